"""Importance criteria: one registry of small named scoring functions (higher score = keep).

A criterion maps a layer to one score per weight (``l1``: |w|, ``l2``: w^2; Han et al. 2015) or per
channel (``bn_gamma``: |BN scale|, Liu et al. 2017 "Network Slimming"; ``bn_variance``: BN running
variance; ``bn_mean_variance``: running E[x^2]). ``filter_scores`` reduces them to one score per
output filter / channel (dim 0): the filter L1 / L2 norm of Li et al. 2017 ("Pruning Filters for
Efficient ConvNets"). Data-driven criteria read statistics of a calibration pass
(``compression.calibration.calibrated``): ``activation`` (mean |activation|), ``apoz`` (1 - APoZ,
Hu et al. 2016 "Network Trimming"), ``taylor`` (|w * dL/dw|, Molchanov et al. 2019 "Importance
Estimation for Neural Network Pruning"); ``random`` is the seeded baseline of ShrinkBench (Blalock
et al. 2020). ``group_l1`` / ``group_l2`` / ``group_taylor`` are Torch-Pruning's dependency-group
importance (Fang et al. 2023 "DepGraph"; ``compression.group_importance``): a filter scored over
every layer its removal touches. Magnitude pruning, slimming and the lottery protocol look criteria up here by name,
so adding one is one registered function (timm's ``@register_model`` shape):

    @register_importance("neg_l1")
    def neg_l1(module):
        return -module.weight.detach().abs()
"""
from __future__ import annotations

from dataclasses import dataclass
from types import SimpleNamespace
from typing import Any, Callable, Mapping
from weakref import WeakKeyDictionary

import torch
from torch import nn

ImportanceFn = Callable[[Any], torch.Tensor]  # layer -> scores shaped like its weight (or one per channel)
GroupFn = Callable[[torch.Tensor], torch.Tensor]  # [out, k] per-weight scores -> [out] filter scores


def group_sum(scores: torch.Tensor) -> torch.Tensor:
    """Filter score = sum of its weights' scores (|w| summed: the filter's L1 norm)."""
    return scores.sum(1)


def group_root_sum(scores: torch.Tensor) -> torch.Tensor:
    """Filter score = sqrt of the summed scores (w^2 summed, rooted: the filter's L2 norm)."""
    return scores.sum(1).sqrt()


@dataclass(frozen=True)
class Criterion:
    """A registered criterion: ``fn`` scores one layer, ``group`` reduces a filter's scores to one,
    ``types`` are the module types it applies to (None: any layer with a ``weight``).

    ``filter_fn``: scores the filters directly (instead of ``group`` over ``fn``); ``per_channel``:
    ``fn`` gives one score per output channel, not per weight (structured pruning only);
    ``needs_data``: reads activation statistics of a calibration pass over training batches
    (``needs_grad``: with a backward pass); ``seeded``: reads seeded random draws;
    ``dependency_group``: scored by Torch-Pruning over the layer's dependency group (needs the whole
    net). Callers wrap the scoring in ``compression.calibration.calibrated`` when ``calibrated`` is true."""

    name: str
    fn: ImportanceFn
    group: GroupFn = group_sum
    types: tuple[type, ...] | None = None
    filter_fn: ImportanceFn | None = None
    per_channel: bool = False
    needs_data: bool = False
    needs_grad: bool = False
    seeded: bool = False
    dependency_group: bool = False

    @property
    def calibrated(self) -> bool:
        """True if the scores come from ``compression.calibration.calibrated`` (data, a seed or the net's graph)."""
        return self.needs_data or self.seeded or self.dependency_group

    def __call__(self, module: Any) -> torch.Tensor:
        return self.fn(module)


IMPORTANCE: dict[str, Criterion] = {}


def register_importance(name: str, *, group: GroupFn = group_sum, types: tuple[type, ...] | None = None,
                        filter_fn: ImportanceFn | None = None, per_channel: bool = False, needs_data: bool = False,
                        needs_grad: bool = False, seeded: bool = False,
                        dependency_group: bool = False) -> Callable[[ImportanceFn], ImportanceFn]:
    """Decorator registering ``fn(module) -> scores`` as the criterion ``name`` (``group``: how a
    filter's scores combine; ``types``: the module types it can score, None = any with a weight;
    the other flags: see ``Criterion``)."""
    def register(fn: ImportanceFn) -> ImportanceFn:
        if name in IMPORTANCE:
            raise ValueError(f"importance criterion '{name}' is already registered ({IMPORTANCE[name].fn})")
        IMPORTANCE[name] = Criterion(name, fn, group, types, filter_fn, per_channel, needs_data or needs_grad,
                                     needs_grad, seeded, dependency_group)
        return fn
    return register


def importance_names() -> list[str]:
    """The registered criterion names, in registration order."""
    return list(IMPORTANCE)


def check_importance(name: Any, key: str = "importance", aliases: Mapping[str, str] | None = None) -> str:
    """The registry name of ``name``; ValueError naming the config ``key`` if unknown. ``aliases``
    maps the older names a config accepted before the registry to registry names."""
    aliases = aliases or {}
    if isinstance(name, str) and name in IMPORTANCE:
        return name
    if isinstance(name, str) and name in aliases:
        return aliases[name]
    older = f"; or the older {', '.join(aliases)} (= {', '.join(aliases.values())})" if aliases else ""
    raise ValueError(f"{key} must be one of {', '.join(importance_names())} (the importance registry in "
                     f"compression/importance.py){older}; got {name!r}")


def get_criterion(name: str, key: str = "importance") -> Criterion:
    """The registered ``Criterion`` named ``name`` (ValueError naming ``key`` if unknown)."""
    return IMPORTANCE[check_importance(name, key)]


def check_weight_criterion(name: Any, key: str) -> str:
    """``check_importance``, and the criterion must score a layer from its own weights alone (no
    calibration pass, seed or BatchNorm): what the sensitivity and prune-until protocols can use."""
    name = check_importance(name, key)
    criterion = IMPORTANCE[name]
    if criterion.calibrated or criterion.types is not None or criterion.per_channel:
        usable = [n for n, c in IMPORTANCE.items() if not (c.calibrated or c.types or c.per_channel)]
        raise ValueError(f"{key}={name!r} is not scored from a layer's own weights (it needs a calibration "
                         f"pass, a seed or BatchNorm layers); use one of {', '.join(usable)}")
    return name


def check_applies(name: str, modules: Mapping[str, nn.Module], key: str = "importance") -> None:
    """ValueError naming ``key`` if criterion ``name`` cannot score one of ``modules`` (checked before training)."""
    criterion = IMPORTANCE[check_importance(name, key)]
    usable = [n for n, c in IMPORTANCE.items() if c.types is None]
    for layer, module in modules.items():
        if criterion.types is not None and not isinstance(module, criterion.types):
            raise ValueError(f"{key}={name!r} scores {'/'.join(t.__name__ for t in criterion.types)} layers, but "
                             f"layer '{layer}' is a {type(module).__name__}; use one of {', '.join(usable)}")
        if criterion.types is None and not isinstance(getattr(module, "weight", None), torch.Tensor):
            raise ValueError(f"{key}={name!r} scores a layer's weight, but layer '{layer}' "
                             f"({type(module).__name__}) has none")


def check_per_weight(name: str, key: str = "importance") -> None:
    """ValueError naming ``key`` if criterion ``name`` scores whole channels (it cannot rank single weights)."""
    if IMPORTANCE[check_importance(name, key)].per_channel:
        per_weight = [n for n, c in IMPORTANCE.items() if not c.per_channel and c.types is None]
        raise ValueError(f"{key}={name!r} scores whole output channels, so it needs granularity=structured; for "
                         f"single weights use one of {', '.join(per_weight)}")


def _layer(module: Any) -> Any:
    """A bare tensor stands for a layer's weight (callers that hold weights, not modules)."""
    return SimpleNamespace(weight=module) if isinstance(module, torch.Tensor) else module


def score(name: str, module: Any) -> torch.Tensor:
    """Per-weight (or, for BN criteria, per-channel) scores of ``module`` (or of a bare weight tensor)."""
    criterion = IMPORTANCE[check_importance(name)]
    try:
        return criterion(_layer(module))
    except AttributeError as error:
        raise TypeError(f"importance '{criterion.name}' cannot score a {type(module).__name__}: {error}") from None


def filter_scores(name: str, module: Any) -> torch.Tensor:
    """One score per output filter / channel (dim 0): the criterion's ``filter_fn``, else the group
    reduction of its scores."""
    criterion = IMPORTANCE[check_importance(name)]
    if criterion.filter_fn is not None:
        return criterion.filter_fn(_layer(module))
    scores = score(name, module)
    return criterion.group(scores.reshape(scores.shape[0], -1))


# ----- statistics of a calibration pass ----------------------------------------------------------
# module -> {statistic name: tensor}, written by compression.calibration.calibrated for the duration
# of its ``with`` block; weak keys, so a dropped network drops its statistics.
CALIBRATION: WeakKeyDictionary = WeakKeyDictionary()


def calibration_stat(module: Any, key: str, name: str) -> torch.Tensor:
    """Statistic ``key`` of ``module`` from the running calibration pass; RuntimeError if none ran."""
    try:
        stats = CALIBRATION.get(module)
    except TypeError:  # not weak-referenceable: a bare weight tensor stands for the layer
        stats = None
    if stats is None or key not in stats:
        raise RuntimeError(f"importance '{name}' reads statistics of a calibration pass, but none ran for this "
                           f"{type(module).__name__}; score it inside compression.calibration.calibrated(...) "
                           "with the module itself (not its weight tensor)")
    return stats[key]


# ----- the criteria ------------------------------------------------------------------------------
_BN = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d, nn.SyncBatchNorm)


@register_importance("l1")
def l1(module: Any) -> torch.Tensor:
    """|w| per weight; a filter's score is its L1 norm."""
    return module.weight.detach().abs()


@register_importance("l2", group=group_root_sum)
def l2(module: Any) -> torch.Tensor:
    """w^2 per weight; a filter's score is its L2 norm."""
    return module.weight.detach().pow(2)


@register_importance("bn_gamma", types=_BN)
def bn_gamma(module: Any) -> torch.Tensor:
    """|gamma| per channel of a BatchNorm (Network Slimming's channel importance)."""
    return module.weight.detach().abs()


@register_importance("bn_variance", types=_BN)
def bn_variance(module: Any) -> torch.Tensor:
    """BN running variance per channel: a channel whose pre-BN activation barely varies carries ~no information."""
    return module.running_var.detach()


@register_importance("bn_mean_variance", types=_BN)
def bn_mean_variance(module: Any) -> torch.Tensor:
    """BN running_var + running_mean^2 per channel: the running E[x^2] of the pre-BN activation, so a channel
    scores low only if it barely varies AND its mean is near 0 (it then carries little signal); a channel
    with a large constant mean is kept, as its constant still reaches the next layer through beta."""
    return (module.running_var + module.running_mean.pow(2)).detach()


# ----- data-driven (need compression.calibration.calibrated) -------------------------------------
@register_importance("activation", per_channel=True, needs_data=True)
def activation(module: Any) -> torch.Tensor:
    """Mean |z| per output channel over the calibration batches (samples and positions); z is the layer's
    output after the BatchNorm that directly follows it (pre-activation), or its own output without one."""
    return calibration_stat(module, "activation", "activation")


@register_importance("apoz", per_channel=True, needs_data=True)
def apoz(module: Any) -> torch.Tensor:
    """1 - APoZ per output channel (Hu et al. 2016): the fraction of non-zero outputs of the ReLU that
    consumes the layer's output (after its BN, if one follows), over samples and positions."""
    return calibration_stat(module, "apoz", "apoz")


def _taylor_filter(module: Any) -> torch.Tensor:
    """|sum_s w_s G_s| per filter: the first-order loss change if the whole filter is removed
    (Molchanov et al. 2019's group criterion, ranked by |.| rather than (.)^2, the same order)."""
    product = calibration_stat(module, "taylor", "taylor")
    return product.reshape(product.shape[0], -1).sum(1).abs()


@register_importance("taylor", filter_fn=_taylor_filter, needs_grad=True)
def taylor(module: Any) -> torch.Tensor:
    """|w * G| per weight, G = the gradient of the loss summed over the calibration batches (each batch's
    mean cross-entropy); on a BatchNorm |gamma * G_gamma + beta * G_beta| per channel (Molchanov et
    al. 2019's gate after BN)."""
    return calibration_stat(module, "taylor", "taylor").abs()


def _random_filter(module: Any) -> torch.Tensor:
    """One uniform draw per filter (so global scope prunes every layer alike, whatever its filter size)."""
    return calibration_stat(module, "random_filter", "random")


@register_importance("random", filter_fn=_random_filter, seeded=True)
def random_scores(module: Any) -> torch.Tensor:
    """Uniform [0, 1) per weight (per channel on BN) from a generator seeded by (seed, layer name): the
    random-pruning baseline of ShrinkBench (Blalock et al. 2020); the same seed gives the same masks."""
    return calibration_stat(module, "random", "random")


# ----- dependency groups, scored by Torch-Pruning (need compression.calibration.calibrated) ---------
def _group_stat(name: str) -> ImportanceFn:
    def fn(module: Any) -> torch.Tensor:
        return calibration_stat(module, "group", name)
    fn.__doc__ = f"{name}: one score per output channel over its dependency group (compression.group_importance)."
    return fn


register_importance("group_l1", per_channel=True, dependency_group=True)(_group_stat("group_l1"))
register_importance("group_l2", per_channel=True, dependency_group=True)(_group_stat("group_l2"))
register_importance("group_taylor", per_channel=True, dependency_group=True, needs_grad=True)(
    _group_stat("group_taylor"))

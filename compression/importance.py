"""Importance criteria: one registry of small named scoring functions (higher score = keep).

A criterion maps a layer to one score per weight (``l1``: |w|, ``l2``: w^2; Han et al. 2015) or per
channel (``bn_gamma``: |BN scale|, Liu et al. 2017 "Network Slimming"; ``bn_variance``: BN running
variance). ``filter_scores`` reduces them to one score per output filter / channel (dim 0): the
filter L1 / L2 norm of Li et al. 2017 ("Pruning Filters for Efficient ConvNets"). Magnitude
pruning, slimming and the lottery protocol look criteria up here by name, so adding one is one
registered function (timm's ``@register_model`` shape):

    @register_importance("taylor")
    def taylor(module):
        return (module.weight * module.weight.grad).detach().abs()
"""
from __future__ import annotations

from dataclasses import dataclass
from types import SimpleNamespace
from typing import Any, Callable, Mapping

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
    ``types`` are the module types it applies to (None: any layer with a ``weight``)."""

    name: str
    fn: ImportanceFn
    group: GroupFn = group_sum
    types: tuple[type, ...] | None = None

    def __call__(self, module: Any) -> torch.Tensor:
        return self.fn(module)


IMPORTANCE: dict[str, Criterion] = {}


def register_importance(name: str, *, group: GroupFn = group_sum, types: tuple[type, ...] | None = None
                        ) -> Callable[[ImportanceFn], ImportanceFn]:
    """Decorator registering ``fn(module) -> scores`` as the criterion ``name`` (``group``: how a
    filter's scores combine; ``types``: the module types it can score, None = any with a weight)."""
    def register(fn: ImportanceFn) -> ImportanceFn:
        if name in IMPORTANCE:
            raise ValueError(f"importance criterion '{name}' is already registered ({IMPORTANCE[name].fn})")
        IMPORTANCE[name] = Criterion(name, fn, group, types)
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
    """One score per output filter / channel (dim 0): the criterion's group reduction of its scores."""
    scores = score(name, module)
    return IMPORTANCE[check_importance(name)].group(scores.reshape(scores.shape[0], -1))


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

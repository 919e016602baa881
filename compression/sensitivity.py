"""Per-layer pruning sensitivity: prune one layer alone at a grid of ratios, evaluate, restore.

Li et al. 2017 ("Pruning Filters for Efficient ConvNets", section 4.1 / figure 2): each layer's
filters are pruned independently (smallest L1 norm first) and the network evaluated without
retraining; layers whose accuracy holds up are pruned harder. The table this module returns
(``{layer: {ratio: acc1}}`` plus the dense acc1) feeds ``compression.budget`` (per-layer ratios
under a FLOPs / parameter budget), as in AMC-style per-layer allocation without the agent.

Pruning is simulated by zeroing on the network itself and restored exactly afterwards:
structured = the layer's output filters (weight rows, bias, and the BatchNorm that normalises
them, so the channel outputs exactly zero, as a physically thinned net would compute);
unstructured = single weights. Which filters / weights go is decided by a criterion of the
``compression.importance`` registry through ``compression.masks`` (the masks magnitude pruning
uses), so the measured curve is the one the fine-tuning run will start from.
"""
from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Iterable, Iterator, Mapping, Sequence

import torch
from torch import nn

from netcompress.compression.importance import check_applies, check_importance
from netcompress.compression.layer_selection import select_layers
from netcompress.compression.masks import check_choice, expand_filter_mask, structured_masks, unstructured_masks
from netcompress.evaluation.evaluate import evaluate
from netcompress.evaluation.metrics import ClassificationMetrics

KINDS = ("structured", "unstructured")


@dataclass
class Sensitivity:
    """The analysis' result.

    ``table[layer][ratio]``: top-1 (sample-averaged, fraction in [0, 1]) with only that layer pruned
    at that ratio; ``units[layer]``: its prunable units (filters if structured, weights if not);
    ``skipped``: selected layers left out, with the reason (structured: filters not removable alone).
    """

    dense_acc1: float
    table: dict[str, dict[float, float]]
    units: dict[str, int]
    kind: str
    ratios: list[float]
    importance: str = "l1"
    skipped: dict[str, str] = field(default_factory=dict)

    def drop(self, layer: str, ratio: float) -> float:
        """Accuracy drop (dense acc1 - acc1) of ``layer`` at a measured ``ratio``."""
        return self.dense_acc1 - self.table[layer][ratio]

    def rows(self) -> list[dict]:
        """One row per (layer, ratio): layer, ratio, pruned units, acc1, drop (for sensitivity.csv)."""
        return [{"layer": layer, "ratio": ratio, "pruned": pruned_units(ratio, self.units[layer], self.kind),
                 "units": self.units[layer], "acc1": acc, "drop": self.dense_acc1 - acc}
                for layer, by_ratio in self.table.items() for ratio, acc in by_ratio.items()]


def check_ratios(ratios: object, key: str = "ratios") -> list[float]:
    """A non-empty increasing list of fractions in (0, 1)."""
    if isinstance(ratios, (str, bytes)) or not isinstance(ratios, Sequence) or not ratios or not all(
            isinstance(r, (int, float)) and not isinstance(r, bool) and 0.0 < r < 1.0 for r in ratios):
        raise ValueError(f"`{key}` must be a non-empty list of fractions in (0, 1) (e.g. [0.1, 0.3, 0.5, 0.7, 0.9]); "
                         f"got {ratios!r}")
    values = [float(r) for r in ratios]
    if values != sorted(set(values)):
        raise ValueError(f"`{key}` must be strictly increasing without repeats; got {ratios!r}")
    return values


def pruned_units(ratio: float, units: int, kind: str) -> int:
    """Units ``compression.masks`` prunes at ``ratio``: round(ratio * n), structured keeps at least one filter."""
    pruned = round(ratio * units)
    return min(pruned, units - 1) if kind == "structured" else pruned


def _units(module: nn.Module, kind: str) -> int:
    return int(module.weight.shape[0]) if kind == "structured" else int(module.weight.numel())


def candidate_layers(net: nn.Module, include: Sequence[str] = ("*",), exclude: Sequence[str] = (),
                     skip_first_last: bool = True, kind: str = "structured",
                     example_input: torch.Tensor | None = None, key: str = "sensitivity"
                     ) -> tuple[dict[str, nn.Module], dict[str, str]]:
    """(layers to analyse, {skipped layer: reason}) selected like magnitude pruning does.

    Unstructured: every selected Conv2d/Linear. Structured: the selected Conv2d layers whose
    filters can be removed alone (``channel_removal.check_removable(exact=True)``); a conv whose
    output channels are tied to another conv (a ResNet's residual stream, a depthwise partner)
    is skipped with the reason, since its filters cannot go without the partner's.
    """
    check_choice(kind, KINDS, f"`{key}.kind`")
    layers = select_layers(net, include, exclude, skip_first_last, key=key)
    if kind == "unstructured":
        return dict(layers), {}
    from netcompress.compression.channel_removal import check_removable, example_input as make_example

    example = make_example(net) if example_input is None else example_input
    chosen, skipped = {}, {}
    for name, module in layers.items():
        if not isinstance(module, nn.Conv2d):
            skipped[name] = f"{type(module).__name__}: structured analysis prunes Conv2d filters only"
            continue
        try:
            check_removable(net, [name], example, key=key, exact=True)
        except ValueError as exc:
            skipped[name] = str(exc).split(": ", 2)[-1]
            continue
        chosen[name] = module
    if not chosen:
        raise ValueError(f"`{key}`: none of the selected layers can lose filters alone ({len(skipped)} skipped, e.g. "
                         f"{next(iter(skipped.items()), ('-', '-'))}); select other layers with include/exclude "
                         "or use kind=unstructured")
    return chosen, skipped


def _norms(net: nn.Module, names: Iterable[str], example: torch.Tensor | None) -> dict[str, str]:
    from netcompress.compression.channel_removal import example_input as make_example
    from netcompress.compression.channel_removal import following_norms

    example = make_example(net) if example is None else example
    return following_norms(net, list(names), example)


@contextmanager
def pruned(net: nn.Module, layer: str, ratio: float, kind: str = "structured", importance: str = "l1",
           norm: str | None = None) -> Iterator[torch.Tensor]:
    """``net`` with only ``layer`` pruned at ``ratio`` (zeroed in place) inside the block; every touched
    tensor is restored bit for bit on exit. Yields the bool keep-mask (per filter or per weight).

    ``norm``: name of the BatchNorm right after ``layer`` (structured), zeroed with its filters.
    """
    modules = dict(net.named_modules())
    module = modules[layer]
    if kind == "structured":
        keep = structured_masks({layer: module}, ratio, scope="layer", importance=importance)[layer]
    else:
        keep = unstructured_masks({layer: module}, ratio, scope="layer", importance=importance)[layer]
    touched = [module.weight]
    if kind == "structured":
        touched += [p for p in (getattr(module, "bias", None),) if p is not None]
        if norm is not None:
            touched += [p for p in (modules[norm].weight, modules[norm].bias) if p is not None]
    saved = [t.detach().clone() for t in touched]
    try:
        with torch.no_grad():
            keep_dev = keep.to(module.weight.device)
            if kind == "structured":
                module.weight.mul_(expand_filter_mask(keep_dev, module.weight).to(module.weight.dtype))
                for t in touched[1:]:
                    t.mul_(keep_dev.to(t.dtype))
            else:
                module.weight.mul_(keep_dev.to(module.weight.dtype))
        yield keep
    finally:
        with torch.no_grad():
            for t, s in zip(touched, saved):
                t.copy_(s)


def top1(net: nn.Module, batches: Iterable, num_classes: int) -> float:
    """Sample-averaged top-1 of ``net`` on ``batches`` (evaluation.evaluate + ClassificationMetrics)."""
    return float(evaluate(net, batches, ClassificationMetrics(num_classes))["acc1"])


def sensitivity_table(net: nn.Module, batches: Iterable, layers: Mapping[str, nn.Module] | Sequence[str],
                      ratios: Sequence[float], kind: str = "structured", importance: str = "l1",
                      num_classes: int | None = None, example_input: torch.Tensor | None = None,
                      skipped: Mapping[str, str] | None = None, progress=None) -> Sensitivity:
    """Top-1 of ``net`` with each of ``layers`` pruned alone at each of ``ratios`` (no retraining).

    Args:
        net: the trained dense network (evaluated in eval mode; its weights are restored exactly).
        batches: ``(inputs, targets)`` batches of the validation split; materialised once and reused.
        layers: names (or {name: module}) of the layers, e.g. from :func:`candidate_layers`.
        ratios: increasing fractions in (0, 1) of each layer's filters (structured) or weights pruned.
        kind: ``structured`` (whole output filters) or ``unstructured`` (single weights).
        importance: a criterion of ``compression.importance`` (``l1``: filter L1 norm / |w|).
        num_classes: logit columns (default: the classifier's ``out_features``).
        progress: optional ``callable(layer, ratio, acc1)`` called after each evaluation.
    """
    check_choice(kind, KINDS, "kind")
    ratios = check_ratios(list(ratios))
    importance = check_importance(importance, "importance")
    modules = dict(net.named_modules())
    names = list(layers)
    missing = [n for n in names if n not in modules]
    if missing:
        raise ValueError(f"sensitivity_table: the model has no layers {missing}")
    check_applies(importance, {n: modules[n] for n in names}, "importance")
    if num_classes is None:
        num_classes = int(net.get_classifier().out_features)
    batches = list(batches)  # the same batches for every evaluation (a loader is read once)
    norms = _norms(net, [n for n in names if isinstance(modules[n], nn.Conv2d)], example_input) \
        if kind == "structured" else {}
    dense = top1(net, batches, num_classes)
    table: dict[str, dict[float, float]] = {}
    for name in names:
        table[name] = {}
        for ratio in ratios:
            with pruned(net, name, ratio, kind, importance, norms.get(name)):
                acc = top1(net, batches, num_classes)
            table[name][ratio] = acc
            if progress is not None:
                progress(name, ratio, acc)
    units = {n: _units(modules[n], kind) for n in names}
    return Sensitivity(dense, table, units, kind, ratios, importance, dict(skipped or {}))


def drop_curve(sens: Sensitivity, layer: str, steps: Sequence[float]) -> list[float]:
    """Accuracy drop at each ratio of ``steps``: piecewise linear between the measured points (ratio 0
    = the dense acc1), made non-decreasing (running maximum), so "the largest ratio whose drop is at
    most t" is well defined. A measured ratio r sits at the fraction really pruned, round(r * n) / n
    (0.9 of 32 filters is 29/32), and ``steps`` must lie within [0, the largest of those]."""
    n = sens.units[layer]
    xs = [0.0] + [pruned_units(r, n, sens.kind) / n for r in sens.table[layer]]
    ys = [0.0] + [sens.dense_acc1 - a for a in sens.table[layer].values()]
    for i in range(1, len(ys)):
        ys[i] = max(ys[i], ys[i - 1])
    out = []
    for r in steps:
        if r > xs[-1] + 1e-12:
            raise ValueError(f"drop_curve: ratio {r} is beyond the largest measured ratio {xs[-1]} of '{layer}'")
        j = next(i for i in range(1, len(xs)) if r <= xs[i] + 1e-12) if r > 0 else 1
        x0, x1, y0, y1 = xs[j - 1], xs[j], ys[j - 1], ys[j]
        out.append(y0 + (y1 - y0) * ((r - x0) / (x1 - x0) if x1 > x0 else 1.0))
    return out


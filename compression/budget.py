"""Per-layer pruning ratios under a FLOPs / parameter / measured-latency budget, from sensitivity curves.

The allocation step of sensitivity-driven pruning (Li et al. 2017, "Pruning Filters for Efficient
ConvNets", section 4.1: prune the insensitive layers harder): given each layer's accuracy-drop
curve (``compression.sensitivity``) and a target fraction of FLOPs, parameters or batch-1 CPU
latency to keep, pick one ratio per layer. Allocators are a registry (``ALLOCATORS``);
``equal_drop`` raises one common accuracy-drop threshold, one filter at a time, and stops at the
first allocation that meets the budget, so every layer ends as far pruned as that threshold allows.

``CostModel`` predicts the budget of a choice from the layer shapes alone (no thinning): a
Conv2d/Linear's FLOPs and weights scale with (kept output filters / all) x (kept input channels /
all), where the input channels are the pruned filters of the layer that feeds it (found with
torch-pruning's dependency graph: convs, a flatten into a Linear, and the BatchNorm whose
gamma/beta go with each filter). FLOPs per layer come from the same counter as
``evaluation.model_stats.count_flops`` (2 per multiply-add; BatchNorm/ReLU/pooling are not
counted there either), so the prediction is exact for plain chains and residual nets whose
pruned convs are not coupled (tests/test_sensitivity.py checks it against a thinned network).
Unstructured: a layer's FLOPs and non-zero weights scale with its density (sparse-kernel FLOPs).
Latency is not modelled but measured (``compression.latency_model``: thin and time each queried
allocation, NetAdapt-style), so the allocator bisects its path instead of testing every step.
"""
from __future__ import annotations

import heapq
import warnings
from dataclasses import dataclass
from typing import TYPE_CHECKING, Callable, Mapping, Sequence

import torch
from torch import nn

from netcompress.compression.sensitivity import KINDS, Sensitivity, drop_curve, pruned_units
from netcompress.evaluation.model_stats import count_flops, count_parameters, layer_flops

if TYPE_CHECKING:
    from netcompress.compression.latency_model import MeasuredLatency

METRICS = ("params", "flops")          # predicted by CostModel
MEASURED = ("latency_ms",)             # measured by compression.latency_model.MeasuredLatency (structured only)
UNSTRUCTURED_STEP = 0.01  # unstructured allocation moves 1% of one layer's weights per step


def check_metric(metric: object, key: str = "budget", kind: str = "structured") -> str:
    """A budget metric: params | flops, or latency_ms (measured; structured pruning only)."""
    if metric not in METRICS + MEASURED:
        raise ValueError(f"`{key}.metric` must be one of {', '.join(METRICS + MEASURED)}; got {metric!r}")
    if metric in MEASURED and kind != "structured":
        raise ValueError(f"`{key}.metric`={metric!r} needs kind=structured: zeroed single weights run through the "
                         "same dense kernels, so unstructured sparsity does not change the measured latency; use "
                         "flops or params (sparse-kernel counts) for unstructured pruning")
    return str(metric)


def check_target(target: object, key: str = "budget") -> float:
    if isinstance(target, bool) or not isinstance(target, (int, float)) or not 0.0 < target <= 1.0:
        raise ValueError(f"`{key}.target` must be the fraction of the dense cost to keep, in (0, 1] (0.5 keeps "
                         f"half); got {target!r}")
    return float(target)


class CostModel:
    """Predicted params / FLOPs of the network with ``pruned[layer]`` units removed from each layer.

    Args:
        net: the dense network.
        layers: the layers that may be pruned (structured: convs whose filters can go alone).
        input_size: (C, H, W) of one image.
        kind: ``structured`` (filters) or ``unstructured`` (single weights).
    """

    def __init__(self, net: nn.Module, layers: Sequence[str], input_size: Sequence[int],
                 kind: str = "structured") -> None:
        if kind not in KINDS:
            raise ValueError(f"kind must be one of {', '.join(KINDS)}; got {kind!r}")
        self.kind = kind
        self.layers = list(layers)
        input_size = tuple(int(s) for s in input_size)
        modules = dict(net.named_modules())
        flops = layer_flops(net, input_size)
        total, nonzero = count_parameters(net)
        self.dense = {"params": total if kind == "structured" else nonzero,
                      "flops": count_flops(net, input_size)}
        self.units = {n: int(modules[n].weight.shape[0] if kind == "structured" else modules[n].weight.numel())
                      for n in self.layers}
        # per Conv2d/Linear touched: (flops, weight params, bias params, in-channels)
        self._terms: dict[str, tuple[int, int, int, int]] = {}
        self._consumers: dict[str, dict[str, float]] = {}  # module -> {producer layer: its input channels per filter}
        self._aux: dict[str, tuple[str, float]] = {}      # norm module -> (producer layer, params per filter)
        for name, module in modules.items():
            if isinstance(module, (nn.Conv2d, nn.Linear)):
                bias = module.bias.numel() if module.bias is not None else 0
                inputs = module.in_channels if isinstance(module, nn.Conv2d) else module.in_features
                self._terms[name] = (flops.get(name, 0), module.weight.numel(), bias, inputs)
        if kind == "structured":
            self._trace(net, modules, input_size)

    def _trace(self, net: nn.Module, modules: dict, input_size: tuple) -> None:
        import torch_pruning as tp

        names = {m: n for n, m in modules.items()}
        was_training = net.training
        net.eval()
        try:
            with warnings.catch_warnings(), torch.enable_grad():
                warnings.simplefilter("ignore")
                example = torch.zeros(1, *input_size, device=next(net.parameters()).device)
                graph = tp.DependencyGraph().build_dependency(net, example_inputs=example, verbose=False)
        finally:
            net.train(was_training)
        for layer in self.layers:
            module, n = modules[layer], self.units[layer]
            pruner = graph.get_pruner_of_module(module)
            group = graph.get_pruning_group(module, pruner.prune_out_channels, list(range(n)))
            for item in group:
                target = item.dep.target.module
                tname = names.get(target)
                if tname is None or target is module:
                    continue
                per_filter = len(item.idxs) / n
                if isinstance(target, (nn.Conv2d, nn.Linear)):
                    if graph.is_out_channel_pruning_fn(item.dep.handler):
                        raise ValueError(f"CostModel: the filters of '{layer}' are tied to the outputs of '{tname}' "
                                         "(a residual or depthwise partner); they cannot be removed alone")
                    self._consumers.setdefault(tname, {})[layer] = per_filter
                else:
                    own = sum(p.numel() for p in target.parameters(recurse=False))
                    channels = getattr(target, "num_features", None) or getattr(target, "num_channels", None)
                    if own and channels:
                        self._aux[tname] = (layer, per_filter * own / channels)

    def removed(self, pruned: Mapping[str, int]) -> dict[str, float]:
        """{params, flops} removed when ``pruned[layer]`` units go from each layer (others: none)."""
        unknown = set(pruned) - set(self.units)
        if unknown:
            raise ValueError(f"CostModel: {sorted(unknown)} are not among its layers {self.layers}")
        params = flops = 0.0
        if self.kind == "unstructured":
            for layer, p in pruned.items():
                params += p
                flops += self._terms[layer][0] * p / self.units[layer]
            return {"params": params, "flops": flops}
        for name, (f, w, b, inputs) in self._terms.items():
            out_frac = pruned.get(name, 0) / self.units[name] if name in self.units else 0.0
            in_frac = sum(pruned.get(p, 0) * per for p, per in self._consumers.get(name, {}).items()) / inputs
            gone = 1.0 - (1.0 - out_frac) * (1.0 - in_frac)
            flops += f * gone
            params += w * gone + b * out_frac
        for producer, per in self._aux.values():
            params += pruned.get(producer, 0) * per
        return {"params": params, "flops": flops}

    def fraction(self, pruned: Mapping[str, int]) -> dict[str, float]:
        """{params, flops} kept, as fractions of the dense network's."""
        gone = self.removed(pruned)
        return {k: 1.0 - gone[k] / self.dense[k] for k in METRICS}

    def predicted(self, pruned: Mapping[str, int]) -> dict[str, float]:
        """{params, flops} kept, absolute (rounded counts)."""
        gone = self.removed(pruned)
        return {k: self.dense[k] - gone[k] for k in METRICS}


@dataclass
class Allocation:
    """Per-layer ratios (``pruned / units`` exactly, so ``compression.masks`` prunes exactly ``pruned``)."""

    ratios: dict[str, float]
    pruned: dict[str, int]
    predicted: dict[str, float]   # {params, flops[, latency_ms]}: fractions of the dense network kept
    threshold: float              # the common accuracy drop reached (equal_drop)
    drops: dict[str, float]       # each layer's predicted drop at its ratio (from its curve)
    metric: str
    target: float
    method: str
    queries: int = 0              # budget evaluations the allocator made (latency: allocations timed)


Fraction = Callable[[Mapping[str, int]], float]  # pruned units per layer -> kept fraction of the budget metric
# (sensitivity, allocation steps per layer, budget fraction, target) -> (pruned per layer, threshold, drop per layer)
Allocator = Callable[[Sensitivity, Mapping[str, list[int]], Fraction, float],
                     tuple[dict[str, int], float, dict[str, float]]]
ALLOCATORS: dict[str, Allocator] = {}


def register_allocator(name: str) -> Callable[[Allocator], Allocator]:
    def register(fn: Allocator) -> Allocator:
        if name in ALLOCATORS:
            raise ValueError(f"allocator '{name}' is already registered")
        ALLOCATORS[name] = fn
        return fn
    return register


def steps_of(units: int, kind: str, max_ratio: float) -> list[int]:
    """The pruned-unit counts an allocator may give a layer of ``units``: 0 up to ``max_ratio`` (the largest
    measured), one filter apart (structured) or 1% of the weights apart (unstructured)."""
    top = pruned_units(max_ratio, units, kind)
    if kind == "structured":
        return list(range(top + 1))
    return sorted({min(top, round(i * UNSTRUCTURED_STEP * units)) for i in range(int(1 / UNSTRUCTURED_STEP) + 1)})


def equal_drop_path(sens: Sensitivity, steps: Mapping[str, list[int]]) -> list[tuple[str, float]]:
    """The equal-drop order of moves: each (layer, drop) advances ``layer`` one step of ``steps``, always the
    layer whose next step costs the least accuracy (ties: layer order), until every layer is at its last."""
    layers = list(steps)
    drops = {layer: drop_curve(sens, layer, [p / sens.units[layer] for p in steps[layer]]) for layer in layers}
    index = {layer: 0 for layer in layers}
    heap = [(drops[layer][1], order, layer) for order, layer in enumerate(layers) if len(steps[layer]) > 1]
    heapq.heapify(heap)
    moves = []
    while heap:
        drop, order, layer = heapq.heappop(heap)
        index[layer] += 1
        moves.append((layer, drop))
        if index[layer] + 1 < len(steps[layer]):
            heapq.heappush(heap, (drops[layer][index[layer] + 1], order, layer))
    return moves


def _after(moves: Sequence[tuple[str, float]], count: int, steps: Mapping[str, list[int]]) -> dict[str, int]:
    """Pruned units per layer after the first ``count`` moves."""
    index = {layer: 0 for layer in steps}
    for layer, _ in moves[:count]:
        index[layer] += 1
    return {layer: steps[layer][i] for layer, i in index.items()}


@register_allocator("equal_drop")
def equal_drop(sens: Sensitivity, steps: Mapping[str, list[int]], fraction: Fraction,
               target: float) -> tuple[dict[str, int], float, dict[str, float]]:
    """Raise one accuracy-drop threshold until the budget is met: each step prunes one more unit
    (filter) of the layer whose next step costs the least accuracy, so all layers stay at the same
    threshold. Returns the first allocation of that path that meets the target (undoing its last
    step would miss it: the target is met within one step, one filter of one layer), found by
    bisection, since pruning more never raises the cost (exact for FLOPs / params; for measured
    latency up to timing noise, with about log2(steps) allocations timed instead of all)."""
    moves = equal_drop_path(sens, steps)
    lo, hi = 0, len(moves)  # fraction(after lo moves) > target; fraction(after hi moves) <= target (checked)
    if fraction(_after(moves, 0, steps)) <= target:
        hi = 0
    while hi - lo > 1:
        mid = (lo + hi) // 2
        if fraction(_after(moves, mid, steps)) <= target:
            hi = mid
        else:
            lo = mid
    pruned = _after(moves, hi, steps)
    threshold = max((drop for _, drop in moves[:hi]), default=0.0)
    drops = {layer: drop_curve(sens, layer, [pruned[layer] / sens.units[layer]])[0] for layer in steps}
    return pruned, threshold, drops


def check_reachable(cost: CostModel, metric: str, target: float, max_ratio: float, key: str = "budget",
                    latency: "MeasuredLatency | None" = None) -> None:
    """ValueError naming ``key.target`` when no allocation (one filter left per layer) or none within the
    measured curves (every layer at ``max_ratio``, the grid's largest) can keep as little as ``target``.
    Needs only the cost model (latency: two timings), so a protocol checks it before the analysis."""
    def kept(pruned: Mapping[str, int]) -> float:
        return latency.fraction(pruned) if metric in MEASURED else cost.fraction(pruned)[metric]

    if metric in MEASURED and latency is None:
        raise ValueError(f"`{key}.metric`={metric!r} is measured: pass a MeasuredLatency (latency=...)")
    floor = {layer: n - 1 for layer, n in cost.units.items()}
    lowest = kept(floor)
    if target < lowest:
        raise ValueError(f"`{key}.target`={target} is below the smallest {metric} fraction any allocation can reach "
                         f"({lowest:.4f}{' measured' if metric in MEASURED else ''}, with one "
                         f"{'filter' if cost.kind == 'structured' else 'weight'} left in each of the {len(floor)} "
                         "analysed layers; the others stay dense); raise the target or analyse more layers "
                         "(include/exclude)")
    top = {layer: steps_of(n, cost.kind, max_ratio)[-1] for layer, n in cost.units.items()}
    measured = kept(top)
    if target < measured:
        raise ValueError(f"`{key}.target`={target} needs more pruning than the measured curves cover ({metric} "
                         f"fraction {measured:.4f} with every layer at the largest ratio {max_ratio}); add "
                         "larger ratios to the sensitivity grid or raise the target")


def allocate(sens: Sensitivity, cost: CostModel, metric: str = "flops", target: float = 0.5,
             method: str = "equal_drop", key: str = "budget", latency: "MeasuredLatency | None" = None
             ) -> Allocation:
    """Per-layer ratios keeping at most ``target`` of the dense ``metric`` (params | flops predicted by
    ``cost``; latency_ms measured by ``latency``), by the allocator ``method`` of ``ALLOCATORS``;
    ValueError naming ``key`` for a bad or unreachable target."""
    metric = check_metric(metric, key, sens.kind)
    target = check_target(target, key)
    if method not in ALLOCATORS:
        raise ValueError(f"`{key}.method` must be one of {', '.join(ALLOCATORS)}; got {method!r}")
    if set(cost.layers) != set(sens.table):
        raise ValueError(f"allocate: the cost model's layers {cost.layers} differ from the analysed {list(sens.table)}")
    if metric in MEASURED and (latency is None or set(latency.layers) != set(cost.layers)):
        raise ValueError(f"`{key}.metric`={metric!r} is measured: pass a MeasuredLatency over the analysed layers")
    check_reachable(cost, metric, target, sens.ratios[-1], key, latency)
    steps = {layer: steps_of(sens.units[layer], sens.kind, sens.ratios[-1]) for layer in cost.layers}
    queries = []

    def fraction(pruned: Mapping[str, int]) -> float:
        queries.append(1)
        return latency.fraction(pruned) if metric in MEASURED else cost.fraction(pruned)[metric]

    pruned, threshold, drops = ALLOCATORS[method](sens, steps, fraction, target)
    predicted = cost.fraction(pruned)
    if metric in MEASURED:
        predicted[metric] = latency.fraction(pruned)
    return Allocation(ratios={layer: pruned[layer] / sens.units[layer] for layer in cost.layers}, pruned=pruned,
                      predicted=predicted, threshold=threshold, drops=drops, metric=metric, target=target,
                      method=method, queries=len(queries))

"""Measured CPU latency of a structured allocation: thin a copy of the net and time it against the dense one.

NetAdapt (Yang et al. 2018, "NetAdapt: Platform-Aware Neural Network Adaptation") budgets per-layer widths
by measured latency rather than a proxy, because latency is neither proportional to FLOPs nor additive
over layers. Each query removes the allocation's filters physically (``channel_removal``, torch-pruning's
dependency graph), choosing them with the same masks magnitude pruning uses, and times the thin and the
dense net interleaved in one window (batch 1, inference mode, this process' thread count); the fraction is
the ratio of the medians. Queries are cached per allocation: the allocator asks about log2(steps) of them.
"""
from __future__ import annotations

import copy
from typing import Mapping, Sequence

import torch
from torch import nn

from netcompress.compression.channel_removal import remove_channels
from netcompress.compression.masks import structured_masks
from netcompress.evaluation.model_stats import eager_runner, interleaved_latency_ms

METRIC = "latency_ms"


class MeasuredLatency:
    """``fraction(pruned)``: median batch-1 CPU latency of the net with ``pruned[layer]`` filters removed
    from each layer, over the dense net's, timed interleaved (``repeats`` rounds after ``warmup``).

    Args:
        net: the dense network (copied; the copy stays on the CPU in eval mode).
        layers: the convs that may lose filters (each removable alone, e.g. from ``candidate_layers``).
        input_size: (C, H, W) of one image.
        importance: the criterion that picks which filters go (as ``callbacks.magnitude_pruning``).
    """

    def __init__(self, net: nn.Module, layers: Sequence[str], input_size: Sequence[int], importance: str = "l1",
                 repeats: int = 30, warmup: int = 5) -> None:
        if repeats < 1 or warmup < 0:
            raise ValueError(f"MeasuredLatency: repeats must be >= 1 and warmup >= 0; got {repeats}, {warmup}")
        self.net = copy.deepcopy(net).cpu().eval()
        self.layers = list(layers)
        self.input_size = tuple(int(s) for s in input_size)
        self.importance = importance
        self.repeats, self.warmup = int(repeats), int(warmup)
        modules = dict(self.net.named_modules())
        self.units = {n: int(modules[n].weight.shape[0]) for n in self.layers}
        self._cache: dict[tuple[int, ...], float] = {}
        self.measurements = 0  # allocations timed (cache misses)

    def thinned(self, pruned: Mapping[str, int]) -> nn.Module:
        """A copy of the net with ``pruned[layer]`` lowest-importance filters of each layer removed."""
        modules = dict(self.net.named_modules())
        keep = {}
        for name in self.layers:
            k = int(pruned.get(name, 0))
            if k:
                keep[name] = structured_masks({name: modules[name]}, k / self.units[name], scope="layer",
                                              importance=self.importance)[name]
        if not keep:
            return copy.deepcopy(self.net)
        return remove_channels(self.net, keep, torch.zeros(1, *self.input_size))

    def fraction(self, pruned: Mapping[str, int]) -> float:
        """Latency of the thinned net / latency of the dense net (medians, timed side by side)."""
        key = tuple(int(pruned.get(n, 0)) for n in self.layers)
        if key not in self._cache:
            self._cache[key] = self.ratio(self.thinned(pruned))
            self.measurements += 1
        return self._cache[key]

    def ratio(self, net: nn.Module) -> float:
        """Latency of ``net`` (e.g. the fine-tuned thin net) / latency of the dense net, timed side by side."""
        times = interleaved_latency_ms({"dense": eager_runner(self.net, self.input_size),
                                        "pruned": eager_runner(net, self.input_size)},
                                       warmup=self.warmup, repeats=self.repeats)
        return times["pruned"] / times["dense"]

"""Dependency-group importance, computed by Torch-Pruning (Fang et al. 2023, "DepGraph: Towards Any
Structural Pruning").

Removing output channel i of a conv removes more than its filter: the BatchNorm channel after it and
the i-th input slice of every layer that consumes it. DepGraph scores the whole group: each member's
per-channel score (L1 / L2 norm, or first-order Taylor |sum w * G| of Molchanov et al. 2019),
reduced over the members by their mean (Torch-Pruning's default ``group_reduction``; no normaliser,
so scores compare across layers for global scope). Torch-Pruning's importance classes compute them
on its dependency graph; this module builds the graph once per scoring and hands one score per
output channel of each selected layer to the registered criteria ``group_l1``, ``group_l2`` and
``group_taylor`` (structured pruning only). ``group_reduction="first"`` would be the layer's own
filter norm, i.e. ``l1`` / ``l2`` / ``taylor`` (tests/test_importance_data.py checks both).
"""
from __future__ import annotations

import warnings
from typing import Callable, Mapping

import torch
import torch_pruning as tp
from torch import nn

SCORERS: dict[str, Callable[[], object]] = {
    "group_l1": lambda: tp.importance.GroupMagnitudeImportance(p=1, group_reduction="mean", normalizer=None),
    "group_l2": lambda: tp.importance.GroupMagnitudeImportance(p=2, group_reduction="mean", normalizer=None),
    "group_taylor": lambda: tp.importance.GroupTaylorImportance(group_reduction="mean", normalizer=None,
                                                                multivariable=True),
}


def group_stats(net: nn.Module, layers: Mapping[str, nn.Module], criterion: str,
                grads: Mapping[torch.Tensor, torch.Tensor] | None = None, example: torch.Tensor | None = None
                ) -> dict[nn.Module, dict[str, torch.Tensor]]:
    """{layer: {"group": one score per output channel}} of ``criterion`` (a key of ``SCORERS``).

    ``example``: an input batch to trace the graph with (default: one zero image of the model's input size).
    ``grads``: G per parameter (``group_taylor``: the summed calibration gradients), placed in ``.grad``
    only while Torch-Pruning reads them; every parameter's own ``.grad`` is restored afterwards.
    """
    from netcompress.compression.channel_removal import example_input

    if criterion not in SCORERS:
        raise ValueError(f"group importance must be one of {', '.join(SCORERS)}; got {criterion!r}")
    if criterion == "group_taylor" and grads is None:
        raise ValueError("group_taylor needs the calibration gradients (compression.calibration.calibrated)")
    names = {m: n for n, m in net.named_modules()}
    was_training = net.training
    net.eval()
    try:
        with warnings.catch_warnings(), torch.inference_mode(False), torch.enable_grad():
            warnings.simplefilter("ignore")  # "unwrapped parameters detected" (layer scales): handled by tp
            example = example_input(net) if example is None else example
            graph = tp.DependencyGraph().build_dependency(net, example_inputs=example, verbose=False)
    finally:
        net.train(was_training)
    scorer = SCORERS[criterion]()
    saved = {p: p.grad for p in (grads or {})}
    out = {}
    try:
        for p, g in (grads or {}).items():
            p.grad = g.to(p.dtype)
        with torch.no_grad():
            for name, module in layers.items():
                pruner = graph.get_pruner_of_module(module)
                if pruner is None:
                    raise ValueError(f"importance={criterion!r}: Torch-Pruning has no channel pruner for layer "
                                     f"'{name}' ({type(module).__name__})")
                n = pruner.get_out_channels(module)
                group = graph.get_pruning_group(module, pruner.prune_out_channels, list(range(n)))
                scores = scorer(group)
                if scores is None or scores.shape != (n,):
                    raise ValueError(f"importance={criterion!r}: Torch-Pruning gave no per-channel scores for layer "
                                     f"'{names.get(module, name)}'; use the layer's own criterion "
                                     f"({criterion.removeprefix('group_')}) instead")
                out[module] = {"group": scores.detach().float()}
    finally:
        for p, g in saved.items():
            p.grad = g
    return out

"""Physical channel removal: cut output channels of named Conv/BN/Linear layers and everything coupled.

Shared by network slimming (Liu et al. 2017, "Learning Efficient Convolutional Networks through
Network Slimming") and structured filter pruning (Li et al. 2017, "Pruning Filters for Efficient
ConvNets"); the Lottery-Ticket code reuses it. Dependencies (the conv before a BN, the next
layer's input channels, residual partners, depthwise convs, concatenations) come from
torch-pruning's dependency graph (Fang et al. 2023, "DepGraph"), so the result is a smaller
plain ``nn.Module`` with real speed, saved and reloaded by ``models.serialization``.

API (three functions):

* ``example_input(net, input_size=None)``: a one-image zero batch for tracing the graph (the
  data's ``input_size``, else the model's own, ``models.factory.model_input_size``).

* ``check_removable(net, layer_names, example_input)``: raise ``ValueError`` naming the first
  layer whose channels cannot be removed safely (attention heads / reshapes, the classifier's
  classes, unknown layer types). Call it before training.
* ``remove_channels(net, keep, example_input) -> nn.Module``: a pruned copy of ``net``.
  ``keep[name]`` is a bool tensor over the layer's output channels (Conv2d ``out_channels``,
  BatchNorm ``num_features``, Linear ``out_features``). Channels coupled across named layers
  (a residual stream, a conv and its BN) are removed only when *every* named layer in the
  coupling group marks them False (nothing a named layer keeps is lost); unnamed coupled
  layers follow. Layers that split channels into equal groups (grouped, not depthwise, convs
  and GroupNorm) lose the same within-group positions in every group, as torch-pruning's own
  pruners do: a position is removed only if it goes in every group (else it is kept in all).
"""
from __future__ import annotations

import copy
import warnings
from typing import Iterable, Mapping

import torch
import torch_pruning as tp
from torch import nn

# Layer types whose output channels a caller may name.
REMOVABLE_TYPES: tuple[type, ...] = (nn.Conv2d, nn.BatchNorm2d, nn.Linear)
# Graph nodes through which channel indices keep their meaning.
# Graph nodes torch-pruning maps channel indices through (flatten/permute reshapes included).
_SAFE_OPS = {tp.ops.OPTYPE.CONV, tp.ops.OPTYPE.BN, tp.ops.OPTYPE.LINEAR, tp.ops.OPTYPE.PRELU,
             tp.ops.OPTYPE.DEPTHWISE_CONV, tp.ops.OPTYPE.CONCAT, tp.ops.OPTYPE.SPLIT,
             tp.ops.OPTYPE.ELEMENTWISE, tp.ops.OPTYPE.LN, tp.ops.OPTYPE.PARAMETER, tp.ops.OPTYPE.GN,
             tp.ops.OPTYPE.IN, tp.ops.OPTYPE.OUTPUT, tp.ops.OPTYPE.RESHAPE}


def example_input(net: nn.Module, input_size: Iterable[int] | None = None) -> torch.Tensor:
    """A one-image zero batch of ``input_size`` (C, H, W; None = the model's own) on ``net``'s device."""
    from netcompress.models.factory import model_input_size

    size = tuple(input_size) if input_size else model_input_size(net)
    return torch.zeros(1, *size, device=next(net.parameters()).device)


def _build_graph(net: nn.Module, example_input: torch.Tensor) -> tp.DependencyGraph:
    was_training = net.training
    net.eval()  # tracing must not update BN running statistics
    try:
        with warnings.catch_warnings(), torch.enable_grad():
            warnings.simplefilter("ignore")  # "unwrapped parameters detected" (layer scales): handled
            graph = tp.DependencyGraph().build_dependency(net, example_inputs=example_input, verbose=False)
    finally:
        net.train(was_training)
    return graph


def _out_channels(module: nn.Module) -> int:
    if isinstance(module, nn.Conv2d):
        return module.out_channels
    if isinstance(module, nn.BatchNorm2d):
        return module.num_features
    return module.out_features


def _classifier_name(net: nn.Module) -> str | None:
    from netcompress.models.factory import first_and_last_layer_names

    return first_and_last_layer_names(net)[1]


def _group(graph: tp.DependencyGraph, module: nn.Module, idxs: list[int]):
    pruner = graph.get_pruner_of_module(module)
    return graph.get_pruning_group(module, pruner.prune_out_channels, idxs)


def _channel_groups(graph: tp.DependencyGraph, item) -> int:
    """Equal channel groups the item's layer splits these channels into (1: none; depthwise: 1, torch-pruning
    keeps those consistent itself)."""
    module = item.dep.target.module
    if isinstance(module, nn.Conv2d) and module.groups == module.out_channels:
        return 1
    pruner = graph.get_pruner_of_module(module)
    if pruner is None:
        return 1
    if graph.is_out_channel_pruning_fn(item.dep.handler):
        return pruner.get_out_channel_groups(module)
    return pruner.get_in_channel_groups(module)


def _layer_channels(graph: tp.DependencyGraph, item) -> int:
    """The item layer's channel count on the side (in or out) this group touches."""
    module = item.dep.target.module
    pruner = graph.get_pruner_of_module(module)
    if graph.is_out_channel_pruning_fn(item.dep.handler):
        return pruner.get_out_channels(module)
    return pruner.get_in_channels(module)


def _grouped_problem(graph: tp.DependencyGraph, item, target: str) -> str | None:
    """Why this grouped layer's channels cannot be kept group-uniform from this coupling group, or None."""
    groups = _channel_groups(graph, item)
    if groups <= 1:
        return None
    total = _layer_channels(graph, item)
    mapped = {idx for idx, root in zip(item.idxs, item.root_idxs) if root is not None}
    if total % groups or len(mapped) != total:
        side = "output" if graph.is_out_channel_pruning_fn(item.dep.handler) else "input"
        return (f"its channels reach the {groups}-group layer '{target}' ({side}), which also takes channels "
                "from elsewhere (e.g. a concatenation), so its groups cannot be kept equal")
    return None


def _align_to_channel_groups(graph: tp.DependencyGraph, group, kept_root: torch.Tensor) -> torch.Tensor:
    """``kept_root`` grown until every grouped layer of ``group`` keeps the same within-group positions in
    each of its groups (a position survives in all groups if any group keeps it)."""
    kept_root = kept_root.clone()
    changed = True
    while changed:  # each pass only adds kept channels, so this ends
        changed = False
        for item in group:
            groups = _channel_groups(graph, item)
            if groups <= 1:
                continue
            size = _layer_channels(graph, item) // groups
            pairs = [(idx, root) for idx, root in zip(item.idxs, item.root_idxs) if root is not None]
            kept_local = torch.zeros(size, dtype=torch.bool)
            for idx, root in pairs:
                kept_local[idx % size] |= bool(kept_root[root])
            for idx, root in pairs:
                if kept_local[idx % size] and not kept_root[root]:
                    kept_root[root] = True
                    changed = True
    return kept_root


def _attention_owner(names: dict, target: str) -> str | None:
    """The enclosing multi-head attention module of layer ``target`` (timm Attention, nn.MultiheadAttention)."""
    modules = {n: m for m, n in names.items()}
    parts = target.split(".")
    for i in range(len(parts), 0, -1):
        prefix = ".".join(parts[:i])
        module = modules.get(prefix)
        if module is not None and (isinstance(module, nn.MultiheadAttention) or hasattr(module, "num_heads")):
            return prefix
    return None


def _problem(graph: tp.DependencyGraph, names: dict, module_name: str, group, classifier: str | None) -> str | None:
    """Why removing this group's channels is unsafe, or None."""
    for item in group:
        node = item.dep.target
        op_type = node.type
        target = names.get(node.module, getattr(node, "name", "?"))
        if op_type not in _SAFE_OPS:
            return f"its channels reach a {op_type.name.lower()} op ('{target}') that has no channel-removal rule"
        owner = _attention_owner(names, target)
        if owner is not None:
            return (f"its channels reach the attention block '{owner}' ('{target}'), whose heads split the "
                    "channels and are not handled")
        if classifier is not None and target == classifier and graph.is_out_channel_pruning_fn(item.dep.handler):
            return f"it is coupled to the classifier '{classifier}' outputs (removing channels would remove classes)"
        why = _grouped_problem(graph, item, target)
        if why:
            return why
    return None


def check_removable(net: nn.Module, layer_names: Iterable[str], example_input: torch.Tensor,
                    key: str = "compression", exact: bool = False) -> None:
    """Raise ValueError naming the first of ``layer_names`` whose output channels cannot be removed.

    ``exact``: also refuse a layer whose output channels are shared with a Conv/Linear that is not
    in ``layer_names`` (a residual partner, a depthwise conv): zeroing only the named filters would
    not zero the channel there, so removing it would change the function.
    """
    modules = dict(net.named_modules())
    layer_names = list(layer_names)
    for name in layer_names:
        if name not in modules:
            raise ValueError(f"{key}: the model has no layer named '{name}'")
        if not isinstance(modules[name], REMOVABLE_TYPES):
            raise ValueError(f"{key}: cannot remove channels of layer '{name}' ({type(modules[name]).__name__}); "
                             f"supported: {', '.join(t.__name__ for t in REMOVABLE_TYPES)}")
    try:
        graph = _build_graph(net, example_input)
    except Exception as exc:  # tracing failed: report it as a config error
        raise ValueError(f"{key}: cannot trace {type(net).__name__} for channel removal ({exc})") from exc
    names = {m: n for n, m in net.named_modules()}
    classifier = _classifier_name(net)
    for name in layer_names:
        module = modules[name]
        if module not in graph.module2node:
            raise ValueError(f"{key}: layer '{name}' is not used in the forward pass; cannot remove its channels")
        group = _group(graph, module, list(range(_out_channels(module))))
        why = _problem(graph, names, name, group, classifier)
        if why is None and exact:
            for item in group:
                other = names.get(item.dep.target.module)
                if (other not in (None, name) and other not in layer_names and graph.is_out_channel_pruning_fn(
                        item.dep.handler) and isinstance(item.dep.target.module, (nn.Conv2d, nn.Linear))):
                    why = (f"its output channels are shared with '{other}' (a residual partner or depthwise conv) "
                           "that is not pruned with it")
                    break
        if why:
            raise ValueError(f"{key}: cannot physically remove output channels of layer '{name}': {why}. "
                             "Exclude it with an exclude pattern, or use unstructured pruning for this model")


def remove_channels(net: nn.Module, keep: Mapping[str, torch.Tensor], example_input: torch.Tensor,
                    inplace: bool = False) -> nn.Module:
    """A copy of ``net`` (or ``net`` itself with ``inplace``) with the False channels of ``keep`` removed."""
    net = net if inplace else copy.deepcopy(net)
    modules = dict(net.named_modules())
    for name, mask in keep.items():
        module = modules.get(name)
        if not isinstance(module, REMOVABLE_TYPES):
            raise ValueError(f"remove_channels: '{name}' is not a Conv2d/BatchNorm2d/Linear layer of the model")
        if mask.dtype != torch.bool or mask.shape != (_out_channels(module),):
            raise ValueError(f"remove_channels: keep['{name}'] must be a bool tensor of shape "
                             f"({_out_channels(module)},); got {mask.dtype} {tuple(mask.shape)}")
    graph = _build_graph(net, example_input.to(next(net.parameters()).device))
    names = {m: n for n, m in modules.items()}
    classifier = _classifier_name(net)
    done: set[str] = set()
    for name in keep:
        if name in done:
            continue
        module = modules[name]
        n = _out_channels(module)
        group = _group(graph, module, list(range(n)))
        why = _problem(graph, names, name, group, classifier)
        if why:
            raise ValueError(f"remove_channels: cannot remove output channels of layer '{name}': {why}")
        kept_root = torch.zeros(n, dtype=torch.bool)
        for item in group:  # a root channel survives if any named member of the group keeps it
            member = names.get(item.dep.target.module)
            if member in keep and graph.is_out_channel_pruning_fn(item.dep.handler):
                mask = keep[member].cpu()
                for idx, root in zip(item.idxs, item.root_idxs):
                    if root is not None and mask[idx]:
                        kept_root[root] = True
                done.add(member)
        kept_root = _align_to_channel_groups(graph, group, kept_root)
        prune = (~kept_root).nonzero().flatten().tolist()
        if prune:
            _group(graph, module, prune).prune()
    return net


def channel_counts(net: nn.Module) -> dict[str, int]:
    """Output channels of every Conv2d/BatchNorm2d/Linear (what a slimmed model reports)."""
    return {n: _out_channels(m) for n, m in net.named_modules() if isinstance(m, REMOVABLE_TYPES)}


def following_norms(net: nn.Module, layer_names: Iterable[str], example_input: torch.Tensor) -> dict[str, str]:
    """{conv name: name of the BatchNorm2d that directly normalises its output} for those that have one.

    Structured pruning zeroes that BN's gamma and beta with the filter, so a masked network
    computes exactly what the physically thinned one computes.
    """
    graph = _build_graph(net, example_input)
    names = {m: n for n, m in net.named_modules()}
    modules = dict(net.named_modules())
    out = {}
    for name in layer_names:
        node = graph.module2node.get(modules[name])
        if node is None:
            continue
        for child in node.outputs:
            if isinstance(child.module, nn.BatchNorm2d) and child.module.num_features == _out_channels(modules[name]):
                out[name] = names[child.module]
                break
    return out

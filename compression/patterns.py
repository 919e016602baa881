"""N:M semi-structured and block sparsity masks.

N:M: keep exactly N of every M consecutive weights along the input dimension, the pattern NVIDIA's
sparse tensor cores run (2:4; Mishra et al. 2021, "Accelerating Sparse Deep Neural Networks", the
ASP library; Zhou et al. 2021, "Learning N:M Fine-grained Structured Sparse Neural Networks From
Scratch"). Block: prune whole ``[bo, bi]`` tiles of the 2-D weight view (Narang et al. 2017,
"Block-Sparse Recurrent Neural Networks"; Gray et al. 2017, block-sparse GPU kernels).

Group order (N:M). A Linear weight ``[out, in]`` is grouped along ``in``: ``w[o, g*M:(g+1)*M]``,
as ``torch.sparse.to_sparse_semi_structured`` expects of the weight's rows. A Conv2d weight
``[out, in, kh, kw]`` is first permuted to channels-last ``[out, kh, kw, in]`` (the implicit-GEMM
layout, K = kh*kw*in with ``in`` fastest, as NVIDIA ASP does): a group is M consecutive input
channels at one ``(out, kh, kw)``. So ``in`` must be divisible by M (no group straddles a kernel
position). ``nm_groups`` returns this ``[groups, M]`` view; every function here uses it.

Scores come from the ``compression.importance`` registry (per weight); within a group the lowest
scores are pruned, ties broken by position (lower index first), previously pruned entries first,
so masks only shrink (as ``compression.masks``). Gradual schedules: at target sparsity ``s`` each
group prunes ``round(s * M)`` weights, so a schedule whose final sparsity is ``1 - N/M`` ends at
exactly ``M - N`` pruned per group. Block score = the sum of its weights' scores; the lowest
blocks are pruned to the target (global or per layer) by ``compression.masks.masks_from_scores``
(exact ``round(s * blocks)``), over the view ``[out, in*kh*kw]`` (PyTorch's own flattening).
"""
from __future__ import annotations

from typing import Any, Mapping, Sequence

import torch

from netcompress.compression.importance import score
from netcompress.compression.masks import check_sparsity, masks_from_scores


# ----- checks ----------------------------------------------------------------------------------------
def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def check_nm_args(n: Any, m: Any, key: str = "") -> tuple[int, int]:
    """(n, m) if ``1 <= n < m``; else ValueError naming ``key``."""
    if not _is_int(m) or m < 2:
        raise ValueError(f"`{key}m` must be an integer >= 2 (the group size, e.g. 4 for 2:4); got {m!r}")
    if not _is_int(n) or not 1 <= n < m:
        raise ValueError(f"`{key}n` must be an integer in [1, m-1] = [1, {m - 1}] (weights kept per group of "
                         f"m={m}, e.g. n=2 for 2:4); got {n!r}")
    return n, m


def check_block(block: Any, key: str = "block") -> tuple[int, int]:
    """(rows, cols) of a block shape given as two positive integers, e.g. [1, 4] or [4, 4]."""
    if isinstance(block, (str, bytes)) or not isinstance(block, Sequence) or len(block) != 2 \
            or not all(_is_int(b) and b >= 1 for b in block):
        raise ValueError(f"`{key}` must be two positive integers [rows, cols] over the weight viewed as "
                         f"[out, in*kh*kw], e.g. [1, 4] or [4, 4]; got {block!r}")
    return int(block[0]), int(block[1])


def _weight(layer: Any) -> torch.Tensor:
    return layer if isinstance(layer, torch.Tensor) else layer.weight


def check_nm_layers(layers: Mapping[str, Any], m: int, key: str) -> None:
    """ValueError naming the first layer whose input dimension is not divisible by ``m``."""
    for name, layer in layers.items():
        shape = tuple(_weight(layer).shape)
        if len(shape) < 2 or shape[1] % m:
            raise ValueError(f"`{key}`: layer '{name}' (weight {list(shape)}) has input dimension "
                             f"{shape[1] if len(shape) > 1 else None}, not divisible by m={m} (N:M groups run "
                             f"along the input channels); exclude it (`{key}.exclude=['{name}']`) or use an m "
                             f"that divides it")


def check_block_layers(layers: Mapping[str, Any], block: tuple[int, int], key: str) -> None:
    """ValueError naming the first layer whose ``[out, in*kh*kw]`` view the block does not tile."""
    for name, layer in layers.items():
        shape = tuple(_weight(layer).shape)
        rows, cols = shape[0], _numel(shape[1:])
        if rows % block[0] or cols % block[1]:
            raise ValueError(f"`{key}.block`={list(block)} does not tile layer '{name}': its weight "
                             f"{list(shape)} viewed as [out, in*kh*kw] = [{rows}, {cols}]; use a block whose "
                             f"sides divide it or exclude it (`{key}.exclude=['{name}']`)")


def _numel(shape: Sequence[int]) -> int:
    total = 1
    for s in shape:
        total *= s
    return total


# ----- N:M -------------------------------------------------------------------------------------------
def _channels_last_shape(shape: Sequence[int]) -> tuple[int, ...]:
    return (shape[0], *shape[2:], shape[1])


def nm_groups(tensor: torch.Tensor, m: int) -> torch.Tensor:
    """``tensor`` (weight-shaped) as ``[groups, m]``: M consecutive input channels per row, in the
    documented order (Linear: along ``in``; Conv: channels-last ``[out, kh, kw, in]``)."""
    if tensor.dim() < 2 or tensor.shape[1] % m:
        raise ValueError(f"N:M needs a weight whose input dimension (dim 1) is divisible by m={m}; "
                         f"got shape {list(tensor.shape)}")
    if tensor.dim() > 2:
        tensor = tensor.permute(0, *range(2, tensor.dim()), 1)  # [out, kh, kw, in]
    return tensor.reshape(-1, m)


def nm_ungroup(groups: torch.Tensor, shape: Sequence[int]) -> torch.Tensor:
    """The inverse of ``nm_groups``: a ``[groups, m]`` tensor back to the weight's ``shape``."""
    out = groups.reshape(_channels_last_shape(shape))
    if len(shape) > 2:
        out = out.permute(0, len(shape) - 1, *range(1, len(shape) - 1))
    return out.contiguous()


def nm_keep(scores: torch.Tensor, n_prune: int, previous: torch.Tensor | None = None) -> torch.Tensor:
    """Bool keep-mask over ``[groups, m]`` scores pruning the ``n_prune`` lowest of each row (previously
    pruned entries first, ties broken by position: a stable sort)."""
    scores = scores.float().clone()
    if previous is not None:
        scores[~previous] = -float("inf")
    order = torch.sort(scores, dim=1, stable=True).indices
    keep = torch.ones_like(scores, dtype=torch.bool)
    keep.scatter_(1, order[:, :n_prune], False)
    return keep


def nm_masks(layers: Mapping[str, Any], sparsity: float, scope: str = "layer", importance: str = "l1",
             previous: Mapping[str, torch.Tensor] | None = None, *, n: int, m: int) -> dict[str, torch.Tensor]:
    """Weight-shaped bool keep-masks pruning ``round(sparsity * m)`` of every group of ``m`` (at most
    ``m - n``; the schedule's final ``1 - n/m`` gives exactly n:m). ``scope`` is unused: N:M is per group."""
    check_sparsity(sparsity, "sparsity")
    k = round(sparsity * m)
    if k > m - n:
        raise ValueError(f"sparsity {sparsity} prunes {k} of every {m} weights, more than m - n = {m - n} of {n}:{m}")
    previous = previous or {}
    out = {}
    for name, layer in layers.items():
        weight = _weight(layer)
        scores = score(importance, layer)
        if scores.shape != weight.shape:
            raise ValueError(f"importance '{importance}' gives scores {list(scores.shape)} for layer '{name}', "
                             f"not one per weight {list(weight.shape)}; N:M needs a per-weight criterion")
        prev = previous.get(name)
        keep = nm_keep(nm_groups(scores, m), k, None if prev is None else nm_groups(prev.bool().to(scores.device), m))
        out[name] = nm_ungroup(keep, weight.shape)
    return out


def check_nm(weight: torch.Tensor, n: int, m: int) -> bool:
    """True if every group of ``m`` consecutive input-dimension weights (documented order) has at most
    ``n`` non-zeros: the pattern ``to_sparse_semi_structured`` (2:4) and sparse tensor cores accept."""
    return bool((nm_groups(weight.detach() != 0, m).sum(1) <= n).all())


# ----- blocks ----------------------------------------------------------------------------------------
def _blocks(tensor: torch.Tensor, block: tuple[int, int]) -> torch.Tensor:
    """``[out, in*kh*kw]`` view split into ``[out/bo, bo, cols/bi, bi]`` tiles."""
    rows = tensor.shape[0]
    flat = tensor.reshape(rows, -1)
    bo, bi = block
    if rows % bo or flat.shape[1] % bi:
        raise ValueError(f"block {list(block)} does not tile a weight viewed as {list(flat.shape)}")
    return flat.reshape(rows // bo, bo, flat.shape[1] // bi, bi)


def block_masks(layers: Mapping[str, Any], sparsity: float, scope: str = "global", importance: str = "l1",
                previous: Mapping[str, torch.Tensor] | None = None, *, block: Sequence[int]
                ) -> dict[str, torch.Tensor]:
    """Weight-shaped bool keep-masks pruning whole blocks: ``round(sparsity * blocks)`` of the lowest
    block scores (sum of the weights' scores), over all layers (global) or in each (layer)."""
    block = check_block(block)
    previous = previous or {}
    weights = {name: _weight(layer) for name, layer in layers.items()}
    scores = {name: _blocks(score(importance, layer), block).sum((1, 3)) for name, layer in layers.items()}
    prev = {name: _blocks(previous[name].bool(), block).all(3).all(1) for name in layers if name in previous}
    keep = masks_from_scores(scores, sparsity, scope, prev or None)
    out = {}
    for name, kept in keep.items():
        full = kept.repeat_interleave(block[0], 0).repeat_interleave(block[1], 1)
        out[name] = full.reshape(weights[name].shape).contiguous()
    return out


"""Magnitude pruning masks: unstructured (single weights) and structured (whole output filters).

Importance comes from the registry in ``compression.importance`` by name: per weight (|w|, w^2, ...)
or per output filter for structured pruning (filter L1/L2 norm, Li et al. 2017, "Pruning Filters
for Efficient ConvNets"). ``masks_from_scores`` turns any scores into masks. Scope is one
global threshold over all selected layers or the same fraction per layer. Sparsity is exact:
``round(sparsity * n)`` entries are pruned, the lowest scores first with ties broken by position,
exactly as ``torch.nn.utils.prune`` does. Already-pruned entries stay pruned (masks only shrink).

Filter counts (structured, scope=layer) follow a documented ``rounding`` rule: ``nearest`` prunes
``round(ratio * n)`` (torch.nn.utils.prune), ``keep_floor`` keeps ``int((1 - ratio) * n)`` as the
authors' L1-norm pruning scripts do (Liu et al. 2019 repo, ``res56prune.py``: 2/4/7 of 16/32/64
filters pruned at ratio 0.1, where ``nearest`` prunes 2/3/6). ``round_to`` then rounds each
layer's kept count down to a multiple (hardware-friendly widths; Torch-Pruning's ``round_to``),
never below one multiple.
"""
from __future__ import annotations

from typing import Any, Mapping

import torch

from netcompress.compression.importance import filter_scores, score

SCOPES = ("global", "layer")
ROUNDINGS = ("nearest", "keep_floor")


def pruned_count(n: int, ratio: float, rounding: str = "nearest") -> int:
    """Entries of ``n`` pruned at ``ratio`` under ``rounding`` (see the module docstring)."""
    check_choice(rounding, ROUNDINGS, "rounding")
    if rounding == "keep_floor":
        return n - int((1.0 - ratio) * n)
    return round(ratio * n)


def check_round_to(value: object, key: str) -> int | None:
    """``round_to`` from config: None (off) or an int >= 1."""
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{key} must be null (no rounding) or an int >= 1 (e.g. 8: kept channels a multiple "
                         f"of 8); got {value!r}")
    return value


def round_kept(keep: torch.Tensor, scores: torch.Tensor, round_to: int | None) -> torch.Tensor:
    """``keep`` (1-D bool) with its kept count rounded down to a multiple of ``round_to`` (at least one
    multiple, at most all): the lowest-scored kept entries go, or the best pruned ones come back."""
    if not round_to or round_to == 1:
        return keep
    n, kept = keep.numel(), int(keep.sum())
    target = min(n, max(round_to, kept - kept % round_to))
    if target == kept:
        return keep
    order = torch.argsort(scores.float(), descending=True, stable=True)
    ranked = torch.cat([order[keep[order]], order[~keep[order]]])  # kept ones (best first), then pruned (best first)
    out = torch.zeros_like(keep)
    out[ranked[:target]] = True
    return out


def check_sparsity(value: float, key: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0.0 <= value < 1.0:
        raise ValueError(f"{key} must be a fraction in [0, 1) (0.9 prunes 90% of the weights); got {value!r}")
    return float(value)


def check_choice(value: str, choices: tuple[str, ...], key: str) -> str:
    if value not in choices:
        raise ValueError(f"{key} must be one of {', '.join(choices)}; got {value!r}")
    return value


def _keep_mask(scores: torch.Tensor, n_prune: int, previous: torch.Tensor | None) -> torch.Tensor:
    """Bool mask keeping all but the ``n_prune`` lowest scores; previously pruned entries go first."""
    scores = scores.float().clone()
    if previous is not None:
        scores[~previous] = -float("inf")
    keep = torch.ones_like(scores, dtype=torch.bool)
    if n_prune > 0:
        keep[torch.topk(scores, k=n_prune, largest=False).indices] = False
    return keep


def masks_from_scores(scores: Mapping[str, torch.Tensor], sparsity: float, scope: str = "global",
                      previous: Mapping[str, torch.Tensor] | None = None, rounding: str = "nearest"
                      ) -> dict[str, torch.Tensor]:
    """Bool keep-masks shaped like ``scores`` pruning the ``round(sparsity * n)`` lowest scores (per layer:
    ``pruned_count(n, sparsity, rounding)``): over all layers at once (scope=global) or in each layer
    (scope=layer); ``previous`` masks only shrink."""
    check_sparsity(sparsity, "sparsity")
    check_choice(scope, SCOPES, "scope")
    check_choice(rounding, ROUNDINGS, "rounding")
    previous = previous or {}
    if scope == "layer":
        return {name: _keep_mask(s.flatten(), pruned_count(s.numel(), sparsity, rounding),
                                 _flat(previous.get(name))).view_as(s)
                for name, s in scores.items()}
    if rounding != "nearest":
        raise ValueError(f"rounding={rounding!r} sets each layer's filter count, so it needs scope=layer "
                         f"(scope=global prunes round(sparsity * n) over all layers at once)")
    names = list(scores)
    flat = torch.cat([scores[n].flatten().float() for n in names])
    prev = None
    if previous:
        prev = torch.cat([_flat(previous.get(n)) if n in previous else torch.ones(scores[n].numel(), dtype=torch.bool,
                                                                                  device=flat.device) for n in names])
    keep = _keep_mask(flat, round(sparsity * flat.numel()), prev)
    out, offset = {}, 0
    for n in names:
        size = scores[n].numel()
        out[n] = keep[offset:offset + size].view_as(scores[n])
        offset += size
    return out


def _flat(mask: torch.Tensor | None) -> torch.Tensor | None:
    return None if mask is None else mask.flatten().bool()


def unstructured_masks(layers: Mapping[str, Any], sparsity: float, scope: str = "global",
                       importance: str = "l1", previous: Mapping[str, torch.Tensor] | None = None
                       ) -> dict[str, torch.Tensor]:
    """Bool keep-masks (weight-shaped) pruning exactly ``round(sparsity * n)`` weights.

    ``layers`` maps names to modules (or to bare weight tensors); ``importance`` names a criterion
    of ``compression.importance``."""
    scores = {n: score(importance, layer) for n, layer in layers.items()}
    return masks_from_scores(scores, sparsity, scope, previous)


def structured_masks(layers: Mapping[str, Any], sparsity: float, scope: str = "layer",
                     importance: str = "l1", previous: Mapping[str, torch.Tensor] | None = None,
                     rounding: str = "nearest", round_to: int | None = None) -> dict[str, torch.Tensor]:
    """Bool keep-masks over output filters (shape ``[out_channels]``), at least one filter kept per layer;
    ``rounding`` sets each layer's count (scope=layer), ``round_to`` rounds kept counts to a multiple."""
    scores = {n: filter_scores(importance, layer) for n, layer in layers.items()}
    masks = masks_from_scores(scores, sparsity, scope, previous, rounding)
    for name, mask in masks.items():
        if not mask.any():  # never empty a layer: keep its strongest filter
            mask[scores[name].argmax()] = True
        masks[name] = round_kept(mask, scores[name], round_to)
    return masks


def expand_filter_mask(mask: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """A per-filter mask broadcast to the weight's shape."""
    return mask.view(-1, *([1] * (weight.dim() - 1))).expand_as(weight)


def sparsity_of(masks: Mapping[str, torch.Tensor]) -> float:
    """Fraction of pruned entries over all masks."""
    total = sum(m.numel() for m in masks.values())
    kept = sum(int(m.sum()) for m in masks.values())
    return 1.0 - kept / total if total else 0.0


def enforce_masks_(params: list[torch.Tensor], masks: list[torch.Tensor],
                   optimizer: torch.optim.Optimizer | None = None) -> None:
    """Zero pruned weights in place, and their optimizer state (momentum, Adam moments), so
    nothing can revive them. ``masks`` are float 0/1 tensors shaped like ``params``.

    One fused ``_foreach_mul_`` per tensor list: no Python loop over elements, no host sync.
    """
    with torch.no_grad():
        torch._foreach_mul_(params, masks)
        if optimizer is None:
            return
        for key in ("momentum_buffer", "exp_avg", "exp_avg_sq"):
            pairs = [(optimizer.state[p][key], m) for p, m in zip(params, masks)
                     if p in optimizer.state and optimizer.state[p].get(key) is not None]
            if pairs:
                torch._foreach_mul_([b for b, _ in pairs], [m for _, m in pairs])

"""Where the retraining of a pruned network starts, and for how long (Frankle & Carbin 2019; Liu et al. 2019).

* rewind: surviving weights reset to their value at step k of the dense run, pruned ones 0;
* reinit: a fresh random init (another seed) under the same mask (LTH's "random reinit",
  Rethinking's "scratch" training), for the same epochs (Scratch-E) or the same compute
  (Scratch-B: epochs x dense FLOPs / pruned FLOPs, optionally capped);
* random_prune: a random mask with each layer's pruned count unchanged (the ShrinkBench baseline);
* finetune: the trained weights themselves, masked.
"""
from __future__ import annotations

import math
from typing import Mapping

import torch
from torch import nn

from netcompress.evaluation.model_stats import count_flops, layer_flops


def masked_state(state: Mapping[str, torch.Tensor], masks: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """``state`` with each masked layer's ``<name>.weight`` multiplied by its keep-mask."""
    out = {k: v.clone() for k, v in state.items()}
    for name, mask in masks.items():
        key = f"{name}.weight"
        if key not in out:
            raise ValueError(f"the mask names layer '{name}' but the weights have no '{key}'")
        out[key] = out[key] * mask.to(out[key].dtype)
    return out


def random_masks_like(masks: Mapping[str, torch.Tensor], seed: int) -> dict[str, torch.Tensor]:
    """Random keep-masks with exactly as many kept weights per layer as ``masks`` (seeded)."""
    generator = torch.Generator().manual_seed(int(seed))
    out = {}
    for name, mask in masks.items():
        keep = int(mask.sum())
        flat = torch.zeros(mask.numel(), dtype=torch.bool)
        flat[torch.randperm(mask.numel(), generator=generator)[:keep]] = True
        out[name] = flat.view_as(mask)
    return out


def scratch_b_budget(budget: int, dense_flops: float, pruned_flops: float, max_factor: float | None = None) -> int:
    """Scratch-B budget (Liu et al. 2019, sec. 4): ``round(budget * dense_flops / pruned_flops)``,
    the factor capped at ``max_factor`` when given (the paper caps ImageNet at 2x). ``budget`` is
    the dense run's length in any unit; the protocol passes optimizer steps, so a short run is not
    rounded to whole epochs (5 epochs x 1.1 would stay 5)."""
    if budget < 1 or dense_flops <= 0 or pruned_flops <= 0:
        raise ValueError(f"Scratch-B needs a budget >= 1 and positive FLOPs; got budget={budget}, "
                         f"dense_flops={dense_flops}, pruned_flops={pruned_flops}")
    factor = dense_flops / pruned_flops
    if max_factor is not None:
        factor = min(factor, float(max_factor))
    return max(1, int(math.floor(budget * factor + 0.5)))


def effective_flops(net: nn.Module, masks: Mapping[str, torch.Tensor] | None, input_size: tuple[int, int, int]) -> int:
    """FLOPs of one forward pass counting only unpruned weights of masked layers (what a sparse
    kernel would do; Rethinking's Scratch-B budget for unstructured pruning)."""
    total = count_flops(net, input_size)
    if not masks:
        return total
    per_layer = layer_flops(net, input_size)
    saved = sum(per_layer[name] * (1.0 - float(mask.float().mean())) for name, mask in masks.items()
                if name in per_layer)
    return int(round(total - saved))

"""The order val/test images are served in: classes interleaved, so any prefix is balanced.

Data sets on disk are sorted by class (CIFAR-10's test split, every ImageFolder tree), so a
limited evaluation (``trainer.limit_test_batches=1``, a quick sanity check) would see one class.
Serving them round-robin over classes (each class's images in a fixed shuffled order, the same
for every seed, so a limited test is the same subset in every run) makes the first k * C images
hold k of each class. The full-set figures do not depend on the order.
"""
from __future__ import annotations

import torch

ORDER_SEED = 0  # fixed: the same evaluation subset for every run and seed


def stratified_order(labels: torch.Tensor, seed: int = ORDER_SEED) -> torch.Tensor:
    """Indices of ``labels`` sorted by (rank within its class, class), ranks drawn by a fixed shuffle."""
    labels = torch.as_tensor(labels, dtype=torch.int64).cpu()
    shuffle = torch.randperm(len(labels), generator=torch.Generator().manual_seed(seed))
    shuffled = labels[shuffle]
    by_class = torch.argsort(shuffled, stable=True)  # shuffled positions grouped by class
    counts = torch.bincount(shuffled)
    starts = torch.cumsum(counts, 0) - counts
    rank = torch.empty_like(shuffled)
    rank[by_class] = torch.arange(len(labels)) - torch.repeat_interleave(starts, counts)
    key = rank * (int(labels.max()) + 1 if len(labels) else 1) + shuffled
    return shuffle[torch.argsort(key, stable=True)]

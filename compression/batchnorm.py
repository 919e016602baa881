"""The BatchNorm layers network slimming works on (Liu et al. 2017: channels ranked by BN gamma).

Shared by the L1-on-gamma training callback (``callbacks/bn_sparsity.py``) and the slimming
callback that removes the channels (``callbacks/slimming.py``).
"""
from __future__ import annotations

from typing import Sequence

from torch import nn

from netcompress.compression.layer_selection import select_layers

BN_TYPES: tuple[type, ...] = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)


def batchnorm_layers(net: nn.Module, include: Sequence[str], exclude: Sequence[str], key: str) -> dict[str, nn.Module]:
    """Affine BatchNorm layers matching the patterns; a clear error if the model has none."""
    if not any(isinstance(m, BN_TYPES) and m.affine for m in net.modules()):
        raise ValueError(f"`{key}`: {type(net).__name__} has no BatchNorm layer with a learnable scale; "
                         "network slimming ranks channels by BN gamma (use a BN model such as vgg19_bn_cifar "
                         "or resnet56_cifar, or magnitude_pruning with granularity=structured)")
    layers = select_layers(net, include, exclude, skip_first_last=False, types=BN_TYPES, key=key)
    return {n: m for n, m in layers.items() if m.affine}

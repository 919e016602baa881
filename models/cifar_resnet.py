"""CIFAR ResNet-20/32/44/56/110 (He et al. 2016, "Deep Residual Learning", section 4.2).

Stem conv3x3(16) + three stages of n = (depth - 2) / 6 BasicBlocks with 16/32/64 channels
(stride 2 at stages 2 and 3) + global average pool + Linear. Two shortcut options:

* ``shortcut="B"`` (default): 1x1 conv + BN projection where the shape changes, as open_lth
  builds the Lottery Ticket ResNets; every layer is a plain module, so torch-pruning can thin
  the residual stream.
* ``shortcut="A"``: He et al.'s parameter-free identity with zero-padded extra channels. Where
  the resolution halves, ``shortcut_pool`` picks how: ``subsample`` (x[:, :, ::2, ::2], the
  default) or ``avg`` (2x2 average pooling, then the zero channels appended after the input's:
  exactly the ``downsample_basic_block`` of the L1-norm pruning code of "Rethinking the Value of
  Network Pruning", Liu et al. 2019, cifar/l1-norm-pruning/models/resnet.py, which the Li et al.
  / Rethinking presets use). One difference is deliberate: that code builds the shortcut from
  ``x.data``, so no gradient flows through the two downsampling shortcuts; here it does (the
  forward pass and every parameter are identical; tests/test_models.py checks both against a
  rewrite of their model).

``inner_channels`` thins the first conv of each block only (Li et al. 2017, "Pruning Filters
for Efficient ConvNets", ResNet-56-A/B), leaving the residual stream intact.
"""
from __future__ import annotations

from typing import Any, Optional, Sequence

import torch
import torch.nn as nn
from timm.models import generate_default_cfgs, register_model

from .factory import build_cifar_model, check_width, cifar_cfg

__all__ = ["CifarResNet", "BasicBlock", "ZeroPadShortcut"]

_SHORTCUTS = ("A", "B")
_SHORTCUT_POOLS = ("subsample", "avg")


class ZeroPadShortcut(nn.Module):
    """Option-A shortcut: stride-s subsample, then append zero channels (out = ratio * in).

    The zeros are built as ``x.mul(0)`` so torch-pruning traces them as a concat of the input
    with itself: pruning input channel k also prunes output channels k, k + in, ..., which keeps
    ``out == ratio * in`` valid after pruning. No channel counts are stored, only the ratio.

    ``quantize_output``: the int8 model quantizes this output (the residual Add reads it), so QAT
    fake-quantizes it here too (``compression/activation_points.py``); without it onnxruntime
    calibrated the concat itself and int8 disagreed with the fake-quant net.
    """

    quantize_output = True

    def __init__(self, stride: int, ratio: int, pool: str = "subsample"):
        super().__init__()
        self.ratio = ratio
        # subsample: AvgPool of kernel 1 = x[:, :, ::s, ::s], kept as a visible module;
        # avg: s x s average pooling (the Rethinking authors' downsample_basic_block)
        kernel = stride if pool == "avg" else 1
        self.pool = nn.AvgPool2d(kernel_size=kernel, stride=stride) if stride > 1 else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.pool(x)
        if self.ratio == 1:
            return x
        return torch.cat([x] + [x.mul(0)] * (self.ratio - 1), dim=1)


class BasicBlock(nn.Module):
    """conv3x3-BN-ReLU-conv3x3-BN + shortcut, then ReLU (He et al. 2016, figure 2)."""

    def __init__(self, in_chs: int, inner_chs: int, out_chs: int, stride: int, shortcut: str,
                 shortcut_pool: str = "subsample"):
        super().__init__()
        self.conv1 = nn.Conv2d(in_chs, inner_chs, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(inner_chs)
        self.act1 = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(inner_chs, out_chs, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(out_chs)
        self.downsample: Optional[nn.Module] = None
        if stride != 1 or in_chs != out_chs:
            if shortcut == "B":
                self.downsample = nn.Sequential(
                    nn.Conv2d(in_chs, out_chs, 1, stride=stride, bias=False), nn.BatchNorm2d(out_chs))
            else:
                self.downsample = ZeroPadShortcut(stride, out_chs // in_chs, shortcut_pool)
        self.act2 = nn.ReLU(inplace=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shortcut = x if self.downsample is None else self.downsample(x)
        out = self.act1(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.act2(out + shortcut)


def _stage_channels(width: Any, stage_channels: Optional[Sequence[int]]) -> tuple:
    if stage_channels is None:
        base = max(1, round(16 * check_width(width)))
        return (base, 2 * base, 4 * base)  # each stage doubles, so option A stays valid at any width
    chs = tuple(stage_channels)
    if len(chs) != 3 or any(isinstance(c, bool) or not isinstance(c, int) or c < 1 for c in chs):
        raise ValueError(f"model.stage_channels must be 3 positive ints (e.g. [16, 32, 64]); got {stage_channels!r}")
    return chs


class CifarResNet(nn.Module):
    """He et al. 2016 CIFAR ResNet with the timm model API.

    Init: Kaiming-normal (fan_out, ReLU) convs as in He et al. / torchvision, BN weight 1 bias 0,
    Linear with PyTorch's default init.
    """

    def __init__(
        self,
        depth: int = 20,
        num_classes: int = 10,
        in_chans: int = 3,
        shortcut: str = "B",
        width: float = 1,
        stage_channels: Optional[Sequence[int]] = None,
        inner_channels: Optional[Sequence[int]] = None,
        global_pool: str = "avg",
        shortcut_pool: str = "subsample",
    ):
        super().__init__()
        if isinstance(depth, bool) or not isinstance(depth, int) or depth < 8 or (depth - 2) % 6:
            raise ValueError(f"model.depth must be 6n + 2 with n >= 1 (20, 32, 44, 56, 110, ...); got {depth!r}")
        if shortcut not in _SHORTCUTS:
            raise ValueError(f"model.shortcut must be one of {', '.join(_SHORTCUTS)}; got {shortcut!r}")
        _check_pool(global_pool)
        if shortcut_pool not in _SHORTCUT_POOLS:
            raise ValueError(f"model.shortcut_pool must be one of {', '.join(_SHORTCUT_POOLS)} (how shortcut A halves "
                             f"the resolution); got {shortcut_pool!r}")
        if shortcut_pool != "subsample" and shortcut != "A":
            raise ValueError(f"model.shortcut_pool={shortcut_pool!r} shapes the parameter-free shortcut A; "
                             f"got model.shortcut={shortcut!r} (set model.shortcut=A or drop shortcut_pool)")
        chs = _stage_channels(width, stage_channels)
        n = (depth - 2) // 6
        if inner_channels is None:
            inner = [c for c in chs for _ in range(n)]
        else:
            inner = list(inner_channels)
            if len(inner) != 3 * n or any(isinstance(c, bool) or not isinstance(c, int) or c < 1 for c in inner):
                raise ValueError(f"model.inner_channels must be {3 * n} positive ints (one per block of "
                                 f"depth {depth}); got {inner_channels!r}")
        if shortcut == "A" and any(b % a for a, b in zip(chs, chs[1:])):
            raise ValueError(f"model.shortcut='A' zero-pads the identity, so each stage's channels must be a "
                             f"multiple of the previous stage's; got model.stage_channels={list(chs)} "
                             f"(use model.shortcut='B' for arbitrary widths)")

        self.num_classes = num_classes
        self.in_chans = in_chans
        self.shortcut = shortcut
        self.conv1 = nn.Conv2d(in_chans, chs[0], 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(chs[0])
        self.act1 = nn.ReLU(inplace=True)
        prev, block_idx = chs[0], 0
        for stage, c in enumerate(chs):
            blocks = []
            for i in range(n):
                stride = 2 if stage > 0 and i == 0 else 1
                blocks.append(BasicBlock(prev, inner[block_idx], c, stride, shortcut, shortcut_pool))
                prev, block_idx = c, block_idx + 1
            self.add_module(f"layer{stage + 1}", nn.Sequential(*blocks))
        self.global_pool = nn.AdaptiveAvgPool2d(1)
        self.flatten = nn.Flatten(1)
        self.fc = nn.Linear(prev, num_classes) if num_classes > 0 else nn.Identity()
        self._init_weights()

    def _init_weights(self) -> None:
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)

    @property
    def num_features(self) -> int:
        """Channels entering the classifier; read from the last BN so it stays right after pruning."""
        return self.layer3[-1].bn2.num_features

    @property
    def head_hidden_size(self) -> int:
        return self.num_features

    def get_classifier(self) -> nn.Module:
        return self.fc

    def reset_classifier(self, num_classes: int, global_pool: Optional[str] = None) -> None:
        if global_pool is not None:
            _check_pool(global_pool)
        self.num_classes = num_classes
        self.fc = nn.Linear(self.num_features, num_classes) if num_classes > 0 else nn.Identity()

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        x = self.act1(self.bn1(self.conv1(x)))
        return self.layer3(self.layer2(self.layer1(x)))

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        x = self.flatten(self.global_pool(x))
        return x if pre_logits else self.fc(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x))


def _check_pool(global_pool: str) -> None:
    if global_pool != "avg":
        raise ValueError(f"model.global_pool must be 'avg' for the CIFAR nets; got {global_pool!r}")


def _create(variant: str, pretrained: bool = False, **kwargs: Any) -> CifarResNet:
    depth = int(variant.split("_")[0][len("resnet"):])
    return build_cifar_model(CifarResNet, variant, pretrained, dict(depth=depth), **kwargs)


default_cfgs = generate_default_cfgs({
    f"resnet{d}_cifar": cifar_cfg("conv1", "fc", pool_size=(8, 8), paper_ids="arXiv:1512.03385")
    for d in (20, 32, 44, 56, 110)
})


@register_model
def resnet20_cifar(pretrained: bool = False, **kwargs: Any) -> CifarResNet:
    """ResNet-20 for CIFAR (n=3): 0.27M params with shortcut A."""
    return _create("resnet20_cifar", pretrained, **kwargs)


@register_model
def resnet32_cifar(pretrained: bool = False, **kwargs: Any) -> CifarResNet:
    """ResNet-32 for CIFAR (n=5)."""
    return _create("resnet32_cifar", pretrained, **kwargs)


@register_model
def resnet44_cifar(pretrained: bool = False, **kwargs: Any) -> CifarResNet:
    """ResNet-44 for CIFAR (n=7)."""
    return _create("resnet44_cifar", pretrained, **kwargs)


@register_model
def resnet56_cifar(pretrained: bool = False, **kwargs: Any) -> CifarResNet:
    """ResNet-56 for CIFAR (n=9), the L1-norm / DepGraph pruning benchmark."""
    return _create("resnet56_cifar", pretrained, **kwargs)


@register_model
def resnet110_cifar(pretrained: bool = False, **kwargs: Any) -> CifarResNet:
    """ResNet-110 for CIFAR (n=18)."""
    return _create("resnet110_cifar", pretrained, **kwargs)

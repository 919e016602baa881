"""CIFAR VGG-11/13/16/19 with BN, the network-slimming layout (Liu et al. 2017, "Learning
Efficient Convolutional Networks through Network Slimming", github.com/Eric-mingjie/network-slimming).

conv3x3(pad 1, no bias)-BN-ReLU stacks with 'M' = MaxPool2d(2), then a global average pool
(the repo's AvgPool2d(2) on the 2x2 map of a 32x32 input; adaptive here so any size works) and
a single Linear. ``cfg`` takes a thinned layer list, e.g. the one a slimming run prints.
"""
from __future__ import annotations

from typing import Any, List, Optional, Sequence, Union

import torch
import torch.nn as nn
from timm.models import generate_default_cfgs, register_model

from .factory import build_cifar_model, check_width, cifar_cfg

__all__ = ["CifarVGG", "VGG_CFGS"]

VGG_CFGS = {
    11: [64, "M", 128, "M", 256, 256, "M", 512, 512, "M", 512, 512],
    13: [64, 64, "M", 128, 128, "M", 256, 256, "M", 512, 512, "M", 512, 512],
    16: [64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512],
    19: [64, 64, "M", 128, 128, "M", 256, 256, 256, 256, "M", 512, 512, 512, 512, "M", 512, 512, 512, 512],
}


def _scaled_cfg(cfg: Sequence[Union[int, str]], width: Any) -> List[Union[int, str]]:
    w = check_width(width)
    # any Sequence: Hydra passes an omegaconf ListConfig
    ok = isinstance(cfg, Sequence) and not isinstance(cfg, str) and any(not isinstance(v, str) for v in cfg) and all(
        v == "M" or (isinstance(v, int) and not isinstance(v, bool) and v > 0) for v in cfg)
    if not ok:
        raise ValueError(f"model.cfg must be a list of positive ints (conv channels) and 'M' (max-pool) "
                         f"with at least one conv, e.g. [64, 'M', 128]; got {cfg!r}")
    return [v if v == "M" else max(1, round(v * w)) for v in cfg]


class CifarVGG(nn.Module):
    """Slimming-repo VGG with the timm model API.

    Init as in the slimming repo: convs normal(0, sqrt(2 / (k*k*out))) (= Kaiming fan_out),
    BN weight 0.5 bias 0, Linear normal(0, 0.01) bias 0.
    """

    def __init__(
        self,
        cfg: Sequence[Union[int, str]] = tuple(VGG_CFGS[19]),
        num_classes: int = 10,
        in_chans: int = 3,
        width: float = 1,
        global_pool: str = "avg",
    ):
        super().__init__()
        if global_pool != "avg":
            raise ValueError(f"model.global_pool must be 'avg' for the CIFAR nets; got {global_pool!r}")
        layers: List[nn.Module] = []
        prev = in_chans
        for v in _scaled_cfg(cfg, width):
            if v == "M":
                layers.append(nn.MaxPool2d(kernel_size=2, stride=2))
            else:
                layers += [nn.Conv2d(prev, v, 3, padding=1, bias=False), nn.BatchNorm2d(v), nn.ReLU(inplace=True)]
                prev = v
        self.num_classes = num_classes
        self.in_chans = in_chans
        self.features = nn.Sequential(*layers)
        self.global_pool = nn.AdaptiveAvgPool2d(1)
        self.flatten = nn.Flatten(1)
        self.fc = nn.Linear(prev, num_classes) if num_classes > 0 else nn.Identity()
        self._init_weights()

    def _init_weights(self) -> None:
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.constant_(m.weight, 0.5)
                nn.init.zeros_(m.bias)
            elif isinstance(m, nn.Linear):
                nn.init.normal_(m.weight, 0, 0.01)
                nn.init.zeros_(m.bias)

    @property
    def num_features(self) -> int:
        """Channels entering the classifier; read from the last BN so it stays right after pruning."""
        return [m for m in self.features if isinstance(m, nn.BatchNorm2d)][-1].num_features

    @property
    def head_hidden_size(self) -> int:
        return self.num_features

    def get_classifier(self) -> nn.Module:
        return self.fc

    def reset_classifier(self, num_classes: int, global_pool: Optional[str] = None) -> None:
        if global_pool not in (None, "avg"):
            raise ValueError(f"model.global_pool must be 'avg' for the CIFAR nets; got {global_pool!r}")
        self.num_classes = num_classes
        self.fc = nn.Linear(self.num_features, num_classes) if num_classes > 0 else nn.Identity()

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        return self.features(x)

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        x = self.flatten(self.global_pool(x))
        return x if pre_logits else self.fc(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x))


def _create(variant: str, pretrained: bool = False, **kwargs: Any) -> CifarVGG:
    depth = int(variant.split("_")[0][len("vgg"):])
    return build_cifar_model(CifarVGG, variant, pretrained, dict(cfg=list(VGG_CFGS[depth])), **kwargs)


default_cfgs = generate_default_cfgs({
    f"vgg{d}_bn_cifar": cifar_cfg("features.0", "fc", pool_size=(2, 2), paper_ids="arXiv:1708.06519")
    for d in VGG_CFGS
})


@register_model
def vgg11_bn_cifar(pretrained: bool = False, **kwargs: Any) -> CifarVGG:
    """VGG-11-BN for CIFAR, slimming layout."""
    return _create("vgg11_bn_cifar", pretrained, **kwargs)


@register_model
def vgg13_bn_cifar(pretrained: bool = False, **kwargs: Any) -> CifarVGG:
    """VGG-13-BN for CIFAR, slimming layout."""
    return _create("vgg13_bn_cifar", pretrained, **kwargs)


@register_model
def vgg16_bn_cifar(pretrained: bool = False, **kwargs: Any) -> CifarVGG:
    """VGG-16-BN for CIFAR, slimming layout."""
    return _create("vgg16_bn_cifar", pretrained, **kwargs)


@register_model
def vgg19_bn_cifar(pretrained: bool = False, **kwargs: Any) -> CifarVGG:
    """VGG-19-BN for CIFAR, slimming layout (20.04M params for 10 classes)."""
    return _create("vgg19_bn_cifar", pretrained, **kwargs)

"""Conv-2/4/6 for CIFAR-10 (Frankle & Carbin 2019, "The Lottery Ticket Hypothesis", table 1).

Pairs of conv3x3(pad 1)-ReLU with 64,64 | 128,128 | 256,256 filters, each pair followed by
MaxPool2d(2) (Conv-2: one pair, Conv-4: two, Conv-6: three), then FC 256-ReLU-256-ReLU-classes.
No BN. The flattened conv map fixes the input size (32x32 by default, ``img_size`` to change).
"""
from __future__ import annotations

from typing import Any, List, Optional, Sequence, Union

import torch
import torch.nn as nn
from timm.models import generate_default_cfgs, register_model

from .factory import build_cifar_model, check_width, cifar_cfg

__all__ = ["LTHConv"]

_PAIR_CHANNELS = (64, 128, 256)
_FC_WIDTH = 256


def _img_hw(img_size: Union[int, Sequence[int]], pairs: int) -> tuple:
    hw = (img_size, img_size) if isinstance(img_size, int) else tuple(img_size)
    if len(hw) != 2 or any(isinstance(s, bool) or not isinstance(s, int) or s < 2 ** pairs for s in hw):
        raise ValueError(f"model.img_size must be an int or (H, W) of ints >= {2 ** pairs} "
                         f"({pairs} max-pools); got {img_size!r}")
    return hw


class LTHConv(nn.Module):
    """Frankle & Carbin's Conv-2/4/6 with the timm model API.

    ``width`` scales every hidden layer (conv filters and the two 256-unit FC layers).
    Init: Glorot (Xavier) normal weights and zero biases, the paper's Gaussian Glorot init.
    """

    def __init__(
        self,
        pairs: int = 2,
        num_classes: int = 10,
        in_chans: int = 3,
        width: float = 1,
        img_size: Union[int, Sequence[int]] = 32,
    ):
        super().__init__()
        if pairs not in (1, 2, 3):
            raise ValueError(f"model.pairs must be one of 1, 2, 3 (Conv-2/4/6); got {pairs!r}")
        w = check_width(width)
        h, wd = _img_hw(img_size, pairs)
        layers: List[nn.Module] = []
        prev = in_chans
        for c in _PAIR_CHANNELS[:pairs]:
            c = max(1, round(c * w))
            layers += [nn.Conv2d(prev, c, 3, padding=1), nn.ReLU(inplace=True),
                       nn.Conv2d(c, c, 3, padding=1), nn.ReLU(inplace=True), nn.MaxPool2d(2)]
            prev = c
        fc_width = max(1, round(_FC_WIDTH * w))
        self.num_classes = num_classes
        self.in_chans = in_chans
        self.features = nn.Sequential(*layers)
        self.flatten = nn.Flatten(1)
        self.fc1 = nn.Linear(prev * (h >> pairs) * (wd >> pairs), fc_width)
        self.act_fc1 = nn.ReLU(inplace=True)
        self.fc2 = nn.Linear(fc_width, fc_width)
        self.act_fc2 = nn.ReLU(inplace=True)
        self.fc = nn.Linear(fc_width, num_classes) if num_classes > 0 else nn.Identity()
        self._init_weights()

    def _init_weights(self) -> None:
        for m in self.modules():
            if isinstance(m, (nn.Conv2d, nn.Linear)):
                nn.init.xavier_normal_(m.weight)
                nn.init.zeros_(m.bias)

    @property
    def num_features(self) -> int:
        """Channels of the forward_features map; read from the last conv so pruning keeps it right."""
        return [m for m in self.features if isinstance(m, nn.Conv2d)][-1].out_channels

    @property
    def head_hidden_size(self) -> int:
        """Width of the pre-logits features (the second FC layer)."""
        return self.fc2.out_features

    def get_classifier(self) -> nn.Module:
        return self.fc

    def reset_classifier(self, num_classes: int, global_pool: Optional[str] = None) -> None:
        if global_pool not in (None, ""):
            raise ValueError(f"model.global_pool must be '' (Conv-2/4/6 flatten, no pooling); got {global_pool!r}")
        self.num_classes = num_classes
        self.fc = nn.Linear(self.head_hidden_size, num_classes) if num_classes > 0 else nn.Identity()

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        return self.features(x)

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        x = self.act_fc1(self.fc1(self.flatten(x)))
        x = self.act_fc2(self.fc2(x))
        return x if pre_logits else self.fc(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x))


def _create(variant: str, pretrained: bool = False, **kwargs: Any) -> LTHConv:
    pairs = int(variant[len("conv"):].split("_")[0]) // 2
    return build_cifar_model(LTHConv, variant, pretrained, dict(pairs=pairs), **kwargs)


default_cfgs = generate_default_cfgs({
    f"conv{2 * p}_lth": cifar_cfg("features.0", "fc", fixed_input_size=True, paper_ids="arXiv:1803.03635")
    for p in (1, 2, 3)
})


@register_model
def conv2_lth(pretrained: bool = False, **kwargs: Any) -> LTHConv:
    """Conv-2 (Frankle & Carbin 2019): 64,64,pool | FC 256,256,10."""
    return _create("conv2_lth", pretrained, **kwargs)


@register_model
def conv4_lth(pretrained: bool = False, **kwargs: Any) -> LTHConv:
    """Conv-4 (Frankle & Carbin 2019): 64,64,pool,128,128,pool | FC 256,256,10."""
    return _create("conv4_lth", pretrained, **kwargs)


@register_model
def conv6_lth(pretrained: bool = False, **kwargs: Any) -> LTHConv:
    """Conv-6 (Frankle & Carbin 2019): 64,64,pool,128,128,pool,256,256,pool | FC 256,256,10."""
    return _create("conv6_lth", pretrained, **kwargs)

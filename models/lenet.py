"""LeNet-300-100 (LeCun et al. 1998), the fully connected net of Deep Compression's first experiment
(Han et al. 2016, table 1: 266K weights on MNIST, 40x smaller after prune -> cluster -> Huffman).

Flatten -> Linear(in, 300) -> ReLU -> Linear(300, 100) -> ReLU -> Linear(100, classes). The input
is whatever image the data gives (3x32x32 CIFAR-10: 3072 inputs, 953K weights; MNIST is not in
this tree), so ``img_size``/``in_chans`` set the first layer's width.
"""
from __future__ import annotations

from typing import Any, Optional, Sequence, Union

import torch
import torch.nn as nn
from timm.models import generate_default_cfgs, register_model

from .factory import build_cifar_model, cifar_cfg

__all__ = ["LeNet300100"]


class LeNet300100(nn.Module):
    """LeNet-300-100 with the timm model API (``fc1`` is the first layer, ``fc`` the classifier)."""

    def __init__(self, num_classes: int = 10, in_chans: int = 3, img_size: Union[int, Sequence[int]] = 32,
                 hidden: Sequence[int] = (300, 100)) -> None:
        super().__init__()
        hw = (img_size, img_size) if isinstance(img_size, int) else tuple(img_size)
        if len(hw) != 2 or any(isinstance(s, bool) or not isinstance(s, int) or s < 1 for s in hw):
            raise ValueError(f"model.img_size must be a positive int or (H, W); got {img_size!r}")
        if len(hidden) != 2 or any(isinstance(h, bool) or not isinstance(h, int) or h < 1 for h in hidden):
            raise ValueError(f"model.hidden must be two positive ints like [300, 100]; got {hidden!r}")
        self.num_classes = num_classes
        self.in_chans = in_chans
        self.flatten = nn.Flatten(1)
        self.fc1 = nn.Linear(in_chans * hw[0] * hw[1], hidden[0])
        self.act1 = nn.ReLU(inplace=True)
        self.fc2 = nn.Linear(hidden[0], hidden[1])
        self.act2 = nn.ReLU(inplace=True)
        self.fc = nn.Linear(hidden[1], num_classes) if num_classes > 0 else nn.Identity()

    @property
    def num_features(self) -> int:
        return self.fc2.out_features

    @property
    def head_hidden_size(self) -> int:
        return self.fc2.out_features

    def get_classifier(self) -> nn.Module:
        return self.fc

    def reset_classifier(self, num_classes: int, global_pool: Optional[str] = None) -> None:
        self.num_classes = num_classes
        self.fc = nn.Linear(self.num_features, num_classes) if num_classes > 0 else nn.Identity()

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        return self.act2(self.fc2(self.act1(self.fc1(self.flatten(x)))))

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        return x if pre_logits else self.fc(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x))


default_cfgs = generate_default_cfgs({
    "lenet300_100": cifar_cfg("fc1", "fc", fixed_input_size=True, paper_ids="arXiv:1510.00149"),
})


@register_model
def lenet300_100(pretrained: bool = False, **kwargs: Any) -> LeNet300100:
    """LeNet-300-100 (Deep Compression's LeNet-300-100, here on 3x32x32 inputs by default)."""
    return build_cifar_model(LeNet300100, "lenet300_100", pretrained, {}, **kwargs)

"""Keep a given set of weights at zero for the whole fit: retraining a pruned network.

Lottery-ticket retraining (Frankle & Carbin 2019) and the Rethinking baselines (Liu et al.
2019) train a network whose pruning mask is fixed in advance. The mask is applied once before
training and again after every optimizer step with ``compression.masks.enforce_masks_`` (weights
and their momentum / Adam moments, one fused multiply), so weight decay and momentum cannot
revive a pruned weight.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Mapping

import pytorch_lightning as pl
import torch

from netcompress.compression.masks import enforce_masks_


def check_masks(masks: Any, key: str) -> dict[str, torch.Tensor]:
    """``{layer name: 0/1 tensor}`` as bool tensors; anything else raises naming ``key``."""
    if not isinstance(masks, Mapping) or not masks:
        raise ValueError(f"{key} must be a non-empty mapping of layer name -> 0/1 mask tensor; got {type(masks).__name__}")
    out = {}
    for name, mask in masks.items():
        if not isinstance(mask, torch.Tensor):
            raise TypeError(f"{key}['{name}'] must be a tensor; got {type(mask).__name__}")
        if mask.dtype != torch.bool and not bool(((mask == 0) | (mask == 1)).all()):
            raise ValueError(f"{key}['{name}'] must hold only 0 and 1 (a keep-mask); got other values")
        out[str(name)] = mask.detach().bool().cpu()
    return out


def load_masks(path: str | os.PathLike, key: str) -> dict[str, torch.Tensor]:
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{key}={str(path)!r} does not exist; point it at a mask.pt written by the "
                                "lottery protocol (a dict of layer name -> bool tensor)")
    return check_masks(torch.load(path, map_location="cpu", weights_only=True), key)


class FixedMask(pl.Callback):
    """Zero the weights outside ``masks`` before training and after every optimizer step.

    Args:
        masks: ``{layer name: keep-mask shaped like the layer's weight}`` (bool or 0/1 floats).
        path: or a ``torch.save``d file of such a dict (``mask.pt`` of a lottery stage).
        key: the name used in error messages and to tell several instances apart.
    """

    def __init__(self, masks: Mapping[str, torch.Tensor] | None = None, path: str | os.PathLike | None = None,
                 key: str = "fixed_mask") -> None:
        super().__init__()
        if not isinstance(key, str) or not key:
            raise ValueError(f"`key` must be a non-empty string; got {key!r}")
        self.key = key
        if (masks is None) == (path is None):
            raise ValueError(f"{key}: give exactly one of `masks` or `path`")
        self.masks = check_masks(masks, f"{key}.masks") if masks is not None else load_masks(path, f"{key}.path")
        self._params: list[torch.Tensor] = []
        self._float_masks: list[torch.Tensor] = []

    @property
    def state_key(self) -> str:
        return f"FixedMask[{self.key}]"

    def _bind(self, pl_module: pl.LightningModule) -> None:
        """Find each masked weight in ``module.net`` and make float 0/1 masks in its device and layout."""
        modules = dict(pl_module.net.named_modules())
        self._params, self._float_masks = [], []
        for name, mask in self.masks.items():
            module = modules.get(name)
            weight = getattr(module, "weight", None) if module is not None else None
            if weight is None:
                raise ValueError(f"{self.key}: the network has no layer '{name}' with a weight; masked layers "
                                 f"must be module names of module.net (e.g. {', '.join(list(modules)[1:4])})")
            if tuple(weight.shape) != tuple(mask.shape):
                raise ValueError(f"{self.key}: mask of '{name}' has shape {tuple(mask.shape)} but the weight has "
                                 f"{tuple(weight.shape)}; was the mask made for another model or width?")
            self._params.append(weight)
            self._float_masks.append(torch.empty_like(weight).copy_(mask.to(weight.device)))

    def apply(self, pl_module: pl.LightningModule, optimizer: torch.optim.Optimizer | None = None) -> None:
        enforce_masks_(self._params, self._float_masks, optimizer)

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        self._bind(pl_module)
        self.apply(pl_module)

    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._bind(pl_module)  # after a resume restored weights (and possibly other masks)
        self.apply(pl_module)

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        optimizers = trainer.optimizers
        self.apply(pl_module, optimizers[0] if optimizers else None)

    def sparsity(self) -> float:
        total = sum(m.numel() for m in self.masks.values())
        return 1.0 - sum(int(m.sum()) for m in self.masks.values()) / total

    def state_dict(self) -> dict[str, Any]:
        return {"masks": {k: v.clone() for k, v in self.masks.items()}}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.masks = check_masks(state_dict["masks"], f"{self.key} (checkpoint)")  # applied in on_fit_start

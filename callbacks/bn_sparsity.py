"""L1 sparsity on BatchNorm scale factors: the training half of network slimming.

Liu et al. 2017, "Learning Efficient Convolutional Networks through Network Slimming", eq. 1:
the loss gets ``lambda * sum |gamma|``, applied as its subgradient ``lambda * sign(gamma)`` added
to every selected BatchNorm weight's gradient after backward (the authors' ``updateBN``). The
paper uses lambda = 1e-4 for VGG and 1e-5 for ResNet / DenseNet on CIFAR.

Hot path: one fused ``_foreach_add_`` of ``lambda * sign(gamma)`` per step, no host sync. The
list of BN weights is rebuilt when the network is replaced (after slimming).
"""
from __future__ import annotations

from typing import Sequence

import pytorch_lightning as pl
import torch
from torch import nn

from netcompress.compression.batchnorm import batchnorm_layers
from netcompress.lightning_modules.contract import require_contract

KEY = "callbacks.bn_sparsity"


class BNSparsity(pl.Callback):
    """Add ``lam * sign(gamma)`` to the gradient of every selected BN weight (L1 on gamma).

    Args:
        lam: the L1 strength lambda (>= 0): 1e-4 for VGG, 1e-5 for ResNet (Liu et al. 2017).
        include/exclude: module-name patterns of the BatchNorm layers to sparsify.
        until_epoch: stop the penalty from this epoch on (e.g. the slimming epoch, so fine-tuning
            runs without it, as in the paper); null = the whole run.
        log_histogram: log the |gamma| histogram to wandb/TensorBoard at each epoch end.
    """

    CAPABILITIES = frozenset({"single"})  # rules: pipeline/combinations.py

    def __init__(self, lam: float = 1e-4, include: Sequence[str] = ("*",), exclude: Sequence[str] = (),
                 until_epoch: int | None = None, log_histogram: bool = True) -> None:
        super().__init__()
        if isinstance(lam, bool) or not isinstance(lam, (int, float)) or not 0.0 <= lam < 1.0:
            raise ValueError(f"`{KEY}.lam` must be a float in [0, 1) (1e-4 VGG, 1e-5 ResNet); got {lam!r}")
        if isinstance(include, str) or isinstance(exclude, str):
            raise TypeError(f"`{KEY}.include`/`exclude` must be lists of patterns; got {include!r} / {exclude!r}")
        if until_epoch is not None and (isinstance(until_epoch, bool) or not isinstance(until_epoch, int)
                                        or until_epoch < 1):
            raise ValueError(f"`{KEY}.until_epoch` must be null or an int >= 1; got {until_epoch!r}")
        self.lam = float(lam)
        self.include, self.exclude = list(include), list(exclude)
        self.until_epoch = until_epoch
        self.log_histogram = bool(log_histogram)
        self._net: nn.Module | None = None
        self._gammas: list[torch.Tensor] = []

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        require_contract(pl_module, type(self).__name__, ('net',))
        if stage == "fit":
            self._collect(pl_module.net)  # a model without BN fails here, before training

    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        # Again after a resume: restoring a slimmed checkpoint resizes the net in place (same module
        # object, new gamma Parameters), so the tensors found in setup would get no penalty.
        self._collect(pl_module.net)

    def _collect(self, net: nn.Module) -> None:
        self._net = net
        self._gammas = [m.weight for m in batchnorm_layers(net, self.include, self.exclude, KEY).values()]

    def _active(self, trainer: pl.Trainer) -> bool:
        return self.lam > 0 and (self.until_epoch is None or trainer.current_epoch < self.until_epoch)

    def on_before_optimizer_step(self, trainer: pl.Trainer, pl_module: pl.LightningModule, optimizer) -> None:
        if not self._active(trainer):
            return
        if pl_module.net is not self._net:  # the network was slimmed: new BN tensors
            self._collect(pl_module.net)
        pairs = [(g.grad, g) for g in self._gammas if g.grad is not None]
        if pairs:
            with torch.no_grad():
                grads = [gr for gr, _ in pairs]
                torch._foreach_add_(grads, torch._foreach_sign([g for _, g in pairs]), alpha=self.lam)

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if pl_module.net is not self._net:
            self._collect(pl_module.net)
        gammas = torch.cat([g.detach().abs().flatten().float() for g in self._gammas])
        pl_module.log_dict({"compress/bn_gamma_mean": gammas.mean(),
                            "compress/bn_gamma_below_1e-2": (gammas < 1e-2).float().mean()},
                           on_step=False, on_epoch=True)
        if self.log_histogram:
            self._histogram(trainer, gammas.cpu())

    @staticmethod
    def _histogram(trainer: pl.Trainer, gammas: torch.Tensor) -> None:
        for logger in trainer.loggers:
            kind = type(logger).__name__
            if kind == "WandbLogger":
                import wandb

                logger.experiment.log({"compress/bn_gamma_hist": wandb.Histogram(gammas.numpy()),
                                       "trainer/global_step": trainer.global_step})
            elif kind == "TensorBoardLogger":
                logger.experiment.add_histogram("compress/bn_gamma_hist", gammas, trainer.global_step)

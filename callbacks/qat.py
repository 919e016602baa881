"""Quantization-aware training (QAT) with real int8 export at the end.

Jacob et al. 2018, "Quantization and Training of Neural Networks for Efficient Integer-
Arithmetic-Only Inference" (fake quantization with straight-through gradients, BatchNorm
folding, observers frozen late in training), with Krishnamoorthi 2018's per-channel weights.
Selected Conv2d/Linear layers get per-channel symmetric weight and per-tensor affine input
fake quantization (``compression/fake_quant.py``); after ``trainer.test`` the net is exported
to an int8 ONNX model run by onnxruntime (``compression/int8_export.py``), whose test accuracy,
latency and size go to results.json as ``int8/*``, and ``module.net`` is replaced by the plain
fp32 net so model.pt and the fp32 figures stay comparable with other runs.

Schedule (derived from ``trainer.current_epoch``, never stored): float training before
``start_epoch``; from it on, fake quantization with observers updating; from
``freeze_observers_epoch`` on, ranges fixed. The fake-quant modules are inserted in ``setup`` on
every fit, so state_dict keys are the same before and after the start epoch and a checkpoint
from any epoch resumes exactly (observer ranges and the "BN folded" flags are buffers).
"""
from __future__ import annotations

from typing import Any, Mapping, Sequence

import pytorch_lightning as pl
from pytorch_lightning.utilities import rank_zero_warn
from torch import nn

from netcompress.callbacks._quantization_base import QuantizationBase
from netcompress.compression import fake_quant as fq
from netcompress.models.factory import model_input_size


def _check_epoch(value: Any, key: str, allow_none: bool = False) -> int | None:
    if value is None and allow_none:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise ValueError(f"`{key}` must be an int >= 0{' or null' if allow_none else ''}; got {value!r}")
    return value


class QAT(QuantizationBase):
    """Fake-quantize Conv2d/Linear weights (per-channel symmetric) and inputs (per-tensor affine).

    Args:
        bits: weight and activation bits of every quantized layer (2..16; 8 by default).
        act_bits: activation bits of every layer (null = the layer's ``bits``).
        bits_by_pattern: mixed precision, ``{"layer3.*": 4}``: the first matching pattern wins.
        include, exclude: module-name patterns of the layers to quantize.
        skip_first_last: keep the stem conv and the classifier in float (timm pretrained_cfg);
            false quantizes them too (give them 8 bits with ``bits_by_pattern``).
        observer: ``minmax`` (running min/max) or ``ema`` (moving average of per-batch min/max).
        ema_momentum: weight of the newest batch in the ``ema`` observer.
        start_epoch: first epoch trained with fake quantization (float before).
        freeze_observers_epoch: from this epoch on the activation ranges stay fixed (null: never).
        fold_bn: at ``start_epoch``, freeze each conv's BatchNorm statistics and quantize the conv's weight
            folded (w * gamma/std), as the int8 model holds it, while w and gamma keep training
            (Jacob et al. 2018, sec. 3.2, with statistics frozen at the fold).
        export_int8, calibration_batches, latency_repeats: int8 ONNX export after test
            (training batches for the tensors QAT does not observe; timing rounds of int8 vs fp32
            onnxruntime, interleaved: ``latency_repeats`` at batch 1, ``max(3, latency_repeats // 10)`` at 64).
    """

    name = "qat"

    def __init__(self, bits: int = 8, act_bits: int | None = None, bits_by_pattern: Mapping[str, int] | None = None,
                 include: Sequence[str] = ("*",), exclude: Sequence[str] = (), skip_first_last: bool = True,
                 observer: str = "minmax", ema_momentum: float = 0.01, start_epoch: int = 0,
                 freeze_observers_epoch: int | None = None, fold_bn: bool = False, export_int8: bool = True,
                 calibration_batches: int = 8, latency_repeats: int = 30) -> None:
        super().__init__(bits, act_bits, bits_by_pattern, include, exclude, skip_first_last, observer, ema_momentum,
                         export_int8, calibration_batches, latency_repeats)
        self.start_epoch = _check_epoch(start_epoch, "callbacks.qat.start_epoch")
        self.freeze_observers_epoch = _check_epoch(freeze_observers_epoch, "callbacks.qat.freeze_observers_epoch",
                                                   allow_none=True)
        if self.freeze_observers_epoch is not None and self.freeze_observers_epoch <= self.start_epoch:
            raise ValueError(f"`callbacks.qat.freeze_observers_epoch` must be > start_epoch ({self.start_epoch}) "
                             f"so the observers see data; got {self.freeze_observers_epoch}")
        if not isinstance(fold_bn, bool):
            raise TypeError(f"`callbacks.qat.fold_bn` must be true or false; got {fold_bn!r}")
        self.fold_bn = fold_bn
        self.bn_pairs: dict[str, str] = {}

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        net = pl_module.net
        if self.fold_bn and not self.bn_pairs:
            input_size = tuple(getattr(trainer.datamodule, "input_size", None) or model_input_size(net))
            self.bn_pairs = fq.conv_bn_pairs(net, input_size)
        super().setup(trainer, pl_module, stage)

    def prepare_wrapped(self, net: nn.Module) -> None:
        skipped = []
        for conv, bn in self.bn_pairs.items():
            norm = net.get_submodule(bn)
            if conv not in self.layer_bits or isinstance(norm, fq.FoldableBatchNorm2d):
                continue
            if type(norm) is not nn.BatchNorm2d:  # e.g. timm's BatchNormAct2d: its own forward (act) must stay
                skipped.append(bn)
                continue
            fq._set_child(net, bn, fq.make_foldable(norm))
        if skipped:
            rank_zero_warn(f"callbacks.qat.fold_bn: {len(skipped)} norm layers are BatchNorm2d subclasses with their "
                           f"own forward (e.g. {skipped[0]}: {type(net.get_submodule(skipped[0])).__name__}); they "
                           "are not folded during QAT (the int8 export still folds them)")

    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        max_epochs = trainer.max_epochs
        if trainer.fast_dev_run:  # a smoke run: test falls back to PTQ-style calibration
            return
        if max_epochs is not None and max_epochs >= 0 and self.start_epoch >= max_epochs:
            raise ValueError(f"`callbacks.qat.start_epoch` ({self.start_epoch}) must be < trainer.max_epochs "
                             f"({max_epochs}), or QAT never starts")

    def _foldable(self, net: nn.Module):
        return ((net.get_submodule(c), net.get_submodule(b)) for c, b in self.bn_pairs.items()
                if isinstance(net.get_submodule(b), fq.FoldableBatchNorm2d))

    def _apply_schedule(self, trainer: pl.Trainer, pl_module: pl.LightningModule, observe: bool) -> None:
        epoch = trainer.current_epoch
        enabled = epoch >= self.start_epoch
        frozen = self.freeze_observers_epoch is not None and epoch >= self.freeze_observers_epoch
        fq.set_quant_state(pl_module.net, enabled, observe and not frozen)
        for conv, bn in self._foldable(pl_module.net):
            bn.is_folded = bool(bn.folded)  # once per epoch, not per step

    def on_train_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self.fold_bn and trainer.current_epoch >= self.start_epoch:
            for conv, bn in self._foldable(pl_module.net):
                if not bool(bn.folded):
                    fq.fold_bn_into_conv(conv, bn)
        self._apply_schedule(trainer, pl_module, observe=True)

    def on_validation_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if trainer.sanity_checking:
            return
        # Validation after epoch e evaluates the net as trained in epoch e; observers never see val data.
        self._apply_schedule(trainer, pl_module, observe=False)

    def on_validation_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if not trainer.sanity_checking:
            self._apply_schedule(trainer, pl_module, observe=True)

    def on_test_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        for conv, bn in self._foldable(pl_module.net):
            bn.is_folded = bool(bn.folded)
        missing = self.unobserved(pl_module.net)
        if missing:  # training stopped before start_epoch (fast_dev_run, early stop): calibrate as PTQ does
            rank_zero_warn(f"callbacks.qat: {len(missing)} layers were never observed (training ended before "
                           f"start_epoch={self.start_epoch}); calibrating them on {self.calibration_batches} "
                           "training batches, as PTQ does")
            self.calibrate(trainer, pl_module)
        super().on_test_start(trainer, pl_module)

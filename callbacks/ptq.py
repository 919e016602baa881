"""Post-training quantization (PTQ): calibrate activation ranges on N training batches, no training.

The static PTQ baseline of Jacob et al. 2018 / Krishnamoorthi 2018 ("Quantizing deep
convolutional networks for efficient inference: A whitepaper"): per-channel symmetric weights,
per-tensor affine activations whose min-max (or moving-average) ranges come from a few
training batches. Whatever training happens first (none with ``trainer.max_epochs=0`` and
``init_from``, or pruning / KD in the same ``compression`` list) runs in float; the final net is
calibrated when ``trainer.test`` starts, tested with fake quantization (``test/acc1``), then
exported to int8 and tested again (``int8/test/acc1``), exactly as after QAT.
"""
from __future__ import annotations

from typing import Mapping, Sequence

import pytorch_lightning as pl

from netcompress.callbacks._quantization_base import QuantizationBase
from netcompress.compression import fake_quant as fq


class PTQ(QuantizationBase):
    """Fake-quant layers stay inactive during fit; ``calibration_batches`` training batches set the ranges.

    Args: as :class:`netcompress.callbacks.qat.QAT` without the schedule (``bits``, ``act_bits``,
    ``bits_by_pattern``, ``include``, ``exclude``, ``skip_first_last``, ``observer``, ``ema_momentum``,
    ``export_int8``, ``calibration_batches``, ``latency_repeats``). The same training batches calibrate the observers and onnxruntime.
    """

    name = "ptq"
    CAPABILITIES = QuantizationBase.CAPABILITIES | {"calibration_only"}  # rules: pipeline/combinations.py

    def __init__(self, bits: int = 8, act_bits: int | None = None, bits_by_pattern: Mapping[str, int] | None = None,
                 include: Sequence[str] = ("*",), exclude: Sequence[str] = (), skip_first_last: bool = True,
                 observer: str = "minmax", ema_momentum: float = 0.01, export_int8: bool = True,
                 calibration_batches: int = 8, latency_repeats: int = 30) -> None:
        super().__init__(bits, act_bits, bits_by_pattern, include, exclude, skip_first_last, observer, ema_momentum,
                         export_int8, calibration_batches, latency_repeats)

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        super().setup(trainer, pl_module, stage)
        fq.set_quant_state(pl_module.net, enabled=False, observe=False)  # float during fit

    def on_test_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self.unobserved(pl_module.net):
            self.calibrate(trainer, pl_module)
        super().on_test_start(trainer, pl_module)

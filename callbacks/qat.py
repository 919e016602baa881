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

from fnmatch import fnmatchcase
from typing import Any, Mapping, Sequence

import pytorch_lightning as pl
from pytorch_lightning.utilities import rank_zero_warn
import torch
from omegaconf import DictConfig, ListConfig, OmegaConf
from torch import nn

from netcompress.compression import fake_quant as fq
from netcompress.compression.layer_selection import select_layers
from netcompress.models.factory import model_input_size


def _plain(value: Any) -> Any:
    return OmegaConf.to_container(value, resolve=True) if isinstance(value, (DictConfig, ListConfig)) else value


def _check_patterns(value: Any, key: str) -> list[str]:
    value = _plain(value)
    if isinstance(value, str) or not isinstance(value, (list, tuple)) or not all(isinstance(p, str) for p in value):
        raise TypeError(f"`{key}` must be a list of module-name patterns such as ['layer3.*']; got {value!r}")
    return list(value)


def _check_epoch(value: Any, key: str, allow_none: bool = False) -> int | None:
    if value is None and allow_none:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise ValueError(f"`{key}` must be an int >= 0{' or null' if allow_none else ''}; got {value!r}")
    return value


class QuantizationBase(pl.Callback):
    """Layer selection, bits, fake-quant surgery and the int8 export shared by QAT and PTQ."""

    name = "quantization"  # config key prefix in messages: compression.<name>.*

    def __init__(self, bits: int = 8, act_bits: int | None = None, bits_by_pattern: Mapping[str, int] | None = None,
                 include: Sequence[str] = ("*",), exclude: Sequence[str] = (), skip_first_last: bool = True,
                 observer: str = "minmax", ema_momentum: float = 0.01, export_int8: bool = True,
                 calibration_batches: int = 8, latency_repeats: int = 30) -> None:
        super().__init__()
        key = f"callbacks.{self.name}"
        self.bits = fq.check_bits(bits, f"{key}.bits")
        self.act_bits = None if act_bits is None else fq.check_bits(act_bits, f"{key}.act_bits")
        by_pattern = _plain(bits_by_pattern) or {}
        if not isinstance(by_pattern, dict):
            raise TypeError(f"`{key}.bits_by_pattern` must be a mapping like {{'layer3.*': 4}}; got {by_pattern!r}")
        self.bits_by_pattern = {str(p): fq.check_bits(b, f"{key}.bits_by_pattern['{p}']") for p, b in by_pattern.items()}
        self.include = _check_patterns(include, f"{key}.include")
        self.exclude = _check_patterns(exclude, f"{key}.exclude")
        if not isinstance(skip_first_last, bool):
            raise TypeError(f"`{key}.skip_first_last` must be true or false; got {skip_first_last!r}")
        self.skip_first_last = skip_first_last
        if observer not in fq.OBSERVERS:
            raise ValueError(f"`{key}.observer` must be one of {', '.join(fq.OBSERVERS)}; got {observer!r}")
        self.observer = observer
        if isinstance(ema_momentum, bool) or not isinstance(ema_momentum, (int, float)) or not 0 < ema_momentum <= 1:
            raise ValueError(f"`{key}.ema_momentum` must be in (0, 1]; got {ema_momentum!r}")
        self.ema_momentum = float(ema_momentum)
        if not isinstance(export_int8, bool):
            raise TypeError(f"`{key}.export_int8` must be true or false; got {export_int8!r}")
        self.export_int8 = export_int8
        for arg, value in (("calibration_batches", calibration_batches), ("latency_repeats", latency_repeats)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"`{key}.{arg}` must be an int >= 1; got {value!r}")
        self.calibration_batches = calibration_batches
        self.latency_repeats = latency_repeats
        self.layer_bits: dict[str, int] = {}

    # ----- surgery ----------------------------------------------------------------------------
    def check_combination(self, others: list[pl.Callback]) -> None:
        for other in others:
            if isinstance(other, QuantizationBase):
                raise ValueError(f"callbacks.{self.name} and callbacks.{other.name} both quantize the network; "
                                 "pick one of them (qat trains with quantization, ptq only calibrates)")

    def _select(self, net: nn.Module) -> dict[str, nn.Module]:
        """The layers to quantize; any that has no fake-quant wrapper is an error naming it."""
        key = f"callbacks.{self.name}"
        layers = select_layers(net, self.include, self.exclude, self.skip_first_last,
                               types=(nn.modules.conv._ConvNd, nn.Linear), key=key)
        for name, layer in layers.items():
            if not isinstance(layer, fq.QuantMixin) and type(layer) not in fq.WRAPPERS:
                raise ValueError(
                    f"{key}: layer '{name}' is a {type(layer).__name__}, which fake quantization does not support "
                    f"(supported: {', '.join(t.__name__ for t in fq.WRAPPERS)}); leave it out with "
                    f"{key}.exclude=['{name}']")
        for pattern in self.bits_by_pattern:
            if not any(fnmatchcase(name, pattern) for name in layers):
                raise ValueError(f"{key}.bits_by_pattern: pattern '{pattern}' matches no quantized layer; "
                                 f"quantized layers are: {', '.join(list(layers)[:12])}")
        return layers

    def quantize_net(self, net: nn.Module, input_size: tuple[int, ...] | None = None) -> None:
        """Swap the selected layers for fake-quant ones and add the activation output points
        (``compression/activation_points.py``); idempotent: a second setup changes nothing."""
        from netcompress.compression.activation_points import attach

        layers = self._select(net)
        self.layer_bits = fq.layer_bits(list(layers), self.bits, self.bits_by_pattern)
        for name, layer in layers.items():
            if isinstance(layer, fq.QuantMixin):
                continue
            bits = self.layer_bits[name]
            wrapped = fq.wrap_layer(layer, bits, self.act_bits or bits, self.observer, self.ema_momentum)
            fq._set_child(net, name, wrapped)
        self.prepare_wrapped(net)
        attach(net, tuple(input_size or model_input_size(net)), self.act_bits or self.bits, self.observer,
               self.ema_momentum)

    def prepare_wrapped(self, net: nn.Module) -> None:
        """Module swaps that must precede the activation points (their hooks live on the final modules)."""

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        input_size = getattr(getattr(trainer, "datamodule", None), "input_size", None)
        self.quantize_net(pl_module.net, tuple(input_size) if input_size else None)

    # ----- int8 export after test ---------------------------------------------------------------
    @torch.no_grad()
    def calibrate(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Observe the inputs of every quantized layer on the first N training batches (eval mode)."""
        from netcompress.compression.int8_export import calibration_batches

        if trainer.datamodule is None:
            raise RuntimeError(f"callbacks.{self.name}: calibration needs trainer.test(..., datamodule=...)")
        net = pl_module.net
        was_training = net.training
        net.eval()
        fq.set_quant_state(net, enabled=True, observe=True)
        for inputs in calibration_batches(trainer, self.calibration_batches):
            net(inputs.to(pl_module.device))
        fq.set_quant_state(net, enabled=True, observe=False)
        net.train(was_training)

    def unobserved(self, net: nn.Module) -> list[str]:
        """Fake-quant modules whose activation range was never observed (one host sync each, at test only)."""
        return fq.unobserved(net)

    def check_ranges_finite(self, net: nn.Module) -> None:
        """A NaN/inf observed range means the activations diverged; say so instead of exporting garbage."""
        bad = fq.nonfinite_ranges(net)
        if bad:
            shown = ", ".join(f"'{n}' ({lo}, {hi})" for n, (lo, hi) in list(bad.items())[:4])
            raise FloatingPointError(
                f"callbacks.{self.name}: the observed activation range of {len(bad)} fake-quant tensors is not "
                f"finite: {shown}; the activations diverged (NaN/inf) during training or calibration, so there is "
                "nothing to quantize (lower optimizer.lr, or check the run's loss)")

    def on_test_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.check_ranges_finite(pl_module.net)
        fq.set_quant_state(pl_module.net, enabled=True, observe=False)

    def on_test_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """int8 figures (export, test, latency, size), then module.net <- the plain fp32 net."""
        qnet = pl_module.net
        if self.export_int8 and trainer.is_global_zero:
            from netcompress.compression.int8_export import report_int8

            if trainer.datamodule is None:
                raise RuntimeError(f"callbacks.{self.name}.export_int8 needs trainer.test(..., datamodule=...) "
                                   "(training batches calibrate the export, the test set scores it); "
                                   f"or set callbacks.{self.name}.export_int8=false")

            report_int8(trainer, pl_module, qnet, self.calibration_batches, self.latency_repeats)
        bits = list(self.layer_bits.values())
        pl_module.report_result(f"{self.name}/bits_mean", sum(bits) / max(len(bits), 1))
        pl_module.report_result(f"{self.name}/layers", len(bits))
        pl_module.replace_net(fq.strip(qnet).to(pl_module.device))


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
        fold_bn: at ``start_epoch``, fold each conv's BatchNorm statistics into its weight so the
            weights are quantized as the int8 model uses them; BN then keeps only a per-channel
            affine (Jacob et al. 2018, sec. 3.2, with statistics frozen at the fold).
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

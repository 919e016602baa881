"""The Lightning side shared by QAT and PTQ: layer selection, bits, fake-quant surgery, int8 export.

A base class, not a callback of its own (no config entry): ``callbacks/qat.py`` and
``callbacks/ptq.py`` subclass it, so neither technique imports the other's file. The numerics
live in ``compression/fake_quant.py``, ``compression/activation_points.py`` and
``compression/int8_export.py``.
"""
from __future__ import annotations

from typing import Any, Mapping, Sequence

import pytorch_lightning as pl
import torch
from torch import nn

from netcompress.compression import fake_quant as fq
from netcompress.compression.checks import check_int, plain
from netcompress.compression.layer_selection import first_match, select_layers, unmatched_patterns
from netcompress.models.factory import model_input_size
from netcompress.lightning_modules.contract import require_contract


def _check_patterns(value: Any, key: str) -> list[str]:
    value = plain(value)
    if isinstance(value, str) or not isinstance(value, (list, tuple)) or not all(isinstance(p, str) for p in value):
        raise TypeError(f"`{key}` must be a list of module-name patterns such as ['layer3.*']; got {value!r}")
    return list(value)


class QuantizationBase(pl.Callback):
    """Layer selection, bits, fake-quant surgery and the int8 export shared by QAT and PTQ."""

    name = "quantization"  # the config entry, prefix of messages: callbacks.<name>.*
    CAPABILITIES = frozenset({"single", "quantizes"})  # rules: pipeline/combinations.py

    def __init__(self, bits: int = 8, act_bits: int | None = None, bits_by_pattern: Mapping[str, int] | None = None,
                 include: Sequence[str] = ("*",), exclude: Sequence[str] = (), skip_first_last: bool = True,
                 observer: str = "minmax", ema_momentum: float = 0.01, export_int8: bool = True,
                 calibration_batches: int = 8, latency_repeats: int = 30) -> None:
        super().__init__()
        key = f"callbacks.{self.name}"
        self.bits = check_int(bits, f"{key}.bits", 2, 16)
        self.act_bits = None if act_bits is None else check_int(act_bits, f"{key}.act_bits", 2, 16)
        by_pattern = plain(bits_by_pattern) or {}
        if not isinstance(by_pattern, dict):
            raise TypeError(f"`{key}.bits_by_pattern` must be a mapping like {{'layer3.*': 4}}; got {by_pattern!r}")
        self.bits_by_pattern = {str(p): check_int(b, f"{key}.bits_by_pattern['{p}']", 2, 16) for p, b in by_pattern.items()}
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
        self.calibration_batches = check_int(calibration_batches, f"{key}.calibration_batches", 1)
        self.latency_repeats = check_int(latency_repeats, f"{key}.latency_repeats", 1)
        self.layer_bits: dict[str, int] = {}

    # ----- surgery ----------------------------------------------------------------------------
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
        for pattern in unmatched_patterns(self.bits_by_pattern, layers):
            raise ValueError(f"{key}.bits_by_pattern: pattern '{pattern}' matches no quantized layer; "
                             f"quantized layers are: {', '.join(list(layers)[:12])}")
        return layers

    def quantize_net(self, net: nn.Module, input_size: tuple[int, ...] | None = None) -> None:
        """Swap the selected layers for fake-quant ones and add the activation output points
        (``compression/activation_points.py``); idempotent: a second setup changes nothing."""
        from netcompress.compression.activation_points import attach

        layers = self._select(net)
        self.layer_bits = {name: first_match(name, self.bits_by_pattern, self.bits) for name in layers}
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
        require_contract(pl_module, type(self).__name__, ('net',))
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
        # test runs under torch.inference_mode: a copy made there would hold inference tensors, which
        # the gradient-based evaluators after test (robustness attacks, saliency) cannot backprop through
        with torch.inference_mode(False):
            pl_module.replace_net(fq.strip(qnet).to(pl_module.device))
        if hasattr(pl_module, "set_evaluated_net"):  # the evaluators judge the quantized net, not the fp32 copy
            pl_module.set_evaluated_net(qnet)

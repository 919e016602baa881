"""Fake quantization of Conv2d/Linear layers for quantization-aware training and PTQ calibration.

Weights: per-output-channel symmetric, scale = max|w_c| / (2^(b-1) - 1), zero point 0, range
[-(2^(b-1) - 1), 2^(b-1) - 1] (restricted, so the sign of a channel can flip when BatchNorm is
folded in with a negative gamma). Activations (the layer input): per-tensor affine over
[0, 2^b - 1] with a min-max or moving-average min-max observer; the range always contains 0 so
zero padding is exact. Gradients are straight-through (Bengio et al. 2013) inside the range and
zero outside, as in Jacob et al. 2018, "Quantization and Training of Neural Networks for
Efficient Integer-Arithmetic-Only Inference", and Krishnamoorthi 2018 (per-channel weights).

The hot path is torch's fused ``fake_quantize_per_channel_affine`` for weights and
:class:`_FakeQuantizePerTensor` (the same arithmetic as ``fake_quantize_per_tensor_affine``, in
vectorised ops) for activations: no host sync on a GPU (on the CPU the clamp bounds are read as
Python numbers, which costs nothing there).
Observer ranges are buffers, so they are in every checkpoint; the on/off flags are plain
attributes set by the callback from ``trainer.current_epoch`` (derived, not stored).
"""
from __future__ import annotations

import copy
import math
from typing import Iterator

import torch
import torch.nn.functional as F
from torch import nn

OBSERVERS = ("minmax", "ema")
EPS = torch.finfo(torch.float32).eps


def weight_qrange(bits: int) -> tuple[int, int]:
    """Symmetric restricted integer range of ``bits``-bit weights: (-(2^(b-1)-1), 2^(b-1)-1)."""
    qmax = 2 ** (bits - 1) - 1
    return -qmax, qmax


def activation_qrange(bits: int) -> tuple[int, int]:
    """Unsigned integer range of ``bits``-bit activations: (0, 2^b - 1)."""
    return 0, 2 ** bits - 1


def weight_scale(weight: torch.Tensor, bits: int) -> torch.Tensor:
    """Per-output-channel symmetric scale max|w_c| / qmax (detached: no gradient through the scale)."""
    amax = weight.detach().abs().amax(dim=tuple(range(1, weight.dim())))
    return (amax / weight_qrange(bits)[1]).clamp_min(EPS).float()


def fake_quantize_weight(weight: torch.Tensor, bits: int) -> torch.Tensor:
    """Per-channel symmetric fake quantization (straight-through gradient)."""
    scale = weight_scale(weight, bits)
    zero_point = torch.zeros_like(scale, dtype=torch.int32)
    qmin, qmax = weight_qrange(bits)
    return torch.fake_quantize_per_channel_affine(weight, scale, zero_point, 0, qmin, qmax)


def activation_qparams(min_val: torch.Tensor, max_val: torch.Tensor, bits: int
                       ) -> tuple[torch.Tensor, torch.Tensor]:
    """(scale, zero_point) of affine quantization of [min(min_val, 0), max(max_val, 0)] to [0, 2^b - 1].

    Same formula as torch.ao's MinMaxObserver and onnxruntime's ``compute_scale_zp``.
    """
    qmin, qmax = activation_qrange(bits)
    low = min_val.clamp(max=0.0)
    high = max_val.clamp(min=0.0)
    scale = ((high - low) / float(qmax - qmin)).clamp_min(EPS).float()
    zero_point = (qmin - torch.round(low / scale)).clamp(qmin, qmax).to(torch.int32)
    return scale.reshape(1), zero_point.reshape(1)


@torch.no_grad()
def observe_range(act_min: torch.Tensor, act_max: torch.Tensor, x: torch.Tensor, observer: str,
                  momentum: float) -> None:
    """Update a running range in place: ``minmax`` keeps the extremes, ``ema`` a moving average of
    per-batch min/max (the first batch initialises it)."""
    x = x.detach()
    if x.dim() == 4 and not x.is_contiguous() and x.is_contiguous(memory_format=torch.channels_last):
        x = x.permute(0, 2, 3, 1)  # a contiguous view: aminmax would otherwise copy the tensor first
    low, high = torch.aminmax(x)
    low, high = low.float(), high.float()
    if observer == "minmax":
        torch.minimum(act_min, low, out=act_min)
        torch.maximum(act_max, high, out=act_max)
    else:
        fresh = torch.isinf(act_min)
        act_min.copy_(torch.where(fresh, low, act_min + momentum * (low - act_min)))
        act_max.copy_(torch.where(fresh, high, act_max + momentum * (high - act_max)))


class _FakeQuantizePerTensor(torch.autograd.Function):
    """Per-tensor affine fake quantization with a straight-through gradient inside the range.

    The same arithmetic as torch's ``fake_quantize_per_tensor_affine`` (x * (1/scale) rounded half
    to even, clamped, times scale; gradient masked where round(x/scale) + zp leaves [qmin, qmax]),
    written as vectorised elementwise ops: torch's tensor-qparams CPU kernel is about 5x slower on
    channels_last activations (``bench/bench_quantization.py``), and it dominated the QAT step.
    """

    @staticmethod
    def forward(ctx, x: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor, qmin: int, qmax: int):
        inverse, scale = scale.reciprocal().reshape(()), scale.reshape(())  # float32 1/scale, as torch's kernel
        low, high = (qmin - zero_point).reshape(()), (qmax - zero_point).reshape(())
        if x.device.type == "cpu":  # Python numbers: ~6x faster on channels_last, and .item() syncs nothing here
            inverse, scale, low, high = inverse.item(), scale.item(), low.item(), high.item()
        steps = x.mul(inverse).round_()
        clamped = steps.clamp(low, high)
        ctx.save_for_backward(clamped == steps)  # inside the range <=> unchanged by the clamp
        return clamped.mul_(scale)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        (inside,) = ctx.saved_tensors
        return torch.where(inside, grad, 0.0), None, None, None, None


def fake_quantize_activation(x: torch.Tensor, act_min: torch.Tensor, act_max: torch.Tensor, bits: int) -> torch.Tensor:
    """Per-tensor affine fake quantization of ``x`` to ``bits`` over the observed [act_min, act_max]."""
    scale, zero_point = activation_qparams(act_min, act_max, bits)
    qmin, qmax = activation_qrange(bits)
    return _FakeQuantizePerTensor.apply(x, scale.to(x.dtype), zero_point.to(x.dtype), qmin, qmax)


class ActivationQuantizer(nn.Module):
    """Fake quantization of one module's output, with its own observer (see compression/activation_points.py).

    ``anchor`` names the tensor in the exported graph: ``("conv", name)`` = the output of layer
    ``name`` with its BatchNorm folded, ``("module", name)`` = the output of leaf module ``name``.
    """

    def __init__(self, bits: int, observer: str, momentum: float, anchor: tuple[str, str], device=None) -> None:
        super().__init__()
        self.act_bits, self.observer, self.momentum, self.anchor = bits, observer, momentum, tuple(anchor)
        self.quant_enabled = False
        self.observe = False
        self.register_buffer("act_min", torch.tensor(float("inf"), device=device))
        self.register_buffer("act_max", torch.tensor(float("-inf"), device=device))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.quant_enabled:
            return x
        if self.observe:
            observe_range(self.act_min, self.act_max, x, self.observer, self.momentum)
        return fake_quantize_activation(x, self.act_min, self.act_max, self.act_bits)

    def extra_repr(self) -> str:
        return f"a{self.act_bits}, observer={self.observer}, anchor={self.anchor}"


class QuantMixin:
    """Observer buffers, flags and the quantized input/weight shared by QuantConv2d and QuantLinear."""

    weight_bits: int
    act_bits: int
    observer: str
    momentum: float
    quant_enabled: bool  # fake-quantize in forward (else the plain float layer)
    observe: bool        # update the activation range in forward

    def _init_quant(self, weight_bits: int, act_bits: int, observer: str = "minmax", momentum: float = 0.01) -> None:
        self.weight_bits, self.act_bits = weight_bits, act_bits
        self.observer, self.momentum = observer, momentum
        self.quant_enabled = False
        self.observe = False
        device = self.weight.device
        self.register_buffer("act_min", torch.tensor(float("inf"), device=device))
        self.register_buffer("act_max", torch.tensor(float("-inf"), device=device))

    input_quantized_upstream: bool = False  # the producer of the input fake-quantizes it (activation_points)
    input_quantizer: nn.Module | None = None  # ... with this ActivationQuantizer (set by activation_points)
    chain_norm: nn.Module | None = None       # the BatchNorm that alone reads the output (folded at export)

    def update_observer(self, x: torch.Tensor) -> None:
        observe_range(self.act_min, self.act_max, x, self.observer, self.momentum)

    def quantize_input(self, x: torch.Tensor) -> torch.Tensor:
        if self.observe:
            self.update_observer(x)
        return fake_quantize_activation(x, self.act_min, self.act_max, self.act_bits)

    def quantized_weight(self) -> torch.Tensor:
        """The fake-quantized weight. After BN folding (``chain_norm`` frozen by :func:`fold_bn_into_conv`) the
        folded weight w * gamma/std is what gets quantized, as the int8 conv holds it, then divided by
        gamma/std again, so w and gamma stay the trained parameters (Jacob et al. 2018, sec. 3.2; torch.ao's
        ConvBn2d): training the folded weight itself rescales each filter's updates by (std/gamma)^2."""
        norm = self.chain_norm
        if isinstance(norm, FoldableBatchNorm2d) and norm.is_folded:
            factor = norm.weight / torch.sqrt(norm.running_var + norm.eps)
            factor = torch.where(factor == 0, torch.ones_like(factor), factor)  # gamma = 0: a dead channel
            factor = factor.view(-1, *([1] * (self.weight.dim() - 1)))
            return fake_quantize_weight(self.weight * factor, self.weight_bits) / factor
        return fake_quantize_weight(self.weight, self.weight_bits)

    def quantized_forward(self, x: torch.Tensor, compute) -> torch.Tensor:
        """``compute(input, weight)`` on the fake-quantized input (unless quantized upstream) and weight;
        in eval mode with the int8 model's bias rounding added per output channel."""
        x = x if self.input_quantized_upstream else self.quantize_input(x)
        weight = self.quantized_weight()
        out = compute(x, weight)
        offset = None if self.training else self.bias_offset(weight)
        return out if offset is None else out + self.per_channel(offset, out)

    def per_channel(self, values: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
        """``values`` (one per output channel) shaped to broadcast over ``out``: channels in dim 1 (conv)."""
        return values.view(1, -1, *([1] * (out.dim() - 2)))

    @torch.no_grad()
    def bias_offset(self, weight: torch.Tensor) -> torch.Tensor | None:
        """Per-channel term that makes eval outputs use the int8 model's bias (None: no bias anywhere).

        The int8 conv adds its bias (BatchNorm folded in: b' = b*f + beta - mean*f, f = gamma/std)
        as int32 on the grid s_in * s_w' (input scale x per-channel int8 scale of the folded weight).
        That rounding moves outputs by up to 0.5% of an output step, enough to flip roundings deep in
        the net; adding (round(b') - b') / f to the pre-BN output reproduces it.
        """
        norm, bias = self.chain_norm, self.bias
        source = self.input_quantizer if self.input_quantized_upstream else self
        if source is None or (norm is None and bias is None):
            return None
        in_scale = activation_qparams(source.act_min, source.act_max, source.act_bits)[0]
        channels = weight.shape[0]
        factor = torch.ones(channels, device=weight.device)
        folded = bias.detach().clone() if bias is not None else torch.zeros(channels, device=weight.device)
        if norm is not None:
            factor = (norm.weight if norm.weight is not None else 1.0) / torch.sqrt(norm.running_var + norm.eps)
            shift = norm.bias if norm.bias is not None else 0.0
            folded = folded * factor + shift - norm.running_mean * factor
        shape = (-1, *([1] * (weight.dim() - 1)))
        step = in_scale * weight_scale(weight * factor.view(shape), min(self.weight_bits, 8))  # int8 export
        offset = (torch.round(folded / step) * step - folded) / factor
        return torch.nan_to_num(offset, nan=0.0, posinf=0.0, neginf=0.0)  # f = 0 or no range observed yet

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, w{self.weight_bits}a{self.act_bits}, observer={self.observer}"


class QuantConv2d(QuantMixin, nn.Conv2d):
    """nn.Conv2d whose input and weight are fake-quantized when ``quant_enabled``."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.quant_enabled:
            return self._conv_forward(x, self.weight, self.bias)
        return self.quantized_forward(x, lambda inputs, weight: self._conv_forward(inputs, weight, self.bias))


class QuantLinear(QuantMixin, nn.Linear):
    """nn.Linear whose input and weight are fake-quantized when ``quant_enabled``."""

    def per_channel(self, values: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
        """A Linear's output features are its last dim, whatever the leading dims (tokens, batch)."""
        return values

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.quant_enabled:
            return F.linear(x, self.weight, self.bias)
        return self.quantized_forward(x, lambda inputs, weight: F.linear(inputs, weight, self.bias))


class FoldableBatchNorm2d(nn.BatchNorm2d):
    """BatchNorm2d that, once folded (:func:`fold_bn_into_conv`), uses its frozen statistics in training too.

    Folded, BN(conv(x)) = conv(x, w * gamma/std) + (beta - mean * gamma/std): the int8 conv's computation,
    with the conv quantizing w * gamma/std (``QuantMixin.quantized_weight``) while w, gamma and beta
    remain the trained parameters. ``folded`` is a buffer (checkpointed, so a resumed run folds the same).
    """

    is_folded: bool = False  # mirror of the buffer, refreshed by the callback (no sync per step)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.is_folded:
            return super().forward(x)
        return F.batch_norm(x, self.running_mean, self.running_var, self.weight, self.bias, False, 0.0, self.eps)


WRAPPERS: dict[type, type] = {nn.Conv2d: QuantConv2d, nn.Linear: QuantLinear}
PLAIN: dict[type, type] = {QuantConv2d: nn.Conv2d, QuantLinear: nn.Linear, FoldableBatchNorm2d: nn.BatchNorm2d}
_QUANT_BUFFERS = ("act_min", "act_max", "folded")
_QUANT_ATTRS = ("weight_bits", "act_bits", "observer", "momentum", "quant_enabled", "observe", "is_folded",
                "input_quantized_upstream", "input_quantizer", "chain_norm")


def _retype(module: nn.Module, cls: type) -> nn.Module:
    """A new ``cls`` object sharing ``module``'s parameters, buffers and children (no copy of tensors)."""
    new = cls.__new__(cls)
    new.__dict__.update(module.__dict__)
    for attr in ("_parameters", "_buffers", "_modules"):
        setattr(new, attr, dict(getattr(module, attr)))
    new._non_persistent_buffers_set = set(module._non_persistent_buffers_set)
    return new


def _set_child(net: nn.Module, name: str, module: nn.Module) -> None:
    parent, _, child = name.rpartition(".")
    setattr(net.get_submodule(parent) if parent else net, child, module)


def wrap_layer(layer: nn.Module, weight_bits: int, act_bits: int, observer: str, momentum: float) -> QuantMixin:
    """The fake-quant version of a plain nn.Conv2d / nn.Linear, sharing its parameters."""
    new = _retype(layer, WRAPPERS[type(layer)])
    new._init_quant(weight_bits, act_bits, observer, momentum)
    return new


def make_foldable(bn: nn.BatchNorm2d) -> FoldableBatchNorm2d:
    new = _retype(bn, FoldableBatchNorm2d)
    new.register_buffer("folded", torch.zeros((), dtype=torch.bool, device=bn.running_mean.device))
    new.is_folded = False
    return new


def quant_modules(net: nn.Module) -> Iterator[tuple[str, QuantMixin]]:
    return ((n, m) for n, m in net.named_modules() if isinstance(m, QuantMixin))


def set_quant_state(net: nn.Module, enabled: bool, observe: bool) -> None:
    """Fake quantization on/off and observers updating or not, for every quantized layer and output point."""
    for module in net.modules():
        if not isinstance(module, (QuantMixin, ActivationQuantizer)):
            continue
        module.quant_enabled = enabled
        module.observe = observe and enabled


def conv_bn_pairs(net: nn.Module, input_size: tuple[int, ...]) -> dict[str, str]:
    """{conv name: BatchNorm2d name} for every BatchNorm2d whose input is exactly a Conv2d's output.

    Found by one traced forward pass (tensor identity between the conv output and the BN
    input), so it works on any timm CNN without knowing its module naming.
    """
    names = {m: n for n, m in net.named_modules()}
    produced: dict[int, str] = {}
    pairs: dict[str, str] = {}

    def after_conv(module, inputs, output):
        produced[id(output)] = names[module]

    def before_bn(module, inputs):
        conv = produced.get(id(inputs[0]))
        if conv is not None:
            pairs[conv] = names[module]

    hooks = [m.register_forward_hook(after_conv) for m in net.modules() if isinstance(m, nn.Conv2d)]
    hooks += [m.register_forward_pre_hook(before_bn) for m in net.modules() if isinstance(m, nn.BatchNorm2d)]
    was_training = net.training
    try:
        with torch.no_grad():
            device = next(net.parameters()).device
            net.eval()(torch.zeros(2, *input_size, device=device))
    finally:
        net.train(was_training)
        for h in hooks:
            h.remove()
    return pairs


@torch.no_grad()
def fold_bn_into_conv(conv: nn.Conv2d, bn: FoldableBatchNorm2d) -> None:
    """Fold ``bn`` into ``conv`` for quantization: freeze its statistics (no more batch statistics or
    running-average updates), from when on ``conv`` quantizes its weight folded, w * gamma/std.

    The fold is not baked into the weights: w, gamma and beta keep training in their own parametrization
    (Jacob et al. 2018 fold on the fly; baking them in rescaled each filter's SGD steps by (std/gamma)^2 and
    made 8-bit QAT from a trained net diverge: 57% -> 17% top-1 in 30 steps at lr 0.01 on retention_mini's
    parent). ``conv`` is unchanged; the int8 export folds the frozen statistics into its weight and bias.
    """
    bn.folded.fill_(True)
    bn.is_folded = True


def strip(net: nn.Module, bake_weights: bool = False) -> nn.Module:
    """A deep copy of ``net`` with plain nn.Conv2d / nn.Linear / nn.BatchNorm2d (no quantization state).

    ``bake_weights=True`` stores the fake-quantized weights (what the int8 model uses) in the copy.
    """
    from netcompress.compression.activation_points import detach

    net = copy.deepcopy(net)
    detach(net)
    for name, module in list(net.named_modules()):
        plain_cls = PLAIN.get(type(module))
        if plain_cls is None:
            continue
        if bake_weights and isinstance(module, QuantMixin):
            with torch.no_grad():
                module.weight.copy_(module.quantized_weight())
        plain = _retype(module, plain_cls)
        for key in _QUANT_BUFFERS:
            plain._buffers.pop(key, None)
        for key in _QUANT_ATTRS if isinstance(module, QuantMixin) else ("is_folded",):
            plain.__dict__.pop(key, None)
        if name:
            _set_child(net, name, plain)
        else:
            net = plain
    return net


def activation_ranges(net: nn.Module) -> dict[str, tuple[float, float]]:
    """{layer name: (min, max)} of the input range of every quantized layer that quantizes its own input."""
    return {n: (float(m.act_min), float(m.act_max)) for n, m in quant_modules(net) if not m.input_quantized_upstream}


def output_ranges(net: nn.Module) -> dict[tuple[str, str], tuple[float, float]]:
    """{anchor: (min, max)} of every output point (for export)."""
    return {m.anchor: (float(m.act_min), float(m.act_max)) for m in net.modules() if isinstance(m, ActivationQuantizer)}


def _observers(net: nn.Module) -> Iterator[tuple[str, nn.Module]]:
    """(what it observes, module) of every fake-quant module that keeps its own activation range:
    'input of layer1.0.conv1' or 'output of layer1.0.act1' (an output point's producer)."""
    for name, module in net.named_modules():
        if isinstance(module, ActivationQuantizer):
            yield f"output of {module.anchor[1]}", module
        elif isinstance(module, QuantMixin) and not module.input_quantized_upstream:
            yield f"input of {name}", module


def never_observed(low: float, high: float) -> bool:
    """A range still at its initial (+inf, -inf): no batch ever reached the observer."""
    return low == float("inf") and high == float("-inf")


def unobserved(net: nn.Module) -> list[str]:
    """Fake-quant modules whose range was never observed (one host sync each: call at test only)."""
    return [n for n, m in _observers(net) if never_observed(float(m.act_min), float(m.act_max))]


def nonfinite_ranges(net: nn.Module) -> dict[str, tuple[float, float]]:
    """{module: (min, max)} of observed ranges that hold NaN or inf: the activations diverged
    (a NaN poisons a min-max or EMA range for good), which is not the same as never observed."""
    ranges = {n: (float(m.act_min), float(m.act_max)) for n, m in _observers(net)}
    return {n: r for n, r in ranges.items() if not never_observed(*r) and not all(map(math.isfinite, r))}

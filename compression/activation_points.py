"""Where the int8 model quantizes activations, so QAT fake-quantizes the same tensors at the same place.

An integer-only model (Jacob et al. 2018; onnxruntime's QDQ graphs) quantizes a tensor once,
where it is produced, and every consumer sees the quantized values: each quantized conv's output
(after its folded BatchNorm; merged into a following ReLU), every ReLU / ReLU6 / MaxPool output,
and so the residual shortcut and the Add too. Fake-quantizing only the input of each conv misses
the conv outputs that feed a residual Add and quantizes the shortcut in one branch only, so the
exported model would disagree with the trained one.

:func:`attach` finds these *output points* by one probe forward pass (tensor identity and
version counters, so in-place ReLUs and Adds are followed), gives each an
:class:`ActivationQuantizer` with its own observer in ``net.activation_quantizers`` (a buffer
owner: the ranges are in every checkpoint) and runs it as a forward hook of the producing leaf
module. A quantized layer whose input is already quantized upstream skips its own input
fake-quant. Each layer also learns which BatchNorm alone reads its output (``chain_norm``), so
in eval mode it can round its folded bias as the int8 model does (``QuantMixin.bias_offset``).
Nets whose root is an ``nn.Sequential`` (a child would become a layer) keep input-only fake
quantization.
"""
from __future__ import annotations

import functools
from typing import Iterator

import torch
from torch import nn

from netcompress.compression.fake_quant import ActivationQuantizer, QuantMixin

CONTAINER = "activation_quantizers"
POINT_TYPES = (nn.ReLU, nn.ReLU6, nn.MaxPool2d)  # leaf outputs that onnxruntime's QDQ model quantizes
NORM_TYPES = (nn.BatchNorm2d, nn.BatchNorm1d)   # folded into the conv before them at export
OUTPUT_FLAG = "quantize_output"  # a module with this attribute True declares its output a point


def is_point(module: nn.Module) -> bool:
    """A module whose output the int8 model quantizes: a ReLU/ReLU6/MaxPool2d, or any module that
    declares ``quantize_output = True`` because it computes a tensor functionally that a quantized
    op reads (e.g. the option-A ResNet shortcut, whose concat feeds the residual Add)."""
    return isinstance(module, POINT_TYPES) or getattr(module, OUTPUT_FLAG, False) is True


def _quantize_output(quantizer: ActivationQuantizer, module: nn.Module, inputs, output):
    return quantizer(output)


def _key(name: str) -> str:
    return name.replace(".", ":")


def quantizers(net: nn.Module) -> Iterator[tuple[str, ActivationQuantizer]]:
    """(producer module name, quantizer) of every output point of ``net``."""
    container = getattr(net, CONTAINER, None)
    if isinstance(container, nn.ModuleDict):
        for key, quantizer in container.items():
            yield key.replace(":", "."), quantizer


def _probe(net: nn.Module, input_size: tuple[int, ...]):
    """One eval forward pass: leaf outputs in completion order and each leaf's input, as (id, version)."""
    # leaves, and norms even when they hold their activation (timm's BatchNormAct2d: BN -> drop -> act)
    names = {m: n for n, m in net.named_modules()
             if n and (isinstance(m, NORM_TYPES) or is_point(m) or not any(True for _ in m.children()))}
    produced: list[tuple[str, tuple[int, int]]] = []
    consumed: dict[str, tuple[tuple[int, int], int]] = {}  # leaf -> (input key, outputs produced before it ran)
    keep: list[torch.Tensor] = []  # hold every tensor so ids stay unique during the probe

    def tag(t: torch.Tensor) -> tuple[int, int]:
        keep.append(t)
        return id(t), t._version

    def before(module, inputs):
        if inputs and isinstance(inputs[0], torch.Tensor):
            consumed[names[module]] = (tag(inputs[0]), len(produced))

    def after(module, inputs, output):
        if isinstance(output, torch.Tensor):
            produced.append((names[module], tag(output)))

    hooks = [m.register_forward_pre_hook(before) for m in names] + [m.register_forward_hook(after) for m in names]
    was_training = net.training
    try:
        with torch.no_grad():
            net.eval()(torch.zeros(2, *input_size, device=next(net.parameters()).device))
    finally:
        net.train(was_training)
        for h in hooks:
            h.remove()
    return produced, consumed


def find_points(net: nn.Module, input_size: tuple[int, ...]
                ) -> tuple[dict[str, tuple[tuple[str, str], list[str]]], dict[str, str]]:
    """({producer leaf name: (anchor, quantized layers that consume its output)},
    {quantized layer: the BatchNorm that alone reads its output}) of ``net``.

    Points: the output of every ReLU/ReLU6/MaxPool2d leaf and of every module that declares
    ``quantize_output`` (:func:`is_point`), and of every quantized layer's chain
    end (the layer, or the BatchNorm right after it) unless a ReLU consumes it alone (the ReLU's
    point covers it: onnxruntime merges Conv -> Relu into one quantized output).
    """
    produced, consumed = _probe(net, input_size)
    consumers_of: dict[tuple[int, int], list[str]] = {}
    for name, (key, _) in consumed.items():
        consumers_of.setdefault(key, []).append(name)
    output_of = {}
    for name, key in produced:
        output_of.setdefault(name, key)
    modules = dict(net.named_modules())
    points: dict[str, tuple[str, str]] = {}
    norms: dict[str, str] = {}
    for name, key in produced:
        if is_point(modules[name]) and name not in points:
            points[name] = ("module", name)
    for name, module in modules.items():
        if not isinstance(module, QuantMixin) or name not in output_of:
            continue
        end = name
        readers = consumers_of.get(output_of[name], [])
        if len(readers) == 1 and isinstance(modules[readers[0]], NORM_TYPES):
            end = norms[name] = readers[0]
            readers = consumers_of.get(output_of[end], [])
        if len(readers) == 1 and isinstance(modules[readers[0]], POINT_TYPES[:2]):
            continue  # Conv -> (BN ->) ReLU: the ReLU's point
        if any(n.startswith(end + ".") and isinstance(modules[n], POINT_TYPES[:2]) for n in points):
            continue  # Conv -> BatchNormAct(ReLU): the inner ReLU's point
        points.setdefault(end, ("conv", name))
    # the quantized layers reading each point: the last leaf output before the layer ran that is its input
    readers_of: dict[str, list[str]] = {p: [] for p in points}
    for name, (key, before) in consumed.items():
        producer = next((n for n, k in reversed(produced[:before]) if k == key), None)
        if producer in points and isinstance(modules[name], QuantMixin):
            readers_of[producer].append(name)
    return {p: (anchor, readers_of[p]) for p, anchor in points.items()}, norms


def attach(net: nn.Module, input_size: tuple[int, ...], default_bits: int, observer: str, momentum: float) -> int:
    """Add the output points of ``net`` (idempotent); returns how many it has. Bits: the first reader's."""
    if isinstance(net, nn.Sequential):
        return 0
    if isinstance(getattr(net, CONTAINER, None), nn.ModuleDict):
        return len(getattr(net, CONTAINER))
    device = next(net.parameters()).device
    container = nn.ModuleDict()
    points, norms = find_points(net, input_size)
    for layer, norm in norms.items():
        net.get_submodule(layer).__dict__["chain_norm"] = net.get_submodule(norm)  # a reference, not a child
    for producer, (anchor, readers) in points.items():
        layers = [net.get_submodule(r) for r in readers]
        bits = layers[0].act_bits if layers else (net.get_submodule(anchor[1]).act_bits if anchor[0] == "conv"
                                                   else default_bits)
        quantizer = ActivationQuantizer(bits, observer, momentum, anchor, device)
        container[_key(producer)] = quantizer
        net.get_submodule(producer).register_forward_hook(functools.partial(_quantize_output, quantizer))
        for layer in layers:
            if layer.act_bits == bits:
                layer.input_quantized_upstream = True
                layer.__dict__["input_quantizer"] = quantizer
    net.add_module(CONTAINER, container)
    return len(container)


def detach(net: nn.Module) -> None:
    """Remove the output points and their hooks (the plain net of ``strip``)."""
    for module in net.modules():
        for handle_id, hook in list(module._forward_hooks.items()):
            if isinstance(hook, functools.partial) and hook.func is _quantize_output:
                del module._forward_hooks[handle_id]
        if isinstance(module, QuantMixin):
            for key in ("input_quantized_upstream", "input_quantizer", "chain_norm"):
                module.__dict__.pop(key, None)
    if CONTAINER in net._modules:
        del net._modules[CONTAINER]

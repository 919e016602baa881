"""Activation output points: QAT fake-quantizes each tensor where it is produced, as the int8
model does (conv outputs before residual Adds, ReLU outputs shared by the next conv and the
shortcut), and in eval mode rounds the folded bias as the int8 conv does."""
from __future__ import annotations

import functools

import torch
from torch import nn

from netcompress import models  # noqa: F401
from netcompress.callbacks.qat import QAT
from netcompress.compression import activation_points
from netcompress.compression import fake_quant as fq
from netcompress.models.factory import create_model


def quantized_resnet(seed: int = 0, shortcut: str = "B"):
    torch.manual_seed(seed)
    net = create_model("resnet20_cifar", num_classes=10, width=0.25, shortcut=shortcut)
    QAT(bits=8).quantize_net(net, (3, 32, 32))
    fq.set_quant_state(net, True, True)
    with torch.no_grad():
        net.eval()(torch.randn(16, 3, 32, 32))
    fq.set_quant_state(net, True, False)
    return net


def on_grid(x: torch.Tensor, quantizer) -> bool:
    scale, zero_point = fq.activation_qparams(quantizer.act_min, quantizer.act_max, quantizer.act_bits)
    q = x / scale + zero_point
    return bool(torch.allclose(q, q.round(), atol=1e-3))


def test_points_are_relus_and_conv_outputs_before_adds():
    net = quantized_resnet()
    anchors = {q.anchor for _, q in activation_points.quantizers(net)}
    relus = {("module", n) for n, m in net.named_modules() if isinstance(m, nn.ReLU)}
    before_add = {("conv", f"layer{s}.{b}.conv2") for s in (1, 2, 3) for b in range(3)}
    before_add |= {("conv", f"layer{s}.0.downsample.0") for s in (2, 3)}
    assert anchors == relus | before_add
    upstream = {n for n, m in fq.quant_modules(net) if m.input_quantized_upstream}
    assert upstream == {n for n, _ in fq.quant_modules(net)}  # every quantized input comes from a ReLU point
    assert net.get_submodule("layer1.0.conv1").chain_norm is net.get_submodule("layer1.0.bn1")


def test_both_inputs_of_every_residual_add_are_quantized():
    net = quantized_resnet()
    seen = []
    for s in (1, 2, 3):
        for b in range(3):
            block = net.get_submodule(f"layer{s}.{b}")
            # hooks registered after the points see the fake-quantized outputs
            block.bn2.register_forward_hook(functools.partial(lambda name, m, i, o: seen.append((name, o)),
                                                              f"layer{s}:{b}:bn2"))
            block.register_forward_pre_hook(functools.partial(lambda name, m, i: seen.append((name, i[0])),
                                                              f"layer{s}.{b}:input"))
    with torch.no_grad():
        net(torch.randn(4, 3, 32, 32))
    quantizers = dict(activation_points.quantizers(net))
    inputs = {"layer1.0": "act1"}
    for s, count in ((1, 3), (2, 3), (3, 3)):
        for b in range(count):
            nxt = f"layer{s}.{b + 1}" if b < 2 else f"layer{s + 1}.0"
            inputs[nxt] = f"layer{s}.{b}.act2"
    for name, tensor in seen:
        if name.endswith(":bn2"):
            assert on_grid(tensor, quantizers[name.replace(":", ".").removesuffix(".bn2") + ".bn2"]), name
        else:  # the block input: the shortcut and conv1 both read the quantized ReLU output
            assert on_grid(tensor, quantizers[inputs[name.removesuffix(":input")]]), name


def test_option_a_shortcut_output_is_a_point_on_its_own_grid():
    """He et al.'s option A builds the shortcut functionally (subsample, concat zeros); the int8
    model quantizes that concat before the residual Add, so QAT fake-quantizes it there too."""
    net = quantized_resnet(shortcut="A")
    anchors = {q.anchor for _, q in activation_points.quantizers(net)}
    relus = {("module", n) for n, m in net.named_modules() if isinstance(m, nn.ReLU)}
    before_add = {("conv", f"layer{s}.{b}.conv2") for s in (1, 2, 3) for b in range(3)}
    shortcuts = {("module", f"layer{s}.0.downsample") for s in (2, 3)}
    assert anchors == relus | before_add | shortcuts
    seen = {}
    for s in (2, 3):
        net.get_submodule(f"layer{s}.0.downsample").register_forward_hook(
            functools.partial(lambda name, m, i, o: seen.__setitem__(name, o), f"layer{s}.0.downsample"))
    with torch.no_grad():
        net(torch.randn(4, 3, 32, 32))
    quantizers = dict(activation_points.quantizers(net))
    for name, tensor in seen.items():
        assert on_grid(tensor, quantizers[name]), name
        assert quantizers[name].act_max > 0 and int((tensor == 0).sum()) >= tensor.numel() // 2  # zero channels


def test_eval_bias_rounding_matches_the_int8_conv():
    """conv -> BN in eval equals the int8 computation: folded weight, bias rounded to s_in * s_w'."""
    net = quantized_resnet()
    torch.manual_seed(1)
    for module in net.modules():
        if isinstance(module, nn.BatchNorm2d):
            module.running_mean.uniform_(-1, 1)
            module.running_var.uniform_(0.5, 2)
            module.bias.data.uniform_(-1, 1)
    conv, bn = net.get_submodule("layer2.1.conv1"), net.get_submodule("layer2.1.bn1")  # bn1 has no point of its own
    point = dict(activation_points.quantizers(net))["layer2.0.act2"]
    x = point(torch.relu(torch.randn(2, conv.in_channels, 8, 8)))
    with torch.no_grad():
        got = bn(conv(x))
        factor = bn.weight / torch.sqrt(bn.running_var + bn.eps)
        weight = conv.quantized_weight() * factor.view(-1, 1, 1, 1)
        bias = bn.bias - bn.running_mean * factor
        step = fq.activation_qparams(point.act_min, point.act_max, 8)[0] * weight.abs().amax((1, 2, 3)) / 127
        expected = nn.functional.conv2d(x, weight, torch.round(bias / step) * step, padding=1)
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-5)
    assert not torch.allclose(bias, torch.round(bias / step) * step)  # the rounding is not a no-op here


def test_strip_leaves_the_plain_net():
    net = quantized_resnet()
    plain = fq.strip(net)
    reference = create_model("resnet20_cifar", num_classes=10, width=0.25)
    assert set(plain.state_dict()) == set(reference.state_dict())
    assert not any(isinstance(h, functools.partial) for m in plain.modules() for h in m._forward_hooks.values())
    assert all(type(m) in (nn.Conv2d, nn.Linear) for n, m in plain.named_modules() if "conv" in n or n == "fc")
    # the QAT net itself keeps its points (strip works on a copy)
    assert len(dict(activation_points.quantizers(net))) == 30

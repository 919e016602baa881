"""QAT/PTQ fake quantization: numerics against torch built-ins, straight-through gradients,
observers, BN folding, exact resume, and clear errors before training."""
from __future__ import annotations

import copy

import json
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from torch import nn

from netcompress import models  # noqa: F401
from netcompress.callbacks.ptq import PTQ
from netcompress.callbacks.qat import QAT
from netcompress.compression import fake_quant as fq
from conftest import TINY, compose_config, straight_and_resumed
from netcompress.models.factory import create_model
from netcompress.models.serialization import load_model
from netcompress.pipeline.build import build
from netcompress.run import run

SMALL = [*TINY, "+model.width=0.25"]


# ----- numerics --------------------------------------------------------------------------------

@pytest.mark.parametrize("bits", [8, 4, 2])
def test_weight_fake_quant_equals_torch_per_channel_op(bits):
    w = torch.randn(6, 3, 3, 3) * torch.rand(6, 1, 1, 1)
    qmax = 2 ** (bits - 1) - 1
    scale = w.abs().flatten(1).max(1).values / qmax  # written out: per-channel symmetric
    expected = torch.fake_quantize_per_channel_affine(w, scale, torch.zeros(6, dtype=torch.int32), 0, -qmax, qmax)
    torch.testing.assert_close(fq.fake_quantize_weight(w, bits), expected, rtol=0, atol=0)
    by_hand = torch.clamp(torch.round(w / scale.view(-1, 1, 1, 1)), -qmax, qmax) * scale.view(-1, 1, 1, 1)
    torch.testing.assert_close(fq.fake_quantize_weight(w, bits), by_hand, rtol=0, atol=1e-7)
    assert fq.fake_quantize_weight(w, bits).div(scale.view(-1, 1, 1, 1)).round().unique().numel() <= 2 * qmax + 1


def test_weight_gradient_is_straight_through():
    w = torch.randn(4, 5, requires_grad=True)
    fq.fake_quantize_weight(w, 4).sum().backward()
    torch.testing.assert_close(w.grad, torch.ones_like(w))  # max-abs scale: every weight is in range


def test_activation_gradient_passes_inside_range_and_is_zero_outside():
    layer = fq.wrap_layer(nn.Linear(3, 2), 8, 8, "minmax", 0.01)
    layer.act_min.fill_(-1.0)
    layer.act_max.fill_(2.0)
    x = torch.tensor([[-3.0, 0.5, 1.9], [2.5, -0.9, 10.0]], requires_grad=True)
    layer.quantize_input(x).sum().backward()
    inside = ((x >= -1.0) & (x <= 2.0)).float()
    torch.testing.assert_close(x.grad, inside)
    scale, zero_point = fq.activation_qparams(layer.act_min, layer.act_max, 8)
    expected = torch.fake_quantize_per_tensor_affine(x.detach(), float(scale), int(zero_point), 0, 255)
    torch.testing.assert_close(layer.quantize_input(x.detach()), expected, rtol=0, atol=0)


@pytest.mark.parametrize("bits", [8, 4])
def test_activation_fake_quant_equals_torch_kernel_values_and_gradient(bits):
    """The vectorised activation fake quant is torch's fake_quantize_per_tensor_affine, bit for bit,
    gradient mask included, on a channels_last tensor with values on, between and beyond the grid."""
    torch.manual_seed(0)
    low, high = torch.tensor(-0.7), torch.tensor(3.1)
    scale, zero_point = fq.activation_qparams(low, high, bits)
    qmin, qmax = fq.activation_qrange(bits)
    grid = (torch.arange(qmin - 3, qmax + 4) - zero_point) * scale  # exact grid points and ties below
    x = torch.cat([torch.randn(2 * 8 * 6 * 6) * 2, grid, grid + scale / 2]).reshape(-1)
    x = torch.nn.functional.pad(x, (0, (-len(x)) % 8)).reshape(1, 8, -1, 1).to(memory_format=torch.channels_last)
    ours = x.clone().requires_grad_()
    ref = x.clone().requires_grad_()
    out = fq.fake_quantize_activation(ours, low, high, bits)
    expected = torch.fake_quantize_per_tensor_affine(ref, scale, zero_point, qmin, qmax)
    weights = torch.randn_like(x)
    (out * weights).sum().backward()
    (expected * weights).sum().backward()
    torch.testing.assert_close(out, expected, rtol=0, atol=0)
    torch.testing.assert_close(ours.grad, ref.grad, rtol=0, atol=0)
    assert 0 < int((ref.grad == 0).sum()) < x.numel()  # both clamped and passed-through values occur


@pytest.mark.parametrize("low,high", [(-1.3, 4.2), (0.0, 6.0), (0.5, 3.0), (-2.0, -0.5)])
def test_activation_qparams_match_torch_minmax_observer(low, high):
    from torch.ao.quantization import MinMaxObserver

    observer = MinMaxObserver(dtype=torch.quint8, qscheme=torch.per_tensor_affine)
    observer(torch.tensor([low, high]))
    scale_ref, zp_ref = observer.calculate_qparams()
    scale, zp = fq.activation_qparams(torch.tensor(low), torch.tensor(high), 8)
    torch.testing.assert_close(scale, scale_ref.float(), rtol=1e-6, atol=0)
    assert int(zp) == int(zp_ref)


def test_minmax_and_ema_observers_follow_their_formulas():
    batches = [torch.randn(8, 3) * s + o for s, o in ((1.0, 0.0), (3.0, 1.0), (0.5, -2.0))]
    minmax = fq.wrap_layer(nn.Linear(3, 2), 8, 8, "minmax", 0.01)
    ema = fq.wrap_layer(nn.Linear(3, 2), 8, 8, "ema", 0.25)
    for layer in (minmax, ema):
        fq.set_quant_state(layer, True, True)
        for x in batches:
            layer(x)
    assert float(minmax.act_min) == min(float(x.min()) for x in batches)
    assert float(minmax.act_max) == max(float(x.max()) for x in batches)
    low, high = float(batches[0].min()), float(batches[0].max())
    for x in batches[1:]:  # r <- r + m (r_batch - r)
        low, high = low + 0.25 * (float(x.min()) - low), high + 0.25 * (float(x.max()) - high)
    assert float(ema.act_min) == pytest.approx(low, rel=1e-6)
    assert float(ema.act_max) == pytest.approx(high, rel=1e-6)


def test_disabled_wrapper_is_the_float_layer_and_strip_restores_plain_modules():
    net = create_model("resnet20_cifar", num_classes=10, width=0.25).eval()
    x = torch.randn(2, 3, 32, 32)
    reference = net(x)
    QAT().quantize_net(net)
    assert sum(isinstance(m, fq.QuantMixin) for m in net.modules()) == 20  # 21 convs + fc, stem/fc skipped
    torch.testing.assert_close(net(x), reference, rtol=0, atol=0)
    plain = fq.strip(net)
    assert not any(isinstance(m, (fq.QuantMixin, fq.FoldableBatchNorm2d)) for m in plain.modules())
    assert set(plain.state_dict()) == set(create_model("resnet20_cifar", num_classes=10, width=0.25).state_dict())


def _conv_bn(gamma_scale: float = 1.0):
    conv, bn = nn.Conv2d(3, 4, 3, bias=False), nn.BatchNorm2d(4)
    with torch.no_grad():
        bn.weight.uniform_(-2, 2).mul_(gamma_scale), bn.bias.uniform_(-1, 1)
        bn.running_mean.uniform_(-1, 1), bn.running_var.uniform_(0.5, 2)
    return conv, bn


def _quantized_pair(conv: nn.Conv2d, bn: nn.BatchNorm2d, fold: bool) -> nn.Sequential:
    """conv wrapped 8-bit (input range fixed), its BN foldable; folded or simply frozen (eval-mode BN)."""
    conv, bn = fq.wrap_layer(copy.deepcopy(conv), 8, 8, "minmax", 0.01), fq.make_foldable(copy.deepcopy(bn))
    conv.act_min.fill_(-4.0), conv.act_max.fill_(4.0)
    conv.__dict__["chain_norm"] = bn  # as activation_points.attach sets it
    if fold:
        fq.fold_bn_into_conv(conv, bn)
    else:
        bn.is_folded = True  # frozen statistics, weight quantized unfolded
    fq.set_quant_state(nn.Sequential(conv, bn), enabled=True, observe=False)
    return nn.Sequential(conv, bn).train()


def test_bn_fold_quantizes_the_folded_weight_and_keeps_the_trained_parameters():
    torch.manual_seed(0)
    conv, bn = _conv_bn()
    x = torch.randn(2, 3, 8, 8)
    expected = bn.eval()(conv(x))
    folded = _quantized_pair(conv, bn, fold=True)
    qconv, qbn = folded
    assert bool(qbn.folded) and torch.equal(qconv.weight, conv.weight)  # nothing baked into the weights
    factor = (bn.weight / torch.sqrt(bn.running_var + bn.eps)).detach().view(-1, 1, 1, 1)
    # the int8 conv's weight: the folded weight, quantized per channel
    torch.testing.assert_close(qconv.quantized_weight() * factor, fq.fake_quantize_weight(conv.weight * factor, 8))
    with torch.no_grad():
        out = folded(x)  # train mode: frozen statistics, the int8 model's computation up to 8-bit rounding
    assert (out - expected).abs().max() < 0.05 * expected.abs().max()


def test_bn_fold_leaves_the_sgd_steps_of_a_small_gamma_channel_alone():
    """gamma/std = 0.01: the fold must not rescale the filter's updates. Baking the fold into the weights did,
    by (std/gamma)^2, and 8-bit QAT from a trained net diverged (docs/quantization.md)."""
    torch.manual_seed(0)
    conv, bn = _conv_bn(gamma_scale=0.01)
    x, target = torch.randn(4, 3, 8, 8), torch.randn(4, 4, 6, 6)
    grads = {}
    for fold in (True, False):
        pair = _quantized_pair(conv, bn, fold)
        torch.nn.functional.mse_loss(pair(x), target).backward()
        grads[fold] = pair[0].weight.grad
    torch.testing.assert_close(grads[True], grads[False], rtol=1e-4, atol=1e-9)


@pytest.mark.parametrize("tokens", [5, 4])  # 4 == out_features: the old (1, -1, 1) offset broadcast silently
def test_quant_linear_eval_on_tokens_adds_the_int8_bias_per_output_feature(tokens):
    """A ViT-style (batch, tokens, features) input in eval mode: the output is the linear map of the
    fake-quantized input and weight plus the bias rounded to the int8 grid s_in * s_w of each
    output feature (written out here), whatever the token count."""
    torch.manual_seed(0)
    layer = fq.wrap_layer(nn.Linear(8, 4), 8, 8, "minmax", 0.01)
    with torch.no_grad():  # scaled up so the bias grid step (~7e-3) dwarfs float error
        layer.weight.mul_(10)
        layer.bias.uniform_(-1, 1)
    fq.set_quant_state(layer, True, True)
    layer.train()(10 * torch.randn(2, tokens, 8))
    fq.set_quant_state(layer, True, False)
    x = 10 * torch.randn(2, tokens, 8)
    with torch.no_grad():
        got = layer.eval()(x)
        scale, zero_point = fq.activation_qparams(layer.act_min, layer.act_max, 8)
        x_q = torch.fake_quantize_per_tensor_affine(x, float(scale), int(zero_point), 0, 255)
        w_scale = layer.weight.abs().amax(1) / 127
        w_q = torch.clamp(torch.round(layer.weight / w_scale[:, None]), -127, 127) * w_scale[:, None]
        step = scale * w_scale
        expected = x_q @ w_q.T + torch.round(layer.bias / step) * step
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-4)
    torch.testing.assert_close(got, layer(x.reshape(-1, 8)).reshape(2, tokens, 4), rtol=0, atol=1e-4)
    rounding = (torch.round(layer.bias / step) * step - layer.bias).abs()
    assert rounding.min() > 1e-4 and rounding.std() > 1e-4  # per-feature offsets that the tolerance can see


def test_a_nan_range_is_reported_as_not_finite_not_as_never_observed(tiny_config):
    """A diverged run leaves NaN in an observer; QAT and the export must say the range is not
    finite, not that quantization never ran (the old message sent users to the wrong cause)."""
    from netcompress.compression import activation_points
    from netcompress.compression.int8_export import export_int8

    datamodule, module, trainer = build(tiny_config("compression=[qat]", "+model.width=0.25"))
    qat = next(c for c in trainer.callbacks if isinstance(c, QAT))
    qat.setup(trainer, module, "test")
    net = module.net
    fq.set_quant_state(net, True, True)
    with torch.no_grad():
        net.eval()(torch.randn(4, 3, 32, 32))
    point = dict(activation_points.quantizers(net))["layer1.0.act1"]
    point.act_max.fill_(float("nan"))
    assert fq.unobserved(net) == [] and list(fq.nonfinite_ranges(net)) == ["output of layer1.0.act1"]
    with pytest.raises(FloatingPointError, match=r"callbacks\.qat: the observed activation range of 1 fake-quant "
                                                 r"tensors is not finite: 'output of layer1\.0\.act1' "
                                                 r"\(-?[0-9.]+, nan\)"):
        qat.on_test_start(trainer, module)
    with pytest.raises(FloatingPointError, match="range of 'module:layer1.0.act1' is not finite"):
        export_int8(net, Path(trainer.default_root_dir) / "int8.onnx", (3, 32, 32), [torch.randn(2, 3, 32, 32)])


# ----- errors before training ------------------------------------------------------------------

@pytest.mark.parametrize("bits", [0, 1, 17, 8.0, True])
def test_bits_outside_2_to_16_are_rejected(bits):
    with pytest.raises(ValueError, match=rf"`callbacks\.qat\.bits` must be an int in 2\.\.16; got {bits!r}"):
        QAT(bits=bits)
    with pytest.raises(ValueError, match=r"`callbacks\.ptq\.bits_by_pattern\['layer3\.\*'\]` must be an int in 2\.\.16"):
        PTQ(bits_by_pattern={"layer3.*": 17})


@pytest.mark.parametrize("kwargs,message", [
    ({"observer": "max"}, r"`callbacks\.qat\.observer` must be one of minmax, ema; got 'max'"),
    ({"ema_momentum": 0}, r"`callbacks\.qat\.ema_momentum` must be in \(0, 1\]; got 0"),
    ({"start_epoch": -1}, r"`callbacks\.qat\.start_epoch` must be an int >= 0; got -1"),
    ({"start_epoch": 2, "freeze_observers_epoch": 2}, r"freeze_observers_epoch` must be > start_epoch \(2\)"),
    ({"calibration_batches": 0}, r"`callbacks\.qat\.calibration_batches` must be an int >= 1; got 0"),
])
def test_bad_arguments_are_rejected_at_construction(kwargs, message):
    with pytest.raises(ValueError, match=message):
        QAT(**kwargs)


def test_patterns_that_match_nothing_fail_before_training(tiny_config):
    for override, message in [
        ("callbacks.qat.include=[nolayer*]", r"callbacks\.qat: pattern 'nolayer\*' matches no"),
        ("++callbacks.qat.bits_by_pattern={nolayer*: 4}",
         r"callbacks\.qat\.bits_by_pattern: pattern 'nolayer\*' matches no quantized layer"),
    ]:
        cfg = tiny_config("compression=[qat]", override)
        datamodule, module, trainer = build(cfg)
        before = [p.detach().clone() for p in module.net.parameters()]
        with pytest.raises(ValueError, match=message):
            trainer.fit(module, datamodule=datamodule)
        assert trainer.global_step == 0
        assert all(torch.equal(b, p) for b, p in zip(before, module.net.parameters()))


def test_unsupported_layer_is_named_with_the_fix():
    class WithConv1d(nn.Module):
        def __init__(self):
            super().__init__()
            self.stem = nn.Conv2d(3, 4, 3)
            self.mix = nn.Conv1d(4, 4, 1)
            self.body = nn.Conv2d(4, 4, 3)
            self.fc = nn.Linear(4, 2)

        def forward(self, x):
            x = self.stem(x)
            x = self.mix(x.flatten(2)).unflatten(2, x.shape[2:])
            return self.fc(self.body(x).mean((2, 3)))

    callback = QAT(include=["*"])
    with pytest.raises(ValueError, match=r"layer 'mix' is a Conv1d, which fake quantization does not support.*"
                                         r"callbacks\.qat\.exclude=\['mix'\]"):
        callback.setup(None, SimpleNamespace(net=WithConv1d()), "fit")
    QAT(exclude=["mix"]).quantize_net(WithConv1d())  # the suggested fix works


def test_start_after_last_epoch_and_qat_with_ptq_are_rejected(tiny_config):
    cfg = tiny_config("compression=[qat]", "callbacks.qat.start_epoch=1")
    datamodule, module, trainer = build(cfg)
    with pytest.raises(ValueError, match=r"`callbacks\.qat\.start_epoch` \(1\) must be < trainer\.max_epochs \(1\)"):
        trainer.fit(module, datamodule=datamodule)
    with pytest.raises(ValueError, match=r"callbacks\.qat and callbacks\.ptq both quantize"):
        build(tiny_config("compression=[qat,ptq]"))


# ----- schedule, mixed precision, resume ---------------------------------------------------------

def test_schedule_and_mixed_precision_follow_the_config(tiny_config):
    cfg = tiny_config("compression=[qat]", "trainer.max_epochs=3", "callbacks.qat.start_epoch=1",
                      "callbacks.qat.freeze_observers_epoch=2", "++callbacks.qat.bits_by_pattern={layer3.*: 4}",
                      "callbacks.qat.export_int8=false", "+model.width=0.25", "save_model=false")
    datamodule, module, trainer = build(cfg)
    seen = []

    class Spy(QAT.__mro__[-2]):  # pl.Callback
        def on_train_epoch_end(self, trainer, pl_module):
            layer = pl_module.net.get_submodule("layer1.0.conv1")
            point = pl_module.net.activation_quantizers["act1"]  # quantizes layer1.0.conv1's input
            assert layer.input_quantized_upstream and (point.quant_enabled, point.observe) == (layer.quant_enabled,
                                                                                                 layer.observe)
            seen.append((layer.quant_enabled, layer.observe, float(point.act_max)))

    trainer.callbacks.append(Spy())
    trainer.fit(module, datamodule=datamodule)
    (e0, o0, r0), (e1, o1, r1), (e2, o2, r2) = seen
    assert (e0, o0, e1, o1, e2, o2) == (False, False, True, True, True, False)
    assert r0 == float("-inf") and r1 > 0 and r2 == r1  # observed in epoch 1, frozen in epoch 2
    qat = next(c for c in trainer.callbacks if isinstance(c, QAT))
    assert qat.layer_bits["layer3.0.conv1"] == 4 and qat.layer_bits["layer1.0.conv1"] == 8
    assert module.net.get_submodule("layer3.0.conv1").weight_bits == 4


@pytest.mark.slow
def test_resume_mid_qat_equals_uninterrupted(tmp_path):
    base = [*SMALL, "compression=[qat]", "callbacks=model_checkpoint", "scheduler=cosine", "trainer.max_epochs=3",
            "callbacks.qat.start_epoch=1", "callbacks.qat.freeze_observers_epoch=2", "callbacks.qat.fold_bn=true",
            "callbacks.qat.observer=ema", "callbacks.qat.latency_repeats=2"]
    straight, resumed, _ = straight_and_resumed(base, tmp_path, stop_after=2)
    assert resumed["test/acc1"] == straight["test/acc1"]
    assert resumed["int8/test/acc1"] == straight["int8/test/acc1"]
    # model.pt is the plain fp32 net (BN folded in): load_model rebuilds it and it has no quant state.
    saved = json.loads((tmp_path / "straight" / "results.json").read_text())
    for key in ("int8/test/acc1", "int8/latency_ms", "int8/size_bytes", "test/acc1", "latency_ms", "size_bytes"):
        assert key in saved, key
    assert 0 < saved["int8/size_bytes"] < saved["size_bytes"]
    net = load_model(tmp_path / "straight" / "model.pt")
    assert not any(isinstance(m, (fq.QuantMixin, fq.FoldableBatchNorm2d)) for m in net.modules())
    assert (tmp_path / "straight" / "model_int8.onnx").is_file()


@pytest.mark.parametrize("overrides", [["compression=[qat]"], ["compression=[ptq]"],
                                       ["experiment=qat_resnet20_cifar10"], ["experiment=qat_mini", "init_from=x.pt"]])
def test_configs_and_presets_instantiate(tmp_path, overrides):
    import hydra

    cfg = compose_config([*overrides, "data.root=/nonexistent"], tmp_path)
    name = "ptq" if "compression=[ptq]" in overrides else "qat"
    callback = hydra.utils.instantiate(cfg.callbacks[name])
    assert isinstance(callback, PTQ if name == "ptq" else QAT)
    if overrides[0].startswith("experiment=qat_resnet20"):
        assert (callback.start_epoch, callback.freeze_observers_epoch, callback.fold_bn) == (120, 150, True)


# ----- after pruning / slimming in the same list --------------------------------------------------

def _int8_conv_weights(path) -> dict[str, np.ndarray]:
    import onnx
    from onnx import numpy_helper

    graph = onnx.load(str(path)).graph
    return {t.name.removesuffix("_quantized").removesuffix(".weight"): numpy_helper.to_array(t)
            for t in graph.initializer if t.name.endswith("weight_quantized") and t.dims and len(t.dims) == 4}


@pytest.mark.slow
def test_pruned_then_quantized_keeps_its_zeros_in_the_int8_model(tmp_path):
    cfg = compose_config([*TINY, "+model.width=0.25", "data.val_size=16", "data.test_size=64",
                          "compression=[magnitude_pruning,qat]", "callbacks.magnitude_pruning.sparsity=0.6",
                          "trainer.max_epochs=2", "callbacks.qat.start_epoch=1", "callbacks.qat.latency_repeats=2"],
                         tmp_path / "run")
    results = run(cfg)
    assert results["status"] == "ok" and 0 <= results["int8/agreement"] <= 1
    weights = _int8_conv_weights(tmp_path / "run" / "model_int8.onnx")
    zeros = sum(int((w == 0).sum()) for w in weights.values())
    assert len(weights) == 20 and zeros >= int(0.6 * sum(w.size for w in weights.values()))  # masks survive QAT


@pytest.mark.slow
def test_slimmed_then_quantized_exports_the_thin_net(tmp_path):
    cfg = compose_config([*TINY, "compression=[bn_sparsity,slimming,qat]", "model.name=vgg11_bn_cifar",
                          "+model.width=0.125", "data.val_size=16", "data.test_size=64",
                          "callbacks.slimming.at_epochs=[1]", "callbacks.slimming.prune_ratio=0.5",
                          "callbacks.bn_sparsity.until_epoch=1", "trainer.max_epochs=3",
                          "callbacks.qat.start_epoch=2", "callbacks.qat.latency_repeats=2"], tmp_path / "run")
    results = run(cfg)
    assert results["status"] == "ok", results.get("error")
    thin = _int8_conv_weights(tmp_path / "run" / "model_int8.onnx")
    full = create_model("vgg11_bn_cifar", num_classes=10, width=0.125)
    widths = {n: m.out_channels for n, m in full.named_modules() if isinstance(m, nn.Conv2d)}
    assert thin and sum(w.shape[0] for w in thin.values()) < sum(widths[n] for n in thin)


def test_the_evaluators_judge_the_quantized_net_not_its_fp32_copy(tiny_config):
    """After QAT, model.pt stores the plain fp32 net, but retention judges the fake-quantized net that test
    scored: the retention per-class accuracies add up to test/acc1 of the quantized net."""
    from netcompress.pipeline.fit import fit_and_test

    cfg = tiny_config("compression=[qat]", "callbacks.qat.bits=2", "callbacks.qat.export_int8=false",
                      "evaluation=[retention]", "trainer.max_epochs=2")
    results, objects = fit_and_test(cfg)
    module = objects["module"]
    assert module.evaluated_net is not module.net  # model.pt's fp32 copy vs the quantized net
    counts = results["test/class_counts"]
    judged = sum(a * n for a, n in zip(results["retention/per_class_acc1"], counts) if n) / sum(counts)
    assert judged == pytest.approx(results["test/acc1"], abs=1e-9)

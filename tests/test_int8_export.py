"""Real int8 export: the onnxruntime model runs int8 kernels, uses the QAT integers, agrees with
the fake-quant model, and PTQ runs end to end without training."""
from __future__ import annotations

import json

import numpy as np
import onnx
import pytest
import torch
from onnx import numpy_helper
from torchmetrics.classification import MulticlassAccuracy

from netcompress import models  # noqa: F401
from netcompress.callbacks.qat import QAT
from netcompress.compression import fake_quant as fq
from netcompress.compression.int8_export import export_int8, fold_batchnorm, predict, session
from conftest import TINY
from netcompress.models.factory import create_model
from netcompress.models.serialization import load_model
from netcompress.pipeline.build import build
from netcompress.run import run


def calibrated_net(seed: int = 0, bits: int = 8, shortcut: str = "B"):
    """resnet20_cifar (half width, ``shortcut`` option) with random convs, BatchNorm statistics of
    the data and a least-squares classifier fitted on synthetic data (a decisive net without SGD),
    then fake quant on every layer but stem and fc, observers calibrated on 4 training batches.

    Returns (net, calibration batches, (test inputs, test targets)).
    """
    from netcompress.datamodules.synthetic import SyntheticDataModule

    torch.manual_seed(seed)
    data = SyntheticDataModule(train_size=512, val_size=0, test_size=256, batch_size=64, seed=seed)
    data.setup("fit")
    net = create_model("resnet20_cifar", num_classes=10, width=0.5, shortcut=shortcut)
    train = [torch.cat(t) for t in zip(*data.train_dataloader())]
    with torch.no_grad():  # BatchNorm statistics of the data (cumulative average), as a trained net has
        for module in net.modules():
            if isinstance(module, torch.nn.BatchNorm2d):
                module.momentum = None
        net.train()(train[0])
    net.eval()
    with torch.no_grad():  # ridge regression of one-hot targets on the pooled features
        features = net.forward_head(net.forward_features(train[0]), pre_logits=True)
        features = torch.cat([features, torch.ones(len(features), 1)], 1)
        onehot = torch.nn.functional.one_hot(train[1], 10).float()
        solution = torch.linalg.solve(features.T @ features + 1e-3 * torch.eye(features.shape[1]), features.T @ onehot)
        net.fc.weight.copy_(solution[:-1].T * 10)
        net.fc.bias.copy_(solution[-1] * 10)
    QAT(bits=bits).quantize_net(net)
    calibration = [x for x, _ in data.train_dataloader()][:4]
    fq.set_quant_state(net, True, True)
    with torch.no_grad():
        for x in calibration:
            net(x)
    fq.set_quant_state(net, True, False)
    test = [torch.cat(t) for t in zip(*data.test_dataloader())]
    return net, calibration, test


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    net, calibration, test = calibrated_net()
    path = export_int8(net, tmp_path_factory.mktemp("int8") / "model_int8.onnx", (3, 32, 32), calibration)
    return net, path, test


@pytest.fixture(scope="module")
def exported_option_a(tmp_path_factory):
    """The same, with He et al.'s option-A shortcut (subsample + zero channels, a functional concat)."""
    net, calibration, test = calibrated_net(shortcut="A")
    path = export_int8(net, tmp_path_factory.mktemp("int8a") / "model_int8.onnx", (3, 32, 32), calibration)
    return net, path, test


@pytest.mark.parametrize("fixture", ["exported", "exported_option_a"])
def test_int8_top1_agrees_with_fake_quant_on_a_test_batch(fixture, request):
    """On a net that separates the classes (a random one has near-tied logits, where any rounding flips top-1).
    Option A agreed on 95.7% of this batch when onnxruntime calibrated its shortcut concat itself."""
    net, path, (x, y) = request.getfixturevalue(fixture)
    with torch.no_grad():
        fake = net(x)
    int8 = predict(session(path, threads=1), x)
    agreement = (fake.argmax(1) == int8.argmax(1)).float().mean().item()
    assert (fake.argmax(1) == y).float().mean() > 0.5  # it did learn the synthetic classes
    assert agreement >= 0.99, agreement


@pytest.mark.parametrize("fixture", ["exported", "exported_option_a"])
def test_every_int8_activation_uses_a_qat_range(fixture, request):
    """Each QuantizeLinear of the exported graph has the scale and zero point of one fake-quant
    observer: onnxruntime calibrates no tensor itself, so int8 and fake-quant quantize the same
    tensors the same way (residual Adds and shortcuts included; option A's concat shortcut too)."""
    net, path, _ = request.getfixturevalue(fixture)
    graph = onnx.load(str(path)).graph
    tensors = {t.name: numpy_helper.to_array(t) for t in graph.initializer}
    qat = []
    for module in net.modules():
        if isinstance(module, (fq.QuantMixin, fq.ActivationQuantizer)) and not getattr(module, "input_quantized_upstream", False):
            scale, zero_point = fq.activation_qparams(module.act_min, module.act_max, module.act_bits)
            qat.append((float(scale), int(zero_point)))
    activations = [n for n in graph.node if n.op_type == "QuantizeLinear"]
    assert len(activations) == 30  # 19 ReLU outputs + 9 conv2 and 2 downsample (conv or concat) outputs before Adds
    for node in activations:
        scale, zero_point = float(tensors[node.input[1]]), int(tensors[node.input[2]])
        assert any(abs(scale - s) <= 1e-6 * s and zero_point == z for s, z in qat), node.input[0]
    if fixture == "exported_option_a":
        assert sum(n.input[0].endswith("downsample/Concat_output_0") for n in activations) == 2


def test_onnxruntime_runs_int8_kernels(exported, tmp_path):
    import onnxruntime as ort

    _, path, _ = exported
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.optimized_model_filepath = str(tmp_path / "optimized.onnx")
    ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    ops = [n.op_type for n in onnx.load(str(tmp_path / "optimized.onnx")).graph.node]
    assert ops.count("QLinearConv") == 20, sorted(set(ops))  # every quantized conv; the stem stays float
    assert "Conv" in ops or "FusedConv" in ops  # the skipped stem conv


def test_8bit_weights_are_the_qat_integers(exported):
    """Each exported int8 weight times its channel scale equals the fake-quant weight folded with BN."""
    net, path, _ = exported
    reference = fold_batchnorm(fq.strip(net, bake_weights=True), (3, 32, 32))
    graph = onnx.load(str(path)).graph
    tensors = {t.name: numpy_helper.to_array(t) for t in graph.initializer}
    checked = 0
    for node in graph.node:
        if node.op_type != "DequantizeLinear" or tensors.get(node.input[0]) is None:
            continue
        q = tensors[node.input[0]]
        if q.dtype != np.int8 or q.ndim != 4:
            continue
        layer = node.input[0].removesuffix("_quantized").removesuffix(".weight")
        scale = tensors[node.input[1]].reshape(-1, 1, 1, 1)
        expected = reference.get_submodule(layer).weight.detach().numpy()
        np.testing.assert_allclose(q.astype(np.float32) * scale, expected, rtol=1e-5, atol=1e-7)
        assert int(np.abs(q).max()) == 127
        checked += 1
    assert checked == sum(isinstance(m, fq.QuantConv2d) for m in net.modules()) == 20


def test_int8_accuracy_is_sample_averaged_top1(exported):
    """On an imbalanced batch (two thirds one class), the int8 model's acc1 (evaluation.evaluate, as in
    report_int8) is the share of images whose int8 argmax is the label, not the mean per-class recall;
    its agreement with the fake-quant net is the share of equal argmaxes, computed here by hand."""
    from netcompress.compression.int8_export import evaluate_int8

    net, path, (x, y) = exported
    sess = session(path, threads=1)
    predicted = predict(sess, x).argmax(1)
    majority = int(torch.mode(predicted).values)
    rest = (predicted != majority).nonzero().flatten()
    keep = torch.cat([(predicted == majority).nonzero().flatten(), rest[: max(1, len(rest) // 8)]])
    labels = predicted[keep].clone()
    labels[: len(labels) // 3] = (labels[: len(labels) // 3] + 1) % 10  # wrong on a third, all of one class
    batches = [(x[keep][i:i + 16], labels[i:i + 16]) for i in range(0, len(keep), 16)]
    expected = int((predicted[keep] == labels).sum()) / len(labels)
    macro = MulticlassAccuracy(10, top_k=1, average="macro")(predict(sess, x[keep]), labels).item()
    with torch.no_grad():
        fake = net.eval()(x[keep]).argmax(1)
    figures = evaluate_int8(sess, net, batches, num_classes=10)
    assert figures["acc1"] == pytest.approx(expected, abs=1e-9)
    assert figures["agreement"] == pytest.approx(float((fake == predicted[keep]).float().mean()), abs=1e-9)
    assert abs(expected - macro) > 0.01  # the two averages differ on this batch


def test_interleaved_timing_alternates_the_runners_in_one_window():
    from netcompress.evaluation.model_stats import interleaved_latency_ms

    calls = []
    runners = {name: (lambda name=name: calls.append(name)) for name in ("int8", "fp32")}
    ms = interleaved_latency_ms(runners, warmup=1, repeats=4)
    assert calls == ["int8", "fp32"] + ["int8", "fp32", "fp32", "int8"] * 2
    assert set(ms) == {"int8", "fp32"} and all(v >= 0 for v in ms.values())


def test_int8_speedup_is_against_fp32_onnxruntime_at_batch_1_and_64(exported, tmp_path):
    """The speed-up keys compare int8 and fp32 in the same runtime and thread count, each the ratio of
    its own two medians; eager PyTorch has its own key."""
    from netcompress.compression.int8_export import compare_latency, export_fp32_onnx

    net, path, _ = exported
    plain = fq.strip(net)
    fp32 = export_fp32_onnx(plain, tmp_path / "fp32.onnx", (3, 32, 32))
    figures = compare_latency(path, fp32, plain, (3, 32, 32), repeats=3, threads=1)
    assert figures["int8/threads"] == 1
    for suffix in ("", "_b64"):
        ratio = figures[f"int8/fp32_ort_latency_ms{suffix}"] / figures[f"int8/latency_ms{suffix}"]
        assert figures[f"int8/speedup_vs_fp32_ort{suffix}"] == pytest.approx(ratio)
    assert figures["int8/speedup_vs_eager_fp32"] == pytest.approx(
        figures["int8/eager_fp32_latency_ms"] / figures["int8/latency_ms"])
    assert figures["int8/latency_ms_b64"] > figures["int8/latency_ms"]  # 64 images take longer than one


def test_4bit_layers_export_their_own_integers_and_clamp(tmp_path):
    """A 4-bit QAT net exports the 4-bit integers (|q| <= 7, q * scale = the folded fake-quant
    weight), 4-bit activation scales, and a Clip at the top of each 4-bit activation range."""
    net, calibration, _ = calibrated_net(bits=4)
    path = export_int8(net, tmp_path / "int4.onnx", (3, 32, 32), calibration)
    reference = fold_batchnorm(fq.strip(net, bake_weights=True), (3, 32, 32))
    graph = onnx.load(str(path)).graph
    tensors = {t.name: numpy_helper.to_array(t) for t in graph.initializer}
    weights = [n for n in graph.node if n.op_type == "DequantizeLinear" and tensors.get(n.input[0]) is not None
               and tensors[n.input[0]].dtype == np.int8 and tensors[n.input[0]].ndim == 4]
    assert len(weights) == 20
    for node in weights:
        q, scale = tensors[node.input[0]], tensors[node.input[1]].reshape(-1, 1, 1, 1)
        assert int(np.abs(q).max()) == 7
        expected = reference.get_submodule(node.input[0].removesuffix("_quantized").removesuffix(".weight")).weight
        np.testing.assert_allclose(q * scale, expected.detach().numpy(), rtol=1e-5, atol=1e-7)
    clips = [n for n in graph.node if n.op_type == "Clip"]
    assert len(clips) == 30  # one per 4-bit activation point
    for clip in clips:
        low, high = float(tensors[clip.input[1]]), float(tensors[clip.input[2]])
        source = clip.input[0].removesuffix("_DequantizeLinear_Output")  # quantized before or after the Clip
        scale = [float(tensors[n.input[1]]) for n in graph.node
                 if n.op_type == "QuantizeLinear" and n.input[0] in (source, clip.output[0])][0]
        assert (high - low) / scale == pytest.approx(15, rel=1e-5)


@pytest.mark.slow
def test_ptq_calibrates_without_training_and_reports_int8_figures(tmp_path):
    from conftest import compose_config

    cfg = compose_config([*TINY, "+model.width=0.25", "compression=[ptq]", "trainer.max_epochs=0",
                          "callbacks.ptq.calibration_batches=2", "callbacks.ptq.latency_repeats=2"], tmp_path / "run")
    _, initial, _ = build(cfg)
    results = run(cfg)
    assert results["global_step"] == 0
    saved = json.loads((tmp_path / "run" / "results.json").read_text())
    for key in ("int8/test/acc1", "int8/latency_ms", "int8/size_bytes", "test/acc1", "size_bytes",
                "int8/fp32_ort_latency_ms", "int8/latency_ms_b64", "int8/fp32_ort_latency_ms_b64",
                "int8/speedup_vs_fp32_ort", "int8/speedup_vs_fp32_ort_b64", "int8/speedup_vs_eager_fp32",
                "int8/threads"):
        assert key in saved, key
    assert 0.0 <= saved["int8/test/acc1"] <= 1.0 and saved["int8/latency_ms"] > 0
    assert saved["int8/threads"] == torch.get_num_threads()
    assert saved["int8/size_bytes"] == (tmp_path / "run" / "model_int8.onnx").stat().st_size
    net = load_model(tmp_path / "run" / "model.pt")  # the fp32 net, untouched by PTQ
    for key, value in initial.net.state_dict().items():
        torch.testing.assert_close(net.state_dict()[key], value, rtol=0, atol=0, msg=key)


def test_fp32_onnx_of_a_net_with_batchnorm_act_keeps_the_activation(tmp_path):
    """timm's BatchNormAct2d (BN -> drop -> act in one module): folding BN into the conv must keep
    its activation (ReLU6 here), so the exported fp32 model computes what the torch net does."""
    from netcompress.compression.int8_export import export_fp32_onnx

    torch.manual_seed(0)
    net = create_model("mobilenetv2_050", num_classes=10).eval()
    with torch.no_grad():
        for module in net.modules():
            if isinstance(module, torch.nn.BatchNorm2d):
                module.running_mean.uniform_(-0.5, 0.5)
                module.running_var.uniform_(0.5, 1.5)
                module.bias.uniform_(-0.5, 0.5)
    path = export_fp32_onnx(net, tmp_path / "fp32.onnx", (3, 32, 32))
    x = torch.randn(4, 3, 32, 32)
    with torch.no_grad():
        expected = net(x)
    torch.testing.assert_close(predict(session(path, threads=1), x), expected, rtol=1e-3, atol=1e-4)
    assert "Clip" in {n.op_type for n in onnx.load(str(path)).graph.node}  # the ReLU6s are there

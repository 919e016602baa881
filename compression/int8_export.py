"""Real int8 export: fake-quant net -> ONNX QDQ model run by onnxruntime's int8 kernels on the CPU.

Why ONNX QDQ + onnxruntime (and not PT2E): torchao is not installed, the PT2E x86 inductor
path needs a C++ compiler warm-up per shape and is not robust on every timm model, while
``torch.onnx.export`` (dynamo) exports any timm CNN and folds BatchNorm into the convs, and
onnxruntime fuses DQ -> Conv -> Q into QLinearConv (VNNI/AVX2 int8 GEMM) with graph
optimisation on. After a run, :func:`compare_latency` times the int8 model against the same
net's fp32 ONNX in onnxruntime (same threads, interleaved, batch 1 and 64: the gain of
quantization alone); ``bench/bench_quantization.py`` measures the speed and size ratios.

How the QAT numbers are carried over:
* weights: the fake-quantized weights are baked in before export; BatchNorm folding scales
  each output channel, and onnxruntime's per-channel symmetric int8 scale of the folded weight
  reproduces exactly the same integers for 8-bit layers; sub-8-bit layers get their b-bit
  per-channel scales as overrides, so int8 holds exactly their integers too;
* activations: QAT fake-quantizes the tensors the int8 graph quantizes, where they are produced
  (``compression/activation_points.py``: conv outputs, ReLU/MaxPool outputs, and the inputs of
  layers no such point covers); each range (rmin, rmax) goes to onnxruntime as a
  ``TensorQuantOverrides`` entry of that tensor. Only Conv/Gemm/MatMul/Relu/Clip/Add are
  quantized (pooling, flatten etc. run in float on the dequantized values, as in the fake-quant
  net), so with ResNet-style nets no range is left to onnxruntime's own calibration; tensors of
  other nets that no point covers fall back to MinMax on the same training batches. Layers left
  in float (first/last when skipped) are excluded.
"""
from __future__ import annotations

import copy
import logging
import os
import tempfile
from pathlib import Path
from functools import partial
from typing import Any, Callable, Iterable, Mapping

import numpy as np
import torch
from torch import nn

from netcompress.compression.fake_quant import (ActivationQuantizer, activation_qparams, activation_ranges, never_observed,
                                     output_ranges, quant_modules, strip)

QUANTIZED_OPS = ["Conv", "Gemm", "MatMul", "Relu", "Clip", "Add"]


class _AfterNorm(nn.Module):
    """What a folded norm that holds more leaves behind: its children in order (timm's
    BatchNormAct2d -> drop, act), under the same module names."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for child in self.children():
            x = child(x)
        return x


def fold_batchnorm(net: nn.Module, input_size: tuple[int, ...]) -> nn.Module:
    """Eval copy of ``net`` with every conv -> BatchNorm2d pair fused into one conv.

    A plain BN becomes Identity; a BN that holds more (timm's BatchNormAct2d: BN -> drop -> act)
    keeps its children, so its activation stays under the same name.
    Folding multiplies each output channel of the weight by gamma/std, so per-channel integer
    weights stay the same integers (only the channel's scale changes).
    """
    from torch.nn.utils.fusion import fuse_conv_bn_eval

    from netcompress.compression.fake_quant import _set_child, conv_bn_pairs

    net = copy.deepcopy(net).cpu().eval()
    for conv, bn in conv_bn_pairs(net, input_size).items():
        norm = net.get_submodule(bn)
        _set_child(net, conv, fuse_conv_bn_eval(net.get_submodule(conv), norm))
        rest = nn.Identity()
        if any(True for _ in norm.children()):
            rest = _AfterNorm()
            for name, child in norm.named_children():
                rest.add_module(name, child)
        _set_child(net, bn, rest)
    return net


def export_fp32_onnx(net: nn.Module, path: str | os.PathLike, input_size: tuple[int, ...]) -> Path:
    """ONNX (opset 17, dynamic batch) of ``net`` with BatchNorm folded; initializers keep parameter names.

    The TorchScript exporter takes well under a second on a ResNet (the dynamo exporter takes
    10+ s on 2 cores), so it is tried first; dynamo is the fallback for models it cannot trace.
    """
    import warnings

    path = Path(path)
    net = fold_batchnorm(net, input_size)
    x = torch.zeros(2, *input_size)
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")
        try:
            torch.onnx.export(net, (x,), str(path), dynamo=False, input_names=["input"], output_names=["logits"],
                              dynamic_axes={"input": {0: "batch"}, "logits": {0: "batch"}}, opset_version=17)
        except Exception:  # noqa: BLE001 - any tracing failure: use the dynamo exporter instead
            logging.getLogger("torch.onnx").setLevel(logging.ERROR)
            program = torch.onnx.export(net, (x,), dynamo=True, input_names=["input"], output_names=["logits"],
                                        dynamic_shapes=({0: torch.export.Dim("batch", min=1)},), optimize=True)
            program.save(str(path))
    _drop_identities(path)
    return path


def _drop_identities(path: Path) -> None:
    """Remove Identity nodes (the folded BatchNorms) so the quantizer sees Conv -> Relu -> Conv chains."""
    import onnx

    model = onnx.load(str(path))
    graph = model.graph
    outputs = {o.name for o in graph.output}
    rename = {}
    keep = []
    for node in graph.node:
        if node.op_type == "Identity" and node.output[0] not in outputs:
            rename[node.output[0]] = rename.get(node.input[0], node.input[0])
        else:
            keep.append(node)
    for node in keep:
        for i, name in enumerate(node.input):
            if name in rename:
                node.input[i] = rename[name]
    del graph.node[:]
    graph.node.extend(keep)
    onnx.save(model, str(path))


def scope_module(node_name: str) -> str:
    """Module name of a TorchScript-exported node: '/layer1/layer1.0/act2/Relu' -> 'layer1.0.act2'.

    The exporter names a node by its module scopes, where a Sequential's child repeats the
    parent's name ('layer1.0' under 'layer1').
    """
    path: list[str] = []
    for part in node_name.strip("/").split("/")[:-1]:
        if path and part.startswith(path[-1] + "."):
            path[-1] = part
        else:
            path.append(part)
    return ".".join(path)


def module_outputs(graph) -> dict[str, str]:
    """{module name: output tensor of the last node in its scope} of a TorchScript-exported graph.

    Nodes are in topological (trace) order and a module's ops are traced together, so a module's
    last node produces its output: '/layer2/layer2.0/downsample/Concat' -> 'layer2.0.downsample'.
    Every enclosing module is recorded too (a later node of the parent overrides it).
    """
    outputs: dict[str, str] = {}
    for node in graph.node:
        parts = scope_module(node.name).split(".") if node.output else []
        for i in range(1, len(parts) + 1):
            outputs[".".join(parts[:i])] = node.output[0]
    return outputs


def _add_range(overrides: dict, tensor: str, low: float, high: float, bits: int = 8,
               sub8: dict[str, int] | None = None) -> None:
    """Activation override of ``tensor``: its observed range at 8+ bits (the union if two layers read it);
    below 8 bits the scale and zero point of the ``bits`` grid, so int8 holds the same integers
    (recorded in ``sub8`` for :func:`_clip_sub8bit`)."""
    if tensor in overrides and "scale" in overrides[tensor][0]:
        return
    if bits < 8:
        if sub8 is not None:
            sub8[tensor] = bits
        scale, zero_point = activation_qparams(torch.tensor(low), torch.tensor(high), bits)
        overrides[tensor] = [{"scale": np.array(float(scale), dtype=np.float32),
                              "zero_point": np.array(int(zero_point), dtype=np.uint8)}]
        return
    old = overrides.get(tensor, [{"rmin": low, "rmax": high}])[0]
    overrides[tensor] = [{"rmin": np.float32(min(low, old["rmin"])), "rmax": np.float32(max(high, old["rmax"]))}]


def _weight_grid(overrides: dict, name: str, weight: np.ndarray, bits: int) -> None:
    """Per-channel int8 scales of a sub-8-bit layer's folded weight on its ``bits`` grid
    (max|w_c| / (2^(b-1) - 1)), so the int8 weights are exactly the QAT integers."""
    qmax = 2 ** (bits - 1) - 1
    amax = np.abs(weight.reshape(weight.shape[0], -1)).max(axis=1)
    scales = np.maximum(amax / qmax, np.finfo(np.float32).eps).astype(np.float32)
    overrides[name] = [{"axis": 0, "scale": np.array(s, dtype=np.float32), "zero_point": np.array(0, dtype=np.int8)}
                       for s in scales]


def _clip_sub8bit(path: Path, overrides: dict, sub8: dict[str, int]) -> list[str]:
    """Insert a float Clip to the b-bit range after every sub-8-bit activation ``sub8`` {tensor: b};
    returns the Clip node names (to keep out of quantization).

    int8 holds a b-bit tensor's integers (same scale and zero point) but would not clamp values
    beyond the observed range at 2^b - 1 as the fake quant does; the Clip does. Its output gets the
    same override, so the tensor is quantized, clamped and quantized again with identical
    parameters (the second step is exact).
    """
    import onnx
    from onnx import helper, numpy_helper

    model = onnx.load(str(path))
    graph = model.graph
    nodes = list(graph.node)
    clips = []
    for tensor, bits in sub8.items():
        entry = overrides[tensor][0]
        scale, zero_point = float(entry["scale"]), int(entry["zero_point"])
        low, high = np.float32(-zero_point * scale), np.float32((2 ** bits - 1 - zero_point) * scale)
        clipped, name = f"{tensor}_clip{bits}", f"{tensor}_Clip{bits}"
        for node in nodes:
            for i, value in enumerate(node.input):
                if value == tensor:
                    node.input[i] = clipped
        graph.initializer.extend([numpy_helper.from_array(np.array(low), f"{name}_min"),
                                  numpy_helper.from_array(np.array(high), f"{name}_max")])
        clip = helper.make_node("Clip", [tensor, f"{name}_min", f"{name}_max"], [clipped], name=name)
        producer = next((i for i, n in enumerate(nodes) if tensor in n.output), -1)
        nodes.insert(producer + 1, clip)  # right after its producer: the graph stays topologically sorted
        overrides[clipped] = overrides[tensor]
        clips.append(name)
    del graph.node[:]
    graph.node.extend(nodes)
    onnx.save(model, str(path))
    return clips


def _check_ranges(ranges: list[tuple[str, tuple[float, float]]]) -> None:
    """Refuse to export a range that was never observed, or one that is not finite (NaN/inf: diverged)."""
    for name, (low, high) in ranges:
        if never_observed(low, high):
            raise RuntimeError(f"int8 export: '{name}' has no observed activation range; "
                               "quantization never ran (calibrate or train with QAT first)")
        if not np.isfinite(low) or not np.isfinite(high):
            raise FloatingPointError(f"int8 export: the observed activation range of '{name}' is not finite "
                                     f"({low}, {high}): the activations diverged during training or calibration")


class _Batches:
    """onnxruntime CalibrationDataReader over a list of float32 arrays."""

    def __init__(self, arrays: list[np.ndarray]) -> None:
        self._it = iter([{"input": a} for a in arrays])

    def get_next(self):
        return next(self._it, None)


def export_int8(qnet: nn.Module, path: str | os.PathLike, input_size: tuple[int, ...],
                calibration: Iterable[torch.Tensor]) -> Path:
    """Write the int8 QDQ ONNX model of a fake-quant net (``QuantConv2d``/``QuantLinear`` layers).

    ``calibration``: a few input batches (training data) for the tensors the fake-quant net does
    not observe itself.
    """
    import onnx
    from onnx import numpy_helper
    from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_static

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    ranges = activation_ranges(qnet)
    points = output_ranges(qnet)
    _check_ranges([*ranges.items(), *((f"{k}:{n}", r) for (k, n), r in points.items())])
    modules = dict(quant_modules(qnet))
    layers = set(modules)
    point_bits = {m.anchor: m.act_bits for m in qnet.modules() if isinstance(m, ActivationQuantizer)}
    plain = strip(qnet, bake_weights=True)
    with tempfile.TemporaryDirectory() as tmp:
        fp32_path = export_fp32_onnx(plain, Path(tmp) / "fp32.onnx", input_size)
        graph = onnx.load(str(fp32_path)).graph
        weights = {t.name: t for t in graph.initializer}
        quantized, overrides, placed, sub8 = [], {}, set(), {}
        for node in graph.node:
            layer = node.input[1].removesuffix(".weight") if len(node.input) > 1 else None
            if node.op_type in ("Conv", "Gemm", "MatMul") and layer in layers:
                quantized.append(node.name)
                module = modules[layer]
                if layer in ranges:
                    _add_range(overrides, node.input[0], *ranges[layer], module.act_bits, sub8)
                if ("conv", layer) in points:
                    _add_range(overrides, node.output[0], *points["conv", layer], point_bits["conv", layer], sub8)
                    placed.add(("conv", layer))
                if module.weight_bits < 8 and node.op_type != "MatMul" and node.input[1] in weights:
                    _weight_grid(overrides, node.input[1], numpy_helper.to_array(weights[node.input[1]]),
                                 module.weight_bits)
            elif node.op_type in ("Relu", "Clip", "MaxPool") and ("module", scope_module(node.name)) in points:
                anchor = ("module", scope_module(node.name))
                _add_range(overrides, node.output[0], *points[anchor], point_bits[anchor], sub8)
                placed.add(anchor)
        outputs = module_outputs(graph)
        for anchor in sorted(a for a in set(points) - placed if a[0] == "module" and a[1] in outputs):
            # a module that computes its output functionally (option-A shortcut's Concat): its last node's output
            _add_range(overrides, outputs[anchor[1]], *points[anchor], point_bits[anchor], sub8)
            placed.add(anchor)
        if set(points) - placed:
            logging.getLogger(__name__).warning("int8 export: activation points %s have no node in the ONNX graph; "
                                                "onnxruntime calibrates those tensors itself",
                                                sorted(set(points) - placed))
        missing = layers - {n.input[1].removesuffix(".weight") for n in graph.node if len(n.input) > 1}
        if missing:  # e.g. all-zero folded weights (timm's zero-init last BN) that the exporter deduplicated
            logging.getLogger(__name__).warning("int8 export: layers %s have no named weight in the ONNX graph "
                                                "(identical weights are deduplicated); they stay in float",
                                                sorted(missing))
        excluded = [n.name for n in graph.node if n.op_type in ("Conv", "Gemm", "MatMul") and n.name not in quantized]
        excluded += _clip_sub8bit(fp32_path, overrides, sub8)
        arrays = [b.detach().float().cpu().contiguous().numpy() for b in calibration]
        quantize_static(str(fp32_path), str(path), _Batches(arrays), quant_format=QuantFormat.QDQ,
                        per_channel=True, activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8,
                        calibrate_method=CalibrationMethod.MinMax, nodes_to_exclude=excluded,
                        op_types_to_quantize=QUANTIZED_OPS,
                        extra_options={"TensorQuantOverrides": overrides, "WeightSymmetric": True,
                                       "ActivationSymmetric": False})
    own = sorted({n.input[0] for n in onnx.load(str(path)).graph.node
                  if n.op_type == "QuantizeLinear" and n.input[0] not in overrides})
    if own:  # e.g. activations computed by functional ops that no fake-quant point follows
        logging.getLogger(__name__).warning(
            "int8 export: onnxruntime calibrated %d activation tensors itself (no fake-quant range), so the int8 "
            "model may disagree with the fake-quant one there: %s", len(own), own[:8])
    return path


def session(path: str | os.PathLike, threads: int | None = None):
    """onnxruntime CPU session with full graph optimisation (QDQ -> QLinearConv fusion)."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.intra_op_num_threads = threads or torch.get_num_threads()
    options.inter_op_num_threads = 1
    options.log_severity_level = 3
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def predict(sess, x: torch.Tensor) -> torch.Tensor:
    """Logits of one batch from an onnxruntime session."""
    out = sess.run(None, {"input": x.detach().float().cpu().contiguous().numpy()})[0]
    return torch.from_numpy(out)


def ort_runner(sess, input_size: tuple[int, ...], batch_size: int = 1) -> Callable[[], object]:
    """One onnxruntime forward pass of a fixed random batch per call (for ``interleaved_latency_ms``)."""
    feed = {"input": np.random.default_rng(0).standard_normal((batch_size, *input_size)).astype(np.float32)}
    return lambda: sess.run(None, feed)


def compare_latency(int8_path: Path, fp32_path: Path, fp32_net: nn.Module, input_size: tuple[int, ...],
                    repeats: int, threads: int | None = None) -> dict[str, float]:
    """int8 vs fp32 onnxruntime on the same BN-folded graph, same thread count, timed interleaved in
    one window at batch 1 (``repeats`` rounds, eager PyTorch fp32 in the same rounds) and batch 64
    (``max(3, repeats // 10)`` rounds): the speed-up of quantization alone, and the eager one apart.
    """
    from netcompress.evaluation.model_stats import eager_runner, interleaved_latency_ms

    threads = threads or torch.get_num_threads()
    previous = torch.get_num_threads()
    torch.set_num_threads(threads)  # eager PyTorch gets the same threads as onnxruntime
    try:
        int8, fp32 = session(int8_path, threads), session(fp32_path, threads)
        b1 = interleaved_latency_ms({"int8": ort_runner(int8, input_size), "ort": ort_runner(fp32, input_size),
                                     "eager": eager_runner(fp32_net, input_size)}, warmup=5, repeats=repeats)
        b64 = interleaved_latency_ms({"int8": ort_runner(int8, input_size, 64),
                                      "ort": ort_runner(fp32, input_size, 64)}, warmup=1, repeats=max(3, repeats // 10))
    finally:
        torch.set_num_threads(previous)
    return {"int8/latency_ms": b1["int8"], "int8/fp32_ort_latency_ms": b1["ort"],
            "int8/speedup_vs_fp32_ort": b1["ort"] / b1["int8"],
            "int8/latency_ms_b64": b64["int8"], "int8/fp32_ort_latency_ms_b64": b64["ort"],
            "int8/speedup_vs_fp32_ort_b64": b64["ort"] / b64["int8"],
            "int8/eager_fp32_latency_ms": b1["eager"], "int8/speedup_vs_eager_fp32": b1["eager"] / b1["int8"],
            "int8/threads": threads}


def calibration_batches(trainer, n: int) -> list[torch.Tensor]:
    """The first ``n`` input batches of the training loader (the data PTQ/QAT observers see)."""
    datamodule = trainer.datamodule
    loader = datamodule.train_dataloader()
    out = []
    for inputs, _ in loader:
        out.append(inputs)
        if len(out) >= n:
            break
    return out


def evaluate_int8(sess, qnet: nn.Module, loader: Iterable, num_classes: int) -> dict[str, Any]:
    """Test figures of the int8 model (``evaluation/metrics.py``: acc1 sample-averaged, acc5, acc1_macro,
    per-class) plus ``agreement``: the share of images where its top-1 equals the fake-quant net's."""
    from netcompress.evaluation.evaluate import evaluate
    from netcompress.evaluation.metrics import Agreement, ClassificationMetrics

    return evaluate(partial(predict, sess), loader, [ClassificationMetrics(num_classes), Agreement()], reference=qnet)


def report_int8(trainer, pl_module, qnet: nn.Module, calibration: int, latency_repeats: int,
                filename: str = "model_int8.onnx") -> Mapping[str, float]:
    """Export ``qnet`` to int8 in the run folder, test it, time it against fp32, report int8/* through the module.

    ``int8/agreement`` is the fraction of test images where the int8 model's top-1 equals the
    fake-quant model's (the fidelity of the export). Latency keys: :func:`compare_latency`.
    """
    datamodule = trainer.datamodule
    input_size = tuple(datamodule.input_size)
    path = export_int8(qnet, Path(trainer.default_root_dir) / filename, input_size,
                       calibration_batches(trainer, calibration))
    tested = evaluate_int8(session(path), qnet, datamodule.test_dataloader(), int(datamodule.num_classes))
    plain = strip(qnet)  # the fp32 net of model.pt
    with tempfile.TemporaryDirectory() as tmp:
        fp32_path = export_fp32_onnx(plain, Path(tmp) / "fp32.onnx", input_size)
        timing = compare_latency(path, fp32_path, plain, input_size, latency_repeats)
    figures = {"int8/test/acc1": tested["acc1"], "int8/test/acc5": tested["acc5"],
               "int8/test/acc1_macro": tested["acc1_macro"], "int8/agreement": tested["agreement"],
               **timing, "int8/size_bytes": path.stat().st_size}
    for key, value in figures.items():
        pl_module.report_result(key, value)
    return figures


__all__ = ["fold_batchnorm", "export_fp32_onnx", "export_int8", "session", "predict", "ort_runner",
           "compare_latency", "evaluate_int8", "report_int8", "calibration_batches", "module_outputs"]

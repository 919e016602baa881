"""Quantization benchmark: fake-quant training-step overhead, and int8 (onnxruntime) vs fp32 on CPU.

    python bench/bench_quantization.py --threads 1                      # step overhead + int8 speed/size
    python bench/bench_quantization.py --runs fp32=DIR qat8=DIR ...     # + accuracy table of real runs

Everything compared is measured side by side in one process, with ``--threads`` torch/onnxruntime
threads (1 by default: the machine's cores are shared and noisy, so compare ratios, not ms).
Tables:
1. training step (forward + backward + SGD, batch 128, ResNet-20 CIFAR): fp32 vs 8-bit fake quant;
2. inference latency (median ms) at batch 1 and 64 and model size: PyTorch fp32 eager,
   onnxruntime fp32 (same BN-folded graph), onnxruntime int8 QDQ, timed interleaved in one
   window (``evaluation.model_stats.interleaved_latency_ms``, as a run's ``int8/*`` keys are), for
   resnet20_cifar (32x32) and timm resnet18 (``--resnet18-size``, 224 by default). "ORT fp32/int8"
   is the speed-up of quantization alone; "torch/int8" mixes runtime and quantization;
3. with ``--runs``: test/acc1, int8/test/acc1 and int8/agreement read from run folders' results.json.
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from netcompress import models  # noqa: E402,F401
from netcompress.callbacks.qat import QAT  # noqa: E402
from netcompress.compression import fake_quant as fq  # noqa: E402
from netcompress.compression.int8_export import export_fp32_onnx, export_int8, ort_runner, session  # noqa: E402
from netcompress.evaluation.model_stats import eager_runner, interleaved_latency_ms  # noqa: E402
from netcompress.models.factory import create_model  # noqa: E402
from netcompress.models.serialization import save_model  # noqa: E402


def step_time_ms(net: torch.nn.Module, batch: int, steps: int, warmup: int = 3) -> float:
    """Median time of one SGD training step (channels_last, as the module trains)."""
    net = net.train().to(memory_format=torch.channels_last)
    optimizer = torch.optim.SGD(net.parameters(), lr=0.01, momentum=0.9)
    x = torch.randn(batch, 3, 32, 32).to(memory_format=torch.channels_last)
    y = torch.randint(0, 10, (batch,))
    times = []
    for i in range(warmup + steps):
        start = time.perf_counter()
        loss = torch.nn.functional.cross_entropy(net(x), y)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        if i >= warmup:
            times.append((time.perf_counter() - start) * 1000)
    return statistics.median(times)


def qat_net(name: str, **kwargs) -> torch.nn.Module:
    """8-bit QAT wrappers, observers on. BN statistics randomised like a trained net's (timm zero-inits
    the last BN gamma of each block, which would make those convs all-zero and trivially cheap)."""
    net = create_model(name, num_classes=10, **kwargs)
    with torch.no_grad():
        for m in net.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.weight.uniform_(0.5, 1.5), m.bias.uniform_(-0.2, 0.2)
                m.running_mean.uniform_(-0.1, 0.1), m.running_var.uniform_(0.5, 1.5)
    QAT(bits=8, observer="ema").quantize_net(net)
    fq.set_quant_state(net, enabled=True, observe=True)
    return net


def bench_step(args) -> None:
    torch.manual_seed(0)
    fp32 = step_time_ms(create_model("resnet20_cifar", num_classes=10), args.batch, args.steps)
    qat = step_time_ms(qat_net("resnet20_cifar"), args.batch, args.steps)
    print(f"\n## training step, resnet20_cifar, batch {args.batch}, {args.threads} thread(s), median of {args.steps}")
    print("| fp32 ms | QAT-8 ms | QAT / fp32 |\n|---|---|---|")
    print(f"| {fp32:.1f} | {qat:.1f} | {qat / fp32:.2f}x |")


def bench_int8(args) -> None:
    print(f"\n## inference, {args.threads} thread(s), median ms, interleaved (batch 1: {args.repeats} rounds, "
          f"batch 64: {args.repeats_64} rounds)")
    print("| model | batch | torch fp32 | ORT fp32 | ORT int8 | torch/int8 | ORT fp32/int8 | size fp32 | size int8 | "
          "size ratio |\n|---|---|---|---|---|---|---|---|---|---|")
    for name, size in (("resnet20_cifar", 32), ("resnet18", args.resnet18_size)):
        torch.manual_seed(0)
        input_size = (3, size, size)
        net = qat_net(name).eval()
        calibration = [torch.randn(8, *input_size) for _ in range(4)]
        with torch.no_grad():
            for x in calibration:
                net(x)
        fq.set_quant_state(net, enabled=True, observe=False)
        plain = fq.strip(net)
        with tempfile.TemporaryDirectory() as tmp:
            fp32_bytes = save_model(plain, Path(tmp) / "model.pt", name, 10)
            fp32_onnx = export_fp32_onnx(plain, Path(tmp) / "fp32.onnx", input_size)
            int8_onnx = export_int8(net, Path(tmp) / "int8.onnx", input_size, calibration)
            int8_bytes = int8_onnx.stat().st_size
            s32, s8 = session(fp32_onnx, args.threads), session(int8_onnx, args.threads)
            for batch in (1, 64):
                repeats = args.repeats if batch == 1 else args.repeats_64
                ms = interleaved_latency_ms({"torch": eager_runner(plain, input_size, batch),
                                             "ort32": ort_runner(s32, input_size, batch),
                                             "ort8": ort_runner(s8, input_size, batch)}, warmup=2, repeats=repeats)
                t, o32, o8 = ms["torch"], ms["ort32"], ms["ort8"]
                print(f"| {name} {size}x{size} | {batch} | {t:.2f} | {o32:.2f} | {o8:.2f} | {t / o8:.2f}x | "
                      f"{o32 / o8:.2f}x | {fp32_bytes} | {int8_bytes} | {fp32_bytes / int8_bytes:.2f}x |")


def runs_table(runs: list[str]) -> None:
    print("\n## real runs (results.json)")
    print("| run | test/acc1 | int8/test/acc1 | int8/agreement | int8 vs fp32 ORT, b1 / b64 | train_time_s | folder |\n"
          "|---|---|---|---|---|---|---|")
    for item in runs:
        label, _, folder = item.partition("=")
        r = json.loads((Path(folder) / "results.json").read_text())

        def f(key):
            value = r.get(key)
            return f"{value:.4f}" if isinstance(value, float) else str(value if value is not None else "-")

        print(f"| {label} | {f('test/acc1')} | {f('int8/test/acc1')} | {f('int8/agreement')} | "
              f"{f('int8/speedup_vs_fp32_ort')} / {f('int8/speedup_vs_fp32_ort_b64')} | {f('train_time_s')} | "
              f"{folder} |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--threads", type=int, default=1, help="torch and onnxruntime intra-op threads")
    parser.add_argument("--batch", type=int, default=128, help="training batch for the step benchmark")
    parser.add_argument("--steps", type=int, default=10, help="timed training steps per variant")
    parser.add_argument("--repeats", type=int, default=30, help="timed batch-1 inference runs")
    parser.add_argument("--repeats-64", type=int, default=5, help="timed batch-64 inference runs")
    parser.add_argument("--resnet18-size", type=int, default=224, help="input side of timm resnet18")
    parser.add_argument("--skip", nargs="*", default=[], choices=["step", "int8"], help="tables to leave out")
    parser.add_argument("--runs", nargs="*", default=[], help="label=run_folder pairs for the accuracy table")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    if "step" not in args.skip:
        bench_step(args)
    if "int8" not in args.skip:
        bench_int8(args)
    if args.runs:
        runs_table(args.runs)


if __name__ == "__main__":
    main()

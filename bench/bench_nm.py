"""N:M (2:4) sparsity: what it costs to train with and what it gains on sparse tensor cores, side by side.

2:4 semi-structured sparsity (Mishra et al. 2021, "Accelerating Sparse Deep Neural Networks"):

1. GPU speed-up (CUDA, compute capability >= 8.0 only; elsewhere a skip message and exit 0): an fp16
   Linear layer, dense vs its 2:4 weight (masks from ``compression.patterns.nm_masks``) converted by
   ``torch.sparse.to_sparse_semi_structured``; median time per forward, CUDA-synchronised, and the
   max difference of the outputs (same math, so fp16 rounding only).
2. Training overhead (CPU, Lightning fit, ResNet-20, synthetic CIFAR-sized data): median time of one
   training step with MagnitudePruning 2:4 (``granularity=nm``) vs 50% unstructured, both one-shot at
   step 0 and enforced after every step by the same fused ``_foreach_mul_``; the two settings
   interleaved over several rounds. Target: nm / unstructured <= 1.02. The callback's own per-step hook
   is also timed inside the run (``1 + hook/step``), the robust figure on shared cores.

    .venv/bin/python bench/bench_nm.py --threads 1
    .venv/bin/python bench/bench_nm.py --skip-overhead    # part 1 only (GPU)

Run with --threads 1 on shared cores and read the ratios, not the absolute times.
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from netcompress import models  # noqa: E402,F401
from netcompress.callbacks.magnitude_pruning import MagnitudePruning  # noqa: E402
from netcompress.compression.patterns import check_nm, nm_masks  # noqa: E402
from netcompress.models.factory import create_model  # noqa: E402
from bench_pruning import step_timer, timed  # noqa: E402  (same step timer as the pruning bench)


# ----- 1. GPU: dense vs 2:4 semi-structured Linear ---------------------------------------------------
def gpu_speedup(out_features: int, in_features: int, batch: int, repeats: int) -> None:
    print("\n1. fp16 Linear forward, dense vs 2:4 (torch.sparse.to_sparse_semi_structured)")
    if not torch.cuda.is_available():
        print("   skipped: no CUDA GPU here (2:4 sparse tensor cores need compute capability >= 8.0)")
        return
    capability = torch.cuda.get_device_capability()
    if capability < (8, 0):
        print(f"   skipped: {torch.cuda.get_device_name()} has compute capability {capability[0]}.{capability[1]}; "
              "2:4 sparse tensor cores need >= 8.0")
        return
    from torch.sparse import to_sparse_semi_structured

    torch.manual_seed(0)
    linear = torch.nn.Linear(in_features, out_features, bias=False).half().cuda().eval()
    with torch.no_grad():
        linear.weight.mul_(nm_masks({"w": linear.weight}, 0.5, n=2, m=4)["w"])
    assert check_nm(linear.weight, 2, 4)
    x = torch.randn(batch, in_features, dtype=torch.float16, device="cuda")
    sparse = torch.nn.Linear(in_features, out_features, bias=False).half().cuda().eval()
    sparse.weight = torch.nn.Parameter(to_sparse_semi_structured(linear.weight.detach().clone()), requires_grad=False)

    def median_ms(layer: torch.nn.Module) -> float:
        times = []
        with torch.inference_mode():
            for _ in range(5):
                layer(x)
            torch.cuda.synchronize()
            for _ in range(repeats):
                start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                start.record()
                layer(x)
                end.record()
                torch.cuda.synchronize()
                times.append(start.elapsed_time(end))
        return statistics.median(times)

    with torch.inference_mode():
        diff = float((linear(x) - sparse(x)).abs().max())
    dense_ms, sparse_ms = [], []
    for _ in range(3):  # interleaved
        dense_ms.append(median_ms(linear))
        sparse_ms.append(median_ms(sparse))
    d, s = statistics.median(dense_ms), statistics.median(sparse_ms)
    print(f"   {torch.cuda.get_device_name()} (sm_{capability[0]}{capability[1]}), x [{batch}, {in_features}] @ "
          f"W [{out_features}, {in_features}]^T, fp16, {repeats} repeats x 3 rounds")
    print(f"   {'dense ms':>10}{'2:4 ms':>10}{'speed-up':>10}{'max |diff|':>12}")
    print(f"   {d:>10.3f}{s:>10.3f}{d / s:>10.2f}{diff:>12.2e}")


# ----- 2. CPU: per-step training overhead, 2:4 vs unstructured 50% ------------------------------------
def time_steps(kind: str, steps: int, batch: int, model: str) -> tuple[list[float], list[float]]:
    import pytorch_lightning as pl
    from functools import partial

    from netcompress.datamodules.synthetic import SyntheticDataModule
    from netcompress.lightning_modules.classification import ClassificationModule

    torch.manual_seed(0)
    data = SyntheticDataModule(num_classes=10, train_size=batch * (steps + 3), val_size=batch, test_size=batch,
                               batch_size=batch)
    net = create_model(model, num_classes=10)
    module = ClassificationModule(net, optimizer=partial(torch.optim.SGD, lr=0.05, momentum=0.9, weight_decay=1e-4))
    callback = {"unstructured_50": MagnitudePruning(sparsity=0.5, start=0),
                "nm_2of4": MagnitudePruning(sparsity=0.5, granularity="nm", n=2, m=4, start=0)}[kind]
    hook_times: list[float] = []
    callback.on_train_batch_end = timed(callback.on_train_batch_end, hook_times)
    timer = step_timer()
    trainer = pl.Trainer(max_epochs=1, accelerator="cpu", logger=False, enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0,
                         limit_val_batches=0, callbacks=[callback, timer])
    trainer.fit(module, datamodule=data)
    if kind == "nm_2of4":  # the trained weights are 2:4
        layers = dict(module.net.named_modules())
        assert all(check_nm(layers[name].weight, 2, 4) for name in callback.masks)
    return timer.times[3:], hook_times[3:]  # drop warm-up steps (and the one-shot pruning event at step 0)


def overhead(rounds: int, steps: int, batch: int, model: str) -> None:
    kinds = ["unstructured_50", "nm_2of4"]
    times: dict[str, list[float]] = {k: [] for k in kinds}
    hooks: dict[str, list[float]] = {k: [] for k in kinds}
    for _ in range(rounds):
        for kind in kinds:
            step, hook = time_steps(kind, steps, batch, model)
            times[kind] += step
            hooks[kind] += hook
    base = statistics.median(times["unstructured_50"])
    print(f"\n2. per-step training time, {model}, batch {batch}, {rounds} rounds x {steps} steps "
          f"(median, interleaved); target nm / unstructured <= 1.02")
    print(f"{'masks':<18}{'ms/step':>10}{'ratio':>8}{'hook ms':>10}{'1 + hook/step':>15}")
    for kind in kinds:
        median = statistics.median(times[kind])
        hook = statistics.median(hooks[kind])
        print(f"{kind:<18}{median * 1000:>10.1f}{median / base:>8.3f}{hook * 1000:>10.3f}{1 + hook / median:>15.4f}")
    print("ratio: end-to-end step time vs unstructured 50% (noisy on shared cores); 1 + hook/step: the "
          "callback's per-step mask enforcement, timed inside the run, over the step time")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=1, help="torch intra-op threads (cores are shared)")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--steps", type=int, default=15, help="timed steps per setting and round")
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--model", default="resnet20_cifar")
    parser.add_argument("--gpu-shape", type=int, nargs=3, default=[3072, 10240, 3072],
                        metavar=("OUT", "IN", "BATCH"), help="Linear out/in features and batch rows (GPU part)")
    parser.add_argument("--gpu-repeats", type=int, default=50)
    parser.add_argument("--skip-overhead", action="store_true")
    parser.add_argument("--skip-gpu", action="store_true")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    print(f"torch {torch.__version__}, {args.threads} thread(s)")
    if not args.skip_gpu:
        gpu_speedup(*args.gpu_shape, repeats=args.gpu_repeats)
    if not args.skip_overhead:
        overhead(args.rounds, args.steps, args.batch, args.model)


if __name__ == "__main__":
    main()

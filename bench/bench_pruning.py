"""Pruning costs and gains, measured side by side in one process (CPU, --threads intra-op threads).

1. Per-step training overhead (Lightning fit, ResNet-20, synthetic CIFAR-sized data): median
   time of one training step (forward + backward + SGD + callback hooks) with no callback, with
   MagnitudePruning (90% unstructured, masks enforced after every step), with BNSparsity,
   and with Lightning's own ModelPruning (forward-pre-hook reparametrisation) for reference.
   Configurations are interleaved over several rounds so machine noise hits all of them alike.
   Targets: <= 1.02x (magnitude), <= 1.01x (BN L1).
2. Slimmed VGG-19 (CIFAR) at 50% and 70% of channels vs dense: params, FLOPs, CPU latency at
   batch 1 and 64, in NCHW and channels_last (the training module's default) memory format.
   The BN gammas are drawn uniformly at random (no trained net here), so every
   layer loses about the same fraction; a trained slimming net prunes late layers more.
   Target: latency speed-up >= 0.8 x the FLOPs reduction.

    .venv/bin/python bench/bench_pruning.py --threads 1
    .venv/bin/python bench/bench_pruning.py --threads 1 --skip-overhead   # part 2 only

The cores of the machine this was written on are shared, so run with --threads 1 and read the
ratios, not the absolute times.
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from netcompress import models  # noqa: E402,F401
from netcompress.callbacks.bn_sparsity import BNSparsity  # noqa: E402
from netcompress.callbacks.slimming import slimming_masks  # noqa: E402
from netcompress.callbacks.magnitude_pruning import MagnitudePruning  # noqa: E402
from netcompress.compression.channel_removal import remove_channels  # noqa: E402
from netcompress.evaluation.model_stats import count_flops, measure_latency_ms  # noqa: E402
from netcompress.models.factory import create_model  # noqa: E402


# ----- 1. per-step overhead ----------------------------------------------------------------------
def step_timer():
    import pytorch_lightning as pl

    class StepTimer(pl.Callback):
        """Wall time from batch start to batch end (after every other callback's batch-end hook)."""

        def __init__(self):
            self.times: list[float] = []

        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            self._t = time.perf_counter()

        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            self.times.append(time.perf_counter() - self._t)

    return StepTimer()


def lightning_pruning():
    from pytorch_lightning.callbacks import ModelPruning

    return ModelPruning("l1_unstructured", amount=0.9, use_global_unstructured=True, apply_pruning=True,
                        make_pruning_permanent=False, verbose=0,
                        parameters_to_prune=None, prune_on_train_epoch_end=False)


def time_steps(kind: str, steps: int, batch: int, model: str) -> list[float]:
    import pytorch_lightning as pl
    from functools import partial

    from netcompress.datamodules.synthetic import SyntheticDataModule
    from netcompress.lightning_modules.classification import ClassificationModule

    torch.manual_seed(0)
    data = SyntheticDataModule(num_classes=10, train_size=batch * (steps + 3), val_size=batch, test_size=batch,
                               batch_size=batch)
    net = create_model(model, num_classes=10)
    module = ClassificationModule(net, optimizer=partial(torch.optim.SGD, lr=0.05, momentum=0.9, weight_decay=1e-4))
    callbacks = {"none": [], "magnitude": [MagnitudePruning(sparsity=0.9, start=0)],
                 "bn_l1": [BNSparsity(lam=1e-4, log_histogram=False)],
                 "lightning_ModelPruning": [lightning_pruning()]}[kind]
    timer = step_timer()
    hook_times: list[float] = []
    for callback in callbacks:  # time the callback's per-step hook itself, inside the real run
        name = {"magnitude": "on_train_batch_end", "bn_l1": "on_before_optimizer_step"}.get(kind)
        if name:
            setattr(callback, name, timed(getattr(callback, name), hook_times))
    trainer = pl.Trainer(max_epochs=1, accelerator="cpu", logger=False, enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0,
                         limit_val_batches=0, callbacks=[*callbacks, timer])
    trainer.fit(module, datamodule=data)
    return timer.times[3:], hook_times[3:]  # drop warm-up steps (and the one-shot pruning event at step 0)


def timed(hook, sink: list[float]):
    def wrapper(*args, **kwargs):
        start = time.perf_counter()
        out = hook(*args, **kwargs)
        sink.append(time.perf_counter() - start)
        return out
    return wrapper


def overhead(rounds: int, steps: int, batch: int, model: str) -> None:
    kinds = ["none", "magnitude", "bn_l1", "lightning_ModelPruning"]
    times: dict[str, list[float]] = {k: [] for k in kinds}
    hooks: dict[str, list[float]] = {k: [] for k in kinds}
    for _ in range(rounds):
        for kind in kinds:
            step, hook = time_steps(kind, steps, batch, model)
            times[kind] += step
            hooks[kind] += hook
    base = statistics.median(times["none"])
    print(f"\n1. per-step training time, {model}, batch {batch}, {rounds} rounds x {steps} steps "
          f"(median, interleaved)")
    print(f"{'callback':<26}{'ms/step':>10}{'ratio':>8}{'hook ms':>10}{'1 + hook/step':>15}")
    for kind in kinds:
        median = statistics.median(times[kind])
        hook = statistics.median(hooks[kind]) if hooks[kind] else float("nan")
        print(f"{kind:<26}{median * 1000:>10.1f}{median / base:>8.3f}{hook * 1000:>10.3f}{1 + hook / base:>15.4f}")
    print("ratio: end-to-end step time vs none (noisy on shared cores); 1 + hook/step: the callback's own "
          "per-step hook, timed inside the run, over the no-callback step time")


# ----- 2. slimmed VGG-19 ---------------------------------------------------------------------------
def slimmed_vgg(ratio: float, seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    net = create_model("vgg19_bn_cifar", num_classes=10).eval()
    with torch.no_grad():
        for m in net.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.weight.uniform_(0, 1)
    if ratio == 0:
        return net
    bns = {n: m for n, m in net.named_modules() if isinstance(m, nn.BatchNorm2d)}
    return remove_channels(net, slimming_masks(bns, ratio), torch.zeros(1, 3, 32, 32)).eval()


def latency_ms(net: nn.Module, batch: int, memory_format: torch.memory_format, repeats: int) -> float:
    """Median CPU forward time (inference mode) in the given memory format, after 2 warm-up passes."""
    return measure_latency_ms(net, (3, 32, 32), batch_size=batch, warmup=2, repeats=repeats,
                              memory_format=memory_format)


def slimming_table(repeats: int) -> None:
    nets = {ratio: slimmed_vgg(ratio) for ratio in (0.0, 0.5, 0.7)}
    flops = {ratio: count_flops(net, (3, 32, 32)) for ratio, net in nets.items()}
    formats = {"nchw": torch.contiguous_format, "nhwc": torch.channels_last}
    settings = [(b, f) for b in (1, 64) for f in formats]
    latency = {(r, b, f): [] for r in nets for b, f in settings}
    for _ in range(3):  # interleave the three nets
        for ratio, net in nets.items():
            for b, f in settings:
                n = repeats if b == 1 else max(3, repeats // 5)
                latency[(ratio, b, f)].append(latency_ms(net, b, formats[f], n))
    med = {k: statistics.median(v) for k, v in latency.items()}
    print("\n2. VGG-19 (CIFAR) slimmed by one global |gamma| threshold vs dense (random gammas); "
          "speed-up x (speed-up / FLOPs reduction)")
    header = "".join(f"{f'b{b} {f} ms':>13}{'speed-up':>15}" for b, f in settings)
    print(f"{'pruned':>7}{'params':>12}{'FLOPs':>13}{'FLOPs x':>9}{header}")
    for ratio, net in nets.items():
        fx = flops[0.0] / flops[ratio]
        cells = ""
        for b, f in settings:
            speed = med[(0.0, b, f)] / med[(ratio, b, f)]
            cells += f"{med[(ratio, b, f)]:>13.1f}{f'{speed:.2f} ({speed / fx:.2f})':>15}"
        params = sum(p.numel() for p in net.parameters())
        print(f"{ratio:>7.0%}{params:>12,}{flops[ratio]:>13,}{fx:>9.2f}{cells}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=1, help="torch intra-op threads (cores are shared)")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--steps", type=int, default=20, help="timed steps per configuration and round")
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--model", default="resnet20_cifar")
    parser.add_argument("--repeats", type=int, default=20, help="batch-1 latency repeats")
    parser.add_argument("--skip-overhead", action="store_true")
    parser.add_argument("--skip-slimming", action="store_true")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    print(f"torch {torch.__version__}, {args.threads} thread(s)")
    if not args.skip_overhead:
        overhead(args.rounds, args.steps, args.batch, args.model)
    if not args.skip_slimming:
        slimming_table(args.repeats)


if __name__ == "__main__":
    main()

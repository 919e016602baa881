"""Does the run.py path cost anything per step? Lightning + our module vs a hand-written loop.

Same ResNet-20, same CIFAR-10 batches (the real tensor loader), batch 128, SGD, on the CPU,
measured side by side in one process: blocks of steps alternate between the two paths so
machine noise hits both alike. Step time = time between consecutive batch starts (loader,
forward, backward, optimizer step and all framework overhead included); median per block,
then the median ratio over blocks. Target: ratio <= 1.03.

    .venv/bin/python bench/bench_step.py --root ../shared/data/cifar10-jpeg --threads 2
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))

import pytorch_lightning as pl  # noqa: E402

from conftest import compose_config  # noqa: E402
from netcompress.pipeline.build import build  # noqa: E402


class StepClock(pl.Callback):
    """Records the wall time at every training batch start."""

    def __init__(self) -> None:
        self.starts: list[float] = []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self.starts.append(time.perf_counter())


def lightning_block(root: str, steps: int, out: Path) -> list[float]:
    cfg = compose_config([f"data.root={root}", "data.val_size=0", "logger=none", "callbacks=none",
                          "trainer.max_epochs=1", f"trainer.limit_train_batches={steps + 1}",
                          "trainer.limit_val_batches=0", "trainer.enable_progress_bar=false",
                          "trainer.enable_model_summary=false"], out)
    datamodule, module, trainer = build(cfg)
    clock = StepClock()
    trainer.callbacks.append(clock)
    trainer.fit(module, datamodule=datamodule)
    return [b - a for a, b in zip(clock.starts[1:], clock.starts[2:])]


def plain_block(root: str, steps: int) -> list[float]:
    """The same work written as a bare PyTorch loop."""
    from netcompress import models  # noqa: F401
    from netcompress.datamodules import CIFAR10DataModule

    torch.manual_seed(0)
    net = models.create_model("resnet20_cifar", num_classes=10).to(memory_format=torch.channels_last)
    optimizer = torch.optim.SGD(net.parameters(), lr=0.1, momentum=0.9, weight_decay=1e-4)
    datamodule = CIFAR10DataModule(root=root, val_size=0, batch_size=128)
    datamodule.setup("fit")
    starts = []
    net.train()
    for i, (x, y) in enumerate(datamodule.train_dataloader()):
        starts.append(time.perf_counter())
        loss = F.cross_entropy(net(x), y)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        if i > steps:
            break
    return [b - a for a, b in zip(starts[1:], starts[2:])]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--root", default=str(ROOT.parent / "shared/data/cifar10-jpeg"))
    parser.add_argument("--steps", type=int, default=20, help="steps per block")
    parser.add_argument("--blocks", type=int, default=3, help="alternating blocks per path")
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    out = Path("/tmp/netcompress_bench_step")
    rows = []
    for block in range(args.blocks):
        plain = statistics.median(plain_block(args.root, args.steps))
        light = statistics.median(lightning_block(args.root, args.steps, out / str(block)))
        rows.append((block, plain, light, light / plain))
    print(f"\nResNet-20, batch 128, CPU, {args.threads} threads, {args.steps} steps per block")
    print(f"{'block':>5} {'plain ms/step':>14} {'run.py ms/step':>15} {'ratio':>7}")
    for block, plain, light, ratio in rows:
        print(f"{block:>5} {plain * 1e3:>14.1f} {light * 1e3:>15.1f} {ratio:>7.3f}")
    print(f"median ratio run.py / plain: {statistics.median(r[3] for r in rows):.3f} (target <= 1.03)")


if __name__ == "__main__":
    main()

"""Is the CIFAR-10 loader fast enough to never be the bottleneck? Loader vs. training step, one run.

Measures, on the CPU, in one process:
  * cache build: decoding the data set under --root into a fresh uint8 cache file (one-time cost);
  * cache load: reading that file back (what every later run pays);
  * loader: images/s over one full training epoch of CIFAR10DataModule.train_dataloader()
    (permutation + batched random crop + flip + normalisation, channels_last);
  * train step: images/s of forward + backward + SGD step of ResNet-20 (timm 'resnet20_cifar'
    from models/) on batches of the same size;
and prints the ratio loader / train step (target >= 20x).

    .venv/bin/python bench/bench_loader.py --root ../shared/data/cifar10-jpeg
"""
from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from netcompress.datamodules import CIFAR10DataModule  # noqa: E402
from netcompress.datamodules.cifar10_store import build_cache, fallback_cache_file, read_cache  # noqa: E402


def build_model(name: str) -> tuple[torch.nn.Module, str]:
    """The registered CIFAR network ``name`` (timm registry, see models/)."""
    import timm

    from netcompress import models  # noqa: F401  (registers the CIFAR nets in timm)
    return timm.create_model(name, num_classes=10), name


def time_cache(root: Path) -> tuple[float, float, Path]:
    """Seconds to decode + write a fresh cache, and to read it back; returns its folder."""
    folder = Path(tempfile.mkdtemp(prefix="bench_cifar_cache_"))
    target = fallback_cache_file(root.resolve(), folder)  # where CIFAR10DataModule(cache_dir=folder) looks
    target.parent.mkdir(parents=True)
    start = time.perf_counter()
    build_cache(root.resolve(), target, allow_download=False)
    built = time.perf_counter() - start
    start = time.perf_counter()
    assert read_cache(target) is not None
    return built, time.perf_counter() - start, folder


def time_loader(dm: CIFAR10DataModule) -> tuple[float, int]:
    """Images/s over one full training epoch (epoch 1, so nothing is warm-up only)."""
    loader = dm.train_dataloader()
    loader.set_epoch(0)
    next(iter(loader))  # warm-up: first allocations
    loader.set_epoch(1)
    images, start = 0, time.perf_counter()
    for x, _ in loader:
        images += x.shape[0]
    return images / (time.perf_counter() - start), images


def time_train_step(dm: CIFAR10DataModule, model_name: str, steps: int) -> tuple[float, str]:
    """Images/s of forward + backward + SGD step on real augmented batches (loading not timed)."""
    net, label = build_model(model_name)
    net = net.to(memory_format=torch.channels_last).train()
    opt = torch.optim.SGD(net.parameters(), lr=0.1, momentum=0.9, weight_decay=5e-4, nesterov=True)
    it = iter(dm.train_dataloader())
    batches = [next(it) for _ in range(steps + 2)]
    elapsed, images = 0.0, 0
    for i, (x, y) in enumerate(batches):
        start = time.perf_counter()
        loss = F.cross_entropy(net(x), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if i >= 2:  # the first two steps warm up allocator and kernels
            elapsed += time.perf_counter() - start
            images += x.shape[0]
    return images / elapsed, label


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--root", type=Path, default=Path("../shared/data/cifar10-jpeg"),
                        help="CIFAR-10 folder (cifar-10-batches-py or ImageFolder train/ test/)")
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--model", default="resnet20_cifar", help="timm name registered by models/")
    parser.add_argument("--steps", type=int, default=20, help="timed training steps")
    parser.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    built, loaded, cache_folder = time_cache(args.root)
    try:
        dm = CIFAR10DataModule(args.root, batch_size=args.batch_size, cache_dir=cache_folder, download=False)
        dm.setup()
        loader_ips, epoch_images = time_loader(dm)
        train_ips, model_label = time_train_step(dm, args.model, args.steps)
    finally:
        shutil.rmtree(cache_folder, ignore_errors=True)

    print(f"\nCIFAR-10 loader vs training step -- root={args.root}, batch {args.batch_size}, CPU, "
          f"{torch.get_num_threads()} threads, torch {torch.__version__}")
    print(f"{'measure':<42}{'value':>14}")
    print(f"{'cache build (decode 60k images + write)':<42}{built:>12.1f} s")
    print(f"{'cache load (torch.load)':<42}{loaded:>12.2f} s")
    print(f"{'loader, one epoch (' + str(epoch_images) + ' images)':<42}{loader_ips:>10,.0f} img/s")
    print(f"{'train step, ' + model_label:<42}{train_ips:>10,.0f} img/s")
    print(f"{'ratio loader / train step':<42}{loader_ips / train_ips:>13.1f}x   (target >= 20x)")


if __name__ == "__main__":
    main()

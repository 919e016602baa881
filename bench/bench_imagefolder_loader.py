"""Does the ImageNet (ImageFolder) loader keep a ResNet-50 training step busy? One run, side by side.

Measures on one device (CUDA if present, else the CPU), in one process:
  * loader, decode=workers: images/s of ImageFolderDataModule's training loader with PIL decoding
    and RandomResizedCrop + flip in ``--workers`` worker processes;
  * loader, decode=device: the same loader with the workers only reading files and the JPEG
    decoding (nvJPEG on a GPU) and the same crops on the device (datamodules/device_decode.py);
  * train step: images/s of forward + backward + SGD of timm ``resnet50`` (1000 classes,
    channels_last; bf16 autocast on CUDA) on batches of the same size, loading not timed;
and prints loader / step for each path (>= 1: the loader keeps up; the aim on a GPU is >= 1.5x
for headroom). The two loaders are timed interleaved, epoch by epoch, in the same window.

Without ``--root`` it writes a tree of ImageNet-sized JPEGs (500x375, quality 90, smooth random
content) to a temporary folder.

    .venv/bin/python bench/bench_imagefolder_loader.py --workers 2 --threads 2
    .venv/bin/python bench/bench_imagefolder_loader.py --root /data/imagenet --workers 8 --batch-size 256
"""
from __future__ import annotations

import argparse
import json
import platform
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from netcompress.datamodules import ImageFolderDataModule  # noqa: E402


def synthetic_tree(root: Path, images: int, classes: int = 4, size: tuple[int, int] = (500, 375)) -> Path:
    """train/ with ``images`` JPEGs over ``classes`` folders (val/: one per class), ImageNet's median size."""
    from PIL import Image

    rng = np.random.default_rng(0)
    for split, count in (("train", images), ("val", classes)):
        for i in range(count):
            folder = root / split / f"class{i % classes}"
            folder.mkdir(parents=True, exist_ok=True)
            coarse = rng.integers(0, 256, (size[1] // 16, size[0] // 16, 3)).astype(np.uint8)
            noise = rng.integers(-12, 13, (size[1], size[0], 3))
            smooth = np.asarray(Image.fromarray(coarse).resize(size, Image.BICUBIC), dtype=np.int64)
            Image.fromarray(np.clip(smooth + noise, 0, 255).astype(np.uint8)).save(folder / f"{i}.jpg", quality=90)
    return root


class _Device:
    """Stands in for the trainer the datamodule asks for its device, rank and world size."""

    def __init__(self, device: torch.device) -> None:
        self.strategy = type("Strategy", (), {"root_device": device})()
        self.global_rank, self.world_size = 0, 1


def loader_of(root: Path, decode: str, device: torch.device, args: argparse.Namespace):
    dm = ImageFolderDataModule(root, batch_size=args.batch_size, num_workers=args.workers, decode=decode,
                               persistent_workers=False)
    dm.trainer = _Device(device)
    dm.setup()
    return dm.train_dataloader()


def time_epoch(loader, device: torch.device) -> float:
    """Images/s of one pass over ``loader`` (batches on ``device``; CUDA work waited for)."""
    images, start = 0, time.perf_counter()
    for x, _ in loader:
        x = x.to(device, non_blocking=True)
        images += x.shape[0]
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return images / (time.perf_counter() - start)


def time_train_step(device: torch.device, batch_size: int, steps: int) -> float:
    """Images/s of forward + backward + SGD of ResNet-50 at 224x224 (the first 2 steps are warm-up)."""
    import timm

    net = timm.create_model("resnet50", num_classes=1000).to(device, memory_format=torch.channels_last).train()
    opt = torch.optim.SGD(net.parameters(), lr=0.1, momentum=0.9, weight_decay=1e-4)
    x = torch.randn(batch_size, 3, 224, 224, device=device).contiguous(memory_format=torch.channels_last)
    y = torch.randint(0, 1000, (batch_size,), device=device)
    elapsed = 0.0
    for i in range(steps + 2):
        start = time.perf_counter()
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
            loss = F.cross_entropy(net(x), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        if i >= 2:
            elapsed += time.perf_counter() - start
    return steps * batch_size / elapsed


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--root", type=Path, default=None, help="ImageFolder tree (default: a synthetic one)")
    parser.add_argument("--images", type=int, default=256, help="synthetic training images (without --root)")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--workers", type=int, default=2, help="loader worker processes (both paths)")
    parser.add_argument("--epochs", type=int, default=2, help="timed epochs per loader, interleaved")
    parser.add_argument("--steps", type=int, default=3, help="timed ResNet-50 training steps")
    parser.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's)")
    parser.add_argument("--device", default=None, help="cuda or cpu (default: cuda if available)")
    parser.add_argument("--out", type=Path, default=None, help="also write the figures as JSON here")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))

    made = None
    root = args.root
    if root is None:
        made = root = synthetic_tree(Path(tempfile.mkdtemp(prefix="bench_imagefolder_")), args.images)
    try:
        loaders = {decode: loader_of(root, decode, device, args) for decode in ("workers", "device")}
        for loader in loaders.values():  # warm-up: worker start, first allocations, nvJPEG handles
            next(iter(loader))
        rates: dict[str, list[float]] = {decode: [] for decode in loaders}
        for _ in range(args.epochs):  # interleaved, so both see the same machine state
            for decode, loader in loaders.items():
                rates[decode].append(time_epoch(loader, device))
        step = time_train_step(device, args.batch_size, args.steps)
    finally:
        if made is not None:
            shutil.rmtree(made, ignore_errors=True)

    loader_ips = {decode: float(np.median(r)) for decode, r in rates.items()}
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "CPU"
    source = root if made is None else f"synthetic 500x375 JPEGs ({args.images} images)"
    print(f"\nImageFolder loader vs ResNet-50 step -- {source}, batch {args.batch_size}, {args.workers} workers, "
          f"{device} ({name}), "
          f"{torch.get_num_threads()} threads, torch {torch.__version__}")
    for decode, ips in loader_ips.items():
        print(f"loader decode={decode:<8} {ips:>10,.1f} img/s  (epochs: {', '.join(f'{r:,.1f}' for r in rates[decode])})"
              f"   loader / step {ips / step:6.2f}x")
    print(f"train step, resnet50    {step:>10,.1f} img/s")
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps({"device": str(device), "device_name": name, "workers": args.workers,
                                        "batch_size": args.batch_size, "threads": torch.get_num_threads(),
                                        "root": str(root) if made is None else f"synthetic {args.images} x 500x375",
                                        "loader_img_s": loader_ips, "loader_epochs_img_s": rates,
                                        "resnet50_step_img_s": step,
                                        "loader_over_step": {d: v / step for d, v in loader_ips.items()}}, indent=2))


if __name__ == "__main__":
    main()

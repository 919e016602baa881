"""Low rank (lowrank) on VGG-16 (CIFAR): truncated SVD of features.* (stem kept) at fixed rank
fractions vs the dense net: params, FLOPs and batch-1 CPU latency, side by side in one run.

    python bench/bench_lowrank.py --threads 1            # ~2 min on a busy 2-core box

The cores of this machine are shared: use --threads 1 and read ratios, not absolute times.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from netcompress import models  # noqa: E402,F401
from netcompress.compression import lowrank  # noqa: E402
from netcompress.evaluation.model_stats import count_flops, measure_latency_ms  # noqa: E402


def table_lowrank(repeats: int) -> None:
    print(f"\nTruncated-SVD low rank of VGG-16 features.* (stem kept), batch-1 CPU latency median of {repeats}")
    print(f"{'setting':<22} {'params':>10} {'MFLOPs':>8} {'latency ms':>10} {'params x':>8} {'FLOPs x':>8} {'speed-up':>8}")
    dense = models.create_model("vgg16_bn_cifar", num_classes=10).eval()
    base = (sum(p.numel() for p in dense.parameters()), count_flops(dense, (3, 32, 32)),
            measure_latency_ms(dense, (3, 32, 32), repeats=repeats))
    rows = [("dense", base)]
    for fraction in (0.5, 0.25, 0.125):
        net = models.create_model("vgg16_bn_cifar", num_classes=10).eval()
        net.load_state_dict(dense.state_dict())
        for name, layer in list(net.named_modules()):
            if name.startswith("features.") and isinstance(layer, nn.Conv2d) and name != "features.0":
                lowrank.set_submodule(net, name, lowrank.decompose(layer, max(1, int(layer.out_channels * fraction))))
        rows.append((f"rank = {fraction:g} x out", (sum(p.numel() for p in net.parameters()),
                                                    count_flops(net, (3, 32, 32)),
                                                    measure_latency_ms(net, (3, 32, 32), repeats=repeats))))
    for label, (params, flops, latency) in rows:
        print(f"{label:<22} {params:>10,} {flops / 1e6:>8.0f} {latency:>10.2f} {base[0] / params:>7.2f}x "
              f"{base[1] / flops:>7.2f}x {base[2] / latency:>7.2f}x")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=1, help="torch intra-op threads (cores are shared)")
    parser.add_argument("--repeats", type=int, default=15, help="latency runs per setting (median)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    print(f"torch {torch.__version__}, {args.threads} thread(s)")
    table_lowrank(args.repeats)


if __name__ == "__main__":
    main()

"""Weight clustering (cluster) on VGG-16 (CIFAR): k-means speed, shared-weight gradient cost and
Deep Compression sizes, side by side in one run.

    python bench/bench_cluster.py --threads 1            # all three tables (~8 min on a busy 2-core box)
    python bench/bench_cluster.py --threads 1 --tables 2

Tables (every ratio compares two things measured in this run, on this machine):
1. k-means of one 2.36M-weight VGG-16 conv layer: sorted prefix-sum Lloyd (ours, O(k log n) per
   iteration after one sort) vs plain Lloyd (bucketize + bincount over all weights per iteration).
2. Shared-weight gradient (the callback's on_before_optimizer_step on all 13 convs + fc) vs the
   SGD(momentum, wd) optimizer step it precedes.
3. Deep Compression storage of the convs of VGG-16: dense fp32 vs fixed-length indices vs Huffman, dense and
   after global magnitude pruning (Han et al.'s 92.5% for VGG-16). The weights are an untrained
   init, so the Huffman gain is indicative only (trained weights are more peaked).

Low-rank decomposition has its own bench, bench/bench_lowrank.py. The cores of this machine are
shared: use --threads 1 and read ratios, not absolute times.
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from netcompress import models  # noqa: E402,F401
from netcompress.callbacks.cluster import Cluster  # noqa: E402
from netcompress.compression.kmeans import assign, cluster_weight, kmeans_1d, linear_init  # noqa: E402
from netcompress.compression.masks import unstructured_masks  # noqa: E402


def best_of(fn, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return min(times)


def plain_lloyd(values: torch.Tensor, k: int, max_iter: int = 100):
    """Textbook Lloyd on all n weights per iteration (the reference the sorted version replaces)."""
    x = values.double()
    centroids = linear_init(x, k)
    labels = assign(x, centroids)
    for _ in range(max_iter):
        sums = torch.bincount(labels, weights=x, minlength=k)
        counts = torch.bincount(labels, minlength=k)
        centroids = torch.where(counts > 0, sums / counts.clamp(min=1), centroids)
        new = assign(x, centroids)
        if torch.equal(new, labels):
            break
        labels = new
    return centroids, labels


def table_kmeans(net: nn.Module, repeats: int) -> None:
    weight = net.features[34].weight.detach().flatten()  # conv 512 -> 512, 3x3
    iters = 30  # the same Lloyd iteration cap for both, so they compute the same clustering
    print(f"\n1. k-means of one VGG-16 conv layer ({weight.numel():,} weights), {iters} Lloyd iterations at most, "
          f"seconds (best of {repeats})")
    print(f"{'k':>5} {'plain Lloyd':>12} {'sorted (ours)':>14} {'speed-up':>9} {'same labels':>12}")
    for k in (32, 256):
        plain = best_of(lambda: plain_lloyd(weight, k, iters), repeats)
        ours = best_of(lambda: kmeans_1d(weight, k, iters), repeats)
        same = torch.equal(plain_lloyd(weight, k, iters)[1], kmeans_1d(weight, k, iters)[1])
        print(f"{k:>5} {plain:>12.3f} {ours:>14.3f} {plain / ours:>8.1f}x {str(same):>12}")


def cluster_all(net: nn.Module, callback: Cluster) -> Cluster:
    """What the callback does at its clustering epoch, without a Trainer: cluster and bind the layers."""
    with torch.no_grad():
        for name, layer in callback._select(net).items():
            _, labels, clustered = cluster_weight(layer.weight, callback.bits)
            layer.weight.copy_(clustered)
            callback._labels[name] = labels
    holder = nn.Module()
    holder.net = net
    callback._bind(holder)
    return callback


def table_gradient(repeats: int) -> None:
    net = models.create_model("vgg16_bn_cifar", num_classes=10)
    callback = cluster_all(net, Cluster(bits=5, skip_first_last=False))
    optimizer = torch.optim.SGD(net.parameters(), lr=0.01, momentum=0.9, weight_decay=1e-4)
    for p in net.parameters():
        p.grad = torch.randn_like(p)
    optimizer.step()  # create momentum buffers
    holder = nn.Module()
    holder.net = net
    shared = best_of(lambda: callback.on_before_optimizer_step(None, holder, optimizer), repeats)
    step = best_of(optimizer.step, repeats)
    n = sum(layer.weight.numel() for layer in callback._layers.values())
    print(f"\n2. Shared-weight gradient on VGG-16 ({n:,} clustered weights, 5 bits), ms (best of {repeats})")
    print(f"{'shared gradient':>16} {'SGD step':>9} {'ratio':>6}")
    print(f"{shared * 1e3:>16.1f} {step * 1e3:>9.1f} {shared / step:>5.2f}x")


def table_storage() -> None:
    print("\n3. Deep Compression storage of the 12 VGG-16 convs after the stem (untrained init), KB")
    print(f"{'setting':<28} {'fp32':>9} {'fixed':>8} {'Huffman':>8} {'ratio fixed':>11} {'ratio Huffman':>13}")
    for sparsity, bits in ((0.0, 5), (0.0, 8), (0.925, 5), (0.925, 8)):
        net = models.create_model("vgg16_bn_cifar", num_classes=10)
        callback = Cluster(bits=bits, include=["features.*"])
        layers = callback._select(net)
        if sparsity:
            masks = unstructured_masks({n: m.weight for n, m in layers.items()}, sparsity, scope="global")
            with torch.no_grad():
                for name, layer in layers.items():
                    layer.weight.mul_(masks[name])
        cluster_all(net, callback)
        figures = callback.storage(net)
        label = f"{'pruned ' + format(sparsity, '.1%') if sparsity else 'dense'}, {bits} bits"
        print(f"{label:<28} {figures['compress/dense_bytes'] / 1e3:>9.0f} {figures['compress/fixed_bytes'] / 1e3:>8.0f} "
              f"{figures['compress/huffman_bytes'] / 1e3:>8.0f} {figures['compress/ratio_fixed']:>10.1f}x "
              f"{figures['compress/ratio']:>12.1f}x")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=1, help="torch intra-op threads (cores are shared)")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--tables", default="123", help="which tables to run, e.g. 2 or 13")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    print(f"torch {torch.__version__}, {args.threads} thread(s)")
    if "1" in args.tables:
        table_kmeans(models.create_model("vgg16_bn_cifar", num_classes=10), 1)
    if "2" in args.tables:
        table_gradient(args.repeats)
    if "3" in args.tables:
        table_storage()


if __name__ == "__main__":
    main()

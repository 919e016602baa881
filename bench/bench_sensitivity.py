"""Per-layer sensitivity analysis (Li et al. 2017, section 4.1; compression/sensitivity.py): wall time
of the whole analysis of ResNet-20 (every analysable layer x 5 ratios, one validation pass each) on
the CPU, plus the cost-model allocation that follows it.

    python bench/bench_sensitivity.py --threads 1 --images 1000                       # structured (9 convs)
    python bench/bench_sensitivity.py --threads 1 --images 1000 --kind unstructured   # all 19 layers

Synthetic CIFAR-shaped data (random N(0,1) images, labels from the dense net's own predictions, so
the drops are non-trivial): the time depends on the images and layers, not on their content.
Randomly initialised ResNet-20 (the repo's resnet20_cifar preset). The cores of this machine are
shared: read the per-evaluation time, not the absolute total, across machines.
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from netcompress import models  # noqa: E402,F401
from netcompress.compression.budget import CostModel, allocate  # noqa: E402
from netcompress.compression.sensitivity import candidate_layers, sensitivity_table  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--images", type=int, default=1000)
    parser.add_argument("--batch", type=int, default=256)
    parser.add_argument("--kind", choices=("structured", "unstructured"), default="structured")
    parser.add_argument("--ratios", type=float, nargs="+", default=[0.1, 0.3, 0.5, 0.7, 0.9])
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    net = models.create_model("resnet20_cifar", num_classes=10).eval()
    x = torch.randn(args.images, 3, 32, 32)
    with torch.no_grad():  # centre the classifier on these images so the labels use every class
        feats = net.forward_head(net.forward_features(x), pre_logits=True)
        fc = net.get_classifier()
        fc.weight.mul_(10.0 / fc.weight.norm(dim=1, keepdim=True) / feats.std(0).mean())
        fc.bias.copy_(-fc.weight @ feats.mean(0))
        y = net(x).argmax(1)
    batches = [(x[i:i + args.batch], y[i:i + args.batch]) for i in range(0, args.images, args.batch)]
    example = torch.zeros(1, 3, 32, 32)
    t0 = time.perf_counter()
    layers, skipped = candidate_layers(net, kind=args.kind, example_input=example)
    t_select = time.perf_counter() - t0
    t0 = time.perf_counter()
    sens = sensitivity_table(net, batches, list(layers), args.ratios, kind=args.kind, example_input=example)
    t_analysis = time.perf_counter() - t0
    evals = 1 + len(layers) * len(args.ratios)
    print(f"analysis: {evals} evaluations in {t_analysis:.1f} s", flush=True)
    t0 = time.perf_counter()
    cost = CostModel(net, list(layers), (3, 32, 32), args.kind)
    alloc = allocate(sens, cost, "flops", 0.7)
    t_alloc = time.perf_counter() - t0
    print(f"ResNet-20 (resnet20_cifar, random init), {args.kind} {sens.importance} sensitivity, torch threads "
          f"{args.threads}, {args.images} synthetic 3x32x32 val images in batches of {args.batch}")
    print(f"layers analysed {len(layers)} (skipped {len(skipped)}), ratios {args.ratios}, evaluations {evals}")
    print(f"{'step':<28} {'seconds':>9}")
    print(f"{'layer selection':<28} {t_select:>9.2f}")
    print(f"{'analysis (all evaluations)':<28} {t_analysis:>9.2f}")
    print(f"{'per evaluation':<28} {t_analysis / evals:>9.3f}")
    print(f"{'cost model + allocation':<28} {t_alloc:>9.2f}")
    print(f"allocation at flops target 0.7: predicted flops {alloc.predicted['flops']:.4f}, "
          f"params {alloc.predicted['params']:.4f}, threshold {alloc.threshold:.4f}")


if __name__ == "__main__":
    main()

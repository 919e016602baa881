"""What each evaluator of ``evaluation=[...]`` costs, relative to one test-set pass of the net.

Issue 12's targets: ``retention`` <= 2.2x (it runs two nets), ``robustness`` at 7 corruptions x 5
severities <= 40x (36 passes of two nets, plus FGSM / PGD on a subset), ``saliency`` on 64 images
<= 2x; ``cost`` is listed too. A ResNet-20 child and a ResNet-20 parent (independent inits: the
cost does not depend on the weights) on synthetic CIFAR-shaped test images, in one process at a
fixed thread count. Rounds alternate: a plain test pass (``evaluate`` with top-1 metrics), then
each evaluator, so machine noise hits all alike; the figure is the median over rounds of
evaluator time / plain-pass time of the same round.

    .venv/bin/python bench/bench_evaluators.py --threads 1 --test-size 2000 --rounds 1

The ratios depend on the test-set size: the attacks run on a fixed ``adversarial_samples`` (256)
and saliency on a fixed 64 images, so both shrink relative to one pass as the test set grows
(CIFAR-10: 10,000). ``robustness`` is timed cold (the first job of a sweep also computes the
parent's figures) and with the parent's figures cached (every later job of the sweep: ``cache_dir``).
"""
from __future__ import annotations

import argparse
import statistics

import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]


import netcompress.models  # noqa: E402,F401  (registers the CIFAR nets with timm)
from netcompress.datamodules.synthetic import SyntheticDataModule  # noqa: E402
from netcompress.evaluation.evaluate import evaluate  # noqa: E402
from netcompress.evaluation.evaluators import EVALUATORS, load_builtin  # noqa: E402
from netcompress.evaluation.metrics import ClassificationMetrics  # noqa: E402
from netcompress.models.factory import create_model  # noqa: E402

TARGETS = {"retention": 2.2, "robustness": 40.0, "robustness (parent cached)": 40.0, "saliency": 2.0, "cost": None}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--test-size", type=int, default=2000, help="synthetic test images")
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--model", default="resnet20_cifar")
    parser.add_argument("--evaluators", nargs="*", default=["retention", "robustness", "saliency", "cost"])
    args = parser.parse_args()

    torch.set_num_threads(args.threads)
    load_builtin()
    dm = SyntheticDataModule(num_classes=10, image_size=32, train_size=64, val_size=64, test_size=args.test_size,
                             batch_size=args.batch_size, seed=0)
    dm.setup("test")
    torch.manual_seed(0)
    net = create_model(args.model, num_classes=10).eval()
    parent = create_model(args.model, num_classes=10).eval()
    out = Path(tempfile.mkdtemp(prefix="bench_evaluators_"))
    evaluators = {name: EVALUATORS[name]() for name in args.evaluators if name in EVALUATORS}
    if "robustness" in evaluators:  # cold: the first job of a sweep; warm: every later job (parent's figures cached)
        cache = tempfile.mkdtemp(prefix="bench_robustness_cache_")
        evaluators["robustness"] = EVALUATORS["robustness"](cache_dir=cache)
        evaluators["robustness (parent cached)"] = evaluators["robustness"]
    print(f"{args.model}, {args.test_size} synthetic test images, batch {args.batch_size}, "
          f"{torch.get_num_threads()} thread(s), {args.rounds} rounds; evaluator defaults of conf/evaluation/*.yaml")

    ratios: dict[str, list[float]] = {name: [] for name in evaluators}
    cold_cache = evaluators["robustness"].cache_dir if "robustness" in evaluators else None
    seconds: dict[str, list[float]] = {name: [] for name in evaluators}
    plain: list[float] = []
    for _ in range(args.rounds):
        start = time.perf_counter()
        evaluate(net, dm.test_dataloader(), ClassificationMetrics(10))
        one_pass = time.perf_counter() - start
        plain.append(one_pass)
        for name, evaluator in evaluators.items():
            if name == "robustness" and cold_cache is not None:
                for stale in cold_cache.glob("*.json"):  # each round's first robustness call is cold
                    stale.unlink()
            start = time.perf_counter()
            evaluator(net, dm, parent, out)
            took = time.perf_counter() - start
            seconds[name].append(took)
            ratios[name].append(took / one_pass)

    print(f"\none test pass of the net: median {statistics.median(plain):.2f} s")
    print(f"{'evaluator':<27} {'seconds':>9} {'x one pass':>11} {'target':>8}")
    for name in evaluators:
        target = TARGETS.get(name)
        ratio = statistics.median(ratios[name])
        verdict = "" if target is None else ("ok" if ratio <= target else "OVER")
        print(f"{name:<27} {statistics.median(seconds[name]):>9.2f} {ratio:>10.2f}x "
              f"{'<= %.1f' % target if target else '-':>8} {verdict}")


if __name__ == "__main__":
    main()

"""What the data-driven importance criteria cost: one calibration batch in training steps.

    python bench/bench_importance.py                      # ResNet-20, batch 128, 1 thread, 20 batches x 3 rounds

``taylor`` (|w * dL/dw|, Molchanov et al. 2019) needs a forward and a backward pass per calibration
batch, ``activation`` (mean |BN output|) a forward pass with hooks (compression/calibration.py). This
times, on synthetic CIFAR-shaped batches, N training steps (forward + backward + SGD step, train mode)
and a calibration of N batches for each criterion (``compression.calibration.calibrated``, the call
magnitude pruning makes at a pruning event, over the layers it would prune), interleaved in one run
(rounds in a rotating order, so load drifts hit every arm alike), and prints the per-batch time of
each and the ratio calibration batch / training step (median over rounds, and the range). It also
turns the ratio into the cost of one pruning event of importance_mini_filter (calibration_batches x
ratio, in training steps) next to that preset's 4 fine-tuning epochs.
"""
from __future__ import annotations

import argparse
import statistics
import time

import torch
import torch.nn.functional as F

CRITERIA = ("taylor", "activation")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="resnet20_cifar")
    parser.add_argument("--width", type=float, default=1.0, help="channel width multiplier (1.0 = He et al.'s)")
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--batches", type=int, default=20, help="N: training steps and calibration batches per round")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--include", nargs="+", default=["layer*.conv1"],
                        help="layers scored (as callbacks.magnitude_pruning.include; importance_mini_filter's)")
    parser.add_argument("--calibration-batches", type=int, default=8, help="importance_mini_filter's calibration_batches")
    parser.add_argument("--finetune-steps", type=int, default=4 * 71,
                        help="importance_mini_filter's fine-tuning steps (4 epochs x ceil(9000 / 128))")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)

    import timm

    from netcompress import models  # noqa: F401  (registers the CIFAR nets in timm)
    from netcompress.compression.calibration import calibrated
    from netcompress.compression.layer_selection import select_layers

    net = timm.create_model(args.model, num_classes=10, width=args.width)
    layers = select_layers(net, args.include, (), True, key="--include")
    optimizer = torch.optim.SGD(net.parameters(), lr=1e-3, momentum=0.9, weight_decay=1e-4)
    batches = [(torch.randn(args.batch_size, 3, 32, 32), torch.randint(0, 10, (args.batch_size,)))
               for _ in range(args.batches)]

    def train_steps(data: list) -> None:
        net.train()
        for x, y in data:
            optimizer.zero_grad(set_to_none=True)
            F.cross_entropy(net(x), y).backward()
            optimizer.step()

    def calibration(criterion: str):
        def run(data: list) -> None:
            with calibrated(net, layers, criterion, data, batches=len(data)):
                pass
        return run

    arms = {"train step": train_steps, **{c: calibration(c) for c in CRITERIA}}
    for fn in arms.values():  # warm-up: allocator, oneDNN kernels
        fn(batches[:1])
    per_batch: dict[str, list[float]] = {name: [] for name in arms}
    names = list(arms)
    for r in range(args.rounds):
        for name in names[r % len(names):] + names[:r % len(names)]:  # rotate the order each round
            start = time.perf_counter()
            arms[name](batches)
            per_batch[name].append((time.perf_counter() - start) / len(batches))

    print(f"{args.model} width {args.width}, batch {args.batch_size}, {args.threads} thread(s), {args.batches} batches "
          f"x {args.rounds} rounds, {len(layers)} layers scored ({' '.join(args.include)}), torch {torch.__version__}")
    print(f"{'arm':<12}{'ms / batch':>12}{'x train step':>14}{'range':>16}{'event (steps)':>15}{'of fine-tune':>14}")
    steps = per_batch["train step"]
    for name, times in per_batch.items():
        ratios = [t / s for t, s in zip(times, steps)]
        ratio = statistics.median(ratios)
        event = ratio * args.calibration_batches
        extra = "" if name == "train step" else f"{event:>15.2f}{100 * event / args.finetune_steps:>13.2f}%"
        print(f"{name:<12}{1000 * statistics.median(times):>12.1f}{ratio:>14.2f}"
              f"{f'{min(ratios):.2f}-{max(ratios):.2f}':>16}{extra}")
    print(f"event: one pruning event's calibration ({args.calibration_batches} batches) in training steps; "
          f"of fine-tune: that as a share of {args.finetune_steps} fine-tuning steps")


if __name__ == "__main__":
    main()

"""Learning-rate schedules as pure functions of the optimizer step (exact on resume).

Each factory takes the optimizer, the number of steps the schedule spans and the steps per
epoch (given by the LightningModule), plus its own arguments from ``conf/scheduler/*.yaml``.
Fractions of training (``milestones``) follow the papers' "decay 10x at 50% and 75%".
"""
from __future__ import annotations

import math
from typing import Sequence

from torch.optim import Optimizer
from torch.optim.lr_scheduler import LambdaLR


def _warmup_factor(step: int, warmup_steps: int) -> float:
    return min(1.0, (step + 1) / warmup_steps) if warmup_steps > 0 else 1.0


def _check_fraction_list(name: str, values: Sequence[float]) -> None:
    if any(not 0.0 < v < 1.0 for v in values) or list(values) != sorted(values):
        raise ValueError(f"scheduler.{name} must be increasing fractions of training in (0, 1); got {list(values)}")


def multistep(optimizer: Optimizer, total_steps: int, steps_per_epoch: int,
              milestones: Sequence[float] = (0.5, 0.75), gamma: float = 0.1,
              warmup_epochs: float = 0.0) -> LambdaLR:
    """Step decay by ``gamma`` at each milestone (a fraction of training), optional linear warm-up."""
    _check_fraction_list("milestones", milestones)
    bounds = [int(m * total_steps) for m in milestones]
    warmup = int(warmup_epochs * steps_per_epoch)

    def factor(step: int) -> float:
        return _warmup_factor(step, warmup) * gamma ** sum(step >= b for b in bounds)

    return LambdaLR(optimizer, factor)


def cosine(optimizer: Optimizer, total_steps: int, steps_per_epoch: int,
           warmup_epochs: float = 0.0, min_factor: float = 0.0) -> LambdaLR:
    """Linear warm-up then cosine decay to ``min_factor`` x the base lr at the last step."""
    warmup = int(warmup_epochs * steps_per_epoch)

    def factor(step: int) -> float:
        if step < warmup:
            return _warmup_factor(step, warmup)
        progress = min(1.0, (step - warmup) / max(1, total_steps - warmup))
        return min_factor + (1.0 - min_factor) * 0.5 * (1.0 + math.cos(math.pi * progress))

    return LambdaLR(optimizer, factor)


def resumed_at(scheduler: LambdaLR, offset: int) -> LambdaLR:
    """``scheduler`` continued from step ``offset``: this run's step s gets the schedule's lr at s + offset.

    How rewinding to step k retrains (Frankle et al. 2020, Renda et al. 2020, open_lth): the
    remaining T - k steps of the original schedule, not a restarted one."""
    if offset == 0:
        return scheduler
    shifted = [lambda step, f=f: f(step + offset) for f in scheduler.lr_lambdas]
    return LambdaLR(scheduler.optimizer, shifted)  # base lrs come from each group's initial_lr


def constant(optimizer: Optimizer, total_steps: int, steps_per_epoch: int,
             warmup_epochs: float = 0.0) -> LambdaLR:
    """Constant lr after an optional linear warm-up."""
    warmup = int(warmup_epochs * steps_per_epoch)
    return LambdaLR(optimizer, lambda step: _warmup_factor(step, warmup))

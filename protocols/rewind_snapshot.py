"""Save the network's weights at chosen optimizer steps of a run, for lottery-ticket rewinding.

Frankle & Carbin 2019 reset a winning ticket's weights to their initial values (step 0);
Frankle et al. 2020 ("Linear Mode Connectivity and the Lottery Ticket Hypothesis") rewind to an
early step k instead, which is what makes tickets appear in deeper networks at lr 0.1.
A snapshot at step k is ``module.net.state_dict()`` just before the (k+1)-th optimizer step,
i.e. after k updates, taken at ``on_train_batch_start``.
"""
from __future__ import annotations

from typing import Any, Callable, Sequence

import pytorch_lightning as pl
import torch


def check_steps(steps: Any, key: str) -> tuple[int, ...]:
    if isinstance(steps, int) and not isinstance(steps, bool):
        steps = [steps]
    try:
        values = list(steps)
    except TypeError:
        values = [None]
    if not values or any(isinstance(s, bool) or not isinstance(s, int) or s < 0 for s in values):
        raise ValueError(f"{key} must be a non-empty list of optimizer steps (ints >= 0); got {steps!r}")
    return tuple(sorted(set(values)))


class RewindSnapshot(pl.Callback):
    """Capture ``module.net.state_dict()`` (CPU copies) when ``global_step`` reaches each of ``steps``.

    Args:
        steps: optimizer steps to capture (0 = the initialisation).
        on_capture: optional ``fn(step, state_dict)`` called with each snapshot (e.g. to save it).
    """

    def __init__(self, steps: Sequence[int] = (0,), on_capture: Callable[[int, dict], None] | None = None) -> None:
        super().__init__()
        self.steps = check_steps(steps, "protocol.snapshot_steps")
        self.on_capture = on_capture
        self.snapshots: dict[int, dict[str, torch.Tensor]] = {}

    def _capture(self, pl_module: pl.LightningModule, step: int) -> None:
        if step in self.steps and step not in self.snapshots:
            state = {k: v.detach().cpu().clone().contiguous() for k, v in pl_module.net.state_dict().items()}
            self.snapshots[step] = state
            if self.on_capture is not None:
                self.on_capture(step, state)

    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if trainer.fast_dev_run:  # a smoke run makes one step: it cannot reach later snapshots
            return
        total = trainer.estimated_stepping_batches
        too_late = [s for s in self.steps if s > total]
        if too_late:
            raise ValueError(f"protocol.snapshot_steps {too_late} are beyond the run's {int(total)} optimizer steps; "
                             "use smaller steps or more epochs")

    def on_train_batch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any,
                             batch_idx: int) -> None:
        self._capture(pl_module, trainer.global_step)

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._capture(pl_module, trainer.global_step)  # a step equal to the run's last one
        missing = [s for s in self.steps if s not in self.snapshots]
        if missing and not trainer.fast_dev_run:
            raise ValueError(f"protocol.snapshot_steps {missing} were never reached: the run made only "
                             f"{trainer.global_step} optimizer steps; use smaller steps or more epochs")

    def state_dict(self) -> dict[str, Any]:
        return {"snapshots": self.snapshots}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.snapshots = dict(state_dict.get("snapshots", {}))

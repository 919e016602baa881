"""Progress output a user can read anywhere: the rich bar on a terminal, plain log lines elsewhere.

A run redirected to a file (``make run > log``, nohup, SLURM, CI) gets one line every
``every_n_steps`` optimizer steps (step, epoch, loss, lr, images/s, ETA) instead of a bar that
prints nothing there; every run gets a one-line summary at each epoch end. Lines go through
Python logging, so under Hydra they reach both the console and the run's ``<task_name>.log``.
"""
from __future__ import annotations

import logging
import sys
import time
from typing import Any

import pytorch_lightning as pl
from pytorch_lightning.callbacks import RichProgressBar
from pytorch_lightning.callbacks.progress import ProgressBar

log = logging.getLogger("netcompress.progress")


def _check_positive_int(name: str, value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"`callbacks.{name}` must be an integer >= 1; got {value!r}")
    return value


def _lr(trainer: "pl.Trainer") -> float | None:
    optimizers = trainer.optimizers
    return float(optimizers[0].param_groups[0]["lr"]) if optimizers else None


def _duration(seconds: float) -> str:
    seconds = int(round(seconds))
    hours, rest = divmod(seconds, 3600)
    return f"{hours}:{rest // 60:02d}:{rest % 60:02d}" if hours else f"{rest // 60}:{rest % 60:02d}"


def _scalar(value: Any) -> float | None:
    try:
        return float(value)
    except (TypeError, ValueError, RuntimeError):
        return None


class PlainProgress(ProgressBar):
    """One log line every ``every_n_steps`` optimizer steps: step/total, epoch, loss, lr, images/s, ETA."""

    def __init__(self, every_n_steps: int = 50) -> None:
        super().__init__()
        self.every_n_steps = _check_positive_int("progress_bar.every_n_steps", every_n_steps)
        self._enabled = True
        self._window_start = 0.0
        self._window_images = 0
        self._fit_start = 0.0
        self._fit_start_step = 0

    def disable(self) -> None:
        self._enabled = False

    def enable(self) -> None:
        self._enabled = True

    def on_train_start(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule") -> None:
        self._fit_start = self._window_start = time.perf_counter()
        self._fit_start_step = trainer.global_step
        self._window_images = 0

    def on_train_batch_end(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule", outputs: Any,
                           batch: Any, batch_idx: int) -> None:
        inputs = batch[0] if isinstance(batch, (list, tuple)) else batch
        self._window_images += int(getattr(inputs, "shape", [0])[0]) * trainer.world_size
        step = trainer.global_step
        if not self._enabled or not trainer.is_global_zero or step == 0 or step % self.every_n_steps:
            return
        now = time.perf_counter()
        total = int(trainer.estimated_stepping_batches)
        done = step - self._fit_start_step
        eta = (now - self._fit_start) / max(done, 1) * max(total - step, 0)
        loss = outputs.get("loss") if isinstance(outputs, dict) else outputs
        images_per_s = self._window_images / max(now - self._window_start, 1e-9)
        lr = _lr(trainer)
        log.info("step %d/%d  epoch %d/%d  loss %s  lr %s  %.0f img/s  ETA %s", step, total,
                 trainer.current_epoch + 1, trainer.max_epochs,
                 f"{_scalar(loss):.4f}" if _scalar(loss) is not None else "-",
                 f"{lr:.4g}" if lr is not None else "-", images_per_s, _duration(eta))
        self._window_start, self._window_images = now, 0


def progress_bar(refresh_rate: int = 10, every_n_steps: int = 50) -> ProgressBar:
    """The rich bar when stdout is a terminal, else :class:`PlainProgress` (a bar prints nothing to a file)."""
    _check_positive_int("progress_bar.refresh_rate", refresh_rate)
    if sys.stdout.isatty():
        return RichProgressBar(refresh_rate=refresh_rate)
    return PlainProgress(every_n_steps=every_n_steps)


class EpochSummary(pl.Callback):
    """One log line at every training epoch end: epoch, train loss, val metrics, lr, time, images/s."""

    def __init__(self) -> None:
        self._epoch_start = 0.0
        self._images = 0

    def on_train_epoch_start(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule") -> None:
        self._epoch_start, self._images = time.perf_counter(), 0

    def on_train_batch_end(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule", outputs: Any,
                           batch: Any, batch_idx: int) -> None:
        inputs = batch[0] if isinstance(batch, (list, tuple)) else batch
        self._images += int(getattr(inputs, "shape", [0])[0]) * trainer.world_size

    def on_train_epoch_end(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule") -> None:
        if trainer.sanity_checking or not trainer.is_global_zero:
            return
        elapsed = time.perf_counter() - self._epoch_start
        metrics = trainer.callback_metrics
        parts = [f"epoch {trainer.current_epoch + 1}/{trainer.max_epochs} done"]
        for key in ("train/loss", "val/loss", "val/acc1", "val/acc5"):
            value = _scalar(metrics.get(key))
            if value is not None:
                parts.append(f"{key} {value:.4f}")
        lr = _lr(trainer)
        if lr is not None:
            parts.append(f"lr {lr:.4g}")
        parts.append(f"{_duration(elapsed)} ({self._images / max(elapsed, 1e-9):.0f} img/s)")
        log.info("  ".join(parts))

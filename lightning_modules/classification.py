"""Image classification on any backbone, with the contract compression callbacks use.

``ClassificationModule`` mixes in ``lightning_modules.contract.CompressionContract`` (loss terms,
auxiliary modules, network replacement, extra results, the dense parent) and adds what a
classification run needs on top: cross-entropy with label smoothing, val/test metrics from
``evaluation/metrics.py``, the optimizer phase after a network replacement (widths and phase go
into every checkpoint, so resuming rebuilds a thinned network before loading weights), and a
memory format that is safe on this machine. The deployable model is always ``module.net``.
"""
from __future__ import annotations

from typing import Any, Callable, Mapping

import pytorch_lightning as pl
from pytorch_lightning.utilities import rank_zero_warn
import torch
import torch.nn.functional as F
from torch import nn

from netcompress.evaluation.metrics import ClassificationMetrics
from netcompress.compression.checks import plain
from netcompress.lightning_modules.contract import CompressionContract
from netcompress.lightning_modules.schedules import resumed_at
from netcompress.models.memory_format import cpu_channels_last_unsafe
from netcompress.models.serialization import CHECKPOINT_KEY, architecture_of, reshape_to



class ClassificationModule(CompressionContract, pl.LightningModule):
    """Cross-entropy training with top-1/top-5 accuracy on val and test.

    ``val/acc1``, ``test/acc1`` (and acc5) are sample-averaged top-k accuracy, ``*/loss`` the mean
    cross-entropy (``evaluation/metrics.py``, the same figures as ``evaluation.evaluate``). Test also
    gives ``test/acc1_macro`` (mean top-1 recall over the classes with test images) and, in
    ``extra_results``, ``test/per_class_acc1`` and ``test/class_counts``. A non-finite training
    loss stops fit at once with a ``FloatingPointError`` naming the step, loss terms and lr.

    Args:
        net: the backbone (any timm model); exported as the run's model.
        optimizer: ``functools.partial`` of a torch optimizer taking params (``conf/optimizer``).
        scheduler: ``partial`` of a ``lightning_modules.schedules`` factory, or None.
        label_smoothing: cross-entropy label smoothing.
        channels_last: keep the net in channels_last memory format (faster convs).
        no_decay_norm_bias: exempt norm weights and biases from weight decay.
        net_spec: ``{"model_name", "num_classes", "model_kwargs"}`` recorded in checkpoints so a
            checkpoint can be turned back into a network (teachers, reports).
        schedule_offset: this run continues a schedule at this optimizer step (lottery rewinding to
            step k trains the remaining T - k steps): the lr schedule spans this run's steps + offset
            and starts at its step ``offset``. 0 = a fresh schedule.
    """

    def __init__(self, net: nn.Module, optimizer: Callable, scheduler: Callable | None = None,
                 label_smoothing: float = 0.0, channels_last: bool = True,
                 no_decay_norm_bias: bool = False, net_spec: Mapping | None = None,
                 schedule_offset: int = 0) -> None:
        super().__init__()
        if not 0.0 <= label_smoothing < 1.0:
            raise ValueError(f"module.label_smoothing must be in [0, 1); got {label_smoothing}")
        self.net_spec = dict(plain(net_spec) or {})
        # Plain values only, so checkpoints load with torch.load(weights_only=True).
        if isinstance(schedule_offset, bool) or not isinstance(schedule_offset, int) or schedule_offset < 0:
            raise ValueError(f"module.schedule_offset must be an int >= 0 (optimizer steps already trained); "
                             f"got {schedule_offset!r}")
        self.schedule_offset = schedule_offset
        self.save_hyperparameters({"label_smoothing": label_smoothing, "channels_last": channels_last,
                                   "no_decay_norm_bias": no_decay_norm_bias, "net_spec": self.net_spec,
                                   "schedule_offset": schedule_offset})
        self.net = net
        self.init_compression_contract()
        self.optimizer_factory = optimizer
        self.scheduler_factory = scheduler
        self.label_smoothing = label_smoothing
        self.channels_last = channels_last
        self.no_decay_norm_bias = no_decay_norm_bias
        self.memory_format = torch.channels_last if channels_last else torch.contiguous_format  # see setup
        self._warned_memory_format = False
        # Optimizer phase: where the current optimizer/schedule started and its overrides.
        self._phase: dict[str, Any] = {"start_step": 0, "optimizer_overrides": {}}
        num_classes = self._num_classes()
        self.eval_metrics = {"val": ClassificationMetrics(num_classes), "test": ClassificationMetrics(num_classes)}

    def _num_classes(self) -> int:
        get_classifier = getattr(self.net, "get_classifier", None)
        classes = getattr(self.net, "num_classes", None)
        if classes is None and get_classifier is not None:
            classes = getattr(get_classifier(), "out_features", None)
        if not classes:
            raise ValueError("the network must expose num_classes (any timm model does)")
        return int(classes)

    # ----- the callback contract -------------------------------------------------------------
    def replace_net(self, net: nn.Module, optimizer_overrides: Mapping | None = None) -> None:
        """Swap the backbone; optimizers and schedules are rebuilt for the remaining steps, with
        ``optimizer_overrides`` (e.g. a fine-tuning lr), and the thin widths go into checkpoints."""
        trainer = self._trainer
        self._phase = {"start_step": trainer.global_step if trainer is not None else 0,
                       "optimizer_overrides": dict(optimizer_overrides or {})}
        super().replace_net(net, optimizer_overrides)  # configure_optimizers reads the new phase
        self._apply_memory_format()  # in place: the rebuilt optimizers hold the same parameters

    # ----- Lightning hooks -------------------------------------------------------------------
    def _apply_memory_format(self) -> None:
        """Put the net (and, through each step's inputs, its activations) in channels_last when configured
        and safe for this net on this device (models/memory_format.py), else in the contiguous format."""
        unsafe = cpu_channels_last_unsafe(self.net) if self.channels_last and self.device.type == "cpu" else []
        self.memory_format = torch.channels_last if self.channels_last and not unsafe else torch.contiguous_format
        if unsafe and not self._warned_memory_format:
            self._warned_memory_format = True
            rank_zero_warn(f"module.channels_last is ignored on the CPU for this net: {unsafe[:3]} are 1x1 strided "
                           "convs with < 8 input channels, whose channels_last backward corrupts memory in "
                           "oneDNN (torch 2.14 on AVX2 CPUs); the net trains in the contiguous format")
        self.net.to(memory_format=self.memory_format)

    def setup(self, stage: str) -> None:
        self._apply_memory_format()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)

    def training_step(self, batch, batch_idx: int) -> torch.Tensor:
        inputs, targets = batch
        inputs = inputs.contiguous(memory_format=self.memory_format)  # no copy when already in it
        logits = self.net(inputs)
        ce = F.cross_entropy(logits, targets, label_smoothing=self.label_smoothing)
        loss = self.compression_loss(ce, inputs, targets, logits)
        self.log("train/loss", loss, prog_bar=True)
        return loss

    def _eval_step(self, batch, stage: str) -> None:
        inputs, targets = batch
        inputs = inputs.contiguous(memory_format=self.memory_format)
        self.eval_metrics[stage].update(self.net(inputs), targets)

    def _sum_over_processes(self, counts: torch.Tensor) -> torch.Tensor:
        trainer = self._trainer
        if trainer is None or trainer.world_size == 1:
            return counts
        return trainer.strategy.reduce(counts, reduce_op="sum")

    def _eval_epoch_end(self, stage: str) -> dict[str, Any]:
        """Log ``<stage>/loss``, ``acc1``, ``acc5`` (all processes' samples) and return all figures."""
        figures = self.eval_metrics[stage].compute(self._sum_over_processes)
        self.eval_metrics[stage].reset()
        self.log(f"{stage}/loss", figures["loss"])
        self.log(f"{stage}/acc1", figures["acc1"], prog_bar=True)
        self.log(f"{stage}/acc5", figures["acc5"])
        return figures

    def on_validation_epoch_start(self) -> None:
        self.eval_metrics["val"].reset()

    def on_test_epoch_start(self) -> None:
        self.eval_metrics["test"].reset()

    def validation_step(self, batch, batch_idx: int) -> None:
        self._eval_step(batch, "val")

    def test_step(self, batch, batch_idx: int) -> None:
        self._eval_step(batch, "test")

    def on_validation_epoch_end(self) -> None:
        self._eval_epoch_end("val")

    def on_test_epoch_end(self) -> None:
        """Test figures; per-class top-1 and class counts go to results.json (lists: not loggable)."""
        figures = self._eval_epoch_end("test")
        self.log("test/acc1_macro", figures["acc1_macro"])
        self.report_result("test/per_class_acc1", figures["per_class_acc1"])
        self.report_result("test/class_counts", figures["class_counts"])

    def _parameter_groups(self) -> list[dict]:
        params = [p for p in list(self.net.parameters()) + list(self.aux.parameters()) if p.requires_grad]
        if not self.no_decay_norm_bias:
            return [{"params": params}]
        decay, no_decay = [], []
        for p in params:
            (no_decay if p.ndim <= 1 else decay).append(p)
        return [{"params": decay}, {"params": no_decay, "weight_decay": 0.0}]

    def configure_optimizers(self):
        optimizer = self.optimizer_factory(self._parameter_groups(), **self._phase["optimizer_overrides"])
        if self.scheduler_factory is None:
            return optimizer
        offset = self.schedule_offset if self._phase["start_step"] == 0 else 0  # a later phase restarts
        total = max(1, int(self.trainer.estimated_stepping_batches) - int(self._phase["start_step"])) + offset
        epochs = self.trainer.max_epochs if self.trainer.max_epochs and self.trainer.max_epochs > 0 else 1
        steps_per_epoch = max(1, int(self.trainer.estimated_stepping_batches) // epochs)
        scheduler = resumed_at(self.scheduler_factory(optimizer, total_steps=total, steps_per_epoch=steps_per_epoch),
                               offset)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        checkpoint[CHECKPOINT_KEY] = {"arch": architecture_of(self.net), "phase": dict(self._phase),
                                      "net_spec": self.net_spec}

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        saved = checkpoint.get(CHECKPOINT_KEY)
        if saved is None:
            return
        theirs, ours = saved.get("net_spec") or {}, self.net_spec
        for field in ("model_name", "num_classes"):  # another model: never resized into this one
            if field in theirs and field in ours and theirs[field] != ours[field]:
                raise ValueError(f"the checkpoint holds {theirs.get('model_name')} with {theirs.get('num_classes')} "
                                 f"classes but this run builds {ours.get('model_name')} with "
                                 f"{ours.get('num_classes')}; resume with the config that wrote the checkpoint")
        if saved["arch"] != architecture_of(self.net):
            reshape_to(self.net, saved["arch"])
            self._apply_memory_format()  # the resized tensors are fresh, contiguous ones
        self._phase = dict(saved["phase"])

"""Image classification on any backbone, with the one contract compression callbacks use.

The contract (callbacks never patch methods and never call each other):

* ``add_loss_term(name, fn, weight)``: ``fn(LossContext) -> scalar tensor`` is added to the
  training loss every step and logged as ``train/<name>`` (distillation, sparsity penalties).
  ``set_task_loss_weight(alpha)`` scales the cross-entropy term (Hinton-style KD mixes them).
* ``register_aux_module(name, module)``: extra trainable modules (e.g. FitNets adapters) that
  are optimised with the network and saved in checkpoints, but are not part of the exported net.
  Register them in the callback's ``setup`` so they exist before optimizers and resume.
* ``replace_net(net, optimizer_overrides)``: swap the backbone in place (physical channel
  removal). Optimizers and LR schedulers are rebuilt for the remaining steps, optionally with
  other optimizer arguments (fine-tune lr). Layer widths are stored in every checkpoint so
  resuming rebuilds the thin network before loading weights.
* ``report_result(key, value)``: extra figures for ``results.json`` (``compress/sparsity``, ...).

The deployable model is always ``module.net``.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Mapping

import pytorch_lightning as pl
from pytorch_lightning.utilities import rank_zero_warn
import torch
import torch.nn.functional as F
from omegaconf import DictConfig, OmegaConf
from torch import nn
from torchmetrics.classification import MulticlassAccuracy, MulticlassStatScores

from netcompress.models.memory_format import cpu_channels_last_unsafe
from netcompress.models.serialization import architecture_of, reshape_to

CHECKPOINT_KEY = "netcompress"


@dataclass
class LossContext:
    """What a loss term sees each training step."""

    inputs: torch.Tensor
    targets: torch.Tensor
    logits: torch.Tensor
    module: "ClassificationModule"


LossFn = Callable[[LossContext], torch.Tensor]


def _plain(value: Any) -> Any:
    return OmegaConf.to_container(value, resolve=True) if isinstance(value, DictConfig) else value


def _scalar(value: Any) -> float:
    """A loss term (tensor or number) as a float, for messages."""
    return float(value.detach()) if isinstance(value, torch.Tensor) else float(value)


def top_k_accuracy(num_classes: int, k: int) -> MulticlassAccuracy:
    """Sample-averaged top-k accuracy (what papers call top-1/top-5); torchmetrics defaults to macro."""
    return MulticlassAccuracy(num_classes, top_k=min(k, num_classes), average="micro")


def per_class_top1(stat_scores: torch.Tensor) -> tuple[list[float], list[int]]:
    """(top-1 recall of each class, its test images) from MulticlassStatScores(average=None) rows
    [tp, fp, tn, fn, support]; a class with no test image has recall NaN (null in results.json)."""
    tp, support = stat_scores[:, 0].double(), stat_scores[:, 4]
    recall = tp / support.double()  # 0/0 = NaN: undefined, not 0
    return [float(r) for r in recall], [int(n) for n in support]


class ClassificationModule(pl.LightningModule):
    """Cross-entropy training with top-1/top-5 accuracy on val and test.

    ``val/acc1``, ``test/acc1`` (and acc5) are sample-averaged top-k accuracy. Test also gives
    ``test/acc1_macro`` (mean per-class recall, torchmetrics' macro average) and, in
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
    """

    def __init__(self, net: nn.Module, optimizer: Callable, scheduler: Callable | None = None,
                 label_smoothing: float = 0.0, channels_last: bool = True,
                 no_decay_norm_bias: bool = False, net_spec: Mapping | None = None) -> None:
        super().__init__()
        if not 0.0 <= label_smoothing < 1.0:
            raise ValueError(f"module.label_smoothing must be in [0, 1); got {label_smoothing}")
        self.net_spec = dict(_plain(net_spec) or {})
        # Plain values only, so checkpoints load with torch.load(weights_only=True).
        self.save_hyperparameters({"label_smoothing": label_smoothing, "channels_last": channels_last,
                                   "no_decay_norm_bias": no_decay_norm_bias, "net_spec": self.net_spec})
        self.net = net
        self.aux = nn.ModuleDict()
        self.optimizer_factory = optimizer
        self.scheduler_factory = scheduler
        self.label_smoothing = label_smoothing
        self.channels_last = channels_last
        self.no_decay_norm_bias = no_decay_norm_bias
        self.task_loss_weight = 1.0
        self.memory_format = torch.channels_last if channels_last else torch.contiguous_format  # see setup
        self._warned_memory_format = False
        self.extra_results: dict[str, Any] = {}
        self._loss_terms: dict[str, tuple[LossFn, float]] = {}
        # Optimizer phase: where the current optimizer/schedule started and its overrides.
        self._phase: dict[str, Any] = {"start_step": 0, "optimizer_overrides": {}}
        num_classes = self._num_classes()
        self.val_acc1 = top_k_accuracy(num_classes, 1)
        self.val_acc5 = top_k_accuracy(num_classes, 5)
        self.test_acc1 = top_k_accuracy(num_classes, 1)
        self.test_acc5 = top_k_accuracy(num_classes, 5)
        self.test_acc1_macro = MulticlassAccuracy(num_classes, top_k=1, average="macro")
        self.test_class_stats = MulticlassStatScores(num_classes, average=None)  # per-class tp and support

    def _num_classes(self) -> int:
        get_classifier = getattr(self.net, "get_classifier", None)
        classes = getattr(self.net, "num_classes", None)
        if classes is None and get_classifier is not None:
            classes = getattr(get_classifier(), "out_features", None)
        if not classes:
            raise ValueError("the network must expose num_classes (any timm model does)")
        return int(classes)

    # ----- the callback contract -------------------------------------------------------------
    def add_loss_term(self, name: str, fn: LossFn, weight: float = 1.0) -> None:
        if name in self._loss_terms:
            raise ValueError(f"a loss term named '{name}' is already registered; two callbacks use one name")
        self._loss_terms[name] = (fn, float(weight))

    def remove_loss_term(self, name: str) -> None:
        self._loss_terms.pop(name, None)

    def set_task_loss_weight(self, weight: float) -> None:
        if not 0.0 <= weight <= 1.0:
            raise ValueError(f"task loss weight must be in [0, 1]; got {weight}")
        self.task_loss_weight = float(weight)

    def register_aux_module(self, name: str, module: nn.Module) -> None:
        if name in self.aux:
            raise ValueError(f"an auxiliary module named '{name}' is already registered")
        self.aux[name] = module.to(self.device)

    def report_result(self, key: str, value: Any) -> None:
        self.extra_results[key] = value

    def replace_net(self, net: nn.Module, optimizer_overrides: Mapping | None = None) -> None:
        """Swap the backbone and, during fit, rebuild optimizers and schedulers from the current step."""
        trainer = self._trainer
        if trainer is not None and trainer.world_size > 1:
            raise RuntimeError("replace_net (physical channel removal) is not supported under multi-process "
                               "DDP yet; run the removal with trainer=cpu or trainer=gpu (one device)")
        self.net = net.to(self.device)
        self._apply_memory_format()
        self._phase = {"start_step": trainer.global_step if trainer is not None else 0,
                       "optimizer_overrides": dict(optimizer_overrides or {})}
        if trainer is not None and trainer.training:
            trainer.strategy.setup_optimizers(trainer)

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
        loss = self.task_loss_weight * ce if self.task_loss_weight != 1.0 else ce
        terms = {"ce": ce}
        if self._loss_terms:
            context = LossContext(inputs, targets, logits, self)
            for name, (fn, weight) in self._loss_terms.items():
                term = terms[name] = fn(context)
                loss = loss + weight * term
                self.log(f"train/{name}", term)
            self.log("train/ce", ce)
        self.check_finite_loss(loss, terms)
        self.log("train/loss", loss, prog_bar=True)
        return loss

    def check_finite_loss(self, loss: torch.Tensor, terms: Mapping[str, Any]) -> None:
        """Stop fit at the first non-finite loss, before the optimizer step spreads it into the weights.

        One host sync per step (the price of never training on NaN; under DDP the ranks agree, so
        all of them stop); the message names the step, each loss term's value and weight, and the lr.
        """
        trainer = self._trainer
        diverged = not bool(torch.isfinite(loss.detach()))
        if trainer is not None:
            diverged = trainer.strategy.reduce_boolean_decision(diverged, all=False)
        if not diverged:
            return
        weights = {"ce": self.task_loss_weight, **{n: w for n, (_, w) in self._loss_terms.items()}}
        values = ", ".join(f"{n}={_scalar(t):.6g} (weight {weights[n]:g})" for n, t in terms.items())
        step, epoch = (trainer.global_step, trainer.current_epoch) if trainer is not None else ("?", "?")
        raise FloatingPointError(
            f"non-finite training loss {float(loss.detach())} at step {step} (epoch {epoch}): {values}; "
            f"last lr {self._last_lr()}. Training diverged: lower optimizer.lr, add warm-up (scheduler), or check "
            "the compression settings that took effect at this step")

    def _last_lr(self) -> str:
        """Learning rate(s) of the last optimizer step, for error messages."""
        trainer = self._trainer
        optimizers = trainer.optimizers if trainer is not None else []
        lrs = sorted({float(g["lr"]) for opt in optimizers for g in opt.param_groups})
        return ", ".join(f"{lr:.6g}" for lr in lrs) if lrs else "unknown (no optimizer)"

    def _eval_step(self, batch, stage: str) -> torch.Tensor:
        inputs, targets = batch
        inputs = inputs.contiguous(memory_format=self.memory_format)
        logits = self.net(inputs)
        acc1, acc5 = (self.val_acc1, self.val_acc5) if stage == "val" else (self.test_acc1, self.test_acc5)
        acc1.update(logits, targets)
        acc5.update(logits, targets)
        self.log(f"{stage}/loss", F.cross_entropy(logits, targets), on_epoch=True, sync_dist=True)
        self.log(f"{stage}/acc1", acc1, on_epoch=True, prog_bar=True)
        self.log(f"{stage}/acc5", acc5, on_epoch=True)
        return logits

    def validation_step(self, batch, batch_idx: int) -> None:
        self._eval_step(batch, "val")

    def test_step(self, batch, batch_idx: int) -> None:
        logits = self._eval_step(batch, "test")
        self.test_acc1_macro.update(logits, batch[1])
        self.test_class_stats.update(logits, batch[1])
        self.log("test/acc1_macro", self.test_acc1_macro, on_epoch=True)

    def on_test_epoch_end(self) -> None:
        """Per-class top-1 and class counts of the test set into results.json (lists: not loggable)."""
        per_class, counts = per_class_top1(self.test_class_stats.compute())
        self.test_class_stats.reset()
        self.report_result("test/per_class_acc1", per_class)
        self.report_result("test/class_counts", counts)

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
        total = max(1, int(self.trainer.estimated_stepping_batches) - int(self._phase["start_step"]))
        epochs = self.trainer.max_epochs if self.trainer.max_epochs and self.trainer.max_epochs > 0 else 1
        steps_per_epoch = max(1, int(self.trainer.estimated_stepping_batches) // epochs)
        scheduler = self.scheduler_factory(optimizer, total_steps=total, steps_per_epoch=steps_per_epoch)
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

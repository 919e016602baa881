"""The contract between compression callbacks and a LightningModule, as a mixin for any module.

Callbacks never patch a module's methods and never call each other; they use these methods:

* ``add_loss_term(name, fn, weight)``: ``fn(LossContext) -> scalar tensor`` is added to the
  training loss every step and logged as ``train/<name>`` (distillation, sparsity penalties).
  ``set_task_loss_weight(weight)`` scales the task (cross-entropy) term (KD's ``ce_weight``).
* ``register_aux_module(name, module)``: extra trainable modules (FitNets adapters) optimised with
  the network and saved in checkpoints, but not part of the exported net (``self.aux``).
* ``replace_net(net, optimizer_overrides)``: swap the network (physical channel removal) and
  rebuild the optimizers for the remaining steps.
* ``report_result(key, value)``: extra figures for ``results.json`` (``self.extra_results``).
* ``set_parent(net, source)``: the dense net this one is compressed from, read back as
  ``self.parent`` (a plain attribute: never trained, moved, or saved in checkpoints).
* ``set_evaluated_net(net)``: the net the evaluators after test should judge when it is not
  ``self.net`` (QAT / PTQ: the fake-quantized net, while ``self.net`` becomes the plain fp32 net
  that model.pt stores); read back as ``self.evaluated_net``.

The network being compressed is ``self.net``. A module of your own mixes this in, calls
``init_compression_contract()`` in ``__init__``, builds its optimizers from ``self.parameters()``,
and returns ``self.compression_loss(task_loss, inputs, targets, logits)`` from ``training_step``
(README: "The callbacks in your own LightningModule"). ``ClassificationModule`` is one such module.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Mapping

import torch
from torch import nn


@dataclass
class LossContext:
    """What a loss term sees each training step."""

    inputs: torch.Tensor
    targets: torch.Tensor
    logits: torch.Tensor
    module: Any  # the LightningModule


LossFn = Callable[[LossContext], torch.Tensor]
CONTRACT = ("net", "add_loss_term", "remove_loss_term", "set_task_loss_weight", "register_aux_module",
            "report_result", "replace_net", "set_parent")


def _scalar(value: Any) -> float:
    """A loss term (tensor or number) as a float, for messages."""
    return float(value.detach()) if isinstance(value, torch.Tensor) else float(value)


def require_contract(pl_module: Any, who: str, needs: tuple[str, ...] = CONTRACT) -> None:
    """Refuse, before any training, a module that lacks the parts of the contract ``who`` uses (``needs``),
    naming them."""
    missing = [name for name in needs if not hasattr(pl_module, name)]
    if missing:
        raise TypeError(f"{who} needs a LightningModule with the compression contract, but "
                        f"{type(pl_module).__name__} lacks {', '.join(missing)}: mix "
                        "netcompress.lightning_modules.contract.CompressionContract into it (README: 'The callbacks "
                        "in your own LightningModule')")


class CompressionContract:
    """Mixin giving a LightningModule the methods compression callbacks call (see the module docstring)."""

    net: nn.Module

    def init_compression_contract(self) -> None:
        """Call in ``__init__`` after ``super().__init__()``."""
        self.aux = nn.ModuleDict()
        self.task_loss_weight = 1.0
        self.extra_results: dict[str, Any] = {}
        self._loss_terms: dict[str, tuple[LossFn, float]] = {}
        self._parent: list = [None, None]  # [net, source]: a list, so the net is no submodule (not trained or saved)

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

    def set_parent(self, net: nn.Module, source: str = "", replace: bool = False) -> None:
        """Record ``net`` as the dense parent (a frozen copy: this module never trains or saves it).

        The first parent set wins (``init_from``'s net, set while building, over a KD teacher set at
        fit start) unless ``replace`` (a protocol naming its dense stage)."""
        if not isinstance(net, nn.Module):
            raise TypeError(f"set_parent takes a torch net; got {type(net).__name__}")
        if self._parent[0] is None or replace:
            self._parent = [net, str(source)]

    def set_evaluated_net(self, net: nn.Module) -> None:
        """The net ``evaluation=[...]`` judges instead of ``self.net`` (a quantization callback's quantized net)."""
        if not isinstance(net, nn.Module):
            raise TypeError(f"set_evaluated_net takes a torch net; got {type(net).__name__}")
        self._evaluated_net = [net]

    @property
    def evaluated_net(self) -> nn.Module:
        """What the evaluators judge: the net set by ``set_evaluated_net``, else ``self.net``."""
        held = getattr(self, "_evaluated_net", None)
        return held[0] if held else self.net

    @property
    def parent(self) -> nn.Module | None:
        """The dense parent net (see ``set_parent``), or None."""
        return self._parent[0]

    @property
    def parent_source(self) -> str | None:
        """Where the parent came from (``init_from:<path>``, ``kd:<teacher>``, ...), or None."""
        return self._parent[1] if self._parent[0] is not None else None

    def replace_net(self, net: nn.Module, optimizer_overrides: Mapping | None = None) -> None:
        """Swap the network and, during fit, rebuild the optimizers (from ``configure_optimizers``)."""
        trainer = self._trainer
        if trainer is not None and trainer.world_size > 1:
            raise RuntimeError("replace_net (physical channel removal) is not supported under multi-process "
                               "DDP yet; run the removal with trainer=cpu or trainer=gpu (one device)")
        self.net = net.to(self.device)
        if trainer is not None and trainer.training:
            trainer.strategy.setup_optimizers(trainer)

    def compression_loss(self, task_loss: torch.Tensor, inputs: torch.Tensor, targets: torch.Tensor,
                         logits: torch.Tensor) -> torch.Tensor:
        """``task_weight * task_loss + sum(weight * term)`` over the callbacks' loss terms, each logged as
        ``train/<name>``; a non-finite result stops fit at once (``check_finite_loss``)."""
        loss = self.task_loss_weight * task_loss if self.task_loss_weight != 1.0 else task_loss
        terms = {"ce": task_loss}
        if self._loss_terms:
            context = LossContext(inputs, targets, logits, self)
            for name, (fn, weight) in self._loss_terms.items():
                term = terms[name] = fn(context)
                loss = loss + weight * term
                self.log(f"train/{name}", term)
            self.log("train/ce", task_loss)
        self.check_finite_loss(loss, terms)
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

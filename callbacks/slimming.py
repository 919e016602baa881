"""Network slimming: remove the channels with the smallest BN scale, then fine-tune the thin net.

Liu et al. 2017, "Learning Efficient Convolutional Networks through Network Slimming", section
4: after training with L1 on BN gamma (``callbacks/bn_sparsity.py``), all selected channels are
ranked by |gamma| with ONE global threshold (the ``prune_ratio`` percentile), at least
``min_channels`` survive in every layer, and the channels are *physically* removed with
everything that depends on them (``compression.channel_removal``, torch-pruning's dependency
graph). The optimizer and LR schedule are rebuilt for the remaining epochs (``replace_net``),
which fine-tune the thin network; several ``at_epochs`` give the paper's multi-pass scheme.
"""
from __future__ import annotations

from typing import Any, Sequence

import pytorch_lightning as pl
import torch
from torch import nn

from netcompress.compression.batchnorm import batchnorm_layers
from netcompress.compression.channel_removal import check_removable, example_input, remove_channels
from netcompress.compression.calibration import calibrated, train_batches
from netcompress.compression.checks import check_int
from netcompress.compression.importance import check_applies, check_importance, get_criterion, score
from netcompress.compression.masks import check_round_to, check_sparsity, masks_from_scores, round_kept
from netcompress.lightning_modules.contract import require_contract

KEY = "callbacks.slimming"
# the criterion names this config took before the importance registry (still accepted)
CRITERION_ALIASES = {"gamma": "bn_gamma", "running_var": "bn_variance"}


def slimming_masks(bns: dict[str, nn.Module], ratio: float, criterion: str = "bn_gamma",
                   min_channels: int = 1, round_to: int | None = None) -> dict[str, torch.Tensor]:
    """Bool keep-masks: the ``round(ratio * N)`` channels of lowest ``criterion`` score (a name of
    ``compression.importance``) over all layers are dropped (one global threshold, ties by
    position), then each layer keeps at least ``min_channels``, its count rounded down to a
    multiple of ``round_to`` (at least one multiple; ``compression.masks.round_kept``)."""
    criterion = check_importance(criterion, "criterion", CRITERION_ALIASES)
    scores = {name: score(criterion, bn).float().cpu() for name, bn in bns.items()}
    masks = masks_from_scores(scores, ratio, "global")
    for name, keep in masks.items():
        floor = min(min_channels, keep.numel())
        if int(keep.sum()) < floor:
            keep[torch.topk(scores[name], floor).indices] = True
        masks[name] = round_kept(keep, scores[name], round_to)
    return masks


class Slimming(pl.Callback):
    """Slim the network at the start of each epoch in ``at_epochs`` (``max_epochs`` = after training).

    Args:
        prune_ratio: fraction of the selected channels removed at each pass, in [0, 1) (paper: 0.7
            for VGG-19 on CIFAR-10); a list gives one ratio per pass.
        at_epochs: epochs at whose start the network is slimmed; the remaining epochs fine-tune it.
            The paper's recipe: trainer.max_epochs=200, at_epochs=[160].
        criterion: per-channel importance from the ``compression.importance`` registry: ``bn_gamma``
            (|BN scale|, the paper) or ``bn_variance`` (BN running variance); ``gamma`` and
            ``running_var`` are accepted as their older names. Also ``bn_mean_variance``, and from a
            calibration pass over ``calibration_batches`` training batches ``activation`` (mean |BN
            output|), ``apoz`` (1 - APoZ of the ReLU after the BN), ``taylor`` (|gamma G_gamma + beta
            G_beta|, Molchanov et al. 2019) or the seeded ``random`` baseline.
        calibration_batches: training batches the data-driven criteria see at each pass (eval mode).
        seed: seed of criterion=random (the same seed gives the same channels).
        min_channels: channels every BN layer keeps at least (so no layer empties).
        finetune_lr: learning rate of the rebuilt optimizer (null keeps the configured one).
        include/exclude: module-name patterns of the BatchNorm layers whose channels may go.
        round_to: each BN layer's kept channels rounded down to a multiple of this (hardware-friendly
            widths; at least one multiple); null = no rounding.
    """

    CAPABILITIES = frozenset({"single", "reshapes_net", "edits_weights"})  # rules: pipeline/combinations.py

    def __init__(self, prune_ratio: float | Sequence[float] = 0.7, at_epochs: Sequence[int] = (160,),
                 criterion: str = "bn_gamma", min_channels: int = 1, finetune_lr: float | None = None,
                 include: Sequence[str] = ("*",), exclude: Sequence[str] = (), calibration_batches: int = 8,
                 seed: int = 0, round_to: int | None = None) -> None:
        super().__init__()
        self.round_to = check_round_to(round_to, f"`{KEY}.round_to`")
        if isinstance(at_epochs, int) or not all(isinstance(e, int) and not isinstance(e, bool) and e >= 1
                                                 for e in at_epochs) or not at_epochs:
            raise ValueError(f"`{KEY}.at_epochs` must be a non-empty list of epochs >= 1, e.g. [160]; "
                             f"got {at_epochs!r}")
        self.at_epochs = sorted(set(int(e) for e in at_epochs))
        ratios = [prune_ratio] * len(self.at_epochs) if isinstance(prune_ratio, (int, float)) else list(prune_ratio)
        if len(ratios) != len(self.at_epochs):
            raise ValueError(f"`{KEY}.prune_ratio` must be one number or one per entry of at_epochs "
                             f"({len(self.at_epochs)}); got {prune_ratio!r}")
        self.prune_ratios = [check_sparsity(r, f"`{KEY}.prune_ratio`") for r in ratios]
        self.criterion = check_importance(criterion, f"`{KEY}.criterion`", CRITERION_ALIASES)
        self.calibration_batches = check_int(calibration_batches, f"{KEY}.calibration_batches", 1)
        self.seed = check_int(seed, f"{KEY}.seed", 0)
        if isinstance(min_channels, bool) or not isinstance(min_channels, int) or min_channels < 1:
            raise ValueError(f"`{KEY}.min_channels` must be an int >= 1; got {min_channels!r}")
        self.min_channels = min_channels
        if finetune_lr is not None and (isinstance(finetune_lr, bool) or not isinstance(finetune_lr, (int, float))
                                        or finetune_lr <= 0):
            raise ValueError(f"`{KEY}.finetune_lr` must be null or a positive float; got {finetune_lr!r}")
        self.finetune_lr = finetune_lr
        if isinstance(include, str) or isinstance(exclude, str):
            raise TypeError(f"`{KEY}.include`/`exclude` must be lists of patterns; got {include!r} / {exclude!r}")
        self.include, self.exclude = list(include), list(exclude)
        self.history: list[dict[str, Any]] = []

    @property
    def last_edit_epoch(self) -> int:
        """The epoch of the last slimming pass (capability ``edits_weights``)."""
        return self.at_epochs[-1]

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        require_contract(pl_module, type(self).__name__, ('net', 'replace_net', 'report_result'))
        if stage != "fit":
            return
        bns = batchnorm_layers(pl_module.net, self.include, self.exclude, KEY)
        check_applies(self.criterion, bns, f"`{KEY}.criterion`")
        example = example_input(pl_module.net, getattr(trainer.datamodule, "input_size", None))
        check_removable(pl_module.net, list(bns), example, key=KEY)

    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if trainer.world_size > 1:
            raise ValueError(f"`{KEY}` replaces the network mid-training, which is not supported under "
                             "multi-process DDP; use trainer=cpu or trainer=gpu (one device)")
        max_epochs = trainer.max_epochs
        if max_epochs is not None and max_epochs > 0 and self.at_epochs[-1] > max_epochs and not trainer.fast_dev_run:
            raise ValueError(f"`{KEY}.at_epochs` {self.at_epochs} goes past trainer.max_epochs={max_epochs}; "
                             f"the run's epochs are train + fine-tune, e.g. max_epochs=200 with at_epochs=[160]")
        if self.history:  # resumed after a slimming pass: its figures come from the checkpoint's history
            self._report(pl_module)

    def slim(self, trainer: pl.Trainer, pl_module: pl.LightningModule, ratio: float, finetune: bool) -> None:
        net = pl_module.net
        bns = batchnorm_layers(net, self.include, self.exclude, KEY)
        loader = train_batches(trainer) if get_criterion(self.criterion).needs_data else None
        with calibrated(net, bns, self.criterion, loader, self.calibration_batches, self.seed,
                        key=f"{KEY}.calibration_batches", seed_key=f"{KEY}.seed"):
            keep = slimming_masks(bns, ratio, self.criterion, self.min_channels, self.round_to)
        before = sum(p.numel() for p in net.parameters())
        channels_before = sum(m.numel() for m in keep.values())
        thin = remove_channels(net, keep, example_input(net, getattr(trainer.datamodule, "input_size", None)))
        channels_after = sum(m.num_features for m in batchnorm_layers(thin, self.include, self.exclude, KEY).values())
        overrides = {"lr": self.finetune_lr} if finetune and self.finetune_lr is not None else None
        pl_module.replace_net(thin, optimizer_overrides=overrides)
        after = sum(p.numel() for p in thin.parameters())
        record = {"epoch": trainer.current_epoch, "prune_ratio": ratio, "params_before": before,
                  "params_after": after, "channels_before": channels_before, "channels_after": channels_after}
        self.history.append(record)
        self._report(pl_module)

    def _report(self, pl_module: pl.LightningModule) -> None:
        """results.json figures, all derived from ``history`` (so a resumed run reports the same)."""
        first, last = self.history[0], self.history[-1]
        pl_module.report_result("compress/slimming", [dict(r) for r in self.history])
        pl_module.report_result("compress/channels_pruned", 1.0 - last["channels_after"] / first["channels_before"])
        pl_module.report_result("compress/params_ratio", last["params_after"] / first["params_before"])

    def on_train_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        epoch = trainer.current_epoch
        if epoch in self.at_epochs:
            self.slim(trainer, pl_module, self.prune_ratios[self.at_epochs.index(epoch)], finetune=True)

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        epoch = trainer.current_epoch  # == max_epochs after the last epoch
        if epoch in self.at_epochs and not any(r["epoch"] == epoch for r in self.history):
            self.slim(trainer, pl_module, self.prune_ratios[self.at_epochs.index(epoch)], finetune=False)

    # the record of past passes (for results.json after a resume); the net itself is in the checkpoint
    def state_dict(self) -> dict[str, Any]:
        return {"history": list(self.history)}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.history = list(state_dict.get("history", []))

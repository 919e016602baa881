"""Low-rank decomposition by truncated SVD, then fine-tuning (Denton et al. 2014; Zhang et al. 2016;
the factorisation is in ``compression/lowrank.py``).

At the start of epoch ``at_epoch`` every selected Linear becomes Linear(in, r) -> Linear(r, out)
and every selected Conv2d a kxk conv to r channels followed by a 1x1 conv, with r fixed
(``rank``) or the smallest rank that keeps a fraction ``energy`` of the squared singular values.
A layer whose factorisation would not have fewer parameters than the layer is left dense. The new
network goes in through ``pl_module.replace_net`` (optimizer and schedule rebuilt, optional
fine-tune ``lr``); params and FLOPs before and after go to results.json.
"""
from __future__ import annotations

from typing import Any, Sequence

import pytorch_lightning as pl
from torch import nn

from netcompress.compression import lowrank
from netcompress.compression.layer_selection import select_layers
from netcompress.evaluation.model_stats import count_flops, count_parameters
from netcompress.lightning_modules.contract import require_contract

KEY = "callbacks.lowrank"


class LowRank(pl.Callback):
    """Replace Linear/Conv2d layers by rank-r pairs (truncated SVD) and fine-tune.

    Args:
        rank: fixed rank of every selected layer (capped at the layer's full rank), or null.
        energy: kept fraction of sum(s_i^2) in (0, 1] that picks each layer's rank, or null.
            Exactly one of ``rank`` and ``energy`` is set.
        include, exclude: module-name patterns of the Conv2d/Linear layers to decompose.
        skip_first_last: leave the stem conv and the classifier dense (timm pretrained_cfg).
        at_epoch: epoch at whose start the layers are decomposed (0 = start of fit, e.g. after
            ``init_from`` a trained run).
        lr: learning rate of the fine-tuning phase (null = the optimizer's); only with at_epoch > 0,
            at epoch 0 set ``optimizer.lr``.
    """

    CAPABILITIES = frozenset({"single", "reshapes_net", "edits_weights"})  # rules: pipeline/combinations.py

    def __init__(self, rank: int | None = None, energy: float | None = 0.9, include: Sequence[str] = ("*",),
                 exclude: Sequence[str] = (), skip_first_last: bool = True, at_epoch: int = 0,
                 lr: float | None = None) -> None:
        super().__init__()
        if (rank is None) == (energy is None):
            raise ValueError(f"set exactly one of `{KEY}.rank` and `{KEY}.energy`; got rank={rank!r}, "
                             f"energy={energy!r}")
        if rank is not None and (isinstance(rank, bool) or not isinstance(rank, int) or rank < 1):
            raise ValueError(f"`{KEY}.rank` must be an int >= 1 or null; got {rank!r}")
        if energy is not None and (isinstance(energy, bool) or not isinstance(energy, (int, float))
                                   or not 0.0 < energy <= 1.0):
            raise ValueError(f"`{KEY}.energy` must be in (0, 1] (kept fraction of sum of squared singular "
                             f"values) or null; got {energy!r}")
        for key, value in (("include", include), ("exclude", exclude)):
            if isinstance(value, str) or not all(isinstance(p, str) for p in (value or ())):
                raise ValueError(f"`{KEY}.{key}` must be a list of module-name patterns like ['fc*']; got {value!r}")
        if not isinstance(skip_first_last, bool):
            raise ValueError(f"`{KEY}.skip_first_last` must be true or false; got {skip_first_last!r}")
        if isinstance(at_epoch, bool) or not isinstance(at_epoch, int) or at_epoch < 0:
            raise ValueError(f"`{KEY}.at_epoch` must be an int >= 0; got {at_epoch!r}")
        if lr is not None and (isinstance(lr, bool) or not isinstance(lr, (int, float)) or not lr > 0):
            raise ValueError(f"`{KEY}.lr` must be a positive number or null; got {lr!r}")
        if lr is not None and at_epoch == 0:
            raise ValueError(f"`{KEY}.lr` only applies to a fine-tuning phase after at_epoch > 0; "
                             "at epoch 0 set optimizer.lr instead")
        self.rank = rank
        self.energy = None if energy is None else float(energy)
        self.include, self.exclude = list(include or ()), list(exclude or ())
        self.skip_first_last = skip_first_last
        self.at_epoch = at_epoch
        self.lr = None if lr is None else float(lr)
        self.report: dict[str, Any] = {}  # empty until decomposed; saved for resume

    @property
    def last_edit_epoch(self) -> int | None:
        """The epoch of the decomposition (capability ``edits_weights``); None at epoch 0, which happens in
        ``on_train_start``, before any epoch starts."""
        return self.at_epoch or None

    def _select(self, net: nn.Module) -> dict[str, nn.Module]:
        layers = select_layers(net, self.include, self.exclude, self.skip_first_last, key=KEY)
        return {name: layer for name, layer in layers.items() if lowrank.decomposable(layer)}

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        require_contract(pl_module, type(self).__name__, ('net', 'replace_net', 'report_result'))
        if stage == "fit" and not self._select(pl_module.net):
            raise ValueError(f"{KEY}: the selected layers are all grouped convolutions, which are not decomposed")

    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        max_epochs = trainer.max_epochs
        if trainer.fast_dev_run:
            return  # a one-step smoke run: a decomposition at a later epoch simply does not happen
        if not self.report and max_epochs is not None and max_epochs >= 0 and self.at_epoch >= max_epochs:
            raise ValueError(f"`{KEY}.at_epoch` ({self.at_epoch}) must be < trainer.max_epochs ({max_epochs}), "
                             "or nothing is decomposed")

    # Epoch 0 acts in on_train_start, before any callback's on_train_epoch_start (so a `cluster`
    # entry at epoch 0 sees the decomposed layers whatever the list order).
    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if not self.report and trainer.current_epoch >= self.at_epoch:
            self._decompose(trainer, pl_module)

    def on_train_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if not self.report and trainer.current_epoch >= self.at_epoch:
            self._decompose(trainer, pl_module)

    def _decompose(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        net = pl_module.net
        input_size = tuple(trainer.datamodule.input_size) if trainer.datamodule is not None else None
        params_before = count_parameters(net)[0]
        flops_before = count_flops(net, input_size) if input_size else None
        ranks, skipped = {}, []
        for name, layer in self._select(net).items():
            rank = lowrank.choose_rank(layer, self.rank, self.energy)
            if lowrank.params_of(layer, rank) >= lowrank.params_of(layer):
                skipped.append(name)  # factorising would not save parameters
                continue
            lowrank.set_submodule(net, name, lowrank.decompose(layer, rank))
            ranks[name] = rank
        pl_module.replace_net(net, {"lr": self.lr} if self.lr is not None else None)
        self.report = {
            "compress/params_before": params_before,
            "compress/params_after": count_parameters(pl_module.net)[0],
            "compress/lowrank_layers": len(ranks),
            "compress/lowrank_skipped": len(skipped),
            "compress/lowrank_ranks": ranks,
        }
        if input_size:
            self.report["compress/flops_before"] = flops_before
            self.report["compress/flops_after"] = count_flops(pl_module.net, input_size)

    def on_fit_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        for key, value in self.report.items():
            pl_module.report_result(key, value)

    def state_dict(self) -> dict[str, Any]:
        return {"report": dict(self.report)}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.report = dict(state_dict.get("report", {}))

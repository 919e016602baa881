"""Magnitude pruning, unstructured or by whole filters, with one-shot / iterative / AGP schedules.

Unstructured: the smallest |w| (or w^2) weights (Han et al. 2015, "Learning both Weights and
Connections"); structured: the output filters of smallest L1/L2 norm (Li et al. 2017, "Pruning
Filters for Efficient ConvNets"), or any criterion of the ``compression.importance`` registry;
gradual: Zhu & Gupta 2017 ("To prune, or not to prune") cubic schedule. Masks come from
``compression.masks`` (identical to ``torch.nn.utils.prune``), the schedule from
``compression.pruning_schedules`` (a pure function of ``global_step``). N:M semi-structured (2:4
sparse tensor cores; Mishra et al. 2021) and block sparsity (Narang et al. 2017): ``compression.patterns``.

Hot path: after every optimizer step one fused ``_foreach_mul_`` multiplies the pruned weights
and their momentum / Adam buffers by pre-cast float masks kept on the device (no forward hooks,
no reparametrisation, no host sync). Masks live in this callback's ``state_dict`` (not as model
buffers), so the exported model.pt stays a plain timm state_dict and the masks travel with the
checkpoint; the schedule position is derived from ``global_step``.
"""
from __future__ import annotations

import math
from functools import partial
from typing import Any, Mapping, Sequence

import pytorch_lightning as pl
import torch
from torch import nn

from netcompress.compression.calibration import calibrated, train_batches
from netcompress.compression.importance import check_applies, check_importance, check_per_weight, get_criterion
from netcompress.compression.layer_selection import first_and_last, first_match, select_layers, unmatched_patterns
from netcompress.compression.masks import (ROUNDINGS, SCOPES, check_choice, check_round_to, check_sparsity, enforce_masks_,
                               expand_filter_mask, sparsity_of, structured_masks, unstructured_masks)
from netcompress.compression.checks import check_int
from netcompress.compression.patterns import (block_masks, check_block, check_block_layers, check_nm,
                                              check_nm_args, check_nm_layers, nm_masks)
from netcompress.compression.pruning_schedules import SCHEDULES, PruningSchedule
from netcompress.compression.sparse_storage import storage_bytes
from netcompress.lightning_modules.contract import require_contract

GRANULARITIES = ("unstructured", "structured", "nm", "block")
UNITS = ("epoch", "step")
KEY = "callbacks.magnitude_pruning"


class MagnitudePruning(pl.Callback):
    """Prune Conv/Linear weights by magnitude on a schedule and keep them pruned.

    Args:
        sparsity: final fraction of pruned weights (unstructured) or filters (structured), in [0, 1).
        granularity: ``unstructured`` (single weights), ``structured`` (whole output filters), ``nm``
            (keep ``n`` of every ``m`` consecutive input-channel weights; ``sparsity`` must be
            ``1 - n/m``; order in ``compression/patterns.py``) or ``block`` (whole ``block`` tiles of
            the ``[out, in*kh*kw]`` weight view).
        importance: a criterion of the ``compression.importance`` registry: ``l1`` (|w|, filter L1
            norm), ``l2`` (w^2, filter L2 norm), or any other registered for Conv2d/Linear weights;
            ``activation`` / ``apoz`` (per filter: structured only), ``taylor`` and ``random`` are scored
            from a calibration pass at each pruning event (``compression/calibration.py``).
        calibration_batches: training batches the data-driven criteria (activation, apoz, taylor) see
            at each pruning event (forward passes in eval mode, + backward for taylor; no step).
        seed: seed of importance=random (the same seed gives the same masks); other criteria ignore it.
        scope: ``global`` (one threshold over all selected layers) or ``layer`` (same fraction per layer).
        schedule: ``oneshot`` (at ``start``), ``iterative`` (``times`` prunings every ``every``, each
            removing the same fraction of what remains, reaching ``sparsity``) or ``agp`` (cubic from
            ``initial_sparsity`` at ``start`` to ``sparsity`` at ``end``, an update every ``every``).
        unit: ``epoch`` or ``step`` for ``start``/``end``/``every`` (an epoch-k event happens before
            the first step of epoch k; ``start = max_epochs`` prunes after the last step).
        include/exclude: module-name patterns (fnmatch) of the layers to prune.
        skip_first_last: leave the stem conv and the classifier dense (timm ``pretrained_cfg``).
        remove_filters: structured only: physically remove the pruned filters (and their BN and
            the next layers' input channels) when training ends, so the exported model is smaller.
        layer_sparsity: ``{pattern: sparsity}`` overrides for the layers whose names match (first
            matching pattern wins; others use ``sparsity``): per-stage ratios as in Li et al.
            Needs scope=layer and schedule=oneshot.
        n, m: granularity=nm: keep ``n`` of every ``m`` weights (2:4 for sparse tensor cores); gradual
            schedules prune ``round(s_t * m)`` per group at target ``s_t``, ending at ``m - n``.
        block: granularity=block: ``[rows, cols]`` of a pruned tile of the ``[out, in*kh*kw]`` view.
        rounding: structured, scope=layer: filters pruned per layer, ``nearest`` (round(ratio * n)) or
            ``keep_floor`` (keep int((1 - ratio) * n), the Li et al. / Rethinking authors' scripts).
        round_to: structured: round each layer's kept filter count down to a multiple of this (e.g. 8
            for hardware-friendly widths; at least one multiple); null = no rounding.
    """

    # rules: pipeline/combinations.py; remove_filters=true also makes the network thinner
    CAPABILITIES = frozenset({"single", "masks_weights", "edits_weights"})
    CAPABILITIES_IF = {"remove_filters": frozenset({"reshapes_net"})}

    def __init__(self, sparsity: float = 0.5, granularity: str = "unstructured", importance: str = "l1",
                 scope: str = "global", schedule: str = "oneshot", unit: str = "epoch", start: int = 0,
                 end: int | None = None, every: int = 1, times: int = 1, initial_sparsity: float = 0.0,
                 include: Sequence[str] = ("*",), exclude: Sequence[str] = (), skip_first_last: bool = True,
                 remove_filters: bool = False, layer_sparsity: Mapping[str, float] | None = None,
                 rounding: str = "nearest", round_to: int | None = None, n: int = 2, m: int = 4,
                 block: Sequence[int] = (1, 4), calibration_batches: int = 8, seed: int = 0) -> None:
        super().__init__()
        self.sparsity = check_sparsity(sparsity, f"`{KEY}.sparsity`")
        self.granularity = check_choice(granularity, GRANULARITIES, f"`{KEY}.granularity`")
        self.importance = check_importance(importance, f"`{KEY}.importance`")
        if granularity != "structured":  # activation / apoz rank whole filters only
            check_per_weight(self.importance, f"`{KEY}.importance`")
        self.calibration_batches = check_int(calibration_batches, f"{KEY}.calibration_batches", 1)
        self.seed = check_int(seed, f"{KEY}.seed", 0)
        self.scope = check_choice(scope, SCOPES, f"`{KEY}.scope`")
        self.schedule_kind = check_choice(schedule, SCHEDULES, f"`{KEY}.schedule`")
        self.unit = check_choice(unit, UNITS, f"`{KEY}.unit`")
        self.start = check_int(start, f"{KEY}.start", 0)
        self.every = check_int(every, f"{KEY}.every", 1)
        self.times = check_int(times, f"{KEY}.times", 1)
        self.initial_sparsity = check_sparsity(initial_sparsity, f"`{KEY}.initial_sparsity`")
        if schedule == "agp":
            if end is None:
                raise ValueError(f"`{KEY}.end` is required with schedule=agp (the {unit} where sparsity "
                                 f"reaches {self.sparsity}); got None")
            self.end = check_int(end, f"{KEY}.end", self.start + 1)
            if self.initial_sparsity > self.sparsity:
                raise ValueError(f"`{KEY}.initial_sparsity` must be <= sparsity ({self.sparsity}); "
                                 f"got {initial_sparsity}")
        else:
            self.end = end
        if isinstance(include, str) or isinstance(exclude, str):
            raise TypeError(f"`{KEY}.include`/`exclude` must be lists of patterns, e.g. ['layer3.*']; "
                            f"got {include!r} / {exclude!r}")
        self.include, self.exclude = list(include), list(exclude)
        if not isinstance(skip_first_last, bool):
            raise TypeError(f"`{KEY}.skip_first_last` must be true or false; got {skip_first_last!r}")
        self.skip_first_last = skip_first_last
        if remove_filters and granularity != "structured":
            raise ValueError(f"`{KEY}.remove_filters` needs granularity=structured (single zero weights "
                             f"cannot be removed physically); got granularity={granularity!r}")
        self.remove_filters = bool(remove_filters)
        self.layer_sparsity = {str(k): check_sparsity(v, f"`{KEY}.layer_sparsity.{k}`")
                               for k, v in dict(layer_sparsity or {}).items()}
        if self.layer_sparsity and (scope != "layer" or schedule != "oneshot"):
            raise ValueError(f"`{KEY}.layer_sparsity` needs scope=layer and schedule=oneshot; "
                             f"got scope={scope!r}, schedule={schedule!r}")
        self.rounding = check_choice(rounding, ROUNDINGS, f"`{KEY}.rounding`")
        self.round_to = check_round_to(round_to, f"`{KEY}.round_to`")
        if (self.rounding != "nearest" or self.round_to) and granularity != "structured":
            raise ValueError(f"`{KEY}.rounding`/`round_to` set filter counts, so they need granularity=structured; "
                             f"got granularity={granularity!r} (rounding={rounding!r}, round_to={round_to!r})")
        if self.rounding != "nearest" and scope != "layer":
            raise ValueError(f"`{KEY}.rounding`={rounding!r} sets each layer's filter count, so it needs "
                             f"scope=layer; got scope={scope!r}")
        self.n, self.m = check_nm_args(n, m, f"{KEY}.")
        self.block = check_block(block, f"{KEY}.block")
        if granularity == "nm":
            if not math.isclose(self.sparsity, 1.0 - self.n / self.m):
                raise ValueError(f"`{KEY}.sparsity` must be 1 - n/m = {1.0 - self.n / self.m} with granularity=nm "
                                 f"(n={self.n}, m={self.m}: the schedule ends at m - n pruned per group); "
                                 f"got {sparsity!r}")
            if self.layer_sparsity:
                raise ValueError(f"`{KEY}.layer_sparsity` does not apply to granularity=nm (every layer is "
                                 f"{self.n}:{self.m}); got {dict(self.layer_sparsity)}")
        self.masks: dict[str, torch.Tensor] = {}  # bool keep-masks: weight-shaped, or [out] if structured
        self._layers: dict[str, nn.Module] = {}
        self._norms: dict[str, str] = {}
        self._params: list[torch.Tensor] = []
        self._float_masks: list[torch.Tensor] = []
        self._schedule: PruningSchedule | None = None
        self._net: nn.Module | None = None

    # ----- checks and set-up ------------------------------------------------------------------
    @property
    def last_edit_epoch(self) -> int | None:
        """The epoch of the last pruning event (capability ``edits_weights``); None with unit=step."""
        if self.unit != "epoch":
            return None
        if self.schedule_kind == "agp":
            return self.end
        return self.start + self.every * ((self.times if self.schedule_kind == "iterative" else 1) - 1)

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        require_contract(pl_module, type(self).__name__, ('net', 'replace_net', 'report_result'))
        if stage != "fit":
            return
        net = pl_module.net
        self._net = net
        self._layers = select_layers(net, self.include, self.exclude, self.skip_first_last, key=KEY)
        check_applies(self.importance, self._layers, f"`{KEY}.importance`")
        if self.granularity == "nm":
            check_nm_layers(self._layers, self.m, KEY)
        elif self.granularity == "block":
            check_block_layers(self._layers, self.block, KEY)
        for pattern in unmatched_patterns(self.layer_sparsity, self._layers):
            raise ValueError(f"`{KEY}.layer_sparsity`: pattern '{pattern}' matches no selected layer; "
                             f"selected: {', '.join(list(self._layers)[:12])}")
        if self.granularity == "structured":
            _, classifier = first_and_last(net)
            if classifier in self._layers:
                raise ValueError(f"`{KEY}`: structured pruning would remove classes of the classifier "
                                 f"'{classifier}'; set skip_first_last=true or exclude it")
            from netcompress.compression.channel_removal import check_removable, example_input, following_norms

            example = example_input(net, getattr(trainer.datamodule, "input_size", None))
            if self.remove_filters:
                check_removable(net, list(self._layers), example, key=KEY, exact=True)
            self._norms = following_norms(net, [n for n, m in self._layers.items() if isinstance(m, nn.Conv2d)],
                                          example)

    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self.remove_filters and trainer.world_size > 1:
            raise ValueError(f"`{KEY}.remove_filters` replaces the network, which is not supported under "
                             "multi-process DDP; use trainer=cpu or trainer=gpu (one device)")
        if self.masks:  # resumed: masks restored from the checkpoint
            unknown = set(self.masks) - set(self._layers)
            if unknown:
                raise ValueError(f"`{KEY}`: the checkpoint has masks for layers {sorted(unknown)} that the "
                                 "current include/exclude does not select; resume with the same config")
            self._prepare_masks(pl_module)

    def _build_schedule(self, trainer: pl.Trainer) -> PruningSchedule:
        per_epoch = 1
        if self.unit == "epoch":  # optimizer steps per epoch
            per_epoch = max(1, math.ceil(trainer.num_training_batches / trainer.accumulate_grad_batches))
        start, every = self.start * per_epoch, self.every * per_epoch
        if self.schedule_kind == "oneshot":
            schedule = PruningSchedule("oneshot", final=self.sparsity, start=start)
        elif self.schedule_kind == "iterative":
            rate = 1.0 - (1.0 - self.sparsity) ** (1.0 / self.times)
            schedule = PruningSchedule("iterative", final=self.sparsity, start=start, every=every,
                                       times=self.times, rate=rate)
        else:
            schedule = PruningSchedule("agp", final=self.sparsity, initial=self.initial_sparsity, start=start,
                                       end=self.end * per_epoch, every=every)
        total = int(trainer.estimated_stepping_batches)
        if schedule.last_step > total and not trainer.fast_dev_run:
            raise ValueError(f"`{KEY}`: the last pruning event is at {self.unit} "
                             f"{schedule.last_step // per_epoch} but training has {trainer.max_epochs} epochs "
                             f"({total} steps); lower start/every/times/end or raise trainer.max_epochs")
        return schedule

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._schedule = self._build_schedule(trainer)

    # ----- the schedule --------------------------------------------------------------------------
    def _prune(self, trainer: pl.Trainer, pl_module: pl.LightningModule, target: float, log: bool = True) -> None:
        make = unstructured_masks if self.granularity == "unstructured" else \
            partial(structured_masks, rounding=self.rounding, round_to=self.round_to)
        if self.granularity == "nm":  # compression/patterns.py
            make = partial(nm_masks, n=self.n, m=self.m)
        elif self.granularity == "block":
            make = partial(block_masks, block=self.block)
        groups: dict[float, dict[str, nn.Module]] = {}  # layers sharing one target sparsity
        for name, layer in self._layers.items():
            groups.setdefault(first_match(name, self.layer_sparsity, target), {})[name] = layer
        masks = {}
        loader = train_batches(trainer) if get_criterion(self.importance).needs_data else None
        with calibrated(pl_module.net, self._layers, self.importance, loader, self.calibration_batches, self.seed,
                        key=f"{KEY}.calibration_batches", seed_key=f"{KEY}.seed"):
            for value, layers in groups.items():
                masks.update(make(layers, value, scope=self.scope, importance=self.importance,
                                  previous={n: self.masks[n] for n in layers if n in self.masks} or None))
        self.masks = {name: masks[name] for name in self._layers}
        self._prepare_masks(pl_module)
        enforce_masks_(self._params, self._float_masks, trainer.optimizers[0] if trainer.optimizers else None)
        if log:
            self._log_sparsity(pl_module)

    def _prepare_masks(self, pl_module: pl.LightningModule) -> None:
        """Float masks on the parameters' device, in one list for the fused in-place multiply."""
        modules = dict(pl_module.net.named_modules())
        params, masks = [], []
        for name, keep in self.masks.items():
            weight = modules[name].weight
            keep = keep.to(weight.device)
            if self.granularity == "structured":
                params.append(weight)
                # empty_like keeps the weight's memory format (channels_last), so the multiply is dense
                masks.append(torch.empty_like(weight).copy_(expand_filter_mask(keep, weight)))
                extra = [modules[name].bias] if getattr(modules[name], "bias", None) is not None else []
                if name in self._norms:
                    norm = modules[self._norms[name]]
                    extra += [p for p in (norm.weight, norm.bias) if p is not None]
                for p in extra:
                    params.append(p)
                    masks.append(keep.to(p.dtype))
            else:
                params.append(weight)
                masks.append(torch.empty_like(weight).copy_(keep))
        self._params, self._float_masks = params, masks

    def on_train_batch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any,
                             batch_idx: int) -> None:
        step = trainer.global_step
        if self._schedule is not None and self._schedule.is_event(step):
            self._prune(trainer, pl_module, self._schedule.target(step))

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        if self._float_masks:
            enforce_masks_(self._params, self._float_masks, trainer.optimizers[0] if trainer.optimizers else None)

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self.masks:
            self._log_sparsity(pl_module)

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        step = trainer.global_step
        if self._schedule is not None and step > 0 and self._schedule.is_event(step):
            self._prune(trainer, pl_module, self._schedule.target(step), log=False)  # an event at the very end
        if not self.masks:
            return
        self._report(pl_module)
        self._report_pattern(pl_module)
        if self.remove_filters:
            from netcompress.compression.channel_removal import example_input, remove_channels

            keep = {name: mask.cpu() for name, mask in self.masks.items() if isinstance(self._layers[name], nn.Conv2d)}
            example = example_input(pl_module.net, getattr(trainer.datamodule, "input_size", None)).cpu()
            thin = remove_channels(pl_module.net, keep, example)
            pl_module.replace_net(thin)
            self._params, self._float_masks = [], []  # the thin net has no pruned filters left
            total = sum(p.numel() for p in thin.parameters())
            pl_module.report_result("compress/params_after_removal", total)

    # ----- reporting -----------------------------------------------------------------------------
    def sparsity_per_layer(self) -> dict[str, float]:
        return {name: 1.0 - float(mask.float().mean()) for name, mask in self.masks.items()}

    def _log_sparsity(self, pl_module: pl.LightningModule) -> None:
        figures = {f"compress/sparsity/{name}": value for name, value in self.sparsity_per_layer().items()}
        figures["compress/sparsity"] = self.global_sparsity()
        pl_module.log_dict(figures, on_step=False, on_epoch=True)

    def global_sparsity(self) -> float:
        """Pruned fraction of the selected weights (structured: filters weighted by their size)."""
        if self.granularity != "structured":  # weight-shaped masks
            return sparsity_of(self.masks)
        modules = {n: m for n, m in self._layers.items()}
        total = sum(modules[n].weight.numel() for n in self.masks)
        pruned = sum(int((~m).sum()) * modules[n].weight[0].numel() for n, m in self.masks.items())
        return pruned / total if total else 0.0

    def _report(self, pl_module: pl.LightningModule) -> None:
        state = pl_module.net.state_dict()
        pl_module.report_result("compress/sparsity", self.global_sparsity())
        pl_module.report_result("compress/sparsity_layers", self.sparsity_per_layer())
        pl_module.report_result("compress/size_dense_bytes", storage_bytes(state, "dense"))
        pl_module.report_result("compress/size_bitmask_bytes", storage_bytes(state, "bitmask"))
        pl_module.report_result("compress/size_csr_bytes", storage_bytes(state, "csr"))

    def _report_pattern(self, pl_module: pl.LightningModule) -> None:
        """The sparsity pattern in results.json; with nm, the exported weights checked against it."""
        pl_module.report_result("compress/granularity", self.granularity)
        if self.granularity == "block":
            pl_module.report_result("compress/block", list(self.block))
        if self.granularity != "nm":
            return
        modules = dict(pl_module.net.named_modules())
        broken = [name for name in self.masks if not check_nm(modules[name].weight, self.n, self.m)]
        if broken:
            raise RuntimeError(f"`{KEY}`: layers {broken} break the {self.n}:{self.m} pattern after training "
                               "(more than n non-zeros in a group); the masks were not enforced")
        pl_module.report_result("compress/nm", f"{self.n}:{self.m}")
        pl_module.report_result("compress/nm_pattern_ok", True)

    # ----- checkpoint ----------------------------------------------------------------------------
    @property
    def state_key(self) -> str:
        return self._generate_state_key(granularity=self.granularity, schedule=self.schedule_kind)

    def state_dict(self) -> dict[str, Any]:
        return {"masks": {name: mask.detach().cpu().clone() for name, mask in self.masks.items()}}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.masks = {name: mask.bool() for name, mask in state_dict.get("masks", {}).items()}

"""How a job gets its network from the pruned stages: a registry of retraining methods (``protocol.method``).

Papers: Frankle & Carbin 2019 (rewind to the init: the winning ticket); Frankle et al. 2020
(rewind to step k); Liu et al. 2019, "Rethinking the Value of Network Pruning" (fine-tune vs
Scratch-E / Scratch-B); Blalock et al. 2020 (random pruning, ShrinkBench's baseline).

Each method is a small class registered by name, in the shape of open_lth's ``lottery/branch/*``:
it owns its start network, its training budget (config overrides) and its report label. A new
method is one class with ``@register_retraining("name")``; ``protocol.method=name`` then selects it:

    @register_retraining("rewind_to_best")
    class RewindToBest(Retraining):
        def unpruned_start(self, base, dense_dir, round_):
            ...
"""
from __future__ import annotations

import copy
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, ClassVar, Mapping

import torch
from omegaconf import DictConfig, OmegaConf, open_dict

from netcompress.pipeline.build import instantiate
from netcompress.pipeline.fit import fit_and_test
from netcompress.protocols import stage_store as store_files
from netcompress.protocols.fixed_mask import FixedMask
from netcompress.protocols.retrain_init import effective_flops, random_masks_like, scratch_b_budget
from netcompress.protocols.stages import input_size, load_stage_net, read_json

if TYPE_CHECKING:
    from netcompress.protocols.lottery import LotteryProtocol

RETRAINING: dict[str, type["Retraining"]] = {}


def register_retraining(name: str) -> Callable[[type["Retraining"]], type["Retraining"]]:
    """Class decorator: make ``cls`` selectable as ``protocol.method=<name>``."""
    def register(cls: type[Retraining]) -> type[Retraining]:
        if name in RETRAINING:
            raise ValueError(f"retraining method {name!r} is already registered ({RETRAINING[name].__qualname__}); "
                             "pick another name")
        cls.name = name
        RETRAINING[name] = cls
        return cls
    return register


@dataclass
class Job:
    """What a retraining sees of one job: its config and the stages already ensured for it."""
    cfg: DictConfig          # the job's config (without the dense-only callbacks)
    base: dict               # resolved, without the protocol: what stages are built from
    dense_dir: Path          # the dense stage's folder
    dense_metrics: dict      # its metrics.json (flops, global_step, test/acc1, ...)
    round: int               # protocol.prune.round
    masks: dict | None       # the round's IMP masks (None when the method does not prune)
    extra: dict = field(default_factory=dict)  # the lottery/* results being collected

    @property
    def epochs(self) -> int:
        return int(self.base["trainer"]["max_epochs"])


class Retraining:
    """One way to retrain (or only test) the pruned network; built with the protocol it serves."""

    name: ClassVar[str] = ""                 # set by @register_retraining
    reported_as: ClassVar[str | None] = None  # ``lottery/method`` when not ``name`` (aliases)
    prunes: ClassVar[bool] = True            # False: the job needs no mask (the dense baseline)

    def __init__(self, protocol: LotteryProtocol) -> None:
        self.protocol = protocol

    @property
    def method(self) -> str:
        """``lottery/method`` in results.json."""
        return self.reported_as or self.name

    @property
    def label(self) -> str:
        """The line a job belongs to in the report."""
        return self.method

    # ----- the start network ------------------------------------------------------------------
    def unpruned_start(self, base: dict, dense_dir: Path, round_: int) -> torch.nn.Module:
        """The full-size network retraining starts from, before the mask is applied."""
        raise NotImplementedError(f"{type(self).__name__} must define unpruned_start or run")

    def start_network(self, base: dict, dense_dir: Path, masks: Mapping, round_: int = 1) -> torch.nn.Module:
        """The network retraining starts from, already masked / thinned."""
        net = self.unpruned_start(base, dense_dir, round_)
        return self.protocol.rounds.apply(net, masks, input_size(base))

    def retrain_masks(self, job: Job) -> dict:
        """The masks retraining uses (the round's IMP masks unless the method draws its own)."""
        return job.masks

    def budget(self, job: Job, start: torch.nn.Module) -> tuple[dict[str, Any], float]:
        """Config overrides of the retraining (``{"trainer.max_epochs": 3}``) and the epochs it trains."""
        return {}, job.epochs

    # ----- the job ----------------------------------------------------------------------------
    def run(self, job: Job) -> tuple[dict, dict]:
        """Retrain from ``start_network`` with the job's own callbacks and loggers (plus FixedMask)."""
        masks = self.retrain_masks(job)
        start = self.start_network(job.base, job.dense_dir, masks, job.round)
        overrides, epochs = self.budget(job, start)
        job.extra.setdefault("lottery/epochs_trained", epochs)
        return fit_job(job.cfg, start, self.protocol.rounds.enforced(masks), overrides,
                       parent=load_stage_net(job.dense_dir))


@register_retraining("dense")
class Dense(Retraining):
    """No pruning: the dense stage's network, tested (the unpruned baseline)."""

    prunes = False

    def unpruned_start(self, base: dict, dense_dir: Path, round_: int) -> torch.nn.Module:
        return load_stage_net(dense_dir)

    def run(self, job: Job) -> tuple[dict, dict]:
        return evaluate(job.cfg, load_stage_net(job.dense_dir), job.dense_metrics)


@register_retraining("dense_reinit_seed")
class DenseReinitSeed(Retraining):
    """Control: the dense architecture trained from the reinit init seed (seed + ``reinit.seed_offset``),
    so ticket - reinit can be read against what the init seed alone moves dense accuracy."""

    prunes = False

    @property
    def label(self) -> str:
        return "dense (reinit seed)"

    def run(self, job: Job) -> tuple[dict, dict]:
        base = dict(job.base, seed=job.base["seed"] + self.protocol.reinit["seed_offset"])
        dense_dir = self.protocol.stages.dense(base)
        job.extra["lottery/init_seed"] = base["seed"]
        return evaluate(job.cfg, load_stage_net(dense_dir), read_json(dense_dir / store_files.METRICS))


@register_retraining("dense_compute_matched")
class DenseComputeMatched(Retraining):
    """Control: the dense network trained from scratch for as many optimizer steps as the round-r
    rewound ticket used in all (dense run + r IMP trainings: its mask inherits them)."""

    prunes = False

    @property
    def label(self) -> str:
        return "dense (compute-matched)"

    def run(self, job: Job) -> tuple[dict, dict]:
        stages, base = self.protocol.stages, job.base
        steps = int(job.dense_metrics["global_step"]) + sum(
            int(read_json(stages.train(base, r) / store_files.METRICS)["global_step"]) for r in range(1, job.round + 1))
        per_epoch = job.dense_metrics["global_step"] / max(int(job.dense_metrics["epochs"]), 1)
        classes = int(load_stage_net(job.dense_dir).get_classifier().out_features)
        job.extra["lottery/epochs_trained"] = round(steps / per_epoch, 3)
        return fit_job(job.cfg, fresh_network(base, base["seed"], classes), None,
                       {"trainer.max_steps": steps, "trainer.max_epochs": math.ceil(steps / per_epoch)},
                       parent=load_stage_net(job.dense_dir))


@register_retraining("finetune")
class Finetune(Retraining):
    """The trained weights of the round before, masked, fine-tuned at ``finetune.lr`` (Liu et al. 2019)."""

    def unpruned_start(self, base: dict, dense_dir: Path, round_: int) -> torch.nn.Module:
        return load_stage_net(self.protocol.stages.train(base, round_ - 1) if round_ > 1 else dense_dir)

    def budget(self, job: Job, start: torch.nn.Module) -> tuple[dict[str, Any], float]:
        epochs = self.protocol.finetune["epochs"] or job.epochs
        return {"optimizer.lr": self.protocol.finetune["lr"], "trainer.max_epochs": epochs}, epochs


@register_retraining("rewind")
class Rewind(Retraining):
    """Survivors reset to step ``rewind_step`` and retrained: the IMP stage itself (k=0: the winning ticket)."""

    @property
    def label(self) -> str:
        return f"rewind k={self.protocol.rewind_step}"

    def unpruned_start(self, base: dict, dense_dir: Path, round_: int) -> torch.nn.Module:
        return self.protocol.stages.rewound(dense_dir)

    def run(self, job: Job) -> tuple[dict, dict]:
        train_dir = self.protocol.stages.train(job.base, job.round)
        results = evaluate(job.cfg, load_stage_net(train_dir), read_json(train_dir / store_files.METRICS),
                           parent=load_stage_net(job.dense_dir))
        job.extra["lottery/train_key"] = train_dir.name
        return results


@register_retraining("reinit")
class Reinit(Retraining):
    """A fresh init (seed + ``reinit.seed_offset``) of the same mask / thin net, trained for the
    same epochs (Scratch-E) or the same compute (Scratch-B, ``reinit.budget=flops``)."""

    fixed_budget: ClassVar[str | None] = None  # set by the scratch_e / scratch_b aliases

    @property
    def budget_kind(self) -> str:
        return self.fixed_budget or self.protocol.reinit["budget"]

    @property
    def label(self) -> str:
        return "reinit (Scratch-B)" if self.budget_kind == "flops" else "reinit (Scratch-E)"

    def init_seed(self, base: dict) -> int:
        return base["seed"] + self.protocol.reinit["seed_offset"]

    def unpruned_start(self, base: dict, dense_dir: Path, round_: int) -> torch.nn.Module:
        classes = int(load_stage_net(dense_dir).get_classifier().out_features)
        return fresh_network(base, self.init_seed(base), classes)

    def start_network(self, base: dict, dense_dir: Path, masks: Mapping, round_: int = 1) -> torch.nn.Module:
        net = super().start_network(base, dense_dir, masks, round_)
        if self.protocol.rounds.structured and hasattr(net, "_init_weights"):
            with torch.random.fork_rng():
                torch.manual_seed(self.init_seed(base))
                net._init_weights()  # the model's own init, with the thin layers' fan-in/out
        return net

    def budget(self, job: Job, start: torch.nn.Module) -> tuple[dict[str, Any], float]:
        if self.budget_kind != "flops":
            return {}, job.epochs
        # Scratch-B: the dense run's steps x dense/pruned FLOPs
        dense = job.dense_metrics
        pruned = effective_flops(start, self.protocol.rounds.enforced(job.masks), input_size(job.base))
        steps = scratch_b_budget(int(dense["global_step"]), dense["flops"], pruned, self.protocol.reinit["max_factor"])
        per_epoch = dense["global_step"] / max(int(dense["epochs"]), 1)
        return ({"trainer.max_steps": steps, "trainer.max_epochs": math.ceil(steps / per_epoch)},
                round(steps / per_epoch, 3))


@register_retraining("random_prune")
class RandomPrune(Retraining):
    """A random mask with each layer's count unchanged, weights from step ``rewind_step`` (Blalock et al. 2020)."""

    @property
    def label(self) -> str:
        return f"random_prune k={self.protocol.rewind_step}"

    def unpruned_start(self, base: dict, dense_dir: Path, round_: int) -> torch.nn.Module:
        return self.protocol.stages.rewound(dense_dir)

    def retrain_masks(self, job: Job) -> dict:
        return random_masks_like(job.masks, job.base["seed"] + self.protocol.reinit["seed_offset"])

    def budget(self, job: Job, start: torch.nn.Module) -> tuple[dict[str, Any], float]:
        """Weights from step k: the remaining T - k steps of the dense schedule (``protocol.rewind_schedule``)."""
        overrides = self.protocol.stages.rewound_budget(job.dense_dir)
        if not overrides:
            return {}, job.epochs
        steps = overrides["trainer.max_steps"]
        return overrides, job.epochs * steps / (steps + self.protocol.rewind_step)


@register_retraining("scratch_e")
class ScratchE(Reinit):
    """Sweep-friendly name for ``reinit`` with ``reinit.budget=epochs`` (reported as reinit)."""

    reported_as = "reinit"
    fixed_budget = "epochs"


@register_retraining("scratch_b")
class ScratchB(Reinit):
    """Sweep-friendly name for ``reinit`` with ``reinit.budget=flops`` (reported as reinit)."""

    reported_as = "reinit"
    fixed_budget = "flops"


# ----- the job's own fit / test -----------------------------------------------------------------

def fresh_network(base: dict, seed: int, num_classes: int) -> torch.nn.Module:
    """A newly initialised network of the job's model, drawn with ``seed`` (global RNG untouched)."""
    with torch.random.fork_rng():
        torch.manual_seed(int(seed))
        return instantiate(OmegaConf.create(base["model"]), num_classes=num_classes)


def _job_config(cfg: DictConfig, overrides: Mapping[str, Any]) -> DictConfig:
    job = copy.deepcopy(cfg)
    with open_dict(job):
        job.init_from = None
        for key, value in overrides.items():
            OmegaConf.update(job, key, value, merge=False)
    return job


def fit_job(cfg: DictConfig, start: torch.nn.Module, masks: Mapping | None, overrides: Mapping[str, Any],
            parent: torch.nn.Module | None = None) -> tuple[dict, dict]:
    """The job's own retraining: its callbacks and loggers, plus FixedMask; ``parent``: the dense net."""
    extra = [FixedMask(masks=masks, key="protocol.mask")] if masks else []
    return fit_and_test(_job_config(cfg, overrides), start=start, callbacks=extra, parent=parent)


def evaluate(cfg: DictConfig, net: torch.nn.Module, stage_metrics: Mapping,
             parent: torch.nn.Module | None = None) -> tuple[dict, dict]:
    """Test a stage's network as this job's result (its training is the stage's); ``parent``: the dense net."""
    results, objects = fit_and_test(_job_config(cfg, {}), start=net, fit=False, parent=parent)
    reused = {k: stage_metrics[k] for k in ("val/acc1", "val/acc5", "val/loss", "train_time_s", "epochs",
                                            "global_step") if k in stage_metrics}
    return {**reused, **results, "lottery/reused_stage": True}, objects

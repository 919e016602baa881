"""Lottery Ticket vs Rethinking: train dense -> prune -> retrain from a chosen start, in one config.

Papers: Frankle & Carbin 2019, "The Lottery Ticket Hypothesis" (iterative magnitude pruning,
IMP, rewinding to the init); Frankle et al. 2020, "Linear Mode Connectivity and the LTH"
(rewinding to an early step k); Liu et al. 2019, "Rethinking the Value of Network Pruning"
(fine-tune vs Scratch-E / Scratch-B); Blalock et al. 2020, "What is the State of Neural
Network Pruning?" (ShrinkBench: the random-pruning baseline).

One job = one (method, sparsity, seed). The stages it depends on (dense run, IMP masks and
retrainings) are fits of the same machinery cached in a content-addressed store, so a sweep
``protocol.method=... protocol.prune.round=... seed=...`` trains each dense net once. This module
checks the settings and runs a job; the parts live beside it:

    stages.py          the dense / mask / train stages and their store keys (``Stages``)
    pruning_rounds.py  the masks of each round, structured thinning (``PruningRounds``)
    retraining.py      the retraining methods, a registry (``protocol.method``: ``RETRAINING``)
    stage_store.py     the content-addressed store; retrain_init.py: masking, random masks,
                       Scratch-B budget; fixed_mask.py / rewind_snapshot.py: the stage callbacks
"""
from __future__ import annotations

import copy
from typing import Mapping, Sequence

from omegaconf import DictConfig, OmegaConf, open_dict

from netcompress.compression.checks import check_int, plain
from netcompress.compression.importance import check_importance
from netcompress.compression.masks import ROUNDINGS, check_choice, check_round_to, check_sparsity, sparsity_of
from netcompress.protocols import stage_store as store_files
from netcompress.protocols.pruning_rounds import PruningRounds
from netcompress.protocols.retrain_init import effective_flops
from netcompress.protocols.retraining import RETRAINING, Job, Retraining, register_retraining  # noqa: F401
from netcompress.protocols.rewind_snapshot import check_steps
from netcompress.protocols.stage_store import StageStore
from netcompress.protocols.stages import STAGE_VERSION, Stages, input_size, load_masks, read_json  # noqa: F401

SCHEDULES = ("imp", "oneshot")
KINDS = ("unstructured", "structured")
CRITERIA = ("magnitude", "l1_filter", "bn_scale")
BUDGETS = ("epochs", "flops")
REWIND_SCHEDULES = ("resume", "restart")


def _check_patterns(value: object, key: str) -> list[str]:
    if isinstance(value, str) or not isinstance(value, Sequence) or not all(isinstance(p, str) for p in value):
        raise ValueError(f"`{key}` must be a list of module-name patterns (e.g. ['layer*']); got {value!r}")
    return list(value)


class LotteryProtocol:
    """Train dense, prune (one-shot or IMP), retrain from the chosen start; one object per job.

    Args:
        method: how the pruned network is retrained, a name of ``retraining.RETRAINING``:
            ``dense`` (no pruning: the unpruned baseline), ``finetune`` (trained weights,
            ``finetune.lr``), ``rewind`` (surviving weights reset to step ``rewind_step``; 0 =
            winning ticket), ``reinit`` (fresh init, same mask/thin net; Scratch-E or Scratch-B by
            ``reinit.budget``; ``scratch_e`` / ``scratch_b`` name the two), ``random_prune``
            (random mask with each layer's count unchanged, weights from step ``rewind_step``).
        rewind_step: optimizer step of the dense run that ``rewind``/``random_prune`` (and the IMP
            rounds) restart from; must be one of ``snapshot_steps``.
        snapshot_steps: steps of the dense run whose weights are saved (part of its key, so keep
            it the same across a sweep).
        store_dir: the shared stage store (``${paths.store_dir}``).
        prune: ``kind`` (unstructured | structured), ``criterion`` (magnitude for unstructured;
            l1_filter | bn_scale for structured), ``schedule`` (imp | oneshot), ``rate`` (IMP:
            fraction of the remaining weights pruned per round), ``round`` (IMP: this job's round,
            sparsity 1 - (1-rate)^round), ``sparsity`` (oneshot), ``scope`` (global | layer),
            ``include``/``exclude``/``skip_first_last`` (layer selection).
        finetune: ``lr`` and ``epochs`` (null = trainer.max_epochs) of fine-tuning.
        reinit: ``budget`` (epochs = Scratch-E, flops = Scratch-B), ``max_factor`` (Scratch-B cap on
            the epoch multiplier; null = none) and ``seed_offset`` (the fresh init uses seed +
            offset, also for the random mask).
        rewind_schedule: with ``rewind_step`` k > 0, how rewound networks (IMP rounds, ``rewind``,
            ``random_prune``) retrain: ``resume`` (default) trains the remaining T - k steps of the
            dense schedule, its lr resumed at step k (Frankle et al. 2020, Renda et al. 2020,
            open_lth); ``restart`` trains all T steps with a fresh schedule (T + k in all).
        dense_callbacks: names of ``callbacks`` entries (e.g. a compression config's key such as
            ``bn_sparsity``) used only while training the dense net (slimming's L1 penalty on BN
            scales); they are part of the dense key and left out of every retraining.
    """

    def __init__(self, method: str = "rewind", rewind_step: int = 0, snapshot_steps: Sequence[int] = (0,),
                 store_dir: str | None = None, prune: Mapping | None = None, finetune: Mapping | None = None,
                 reinit: Mapping | None = None, dense_callbacks: Sequence[str] = (),
                 rewind_schedule: str = "resume") -> None:
        retraining = RETRAINING[check_choice(method, tuple(RETRAINING), "protocol.method")]
        self.rewind_step = check_int(rewind_step, "protocol.rewind_step", 0)
        self.snapshot_steps = list(check_steps(plain(snapshot_steps), "protocol.snapshot_steps"))
        if self.rewind_step not in self.snapshot_steps:
            raise ValueError(f"`protocol.rewind_step`={rewind_step} must be one of protocol.snapshot_steps="
                             f"{self.snapshot_steps} (the dense run saves only those steps)")
        self.rewind_schedule = check_choice(rewind_schedule, REWIND_SCHEDULES, "protocol.rewind_schedule")
        self.store = StageStore(store_dir)
        self.dense_callbacks = _check_patterns(plain(dense_callbacks) or [], "protocol.dense_callbacks")
        self.prune = self._check_prune(dict(plain(prune) or {}))
        self.finetune = self._check_finetune(dict(plain(finetune) or {}))
        self.reinit = self._check_reinit(dict(plain(reinit) or {}))
        self.rounds = PruningRounds(self.prune)
        self.stages = Stages(self.store, self.rounds, self.snapshot_steps, self.rewind_step, self.dense_callbacks,
                             self.rewind_schedule)
        self.retraining: Retraining = retraining(self)

    @property
    def method(self) -> str:
        """``lottery/method``: the retraining's name (``reinit`` for scratch_e / scratch_b)."""
        return self.retraining.method

    @property
    def label(self) -> str:
        """The line a job belongs to in the report."""
        return self.retraining.label

    # ----- argument checks -------------------------------------------------------------------
    @staticmethod
    def _check_prune(p: dict) -> dict:
        out = {"kind": "unstructured", "criterion": "magnitude", "schedule": "imp", "rate": 0.2, "round": 1,
               "sparsity": None, "scope": "global", "importance": "l1", "include": ["*"], "exclude": [],
               "skip_first_last": True, "layer_sparsity": {}, "layer_rate": {}, "rounding": "nearest",
               "round_to": None}
        unknown = set(p) - set(out)
        if unknown:
            raise ValueError(f"protocol.prune has unknown keys {sorted(unknown)}; valid keys: {', '.join(out)}")
        out.update(p)
        check_choice(out["kind"], KINDS, "protocol.prune.kind")
        check_choice(out["criterion"], CRITERIA, "protocol.prune.criterion")
        valid = ("magnitude",) if out["kind"] == "unstructured" else ("l1_filter", "bn_scale")
        if out["criterion"] not in valid:
            raise ValueError(f"`protocol.prune.criterion` must be one of {', '.join(valid)} for "
                             f"prune.kind={out['kind']}; got {out['criterion']!r}")
        check_choice(out["schedule"], SCHEDULES, "protocol.prune.schedule")
        if out["kind"] == "structured" and out["schedule"] != "oneshot":
            raise ValueError("`protocol.prune.schedule` must be oneshot with prune.kind=structured (iterative "
                             f"thinning is not implemented); got {out['schedule']!r}")
        check_choice(out["scope"], ("global", "layer"), "protocol.prune.scope")
        check_importance(out["importance"], "protocol.prune.importance")
        _check_patterns(out["include"], "protocol.prune.include")
        _check_patterns(out["exclude"], "protocol.prune.exclude")
        if not isinstance(out["skip_first_last"], bool):
            raise ValueError(f"`protocol.prune.skip_first_last` must be true or false; got {out['skip_first_last']!r}")
        layer_sparsity = out["layer_sparsity"] or {}
        if not isinstance(layer_sparsity, Mapping):
            raise ValueError("`protocol.prune.layer_sparsity` must map module-name patterns to fractions "
                             f"(e.g. {{'layer1.*': 0.6}}); got {layer_sparsity!r}")
        for pattern, value in layer_sparsity.items():
            check_sparsity(value, f"`protocol.prune.layer_sparsity.{pattern}`")
        if layer_sparsity and (out["schedule"] != "oneshot" or out["scope"] != "layer"):
            raise ValueError("`protocol.prune.layer_sparsity` needs prune.schedule=oneshot and prune.scope=layer "
                             "(a fraction per layer, as Li et al. 2017 prune ResNet-56-B)")
        out["layer_sparsity"] = dict(layer_sparsity)
        layer_rate = out["layer_rate"] or {}
        if not isinstance(layer_rate, Mapping):
            raise ValueError("`protocol.prune.layer_rate` must map module-name patterns to per-round rates "
                             f"(e.g. {{'fc*': 0.2, 'conv*': 0.15}}); got {layer_rate!r}")
        for pattern, value in layer_rate.items():
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0.0 <= value < 1.0:
                raise ValueError(f"`protocol.prune.layer_rate.{pattern}` must be in [0, 1) (the fraction of what "
                                 f"remains pruned each round; 0 = never pruned); got {value!r}")
        if layer_rate and (out["schedule"] != "imp" or out["kind"] != "unstructured"):
            raise ValueError("`protocol.prune.layer_rate` (a per-round rate per layer type, Frankle & Carbin 2019) "
                             f"needs prune.schedule=imp and prune.kind=unstructured; got schedule={out['schedule']!r}, "
                             f"kind={out['kind']!r}")
        out["layer_rate"] = {str(k): float(v) for k, v in layer_rate.items()}
        check_choice(out["rounding"], ROUNDINGS, "protocol.prune.rounding")
        check_round_to(out["round_to"], "`protocol.prune.round_to`")
        if (out["rounding"] != "nearest" or out["round_to"]) and out["kind"] != "structured":
            raise ValueError("`protocol.prune.rounding`/`round_to` set filter counts: they need prune.kind=structured")
        if out["rounding"] != "nearest" and out["scope"] != "layer":
            raise ValueError(f"`protocol.prune.rounding`={out['rounding']!r} sets each layer's filter count: it needs "
                             f"prune.scope=layer; got {out['scope']!r}")
        if out["schedule"] == "imp":
            rate = out["rate"]
            if isinstance(rate, bool) or not isinstance(rate, (int, float)) or not 0.0 < rate < 1.0:
                raise ValueError(f"`protocol.prune.rate` must be in (0, 1) (0.2 prunes 20% of what remains "
                                 f"each round); got {rate!r}")
            check_int(out["round"], "protocol.prune.round", 1)
        else:
            if out["sparsity"] is None:
                raise ValueError("`protocol.prune.sparsity` is required with prune.schedule=oneshot (e.g. 0.7)")
            check_sparsity(out["sparsity"], "`protocol.prune.sparsity`")
            if out["round"] != 1:
                raise ValueError(f"`protocol.prune.round` must be 1 with prune.schedule=oneshot; got {out['round']!r}")
        return out

    @staticmethod
    def _check_finetune(f: dict) -> dict:
        out = {"lr": 0.001, "epochs": None}
        unknown = set(f) - set(out)
        if unknown:
            raise ValueError(f"protocol.finetune has unknown keys {sorted(unknown)}; valid keys: lr, epochs")
        out.update(f)
        lr = out["lr"]
        if isinstance(lr, bool) or not isinstance(lr, (int, float)) or not lr > 0:
            raise ValueError(f"`protocol.finetune.lr` must be a positive number; got {lr!r}")
        if out["epochs"] is not None:
            check_int(out["epochs"], "protocol.finetune.epochs", 1)
        return out

    @staticmethod
    def _check_reinit(r: dict) -> dict:
        out = {"budget": "epochs", "max_factor": None, "seed_offset": 1000}
        unknown = set(r) - set(out)
        if unknown:
            raise ValueError(f"protocol.reinit has unknown keys {sorted(unknown)}; valid keys: {', '.join(out)}")
        out.update(r)
        check_choice(out["budget"], BUDGETS, "protocol.reinit.budget")
        mf = out["max_factor"]
        if mf is not None and (isinstance(mf, bool) or not isinstance(mf, (int, float)) or mf < 1):
            raise ValueError(f"`protocol.reinit.max_factor` must be null or a number >= 1 (the paper caps "
                             f"ImageNet Scratch-B at 2); got {mf!r}")
        check_int(out["seed_offset"], "protocol.reinit.seed_offset", 1)
        return out

    # ----- the job ----------------------------------------------------------------------------
    def run(self, cfg: DictConfig) -> tuple[dict, dict]:
        """One job: ensure the stages it needs, retrain (or test) its network; run.train's return shape."""
        base = job_base(cfg)
        missing = [n for n in self.dense_callbacks if n not in (base.get("callbacks") or {})]
        if missing:
            raise ValueError(f"protocol.dense_callbacks names {missing} but callbacks has only "
                             f"{sorted(base.get('callbacks') or {})}; add the compression config (compression=[...])")
        cfg = _without_callbacks(cfg, self.dense_callbacks)  # retrainings never use the dense-only callbacks
        dense_dir = self.stages.dense(base)
        dense_metrics = read_json(dense_dir / store_files.METRICS)
        round_ = self.prune["round"]
        extra = {"lottery/method": self.method, "lottery/label": self.label, "lottery/round": 0,
                 "lottery/sparsity": 0.0, "lottery/remaining": 1.0, "lottery/dense_key": dense_dir.name,
                 "lottery/rewind_step": self.rewind_step, "lottery/prune_kind": self.prune["kind"],
                 "lottery/dense_test_acc1": dense_metrics.get("test/acc1"),
                 "lottery/dense_params": dense_metrics.get("params_nonzero")}
        masks = None
        if self.retraining.prunes:
            mask_dir = self.stages.mask(base, round_)
            masks = load_masks(mask_dir)
            extra.update({"lottery/round": round_, "lottery/sparsity": sparsity_of(masks),
                          "lottery/remaining": 1.0 - sparsity_of(masks), "lottery/mask_key": mask_dir.name})
        job = Job(cfg=cfg, base=base, dense_dir=dense_dir, dense_metrics=dense_metrics, round=round_, masks=masks,
                  extra=extra)
        results, objects = self.retraining.run(job)
        extra.update(self._compute(base, dense_metrics, results))
        net = objects["module"].net
        dense_flops = dense_metrics["flops"]
        flops = effective_flops(net, self.rounds.enforced(masks), input_size(base))
        extra.update({"lottery/effective_flops": flops, "lottery/dense_flops": dense_flops,
                      "lottery/flops_fraction": flops / dense_flops})
        if self.prune["kind"] == "unstructured":
            extra["compress/sparsity"] = extra["lottery/sparsity"]
        module = objects["module"]
        for key, value in extra.items():
            module.report_result(key, value)
        results.update(extra)
        _tell_wandb(objects["trainer"], cfg, extra)
        return results, objects


    def _compute(self, base: dict, dense_metrics: Mapping, results: Mapping) -> dict:
        """Training compute behind the result, in optimizer steps: its own training, plus (for a pruned
        net) the dense run and the IMP trainings its mask inherits (rounds 1..r-1)."""
        own = int(results.get("global_step") or 0)
        inherited = 0
        if self.retraining.prunes:
            inherited = int(dense_metrics.get("global_step") or 0) + sum(
                int(read_json(self.stages.train(base, r) / store_files.METRICS)["global_step"])
                for r in range(1, self.prune["round"]))
        return {"lottery/train_steps": own, "lottery/cumulative_steps": own + inherited}


def job_base(cfg: DictConfig) -> dict:
    """The job's resolved config without the protocol (what stages are built from)."""
    base = OmegaConf.to_container(cfg, resolve=True)
    base.pop("protocol", None)
    return base


def _without_callbacks(cfg: DictConfig, names: Sequence[str]) -> DictConfig:
    if not names:
        return cfg
    cfg = copy.deepcopy(cfg)
    with open_dict(cfg):
        for name in names:
            cfg.callbacks.pop(name, None)
    return cfg


def _tell_wandb(trainer, cfg: DictConfig, extra: Mapping) -> None:
    """method / sparsity / seed as wandb config, so the report's plots can be made there too."""
    for logger in getattr(trainer, "loggers", []) or []:
        if type(logger).__name__ == "WandbLogger":
            logger.experiment.config.update({"lottery/method": extra["lottery/label"],
                                             "lottery/sparsity": extra["lottery/sparsity"],
                                             "lottery/round": extra["lottery/round"], "seed": cfg.seed},
                                            allow_val_change=True)

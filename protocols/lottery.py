"""Lottery Ticket vs Rethinking: train dense -> prune -> retrain from a chosen start, in one config.

Papers: Frankle & Carbin 2019, "The Lottery Ticket Hypothesis" (iterative magnitude pruning,
IMP, rewinding to the init); Frankle et al. 2020, "Linear Mode Connectivity and the LTH"
(rewinding to an early step k); Liu et al. 2019, "Rethinking the Value of Network Pruning"
(fine-tune vs Scratch-E / Scratch-B); Blalock et al. 2020, "What is the State of Neural
Network Pruning?" (ShrinkBench: the random-pruning baseline).

One job = one (method, sparsity, seed). Stages it depends on are fits of the same machinery
(``pipeline.build.build`` -> ``trainer.fit``) cached in a content-addressed store (``stage_store``), so a
sweep ``protocol.method=... protocol.prune.round=... seed=...`` trains each dense net once:

    dense (seed)      -> model.pt + snapshot_step<k>.pt          key: data/model/module/optimizer/
                                                                     scheduler/trainer/seed/snapshots
    mask r            -> mask.pt  (prunes the round-r target      key: dense key + prune settings +
                         sparsity from the weights of round r-1)       rewind step + r
    train r (IMP)     -> model.pt (mask r, rewound to step k,    key: mask r key
                         retrained with the dense schedule)

The job then retrains from its start (``finetune`` / ``rewind`` / ``reinit`` / ``random_prune``)
or, for ``rewind`` (whose retraining *is* the IMP stage) and ``dense``, only tests the stage's
network. Structured pruning (``prune.kind=structured``) builds a physically thinner network with
``compression.channel_removal`` instead of a mask (Rethinking's L1-norm filter pruning and
slimming presets).
"""
from __future__ import annotations

import copy
import math
from pathlib import Path
from typing import Any, Mapping, Sequence

import torch
from omegaconf import DictConfig, OmegaConf, open_dict

from netcompress.evaluation.model_stats import count_flops, count_parameters
from netcompress.pipeline.build import instantiate
from netcompress.pipeline.fit import fit_and_test
from netcompress.protocols.fixed_mask import FixedMask
from netcompress.protocols.rewind_snapshot import RewindSnapshot, check_steps
from netcompress.compression.layer_selection import select_layers
from netcompress.compression.masks import (check_choice, check_sparsity, sparsity_of, structured_masks,
                               unstructured_masks)
from netcompress.protocols import stage_store as store_files
from netcompress.protocols.retrain_init import (effective_flops, masked_state, random_masks_like,
                                    scratch_b_budget)
from netcompress.protocols.stage_store import StageStore, stage_key, write_json_atomic

METHODS = ("dense", "finetune", "rewind", "reinit", "random_prune")
# Sweep-friendly names for reinit with a budget (Liu et al. 2019): method=scratch_e,scratch_b
ALIASES = {"scratch_e": ("reinit", "epochs"), "scratch_b": ("reinit", "flops")}
SCHEDULES = ("imp", "oneshot")
KINDS = ("unstructured", "structured")
CRITERIA = ("magnitude", "l1_filter", "bn_scale")
BUDGETS = ("epochs", "flops")
STAGE_VERSION = 1  # bump when a stage's code changes what it produces (invalidates the store)
# Trainer settings that do not change what a stage computes (left out of its key).
_TRAINER_NOT_IN_KEY = {"default_root_dir", "enable_progress_bar", "enable_model_summary", "log_every_n_steps",
                       "check_val_every_n_epoch", "limit_val_batches", "limit_test_batches",
                       "num_sanity_val_steps", "callbacks", "logger", "enable_checkpointing", "_target_",
                       "accelerator", "devices", "benchmark"}
_DATA_NOT_IN_KEY = {"num_workers", "cache_dir", "download", "eval_batch_size"}


def _is_trainer_default(key: str, value: Any) -> bool:
    """True when ``value`` is pl.Trainer's own default for ``key`` (a config that spells out a
    default, e.g. after a new key lands in conf/trainer, keeps its stage keys)."""
    import inspect

    import pytorch_lightning as pl

    param = inspect.signature(pl.Trainer.__init__).parameters.get(key)
    return param is not None and param.default is not inspect.Parameter.empty and param.default == value \
        and type(param.default) is type(value)


def _plain(value: Any) -> Any:
    return OmegaConf.to_container(value, resolve=True) if isinstance(value, DictConfig) else copy.deepcopy(value)


def _check_int(value: Any, key: str, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"`{key}` must be an int >= {minimum}; got {value!r}")
    return value


def _check_patterns(value: Any, key: str) -> list[str]:
    if isinstance(value, str) or not isinstance(value, Sequence) or not all(isinstance(p, str) for p in value):
        raise ValueError(f"`{key}` must be a list of module-name patterns (e.g. ['layer*']); got {value!r}")
    return list(value)


class LotteryProtocol:
    """Train dense, prune (one-shot or IMP), retrain from the chosen start; one object per job.

    Args:
        method: how the pruned network is retrained: ``dense`` (no pruning: the unpruned
            baseline), ``finetune`` (trained weights, ``finetune.lr``), ``rewind`` (surviving
            weights reset to step ``rewind_step``; 0 = winning ticket), ``reinit`` (fresh init,
            same mask/thin net; Scratch-E or Scratch-B by ``reinit.budget``), ``random_prune``
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
        dense_callbacks: names of ``callbacks`` entries (e.g. a compression config's key such as
            ``bn_sparsity``) used only while training the dense net (slimming's L1 penalty on BN
            scales); they are part of the dense key and left out of every retraining.
    """

    def __init__(self, method: str = "rewind", rewind_step: int = 0, snapshot_steps: Sequence[int] = (0,),
                 store_dir: str | None = None, prune: Mapping | None = None, finetune: Mapping | None = None,
                 reinit: Mapping | None = None, dense_callbacks: Sequence[str] = ()) -> None:
        alias = ALIASES.get(method)
        self.method = alias[0] if alias else check_choice(method, METHODS + tuple(ALIASES), "protocol.method")
        self.rewind_step = _check_int(rewind_step, "protocol.rewind_step", 0)
        self.snapshot_steps = list(check_steps(_plain(snapshot_steps), "protocol.snapshot_steps"))
        if self.rewind_step not in self.snapshot_steps:
            raise ValueError(f"`protocol.rewind_step`={rewind_step} must be one of protocol.snapshot_steps="
                             f"{self.snapshot_steps} (the dense run saves only those steps)")
        self.store = StageStore(store_dir)
        self.dense_callbacks = _check_patterns(_plain(dense_callbacks) or [], "protocol.dense_callbacks")
        self.prune = self._check_prune(dict(_plain(prune) or {}))
        self.finetune = self._check_finetune(dict(_plain(finetune) or {}))
        self.reinit = self._check_reinit(dict(_plain(reinit) or {}))
        if alias:
            self.reinit["budget"] = alias[1]

    # ----- argument checks -------------------------------------------------------------------
    @staticmethod
    def _check_prune(p: dict) -> dict:
        out = {"kind": "unstructured", "criterion": "magnitude", "schedule": "imp", "rate": 0.2, "round": 1,
               "sparsity": None, "scope": "global", "importance": "l1", "include": ["*"], "exclude": [],
               "skip_first_last": True, "layer_sparsity": {}}
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
        check_choice(out["importance"], ("l1", "l2"), "protocol.prune.importance")
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
        if out["schedule"] == "imp":
            rate = out["rate"]
            if isinstance(rate, bool) or not isinstance(rate, (int, float)) or not 0.0 < rate < 1.0:
                raise ValueError(f"`protocol.prune.rate` must be in (0, 1) (0.2 prunes 20% of what remains "
                                 f"each round); got {rate!r}")
            _check_int(out["round"], "protocol.prune.round", 1)
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
            _check_int(out["epochs"], "protocol.finetune.epochs", 1)
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
        _check_int(out["seed_offset"], "protocol.reinit.seed_offset", 1)
        return out

    # ----- schedule ---------------------------------------------------------------------------
    def target_sparsity(self, round_: int) -> float:
        """Fraction of the selected weights (or filters) pruned after ``round_`` rounds."""
        if self.prune["schedule"] == "oneshot":
            return float(self.prune["sparsity"])
        return 1.0 - (1.0 - float(self.prune["rate"])) ** round_

    @property
    def label(self) -> str:
        """The line a job belongs to in the report."""
        if self.method == "rewind":
            return f"rewind k={self.rewind_step}"
        if self.method == "reinit":
            return "reinit (Scratch-B)" if self.reinit["budget"] == "flops" else "reinit (Scratch-E)"
        if self.method == "random_prune":
            return f"random_prune k={self.rewind_step}"
        return self.method

    # ----- stage keys -------------------------------------------------------------------------
    def dense_parts(self, base: dict) -> dict:
        trainer = {k: v for k, v in base["trainer"].items()
                   if k not in _TRAINER_NOT_IN_KEY and not _is_trainer_default(k, v)}
        data = {k: v for k, v in base["data"].items() if k not in _DATA_NOT_IN_KEY}
        if isinstance(data.get("root"), str):  # ../data and /abs/data are the same data: one key
            data["root"] = str(Path(data["root"]).expanduser().resolve())
        callbacks = {name: (base.get("callbacks") or {}).get(name) for name in self.dense_callbacks}
        return {"stage": "dense", "version": STAGE_VERSION, "data": data, "model": base["model"],
                "module": base["module"], "optimizer": base["optimizer"], "scheduler": base.get("scheduler"),
                "trainer": trainer, "seed": base["seed"], "snapshot_steps": self.snapshot_steps,
                **({"callbacks": callbacks} if callbacks else {})}

    def mask_parts(self, base: dict, round_: int) -> dict:
        prune = {k: v for k, v in self.prune.items() if k != "round"}
        if prune["schedule"] == "imp":
            prune.pop("sparsity")
        return {"stage": "mask", "version": STAGE_VERSION, "dense": stage_key(self.dense_parts(base)),
                "prune": prune, "rewind_step": self.rewind_step, "round": round_}

    def train_parts(self, base: dict, round_: int) -> dict:
        return {"stage": "train", "version": STAGE_VERSION, "mask": stage_key(self.mask_parts(base, round_))}

    # ----- stages -----------------------------------------------------------------------------
    def dense_stage(self, base: dict) -> Path:
        def make(folder: Path) -> None:
            def save(step: int, state: dict) -> None:
                torch.save(state, folder / store_files.snapshot_file(step))

            snapshot = RewindSnapshot(self.snapshot_steps, on_capture=save)
            net, metrics = fit_stage(base, folder, callbacks=[snapshot], test=True, keep=self.dense_callbacks)
            save_net(net, folder / store_files.MODEL, base)
            write_json_atomic(folder / store_files.METRICS, metrics)

        return self.store.ensure("dense", self.dense_parts(base), make)

    def mask_stage(self, base: dict, round_: int) -> Path:
        """Masks (unstructured) or kept filters (structured) of round ``round_``."""
        def make(folder: Path) -> None:
            if round_ == 1:
                source, previous = load_stage_net(self.dense_stage(base)), None
            else:
                source = load_stage_net(self.train_stage(base, round_ - 1))
                previous = load_masks(self.mask_stage(base, round_ - 1))
            masks = self.compute_masks(source, round_, previous)
            torch.save(masks, folder / store_files.MASK)
            write_json_atomic(folder / store_files.METRICS, {"sparsity": sparsity_of(masks), "round": round_,
                                                            "target_sparsity": self.target_sparsity(round_)})

        return self.store.ensure("mask", self.mask_parts(base, round_), make)

    def train_stage(self, base: dict, round_: int) -> Path:
        """IMP round ``round_``: the mask applied to the step-k weights, retrained with the dense schedule."""
        def make(folder: Path) -> None:
            dense_dir = self.dense_stage(base)
            masks = load_masks(self.mask_stage(base, round_))
            start = self.start_network(base, dense_dir, masks, "rewind", masks)
            net, metrics = fit_stage(base, folder, start=start, masks=self.fixed_masks(masks), test=False)
            save_net(net, folder / store_files.MODEL, base)
            write_json_atomic(folder / store_files.METRICS, metrics)

        return self.store.ensure("train", self.train_parts(base, round_), make)

    # ----- pruning ----------------------------------------------------------------------------
    def selected(self, net: torch.nn.Module) -> dict[str, torch.nn.Module]:
        p = self.prune
        types = (torch.nn.Conv2d, torch.nn.Linear) if p["criterion"] != "bn_scale" else (torch.nn.BatchNorm2d,)
        return select_layers(net, p["include"], p["exclude"], p["skip_first_last"], types=types, key="protocol.prune")

    def compute_masks(self, net: torch.nn.Module, round_: int, previous: Mapping | None) -> dict[str, torch.Tensor]:
        p = self.prune
        layers = self.selected(net)
        weights = {name: m.weight.detach().cpu() for name, m in layers.items()}
        sparsity = self.target_sparsity(round_)
        if p["layer_sparsity"]:  # oneshot, per layer: the first matching pattern's fraction, else `sparsity`
            from fnmatch import fnmatchcase

            def fraction(name: str) -> float:
                return next((float(v) for pat, v in p["layer_sparsity"].items() if fnmatchcase(name, pat)), sparsity)

            masks = {}
            for name, w in weights.items():
                one = {name: w}
                masks.update(unstructured_masks(one, fraction(name), "layer", p["importance"])
                             if p["kind"] == "unstructured" else self._structured(one, fraction(name), None))
            return masks
        if p["kind"] == "unstructured":
            return unstructured_masks(weights, sparsity, p["scope"], p["importance"], previous)
        return self._structured(weights, sparsity, previous)

    def _structured(self, weights: Mapping[str, torch.Tensor], sparsity: float, previous: Mapping | None) -> dict:
        """Kept output filters: L1/L2 filter norm (Li et al. 2017) or BN |gamma| (Liu et al. 2017)."""
        p = self.prune
        if p["criterion"] == "l1_filter":
            return structured_masks(weights, sparsity, p["scope"], p["importance"], previous)
        from netcompress.compression.masks import _masks_from_scores

        masks = _masks_from_scores({n: w.abs() for n, w in weights.items()}, sparsity, p["scope"], previous)
        for name, keep in masks.items():
            if not keep.any():  # never empty a layer
                keep[weights[name].abs().argmax()] = True
        return masks

    def fixed_masks(self, masks: Mapping[str, torch.Tensor] | None) -> dict | None:
        """The masks FixedMask enforces (unstructured only; a thin network needs none)."""
        return dict(masks) if masks is not None and self.prune["kind"] == "unstructured" else None

    def thin(self, net: torch.nn.Module, keep: Mapping[str, torch.Tensor], base: dict) -> torch.nn.Module:
        from netcompress.compression.channel_removal import remove_channels

        size = _input_size(base)
        return remove_channels(net, dict(keep), torch.zeros(1, *size))

    def start_network(self, base: dict, dense_dir: Path, masks: Mapping, how: str,
                      source_masks: Mapping | None = None, previous_dir: Path | None = None) -> torch.nn.Module:
        """The network retraining starts from, already masked / thinned."""
        structured = self.prune["kind"] == "structured"
        if how == "finetune":
            net = load_stage_net(previous_dir or dense_dir)
        elif how in ("rewind", "random_prune"):
            net = load_stage_net(dense_dir)
            net.load_state_dict(torch.load(dense_dir / store_files.snapshot_file(self.rewind_step),
                                           map_location="cpu", weights_only=True))
        elif how == "reinit":
            classes = int(load_stage_net(dense_dir).get_classifier().out_features)
            net = fresh_network(base, base["seed"] + self.reinit["seed_offset"], classes)
        else:  # pragma: no cover
            raise AssertionError(how)
        if structured:
            net = self.thin(net, masks, base)
            if how == "reinit" and hasattr(net, "_init_weights"):
                with torch.random.fork_rng():
                    torch.manual_seed(base["seed"] + self.reinit["seed_offset"])
                    net._init_weights()  # the model's own init, with the thin layers' fan-in/out
            return net
        net.load_state_dict(masked_state(net.state_dict(), masks))
        return net

    # ----- the job ----------------------------------------------------------------------------
    def run(self, cfg: DictConfig) -> tuple[dict, dict]:
        """One job: ensure the stages it needs, retrain (or test) its network; run.train's return shape."""
        base = job_base(cfg)
        missing = [n for n in self.dense_callbacks if n not in (base.get("callbacks") or {})]
        if missing:
            raise ValueError(f"protocol.dense_callbacks names {missing} but callbacks has only "
                             f"{sorted(base.get('callbacks') or {})}; add the compression config (compression=[...])")
        cfg = _without_callbacks(cfg, self.dense_callbacks)  # retrainings never use the dense-only callbacks
        dense_dir = self.dense_stage(base)
        dense_metrics = read_json(dense_dir / store_files.METRICS)
        round_ = self.prune["round"]
        extra = {"lottery/method": self.method, "lottery/label": self.label, "lottery/round": 0,
                 "lottery/sparsity": 0.0, "lottery/remaining": 1.0, "lottery/dense_key": dense_dir.name,
                 "lottery/rewind_step": self.rewind_step, "lottery/prune_kind": self.prune["kind"],
                 "lottery/dense_test_acc1": dense_metrics.get("test/acc1"),
                 "lottery/dense_params": dense_metrics.get("params_nonzero")}
        masks = None
        if self.method == "dense":
            results, objects = evaluate(cfg, load_stage_net(dense_dir), dense_metrics)
        else:
            mask_dir = self.mask_stage(base, round_)
            masks = load_masks(mask_dir)
            extra.update({"lottery/round": round_, "lottery/sparsity": sparsity_of(masks),
                          "lottery/remaining": 1.0 - sparsity_of(masks), "lottery/mask_key": mask_dir.name})
            if self.method == "rewind":
                train_dir = self.train_stage(base, round_)
                results, objects = evaluate(cfg, load_stage_net(train_dir), read_json(train_dir / store_files.METRICS))
                extra["lottery/train_key"] = train_dir.name
            else:
                results, objects = self.retrain(cfg, base, dense_dir, masks, round_, extra)
        net = objects["module"].net
        size = _input_size(base)
        dense_flops = dense_metrics["flops"]
        flops = effective_flops(net, self.fixed_masks(masks), size)
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

    def retrain(self, cfg: DictConfig, base: dict, dense_dir: Path, masks: dict, round_: int,
                extra: dict) -> tuple[dict, dict]:
        epochs = int(base["trainer"]["max_epochs"])
        overrides: dict[str, Any] = {}
        fixed = self.fixed_masks(masks)
        if self.method == "finetune":
            previous = self.train_stage(base, round_ - 1) if round_ > 1 else dense_dir
            start = self.start_network(base, dense_dir, masks, "finetune", previous_dir=previous)
            overrides = {"optimizer.lr": self.finetune["lr"], "trainer.max_epochs": self.finetune["epochs"] or epochs}
        elif self.method == "reinit":
            start = self.start_network(base, dense_dir, masks, "reinit")
            if self.reinit["budget"] == "flops":  # Scratch-B: the dense run's steps x FLOPs ratio
                dense = read_json(dense_dir / store_files.METRICS)
                pruned = effective_flops(start, fixed, _input_size(base))
                steps = scratch_b_budget(int(dense["global_step"]), dense["flops"], pruned, self.reinit["max_factor"])
                per_epoch = dense["global_step"] / max(int(dense["epochs"]), 1)
                overrides = {"trainer.max_steps": steps, "trainer.max_epochs": math.ceil(steps / per_epoch)}
                extra["lottery/epochs_trained"] = round(steps / per_epoch, 3)
        elif self.method == "random_prune":
            seed = base["seed"] + self.reinit["seed_offset"]
            random = random_masks_like(masks, seed)
            fixed = self.fixed_masks(random)
            start = self.start_network(base, dense_dir, random, "random_prune")
        else:  # pragma: no cover
            raise AssertionError(self.method)
        extra.setdefault("lottery/epochs_trained", overrides.get("trainer.max_epochs", epochs))
        return fit_job(cfg, start, fixed, overrides)


# ----- helpers shared by the stages and the job --------------------------------------------------

def job_base(cfg: DictConfig) -> dict:
    """The job's resolved config without the protocol (what stages are built from)."""
    base = OmegaConf.to_container(cfg, resolve=True)
    base.pop("protocol", None)
    return base


def read_json(path: Path) -> dict:
    import json

    return json.loads(Path(path).read_text())


def _input_size(base: dict) -> tuple[int, int, int]:
    size = base.get("data", {}).get("image_size")
    return (3, int(size), int(size)) if size else (3, 32, 32)


def load_masks(stage_dir: Path) -> dict[str, torch.Tensor]:
    return torch.load(Path(stage_dir) / store_files.MASK, map_location="cpu", weights_only=True)


def load_stage_net(stage_dir: Path) -> torch.nn.Module:
    from netcompress.models.serialization import load_model

    return load_model(Path(stage_dir) / store_files.MODEL).train()


def save_net(net: torch.nn.Module, path: Path, base: dict) -> None:
    from netcompress.models.serialization import save_model

    kwargs = {k: v for k, v in base["model"].items() if k not in ("_target_", "name", "pretrained")}
    save_model(net.cpu(), path, base["model"]["name"], int(net.get_classifier().out_features), kwargs)


def fresh_network(base: dict, seed: int, num_classes: int) -> torch.nn.Module:
    """A newly initialised network of the job's model, drawn with ``seed`` (global RNG untouched)."""
    with torch.random.fork_rng():
        torch.manual_seed(int(seed))
        return instantiate(OmegaConf.create(base["model"]), num_classes=num_classes)


def _without_callbacks(cfg: DictConfig, names: Sequence[str]) -> DictConfig:
    if not names:
        return cfg
    cfg = copy.deepcopy(cfg)
    with open_dict(cfg):
        for name in names:
            cfg.callbacks.pop(name, None)
    return cfg


def _stage_config(base: dict, folder: Path, keep: Sequence[str] = ()) -> DictConfig:
    cfg = OmegaConf.create(copy.deepcopy(base))
    with open_dict(cfg):
        cfg.callbacks = {name: base["callbacks"][name] for name in keep}
        cfg.logger = {}
        cfg.ckpt_path = None
        cfg.init_from = None
        cfg.trainer.enable_checkpointing = False
        cfg.trainer.default_root_dir = str(folder)
    return cfg


def fit_stage(base: dict, folder: Path, start: torch.nn.Module | None = None, masks: Mapping | None = None,
              callbacks: Sequence = (), test: bool = False, keep: Sequence[str] = ()) -> tuple[torch.nn.Module, dict]:
    """Fit a shared stage with the job's data/model/optimizer/schedule (no logger, no checkpoints;
    of the job's callbacks only those named in ``keep``)."""
    extra = [FixedMask(masks=masks, key="protocol.stage_mask")] if masks else []
    metrics, objects = fit_and_test(_stage_config(base, folder, keep), start=start,
                                    callbacks=[*extra, *callbacks], test=test)
    net = objects["module"].net.cpu()
    metrics["flops"] = count_flops(net, tuple(objects["datamodule"].input_size))
    metrics["params_nonzero"] = count_parameters(net)[1]
    return net, metrics


def _job_config(cfg: DictConfig, overrides: Mapping[str, Any]) -> DictConfig:
    job = copy.deepcopy(cfg)
    with open_dict(job):
        job.init_from = None
        for key, value in overrides.items():
            OmegaConf.update(job, key, value, merge=False)
    return job


def fit_job(cfg: DictConfig, start: torch.nn.Module, masks: Mapping | None,
            overrides: Mapping[str, Any]) -> tuple[dict, dict]:
    """The job's own retraining: its callbacks and loggers, plus FixedMask."""
    extra = [FixedMask(masks=masks, key="protocol.mask")] if masks else []
    return fit_and_test(_job_config(cfg, overrides), start=start, callbacks=extra)


def evaluate(cfg: DictConfig, net: torch.nn.Module, stage_metrics: Mapping) -> tuple[dict, dict]:
    """Test a stage's network as this job's result (its training is the stage's)."""
    results, objects = fit_and_test(_job_config(cfg, {}), start=net, fit=False)
    reused = {k: stage_metrics[k] for k in ("val/acc1", "val/acc5", "val/loss", "train_time_s", "epochs",
                                            "global_step") if k in stage_metrics}
    return {**reused, **results, "lottery/reused_stage": True}, objects


def _tell_wandb(trainer, cfg: DictConfig, extra: Mapping) -> None:
    """method / sparsity / seed as wandb config, so the report's plots can be made there too."""
    for logger in getattr(trainer, "loggers", []) or []:
        if type(logger).__name__ == "WandbLogger":
            logger.experiment.config.update({"lottery/method": extra["lottery/label"],
                                             "lottery/sparsity": extra["lottery/sparsity"],
                                             "lottery/round": extra["lottery/round"], "seed": cfg.seed},
                                            allow_val_change=True)

"""The lottery protocol's shared stages and their keys (the content-addressed store idea of open_lth).

    dense (seed)      -> model.pt + snapshot_step<k>.pt          key: data/model/module/optimizer/
                                                                     scheduler/trainer/seed/snapshots
    mask r            -> mask.pt  (prunes the round-r target      key: dense key + prune settings +
                         sparsity from the weights of round r-1)       rewind step + r
    train r (IMP)     -> model.pt (mask r, rewound to step k,    key: mask r key
                         retrained with the dense schedule)

Each is a fit of the job's own machinery (``pipeline.fit.fit_and_test``) made once in the
``StageStore`` and reused by every job and sweep with the same key. What goes into the keys
(``dense_parts`` / ``mask_parts`` / ``train_parts``) decides which stores stay valid: change it
only together with ``STAGE_VERSION``.
"""
from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any, Mapping, Sequence

import torch
from omegaconf import DictConfig, OmegaConf, open_dict

from netcompress.compression.masks import sparsity_of
from netcompress.evaluation.model_stats import count_flops, count_parameters
from netcompress.pipeline.fit import fit_and_test
from netcompress.protocols import stage_store as store_files
from netcompress.protocols.fixed_mask import FixedMask
from netcompress.protocols.pruning_rounds import PruningRounds
from netcompress.protocols.rewind_snapshot import RewindSnapshot
from netcompress.protocols.stage_store import StageStore, stage_key, write_json_atomic

STAGE_VERSION = 1  # bump when a stage's code changes what it produces (invalidates the store)
# Trainer settings that do not change what a stage computes (left out of its key).
_TRAINER_NOT_IN_KEY = {"default_root_dir", "enable_progress_bar", "enable_model_summary", "log_every_n_steps",
                       "check_val_every_n_epoch", "limit_val_batches", "limit_test_batches",
                       "num_sanity_val_steps", "callbacks", "logger", "enable_checkpointing", "_target_",
                       "accelerator", "devices", "benchmark"}
_DATA_NOT_IN_KEY = {"num_workers", "cache_dir", "download", "eval_batch_size"}


class Stages:
    """``dense(base)``, ``mask(base, r)``, ``train(base, r)``: each stage's folder, made if absent.

    ``base`` is the job's resolved config without the protocol (``lottery.job_base``)."""

    def __init__(self, store: StageStore, rounds: PruningRounds, snapshot_steps: Sequence[int], rewind_step: int,
                 dense_callbacks: Sequence[str], rewind_schedule: str = "resume") -> None:
        self.store = store
        self.rounds = rounds
        self.snapshot_steps = list(snapshot_steps)
        self.rewind_step = rewind_step
        self.dense_callbacks = list(dense_callbacks)
        self.rewind_schedule = rewind_schedule

    # ----- keys -------------------------------------------------------------------------------
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
                "threads": base.get("threads") or torch.get_num_threads(),  # results depend on it: never mixed
                **({"callbacks": callbacks} if callbacks else {})}

    def mask_parts(self, base: dict, round_: int) -> dict:
        prune = {k: v for k, v in self.rounds.prune.items() if k != "round"}
        if prune["schedule"] == "imp":
            prune.pop("sparsity")
        return {"stage": "mask", "version": STAGE_VERSION, "dense": stage_key(self.dense_parts(base)),
                "prune": prune, "rewind_step": self.rewind_step, "round": round_}

    def train_parts(self, base: dict, round_: int) -> dict:
        parts = {"stage": "train", "version": STAGE_VERSION, "mask": stage_key(self.mask_parts(base, round_))}
        if self.rewind_step > 0:  # k = 0 has one schedule either way (and keeps its older keys)
            parts["rewind_schedule"] = self.rewind_schedule
        return parts

    def rewound_budget(self, dense_dir: Path) -> dict[str, Any]:
        """Config overrides for retraining a network rewound to step k: with ``rewind_schedule=resume``
        the remaining T - k steps of the dense run's T, its schedule resumed at k; else none (all T)."""
        if self.rewind_step == 0 or self.rewind_schedule == "restart":
            return {}
        total = int(read_json(Path(dense_dir) / store_files.METRICS)["global_step"])
        return {"trainer.max_steps": total - self.rewind_step, "module.schedule_offset": self.rewind_step}

    # ----- stages -----------------------------------------------------------------------------
    def dense(self, base: dict) -> Path:
        """The dense run (with the ``dense_callbacks``), its weights at ``snapshot_steps`` and its test figures."""
        def make(folder: Path) -> None:
            def save(step: int, state: dict) -> None:
                torch.save(state, folder / store_files.snapshot_file(step))

            snapshot = RewindSnapshot(self.snapshot_steps, on_capture=save)
            net, metrics = fit_stage(base, folder, callbacks=[snapshot], test=True, keep=self.dense_callbacks)
            save_net(net, folder / store_files.MODEL, base)
            write_json_atomic(folder / store_files.METRICS, metrics)

        return self.store.ensure("dense", self.dense_parts(base), make)

    def mask(self, base: dict, round_: int) -> Path:
        """Masks (unstructured) or kept filters (structured) of round ``round_``."""
        def make(folder: Path) -> None:
            if round_ == 1:
                source, previous = load_stage_net(self.dense(base)), None
            else:
                source = load_stage_net(self.train(base, round_ - 1))
                previous = load_masks(self.mask(base, round_ - 1))
            masks = self.rounds.compute_masks(source, round_, previous)
            torch.save(masks, folder / store_files.MASK)
            write_json_atomic(folder / store_files.METRICS, {"sparsity": sparsity_of(masks), "round": round_,
                                                            "target_sparsity": self.rounds.target_sparsity(round_)})

        return self.store.ensure("mask", self.mask_parts(base, round_), make)

    def train(self, base: dict, round_: int) -> Path:
        """IMP round ``round_``: the mask applied to the step-k weights, retrained with the dense schedule."""
        def make(folder: Path) -> None:
            masks = load_masks(self.mask(base, round_))
            dense_dir = self.dense(base)
            start = self.rounds.apply(self.rewound(dense_dir), masks, input_size(base))
            net, metrics = fit_stage(with_overrides(base, self.rewound_budget(dense_dir)), folder, start=start,
                                     masks=self.rounds.enforced(masks), test=False)
            save_net(net, folder / store_files.MODEL, base)
            write_json_atomic(folder / store_files.METRICS, metrics)

        return self.store.ensure("train", self.train_parts(base, round_), make)

    def rewound(self, dense_dir: Path) -> torch.nn.Module:
        """The dense stage's network with its weights at step ``rewind_step`` (not yet pruned)."""
        net = load_stage_net(dense_dir)
        net.load_state_dict(torch.load(dense_dir / store_files.snapshot_file(self.rewind_step),
                                       map_location="cpu", weights_only=True))
        return net


# ----- stage files and fits --------------------------------------------------------------------

def _is_trainer_default(key: str, value: Any) -> bool:
    """True when ``value`` is pl.Trainer's own default for ``key`` (a config that spells out a
    default, e.g. after a new key lands in conf/trainer, keeps its stage keys)."""
    import inspect

    import pytorch_lightning as pl

    param = inspect.signature(pl.Trainer.__init__).parameters.get(key)
    return param is not None and param.default is not inspect.Parameter.empty and param.default == value \
        and type(param.default) is type(value)


def with_overrides(base: dict, overrides: Mapping[str, Any]) -> dict:
    """A copy of ``base`` with dotted-key ``overrides`` set (``{"trainer.max_steps": 100}``)."""
    out = copy.deepcopy(base)
    for key, value in overrides.items():
        parts = key.split(".")
        node = out
        for part in parts[:-1]:
            node = node.setdefault(part, {})
        node[parts[-1]] = value
    return out


def read_json(path: Path) -> dict:
    return json.loads(Path(path).read_text())


def input_size(base: dict) -> tuple[int, int, int]:
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


def _stage_config(base: dict, folder: Path, keep: Sequence[str] = ()) -> DictConfig:
    cfg = OmegaConf.create(copy.deepcopy(base))
    with open_dict(cfg):
        cfg.callbacks = {name: base["callbacks"][name] for name in keep}
        cfg.evaluators = {}  # shared stages never run the job's evaluators
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

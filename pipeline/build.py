"""Build a run from its config: datamodule, network (fresh, or ``init_from``), module, callbacks,
loggers and trainer, with every check that can fail run first (before any data is read or trained).

The one place that turns config into objects; run.py and protocols/ both build through it.
"""
from __future__ import annotations

import copy
import os
from typing import Any

import hydra
import pytorch_lightning as pl
import torch
from hydra.errors import InstantiationException
from omegaconf import DictConfig, OmegaConf

from netcompress.evaluation.evaluators import build_evaluators
from netcompress.lightning_modules.checkpoint_io import check_same_model
from netcompress.models.serialization import SavedNet, build_net, read_saved_net
from netcompress.pipeline.config_checks import check_config
from netcompress.pipeline.combinations import check_combinations
from netcompress.pipeline.entries import entry_names, reshaping_entries
from netcompress.pipeline.wandb_config import is_wandb_entry, wandb_logger


def instantiate(config: DictConfig, **kwargs: Any) -> Any:
    """hydra.utils.instantiate, re-raising our own clear input errors instead of Hydra's wrapper."""
    try:
        return hydra.utils.instantiate(config, **kwargs)
    except InstantiationException as exc:
        if isinstance(exc.__cause__, (ValueError, TypeError, FileNotFoundError)):
            raise exc.__cause__ from None
        raise


def instantiate_group(group: DictConfig | None) -> list[Any]:
    """Objects of a dict-of-configs group (callbacks, loggers), in config order."""
    if not group:
        return []
    return [instantiate(entry) for entry in group.values() if entry and "_target_" in entry]


def build_loggers(cfg: DictConfig) -> list[Any]:
    """The loggers of ``cfg.logger`` in config order; a WandbLogger gets the run's flattened resolved
    config as its run config and the compression entries as tags (pipeline/wandb_config.py)."""
    group = cfg.get("logger")
    if not group:
        return []
    return [wandb_logger(entry, cfg, instantiate) if is_wandb_entry(entry) else instantiate(entry)
            for entry in group.values() if entry and "_target_" in entry]


def model_kwargs(cfg: DictConfig) -> dict:
    return {k: v for k, v in OmegaConf.to_container(cfg.model, resolve=True).items()
            if k not in ("_target_", "name", "pretrained")}


def initial_weights(net, saved: SavedNet | str, spec: dict | None = None):
    """The network of ``init_from`` (a run's .ckpt or model.pt, thinned or not) in place of a fresh init.

    Refused when it holds another model than the config's (``spec``): another model.name, width or
    class count would be trained while the config and results.json name the configured one.
    """
    if not isinstance(saved, SavedNet):
        saved = read_saved_net(saved, key="init_from")
    loaded = build_net(saved)
    expected = net.get_classifier().out_features
    got = loaded.get_classifier().out_features
    if got != expected:
        raise ValueError(f"init_from={str(saved.path)!r} has {got} classes but the data has {expected}; "
                         "point init_from at a run on the same data set")
    if spec is not None:
        check_same_model(saved, net, spec, thinned_by=None)
    return loaded.train()


def processes_per_node(cfg: DictConfig) -> int:
    """Processes one node runs for ``cfg.trainer``: ``devices`` (an int or a list) under a DDP strategy, else 1."""
    trainer = cfg.get("trainer") or {}
    if "ddp" not in str(trainer.get("strategy") or ""):
        return 1
    devices = trainer.get("devices")
    if isinstance(devices, int) and not isinstance(devices, bool):
        return max(1, devices)
    if OmegaConf.is_list(devices) or isinstance(devices, (list, tuple)):
        return max(1, len(devices))
    return 1


def apply_threads(cfg: DictConfig) -> int:
    """Set torch's CPU thread count from ``threads``; returns the count in use.

    One run's numbers depend on it (CPU reductions sum in a thread-dependent order), so it is a
    config value, recorded in results.json and part of the lottery protocol's stage keys. It is also
    written to ``OMP_NUM_THREADS``, which Lightning's DDP launcher then leaves alone (and the other
    ranks inherit). ``threads: null`` leaves torch's default, except under multi-process DDP without
    ``OMP_NUM_THREADS``: there Lightning would lower rank 0's count only when training starts
    (cores // processes), after the stage keys were computed with the old one, and the other ranks
    would key their stages differently; that count is applied here first, so every rank agrees."""
    threads = cfg.get("threads")
    processes = processes_per_node(cfg)
    if not threads and processes > 1 and "OMP_NUM_THREADS" not in os.environ:
        threads = max(1, (os.cpu_count() or 1) // processes)  # lightning_fabric's _suggested_max_num_threads
    if threads:
        torch.set_num_threads(int(threads))
        os.environ["OMP_NUM_THREADS"] = str(int(threads))
    return torch.get_num_threads()


def build(cfg: DictConfig):
    """Datamodule, module, callbacks and trainer from config; every check that can fail runs here."""
    check_config(cfg)  # every value, key and _target_ argument, before any data is read
    build_evaluators(cfg.get("evaluators"))  # each evaluator checks its arguments now, not after training
    pl.seed_everything(cfg.seed, workers=True)
    apply_threads(cfg)
    resume = read_saved_net(cfg.ckpt_path, key="ckpt_path", mmap=True) if cfg.ckpt_path else None
    init = read_saved_net(cfg.init_from, key="init_from") if cfg.get("init_from") else None
    datamodule = instantiate(cfg.data)
    net = instantiate(cfg.model, num_classes=datamodule.num_classes)
    spec = {"model_name": cfg.model.name, "num_classes": datamodule.num_classes, "model_kwargs": model_kwargs(cfg)}
    if resume is not None:  # the checkpoint's network is this config's model (thinned only by its compression)
        thinned_by = reshaping_entries(cfg.get("callbacks")) + (["protocol"] if cfg.get("protocol") else [])
        check_same_model(resume, net, spec, thinned_by=thinned_by)
    if init is not None:
        net = initial_weights(net, init, spec)
    module = instantiate(
        cfg.module, net=net, net_spec=spec,
        optimizer=hydra.utils.instantiate(cfg.optimizer),
        scheduler=hydra.utils.instantiate(cfg.scheduler) if cfg.get("scheduler") else None,
    )
    if init is not None:  # the dense parent: a frozen copy for the evaluators of evaluation=[...]
        module.set_parent(copy.deepcopy(net).eval().requires_grad_(False), source=f"init_from:{cfg.init_from}")
    callbacks = instantiate_group(cfg.get("callbacks"))
    check_combinations(callbacks, entry_names(cfg.get("callbacks")))
    loggers = build_loggers(cfg)
    trainer = instantiate(cfg.trainer, callbacks=callbacks, logger=loggers or False)
    return datamodule, module, trainer

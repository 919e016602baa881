"""Every config value checked once, at config level, before any data is read or a step is taken.

In the spirit of open_lth's typed hyperparameters: a small table of typed fields, one line each
(key, what is allowed, an example of what to type), plus checks by class rather than by key:
required values left at ``???``, callbacks entries without a ``_target_``, keys that no
``_target_``'s arguments accept (for every node of the config that has one), ``max_epochs=0``
on a run that needs training, and a compression entry listed twice. Each error names the key,
the value received and what would be valid.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Callable

from omegaconf import DictConfig, ListConfig, OmegaConf

from netcompress.pipeline.entries import (HYDRA_KEYS, accepted_keys, calibration_only_entries, callback_targets,
                              compression_entries, locate, unknown_key_message)

_ABSENT = object()
UINT32_MAX = 2**32 - 1


# ----- value kinds ------------------------------------------------------------------------------
def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_number(v: Any) -> bool:
    return (isinstance(v, (int, float)) and not isinstance(v, bool)) and math.isfinite(v)


def int_in(low: int, high: float = math.inf) -> Callable[[Any], bool]:
    return lambda v: _is_int(v) and low <= v <= high


def number_in(low: float, high: float = math.inf, low_open: bool = False, high_open: bool = False
              ) -> Callable[[Any], bool]:
    def check(v: Any) -> bool:
        if not _is_number(v):
            return False
        return (v > low if low_open else v >= low) and (v < high if high_open else v <= high)
    return check


def boolean(v: Any) -> bool:
    return isinstance(v, bool)


def text(v: Any) -> bool:
    return isinstance(v, str) and bool(v)


def optional(check: Callable[[Any], bool]) -> Callable[[Any], bool]:
    return lambda v: v is None or check(v)


def either(*checks: Callable[[Any], bool]) -> Callable[[Any], bool]:
    return lambda v: any(c(v) for c in checks)


def list_of(check: Callable[[Any], bool], length: int | None = None) -> Callable[[Any], bool]:
    return lambda v: (isinstance(v, (list, tuple, ListConfig)) and (length is None or len(v) == length)
                      and all(check(x) for x in v))


@dataclass(frozen=True)
class Field:
    """One typed config value: checked only where the composed config has the key."""

    key: str
    check: Callable[[Any], bool]
    allowed: str       # "a float > 0"
    example: str       # what to type instead: "optimizer.lr=0.1"


FIELDS: tuple[Field, ...] = (
    # top level (conf/config.yaml)
    Field("seed", int_in(0, UINT32_MAX), f"an int in [0, {UINT32_MAX}]", "seed=0"),
    Field("task_name", text, "a non-empty string (names the output folder)", "task_name=train"),
    Field("tags", list_of(text), "a list of strings", "'tags=[baseline]'"),
    Field("ckpt_path", optional(text), "null or the path of a run's .ckpt", "ckpt_path=<run>/checkpoints/last.ckpt"),
    Field("init_from", optional(text), "null or the path of a run's model.pt or .ckpt",
          "init_from=<run>/model.pt"),
    Field("optimized_metric", text, "a metric name", "optimized_metric=val/acc1"),
    Field("save_model", boolean, "true or false", "save_model=true"),
    Field("latency_repeats", int_in(1), "an int >= 1", "latency_repeats=30"),
    Field("threads", optional(int_in(1)), "null (torch's default) or an int >= 1", "threads=1"),
    # optimizer
    Field("optimizer.lr", number_in(0, low_open=True), "a float > 0", "optimizer.lr=0.1"),
    Field("optimizer.weight_decay", number_in(0), "a float >= 0", "optimizer.weight_decay=1e-4"),
    Field("optimizer.momentum", number_in(0, 1, high_open=True), "a float in [0, 1)", "optimizer.momentum=0.9"),
    Field("optimizer.nesterov", boolean, "true or false", "optimizer.nesterov=true"),
    Field("optimizer.betas", list_of(number_in(0, 1, high_open=True), 2), "two floats in [0, 1)",
          "'optimizer.betas=[0.9,0.999]'"),
    # trainer
    Field("trainer.max_epochs", int_in(0), "an int >= 0", "trainer.max_epochs=160"),
    Field("trainer.max_steps", int_in(-1), "an int >= -1 (-1: no step limit)", "trainer.max_steps=-1"),
    Field("trainer.check_val_every_n_epoch", optional(int_in(1)), "an int >= 1 or null",
          "trainer.check_val_every_n_epoch=1"),
    Field("trainer.log_every_n_steps", int_in(1), "an int >= 1", "trainer.log_every_n_steps=50"),
    Field("trainer.num_sanity_val_steps", int_in(-1), "an int >= -1", "trainer.num_sanity_val_steps=0"),
    Field("trainer.fast_dev_run", either(boolean, int_in(0)), "true, false or an int >= 0 (batches)",
          "trainer.fast_dev_run=true"),
    Field("trainer.enable_progress_bar", boolean, "true or false", "trainer.enable_progress_bar=false"),
    Field("trainer.enable_model_summary", boolean, "true or false", "trainer.enable_model_summary=false"),
    *(Field(f"trainer.limit_{split}_batches", optional(either(int_in(0), number_in(0.0, 1.0))),
            "null, an int >= 0 (batches) or a float in [0, 1] (fraction)", f"trainer.limit_{split}_batches=1.0")
      for split in ("train", "val", "test")),
    # data
    Field("data.root", text, "a folder path", "data.root=../shared/data/cifar10-jpeg"),
    Field("data.batch_size", int_in(1), "an int >= 1", "data.batch_size=128"),
    Field("data.eval_batch_size", optional(int_in(1)), "an int >= 1 or null", "data.eval_batch_size=256"),
    Field("data.num_workers", int_in(0), "an int >= 0", "data.num_workers=4"),
    Field("data.train_subset", optional(int_in(1)), "an int >= 1 or null (all images)", "data.train_subset=5000"),
    Field("data.train_size", int_in(1), "an int >= 1", "data.train_size=256"),
    Field("data.val_size", int_in(0), "an int >= 0", "data.val_size=5000"),
    Field("data.test_size", int_in(0), "an int >= 0", "data.test_size=64"),
    Field("data.num_classes", int_in(2), "an int >= 2", "data.num_classes=10"),
    Field("data.image_size", int_in(1), "an int >= 1", "data.image_size=224"),
    Field("data.resize_size", int_in(1), "an int >= 1", "data.resize_size=256"),
    Field("data.pad", int_in(0), "an int >= 0", "data.pad=4"),
    Field("data.download", boolean, "true or false", "data.download=false"),
    Field("data.skip_bad_images", boolean, "true or false", "data.skip_bad_images=true"),
    Field("data.pin_memory", boolean, "true or false", "data.pin_memory=false"),
    Field("data.persistent_workers", boolean, "true or false", "data.persistent_workers=false"),
    # model / module
    Field("model.name", text, "a timm model name", "model.name=resnet20_cifar"),
    Field("model.pretrained", boolean, "true or false", "model.pretrained=false"),
    Field("module.label_smoothing", number_in(0, 1, high_open=True), "a float in [0, 1)",
          "module.label_smoothing=0.1"),
    Field("module.channels_last", boolean, "true or false", "module.channels_last=true"),
    Field("module.no_decay_norm_bias", boolean, "true or false", "module.no_decay_norm_bias=false"),
)


# ----- the checks -------------------------------------------------------------------------------
def check_config(cfg: DictConfig) -> None:
    """Raise ``ValueError``/``TypeError`` naming the key, the value and what is valid; else return."""
    check_required(cfg)
    check_fields(cfg)
    check_callbacks(cfg)
    check_targets(cfg)
    check_max_epochs(cfg)
    check_compression_list()


def check_required(cfg: DictConfig) -> None:
    """Values left at ``???`` (kd's teachers, imagefolder's root) and the keys a preset lists in
    ``requires`` (``[init_from]``: a preset's ``init_from: ???`` would merge onto config.yaml's
    ``init_from: null`` as null, since OmegaConf keeps the old value when the new one is ???)."""
    missing = sorted(k for k in OmegaConf.missing_keys(cfg) if not k.startswith("hydra."))
    requires = cfg.get("requires") or []
    if isinstance(requires, str) or not all(isinstance(k, str) for k in requires):
        raise ValueError(f"`requires` must be a list of dotted config keys (e.g. [init_from]); got {requires!r}")
    missing += [k for k in requires if _select(cfg, k) in (None, _ABSENT) and k not in missing]
    if missing:
        key = missing[0]
        more = f" (also unset: {', '.join(missing[1:])})" if len(missing) > 1 else ""
        raise ValueError(f"`{key}` must be set: the config leaves it ??? (required); add {key}=<value> to the "
                         f"command line{more}")


def _select(cfg: DictConfig, key: str) -> Any:
    """The value at dotted ``key`` (resolved), or _ABSENT where this config has no such key."""
    return OmegaConf.select(cfg, key, default=_ABSENT, throw_on_missing=False)


def check_fields(cfg: DictConfig) -> None:
    for field in FIELDS:
        value = _select(cfg, field.key)
        if value is _ABSENT:
            continue
        if isinstance(value, (DictConfig, ListConfig)):
            value = OmegaConf.to_container(value, resolve=True)
        if not field.check(value):
            raise ValueError(f"`{field.key}` must be {field.allowed}; got {value!r} (e.g. {field.example})")


def _entry_owner(name: str, group: str) -> str:
    if group == "callbacks" and name in compression_entries():
        return (f"add {name} to compression=[...] (e.g. compression=[{name}]), which defines "
                f"callbacks.{name}._target_")
    known = sorted(callback_targets()) if group == "callbacks" else []
    listing = f"; entries with a config file: {', '.join(known)}" if known else ""
    return f"every {group} entry needs a _target_ (a class to build){listing}"


def check_callbacks(cfg: DictConfig) -> None:
    """Every entry under callbacks is a node with a ``_target_`` (or null = disabled).

    (Not enforced under logger: the mini presets switch logger=none while their parent preset
    still sets logger.wandb.group, which is meant to fall away.)"""
    for group in ("callbacks",):
        node = cfg.get(group)
        if not isinstance(node, DictConfig):
            continue
        for name in node:
            entry = node[name]
            if entry is None:
                continue
            if not isinstance(entry, DictConfig):
                raise TypeError(f"`{group}.{name}` must be a config node with a _target_ (or null); got {entry!r}")
            if "_target_" not in entry:
                keys = ", ".join(f"{group}.{name}.{k}" for k in entry)
                raise ValueError(f"{group}.{name} has no _target_: {_entry_owner(name, group)}; "
                                 f"as it is, {keys or 'it'} would be silently ignored")


def _target_nodes(node: DictConfig, path: str):
    """(path, node) of every node with a ``_target_``, outermost first (hydra's own node excluded)."""
    if "_target_" in node:
        yield path, node
    for key in node:
        if not path and key == "hydra":
            continue
        child = node._get_node(key)
        if isinstance(child, DictConfig) and not child._is_none() and not child._is_missing():
            yield from _target_nodes(node[key], f"{path}.{key}" if path else str(key))


# Arguments pipeline.build.build passes itself (not config keys) to the object of a group.
INJECTED: dict[str, frozenset[str]] = {
    "optimizer": frozenset({"params"}),
    "scheduler": frozenset({"optimizer", "total_steps", "steps_per_epoch"}),
    "model": frozenset({"num_classes"}),
    "module": frozenset({"net", "net_spec", "optimizer", "scheduler"}),
    "trainer": frozenset({"callbacks", "logger"}),
}


def check_targets(cfg: DictConfig) -> None:
    """Each ``_target_`` imports, and every key beside it is one of its arguments."""
    for path, node in _target_nodes(cfg, ""):
        target = node.get("_target_")
        if not isinstance(target, str):
            continue
        try:
            obj = locate(target)
        except Exception as exc:  # ImportError, AttributeError, hydra's wrappers
            raise ValueError(f"`{path}._target_`={target!r} cannot be imported ({type(exc).__name__}); "
                             "check the spelling of the class path") from None
        valid = accepted_keys(obj)
        if valid is None:  # takes **kwargs: anything goes through
            continue
        valid = [k for k in valid if k not in INJECTED.get(path, ())]
        for key in node:
            if key not in HYDRA_KEYS and key not in valid:
                raise ValueError(unknown_key_message(path, str(key), target, valid))


def _needs_no_training(cfg: DictConfig) -> str | None:
    """Why a run with no training epoch is still meaningful, or None."""
    if cfg.get("init_from"):
        return "init_from"
    if cfg.get("ckpt_path"):
        return "ckpt_path"
    calibration = calibration_only_entries(cfg.get("callbacks"))
    return calibration[0] if calibration else None


def check_max_epochs(cfg: DictConfig) -> None:
    """max_epochs=0 trains nothing: only meaningful for given weights or a calibration-only entry."""
    epochs = _select(cfg, "trainer.max_epochs")
    if epochs != 0 or _select(cfg, "trainer.fast_dev_run") not in (False, 0, _ABSENT) or cfg.get("protocol"):
        return
    max_steps = _select(cfg, "trainer.max_steps")
    if _is_int(max_steps) and max_steps > 0:
        return
    if _needs_no_training(cfg) is None:
        raise ValueError("`trainer.max_epochs`=0 would report an untrained network as the run's result; "
                         "set trainer.max_epochs >= 1, or keep 0 only to evaluate given weights (init_from="
                         "<run>/model.pt) or with a calibration-only entry (compression=[ptq])")


def check_compression_list() -> None:
    """The command line's compression lists (this job's), with no entry twice (Hydra would merge them)."""
    from hydra.core.hydra_config import HydraConfig

    if not HydraConfig.initialized():
        return
    overrides = list(HydraConfig.get().overrides.task)
    from netcompress.pipeline.preflight import check_overrides

    check_overrides(overrides, callback_keys=False)

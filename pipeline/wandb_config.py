"""Weights & Biases run config, tags and end-of-run panels, from the run's own config and results.

The idea of lightning-hydra-template's ``log_hyperparameters``: the whole resolved Hydra config is
the run's config (here flattened to dotted keys, ``callbacks.magnitude_pruning.sparsity``, so the
wandb run table can filter and group by any setting), and the run is tagged with its compression
entries. At the end of a run: the scalar results as summary, the per-class accuracy / forgetting
table of the retention evaluator (Hooker et al. 2019) and the saliency grid image, when present.
"""
from __future__ import annotations

import logging
from pathlib import Path
from typing import Any, Mapping

from omegaconf import DictConfig, OmegaConf

from netcompress.pipeline.entries import compression_entries, entry_names, locate

log = logging.getLogger(__name__)

SKIPPED = ("hydra",)  # not part of the app config a run is made from
PER_CLASS_COLUMNS = {  # wandb table column -> results.json key (evaluation/retention.py)
    "child_acc1": "retention/per_class_acc1",
    "parent_acc1": "retention/parent_per_class_acc1",
    "change": "retention/per_class_acc1_change",
    "forgetting": "retention/per_class_forgetting",
}
SALIENCY_GRID = "saliency/grid_file"  # PNG name in the run folder (evaluation/saliency.py)


def resolved_config(cfg: DictConfig | Mapping) -> dict:
    """``cfg`` as plain containers, interpolations resolved (left as written where one cannot be,
    e.g. ``${hydra:...}`` outside a Hydra app)."""
    if not isinstance(cfg, DictConfig):
        return dict(cfg)
    try:
        return OmegaConf.to_container(cfg, resolve=True)
    except Exception:  # noqa: BLE001 - an unresolvable interpolation: keep its text
        return OmegaConf.to_container(cfg, resolve=False)


def flatten(node: Mapping, prefix: str = "") -> dict[str, Any]:
    """``{"a": {"b": 1}}`` -> ``{"a.b": 1}``; lists stay values, an empty mapping stays ``{}``."""
    flat: dict[str, Any] = {}
    for key, value in node.items():
        if not prefix and key in SKIPPED:
            continue
        name = f"{prefix}{key}"
        if isinstance(value, Mapping) and value:
            flat.update(flatten(value, f"{name}."))
        else:
            flat[name] = dict(value) if isinstance(value, Mapping) else value
    return flat


def flat_config(cfg: DictConfig | Mapping) -> dict[str, Any]:
    """The run's resolved config as dotted keys (the wandb run config)."""
    return flatten(resolved_config(cfg))


def compression_tags(cfg: DictConfig | Mapping) -> list[str]:
    """The run's compression entries (``compression=[...]``, in config order), e.g. ``["magnitude_pruning", "kd"]``."""
    known = set(compression_entries())
    return [name for name in entry_names(cfg.get("callbacks")) if name in known]


def run_tags(cfg: DictConfig | Mapping, given: Any = None) -> list[str]:
    """``given`` tags (the logger config's, normally ``${tags}``) then the compression entries, once each."""
    tags: list[str] = []
    for tag in [*(given or []), *compression_tags(cfg)]:
        if str(tag) not in tags:
            tags.append(str(tag))
    return tags


def is_wandb_entry(entry: Mapping) -> bool:
    """Whether a logger entry builds a Lightning WandbLogger (or a subclass)."""
    try:
        target = locate(str(entry.get("_target_")))
    except (ImportError, AttributeError):
        return False  # the config checks name the bad _target_
    from pytorch_lightning.loggers import WandbLogger

    return isinstance(target, type) and issubclass(target, WandbLogger)


def wandb_logger(entry: DictConfig, cfg: DictConfig, instantiate) -> Any:
    """The WandbLogger of ``entry`` with the run's flattened config and tags (passed to ``wandb.init``);
    a ``config`` the entry sets itself is merged over the flattened one."""
    partial = instantiate(entry, _partial_=True)
    own, tags = (OmegaConf.to_container(v, resolve=True) if OmegaConf.is_config(v) else v
                 for v in (entry.get("config"), entry.get("tags")))
    config = {**flat_config(cfg), **(own or {})}
    return partial(config=config, tags=run_tags(cfg, tags))


# ----- end of run ------------------------------------------------------------------------------
def per_class_rows(results: Mapping) -> list[list]:
    """``[class, child_acc1, parent_acc1, change, forgetting]`` per class (None where a key is absent);
    empty when the results have no per-class figures."""
    columns = {name: results.get(key) for name, key in PER_CLASS_COLUMNS.items()}
    lengths = {len(v) for v in columns.values() if isinstance(v, list)}
    if not lengths:
        return []
    n = max(lengths)
    return [[c, *((v[c] if isinstance(v, list) and c < len(v) else None) for v in columns.values())]
            for c in range(n)]


def log_run_end(experiment, results: Mapping, output_dir: Path | None) -> dict[str, Any]:
    """Summary of the scalar results, plus ``retention/per_class`` (a wandb.Table) and
    ``saliency/grid`` (a wandb.Image) when the results have them; returns what was logged."""
    import wandb

    experiment.summary.update({k: v for k, v in results.items() if not isinstance(v, (dict, list))})
    panels: dict[str, Any] = {}
    rows = per_class_rows(results)
    if rows:
        panels["retention/per_class"] = wandb.Table(columns=["class", *PER_CLASS_COLUMNS], data=rows)
    grid = results.get(SALIENCY_GRID)
    if grid and output_dir is not None:
        path = Path(output_dir) / str(grid)
        if path.is_file():
            panels["saliency/grid"] = wandb.Image(str(path), caption=path.name)
        else:
            log.warning("%s=%r names no file in %s; not logged to wandb", SALIENCY_GRID, grid, output_dir)
    if panels:
        experiment.log(panels)
    return panels


__all__ = ["flatten", "flat_config", "compression_tags", "run_tags", "is_wandb_entry", "wandb_logger",
           "per_class_rows", "log_run_end"]

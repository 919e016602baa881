"""What the config folder offers: compression entries, callback entries and their classes' arguments.

Shared by the command-line pre-flight (which runs before Hydra composes) and the config checks
(which see the composed config), so both name the same valid entries and keys.
"""
from __future__ import annotations

import difflib
import inspect
from functools import lru_cache
from pathlib import Path
from typing import Any, Callable, Mapping

from omegaconf import OmegaConf

CONF_DIR = Path(__file__).resolve().parents[1] / "conf"
# Keys Hydra's instantiate reads itself; allowed beside any _target_.
HYDRA_KEYS = frozenset({"_target_", "_partial_", "_recursive_", "_convert_", "_args_"})


def compression_entries(conf_dir: Path = CONF_DIR) -> list[str]:
    """Names usable in ``compression=[...]``: one per ``conf/compression/<name>.yaml``."""
    return sorted(p.stem for p in (conf_dir / "compression").glob("*.yaml"))


@lru_cache(maxsize=4)
def callback_targets(conf_dir: Path = CONF_DIR) -> dict[str, str]:
    """``{entry: _target_}`` of every callbacks entry a config file defines (conf/compression, conf/callbacks)."""
    targets: dict[str, str] = {}
    for group in ("callbacks", "compression"):
        for path in sorted((conf_dir / group).glob("*.yaml")):
            content = OmegaConf.to_container(OmegaConf.load(path), resolve=False)
            for name, entry in (content or {}).items():
                if isinstance(entry, dict) and isinstance(entry.get("_target_"), str):
                    targets[name] = entry["_target_"]
    return targets


def locate(target: str) -> Any:
    """The class or function a ``_target_`` string names (raises ImportError/AttributeError)."""
    from hydra.utils import get_object

    return get_object(target)


def accepted_keys(target: Any) -> list[str] | None:
    """Keyword arguments ``target`` (a class or function) accepts; None if it takes ``**kwargs``."""
    try:
        signature = inspect.signature(target)
    except (TypeError, ValueError):
        return None
    names = []
    for parameter in signature.parameters.values():
        if parameter.kind is inspect.Parameter.VAR_KEYWORD:
            return None
        if parameter.kind in (inspect.Parameter.POSITIONAL_OR_KEYWORD, inspect.Parameter.KEYWORD_ONLY):
            names.append(parameter.name)
    return names


def did_you_mean(word: str, choices: list[str]) -> str:
    close = difflib.get_close_matches(word, choices, n=3, cutoff=0.6)
    return f" (did you mean {' or '.join(close)}?)" if close else ""


def unknown_key_message(path: str, key: str, target: str, valid: list[str]) -> str:
    return (f"`{path}.{key}` is not an argument of {target}{did_you_mean(key, valid)}; "
            f"valid keys under {path}: {', '.join(valid)}")


# ----- what a compression entry does to the run (registries keyed by _target_) -----------------
# Entries that physically change layer widths or swap layers (so a checkpoint of this run may hold
# a thinner network than model.* builds): target -> predicate on the entry's config.
RESHAPING_TARGETS: dict[str, Callable[[Mapping], bool]] = {
    "netcompress.callbacks.slimming.Slimming": lambda entry: True,
    "netcompress.callbacks.magnitude_pruning.MagnitudePruning": lambda entry: bool(entry.get("remove_filters")),
    "netcompress.callbacks.lowrank.LowRank": lambda entry: True,
}
# Entries whose whole job needs no training epoch (calibration only): trainer.max_epochs=0 is fine.
CALIBRATION_ONLY_TARGETS = frozenset({"netcompress.callbacks.ptq.PTQ"})


def _entries(callbacks: Mapping | None) -> list[tuple[str, Mapping]]:
    return [(name, entry) for name, entry in (callbacks or {}).items()
            if isinstance(entry, Mapping) and isinstance(entry.get("_target_"), str)]


def reshaping_entries(callbacks: Mapping | None) -> list[str]:
    """Names of the callbacks entries that change the network's layer widths or layers."""
    return [name for name, entry in _entries(callbacks)
            if RESHAPING_TARGETS.get(entry["_target_"], lambda e: False)(entry)]


def calibration_only_entries(callbacks: Mapping | None) -> list[str]:
    return [name for name, entry in _entries(callbacks) if entry["_target_"] in CALIBRATION_ONLY_TARGETS]


def reshaping_hint() -> str:
    return "slimming, magnitude_pruning with remove_filters=true, lowrank"

"""What the config folder offers: compression entries, callback entries and their classes' arguments.

Shared by the command-line pre-flight (which runs before Hydra composes) and the config checks
(which see the composed config), so both name the same valid entries and keys.
"""
from __future__ import annotations

import difflib
import inspect
from functools import lru_cache
from pathlib import Path
from typing import Any, Mapping

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


# ----- what a compression entry does to the run (the capabilities its class declares) ----------
def _entries(callbacks: Mapping | None) -> list[tuple[str, Mapping]]:
    return [(name, entry) for name, entry in (callbacks or {}).items()
            if isinstance(entry, Mapping) and isinstance(entry.get("_target_"), str)]


def entry_names(callbacks: Mapping | None) -> list[str]:
    """Names of the callbacks entries that build an object, in config order (as ``instantiate_group``)."""
    return [name for name, _ in _entries(callbacks)]


def _capabilities(entry: Mapping) -> frozenset[str]:
    """``pipeline.combinations.capabilities_of`` the entry's class with its arguments; none if unknown."""
    from netcompress.pipeline.combinations import capabilities_of

    try:
        target = locate(entry["_target_"])
    except (ImportError, AttributeError):
        return frozenset()  # the config checks name the bad _target_
    return capabilities_of(target, entry) if isinstance(target, type) else frozenset()


def reshaping_entries(callbacks: Mapping | None) -> list[str]:
    """Entries that remove channels or swap layers (so a checkpoint may hold a thinner network)."""
    return [name for name, entry in _entries(callbacks) if "reshapes_net" in _capabilities(entry)]


def calibration_only_entries(callbacks: Mapping | None) -> list[str]:
    """Entries whose whole job needs no training epoch (``trainer.max_epochs=0`` is fine)."""
    return [name for name, entry in _entries(callbacks) if "calibration_only" in _capabilities(entry)]

"""Argument checks shared by the callbacks and protocols: one copy each, messages that name the key.

Messages follow the house form "`key` must be ...; got <value>" (Lightning's own callbacks).
"""
from __future__ import annotations

from typing import Any

from omegaconf import DictConfig, ListConfig, OmegaConf


def plain(value: Any) -> Any:
    """A config value as plain Python (dict/list), resolved; anything else unchanged."""
    return OmegaConf.to_container(value, resolve=True) if isinstance(value, (DictConfig, ListConfig)) else value


def check_int(value: Any, key: str, low: int, high: int | None = None, what: str = "") -> int:
    """``value`` as an int in ``low..high`` (no upper bound when ``high`` is None); bools are refused.

    ``what`` is an optional hint appended to the message, e.g. "(2**bits shared values per layer)".
    """
    if isinstance(value, bool) or not isinstance(value, int) or value < low or (high is not None and value > high):
        bound = f"in {low}..{high}" if high is not None else f">= {low}"
        raise ValueError(f"`{key}` must be an int {bound}{' ' + what if what else ''}; got {value!r}")
    return value

"""Config-value checks shared by the datamodules: each error names the config key, the value
received and what would be valid."""
from __future__ import annotations

from collections.abc import Sequence


def check_positive_int(key: str, value: object, allow_none: bool = False) -> None:
    """Raise ``ValueError`` naming config key ``key`` unless ``value`` is an int >= 1 (or None)."""
    if value is None and allow_none:
        return
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        valid = "a positive int" + (" or null" if allow_none else "")
        raise ValueError(f"`{key}` must be {valid}; got {value!r}")


def check_nonnegative_int(key: str, value: object) -> None:
    """Raise ``ValueError`` naming config key ``key`` unless ``value`` is an int >= 0."""
    if not isinstance(value, int) or isinstance(value, bool) or value < 0:
        raise ValueError(f"`{key}` must be an int >= 0; got {value!r}")


def as_float_tuple(key: str, values: Sequence[float], channels: int = 3) -> tuple[float, ...]:
    """Validate a per-channel statistic from config (``mean``/``std``) and return it as a tuple."""
    try:
        out = tuple(float(v) for v in values)
    except (TypeError, ValueError):
        out = ()
    if len(out) != channels:
        raise ValueError(f"`{key}` must be {channels} numbers (one per channel); got {values!r}")
    return out

"""Which layers a compression technique touches: module-name patterns, first conv and classifier skipped.

Every compression config selects layers the same way (CONVENTIONS 4): ``include``/``exclude``
fnmatch patterns over module names, and ``skip_first_last`` (default true) leaves alone the
stem conv and the classifier that timm's ``pretrained_cfg`` names (``first_conv``,
``classifier``), because papers differ on whether to compress them and it must be explicit.
"""
from __future__ import annotations

from fnmatch import fnmatchcase
from typing import Iterable, Mapping, Sequence, TypeVar

from torch import nn

DEFAULT_TYPES: tuple[type, ...] = (nn.Conv2d, nn.Linear)


def first_and_last(net: nn.Module) -> tuple[str | None, str | None]:
    """Names of the stem conv and the classifier (timm pretrained_cfg, else first conv / last linear)."""
    from netcompress.models.factory import first_and_last_layer_names

    return first_and_last_layer_names(net)


T = TypeVar("T")


def _matches(name: str, patterns: Iterable[str]) -> bool:
    return any(fnmatchcase(name, pattern) for pattern in patterns)


def first_match(name: str, by_pattern: Mapping[str, T], default: T | None = None) -> T | None:
    """The value of the first pattern of ``by_pattern`` (in its order) that ``name`` matches, else ``default``.

    The one "first matching pattern wins" rule of per-layer overrides (``layer_sparsity``,
    ``bits_by_pattern``).
    """
    return next((value for pattern, value in by_pattern.items() if fnmatchcase(name, pattern)), default)


def unmatched_patterns(patterns: Iterable[str], names: Iterable[str]) -> list[str]:
    """The patterns that match none of ``names`` (a typo to report before training)."""
    names = list(names)
    return [pattern for pattern in patterns if not any(fnmatchcase(name, pattern) for name in names)]


def select_layers(net: nn.Module, include: Sequence[str] = ("*",), exclude: Sequence[str] = (),
                  skip_first_last: bool = True, types: tuple[type, ...] = DEFAULT_TYPES,
                  key: str = "compression") -> dict[str, nn.Module]:
    """Layers of ``types`` whose names match ``include`` and not ``exclude``, in module order.

    Raises ValueError naming ``key`` when a pattern matches nothing or nothing is left, so a
    typo is caught before training.
    """
    candidates = {name: m for name, m in net.named_modules() if isinstance(m, types)}
    type_names = "/".join(t.__name__ for t in types)
    for pattern in unmatched_patterns(list(include) + list(exclude), candidates):
        shown = ", ".join(list(candidates)[:12]) + (", ..." if len(candidates) > 12 else "")
        raise ValueError(f"{key}: pattern '{pattern}' matches no {type_names} layer of this model; "
                         f"layer names are: {shown}")
    skipped = set(first_and_last(net)) if skip_first_last else set()
    chosen = {name: m for name, m in candidates.items()
              if _matches(name, include) and not _matches(name, exclude) and name not in skipped}
    if not chosen:
        raise ValueError(f"{key}: no {type_names} layer is left after include={list(include)}, "
                         f"exclude={list(exclude)}, skip_first_last={skip_first_last}")
    return chosen

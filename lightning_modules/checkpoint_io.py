"""Is a saved network (``ckpt_path``, ``init_from``) the configured model? Clear errors if not.

Reading the files (``read_saved_net``, ``build_net``, ``load_net``: ``torch.load(weights_only=True)``
only, errors naming the config key) is in ``models.serialization``.

:func:`check_same_model` tells "the configured model, thinned by compression" (a slimmed run's
checkpoint, resumed with its own config) from "another model" (another ``model.name``, width or
class count), which is refused with both architectures named.
"""
from __future__ import annotations

import logging
from typing import Mapping, Sequence

from torch import nn

from netcompress.models.serialization import SavedNet, architecture_of

log = logging.getLogger(__name__)


# ----- is the saved network the configured one? ---------------------------------------------------
def describe_spec(spec: Mapping) -> str:
    """``resnet20_cifar(width=0.5), 10 classes``."""
    kwargs = ", ".join(f"{k}={v}" for k, v in sorted((spec.get("model_kwargs") or {}).items()))
    return f"{spec.get('model_name', '?')}({kwargs}), {spec.get('num_classes', '?')} classes"


def arch_differences(saved: Mapping, configured: Mapping, limit: int = 4) -> str:
    """The layer attributes (widths) and modules that differ, saved vs configured, as one phrase."""
    a, b = saved.get("modules", {}), configured.get("modules", {})
    diffs = [f"{name}.{attr} {a[name].get(attr)} vs {b[name].get(attr)}"
             for name in a if name in b
             for attr in dict.fromkeys([*a[name], *b[name]]) if a[name].get(attr) != b[name].get(attr)]
    parts = []
    if diffs:
        more = f" (+{len(diffs) - limit} more)" if len(diffs) > limit else ""
        parts.append("layer widths saved vs configured: " + ", ".join(diffs[:limit]) + more)
    for label, names in (("only in the saved net", [n for n in a if n not in b]),
                         ("only in the configured net", [n for n in b if n not in a])):
        if names:
            more = f" (+{len(names) - limit} more)" if len(names) > limit else ""
            parts.append(f"modules {label}: " + ", ".join(names[:limit]) + more)
    return "; ".join(parts) or "the same layers"


def _same_dense_model(saved_spec: Mapping, configured: Mapping, configured_arch: Mapping) -> bool:
    """Whether the saved spec builds the configured network (equal specs, or kwargs with the same effect)."""
    if (saved_spec.get("model_name"), saved_spec.get("num_classes")) != \
            (configured.get("model_name"), configured.get("num_classes")):
        return False
    if dict(saved_spec.get("model_kwargs") or {}) == dict(configured.get("model_kwargs") or {}):
        return True
    from netcompress.models.factory import create_model

    try:
        dense = create_model(saved_spec["model_name"], num_classes=saved_spec["num_classes"],
                             **saved_spec.get("model_kwargs", {}))
    except Exception:
        return False
    return architecture_of(dense) == configured_arch


def check_same_model(saved: SavedNet, net: nn.Module, spec: Mapping, thinned_by: Sequence[str] | None) -> None:
    """Refuse a saved network that is not the configured model (``net``, freshly built from ``spec``).

    ``thinned_by``: the config's entries that change layer widths (slimming, ...). A saved net of
    the same model with other widths is accepted silently when this is non-empty, or None
    (init_from: fine-tuning a thinned network is what it is for); with an empty list it is
    accepted with a warning naming the widths. Another model (name, width kwargs, classes) is
    always refused.
    """
    where = f"{saved.key}={str(saved.path)!r}"
    configured_arch = architecture_of(net)
    saved_arch = saved.arch or configured_arch
    if saved.spec.get("model_name") and not _same_dense_model(saved.spec, spec, configured_arch):
        settings = " ".join([f"model.name={saved.spec['model_name']}",
                             *(f"++model.{k}={v}" for k, v in sorted(saved.spec.get("model_kwargs", {}).items()))])
        fix = (f"resume with the model settings that wrote it ({settings}), or start a new run without {saved.key}"
               if saved.key == "ckpt_path" else
               f"to fine-tune that network set {settings}; else point {saved.key} at a run of "
               f"{spec.get('model_name')}")
        raise ValueError(f"{where} holds another model: {describe_spec(saved.spec)}, but the config builds "
                         f"{describe_spec(spec)} ({arch_differences(saved_arch, configured_arch)}); {fix}")
    if saved_arch == configured_arch:
        return
    if not saved.spec.get("model_name") and set(saved_arch.get("modules", {})) != set(configured_arch["modules"]):
        raise ValueError(f"{where} holds another model than the config's {describe_spec(spec)} "
                         f"({arch_differences(saved_arch, configured_arch)}); point {saved.key} at a run of this model")
    if thinned_by is None or thinned_by:
        return  # the same model, thinned by compression: the saved widths are rebuilt on load
    # Not refused: a callback added in code (or an older config) may have thinned it; say so, loudly.
    log.warning("%s holds a thinned %s (%s) but the config has no compression entry that removes channels or "
                "swaps layers (slimming, magnitude_pruning with remove_filters=true, lowrank): the thinned network "
                "is resumed as saved; resume with the configuration that wrote the checkpoint",
                where, describe_spec(spec), arch_differences(saved_arch, configured_arch))

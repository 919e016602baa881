"""Turn a checkpoint or exported model file back into a network, with clear errors for bad files.

Files are read with ``torch.load(weights_only=True)`` only: a file that is not a netcompress
model/checkpoint (a text file, a foreign pickle, one that names code to run) is refused with an
error naming the config key, and its pickled code is never executed.

:func:`check_same_model` tells "the configured model, thinned by compression" (a slimmed run's
checkpoint, resumed with its own config) from "another model" (another ``model.name``, width or
class count), which is refused with both architectures named.
"""
from __future__ import annotations

import logging
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping, Sequence

import torch
from torch import nn

from netcompress.lightning_modules.classification import CHECKPOINT_KEY
from netcompress.models.serialization import FORMAT, architecture_of, reshape_to, why_unreadable

log = logging.getLogger(__name__)
_HINT = "a model.pt or checkpoints/last.ckpt written by run.py"


@dataclass
class SavedNet:
    """What a model.pt or run.py checkpoint says about its network."""

    path: Path
    key: str
    spec: dict = field(default_factory=dict)   # model_name, num_classes, model_kwargs ({} if not recorded)
    arch: dict | None = None                   # models.serialization.architecture_of of the saved net
    state_dict: dict | None = None             # the network's own tensors (no "net." prefix)


def _load(path: Path, key: str, mmap: bool = False) -> Any:
    if not path.is_file():
        raise FileNotFoundError(f"{key}={str(path)!r} does not exist; point {key} at {_HINT} "
                                "(logs/<task_name>/runs/<run>/...)")
    try:
        return torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)
    except Exception as exc:
        raise ValueError(f"{key}={str(path)!r} is not a netcompress model/checkpoint (not a readable checkpoint: "
                         f"{why_unreadable(path, exc)}); point {key} at {_HINT}") from None


def read_checkpoint(path: str | os.PathLike, key: str = "ckpt_path", mmap: bool = False) -> dict:
    """Load a Lightning checkpoint as plain data, or raise an error naming the config key."""
    path = Path(path)
    checkpoint = _load(path, key, mmap)
    if not isinstance(checkpoint, dict) or "state_dict" not in checkpoint:
        raise ValueError(f"{key}={str(path)!r} is not a netcompress model/checkpoint: a torch file without a "
                         f"Lightning state_dict; point {key} at {_HINT}")
    return checkpoint


def read_saved_net(path: str | os.PathLike, key: str, mmap: bool = False) -> SavedNet:
    """The network description in a model.pt (``models.serialization.save_model``) or a run.py .ckpt."""
    path = Path(path)
    payload = _load(path, key, mmap)
    if isinstance(payload, dict) and payload.get("format") == FORMAT:
        spec = {"model_name": payload["model_name"], "num_classes": payload["num_classes"],
                "model_kwargs": dict(payload.get("model_kwargs") or {})}
        return SavedNet(path, key, spec, payload["arch"], payload["state_dict"])
    if not isinstance(payload, dict) or "state_dict" not in payload:
        raise ValueError(f"{key}={str(path)!r} is not a netcompress model/checkpoint: a torch file that is neither "
                         f"a {FORMAT} model file nor a Lightning checkpoint; point {key} at {_HINT}")
    saved = payload.get(CHECKPOINT_KEY) or {}
    prefix = "net."
    state = {k[len(prefix):]: v for k, v in payload["state_dict"].items() if k.startswith(prefix)}
    return SavedNet(path, key, dict(saved.get("net_spec") or {}), saved.get("arch"), state)


def build_net(saved: SavedNet) -> nn.Module:
    """The saved network (thinned widths and swapped layers included), in eval mode."""
    from netcompress.models.factory import create_model

    spec = saved.spec
    if "model_name" not in spec or saved.arch is None:
        raise ValueError(f"{saved.key}={str(saved.path)!r} does not record which model it holds (not written by "
                         "run.py)")
    net = create_model(spec["model_name"], num_classes=spec["num_classes"], **spec.get("model_kwargs", {}))
    reshape_to(net, saved.arch)
    net.load_state_dict(saved.state_dict)
    return net.eval()


def load_net(path: str | os.PathLike, key: str = "ckpt_path") -> nn.Module:
    """A network from a run.py checkpoint (.ckpt) or an exported model file (model.pt), in eval mode."""
    return build_net(read_saved_net(path, key))


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

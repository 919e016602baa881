"""Pickle-free save/load of (possibly thinned) timm models: name + kwargs + layer shapes + state_dict.

Physical channel removal (network slimming, structured pruning) changes layer widths, so the
timm factory alone no longer rebuilds the network. We record every shape-defining module
attribute and every tensor shape, and rebuild by creating the dense model and resizing it.
The file holds only tensors, numbers and strings, so it loads with ``weights_only=True``.

Modules that compression swaps in for a layer (e.g. a low-rank pair for a Linear) expose
``netcompress_spec() -> dict`` with a ``"type"``; ``architecture_of`` records those specs under
``"replace"`` and ``reshape_to`` rebuilds them first with the builder registered for the type.
"""
from __future__ import annotations

import importlib
import os
import re
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch
from torch import nn

FORMAT = "netcompress-model/1"
# The key under which the LightningModule stores net_spec and arch in a run.py .ckpt.
CHECKPOINT_KEY = "netcompress"

# Module attributes that determine tensor shapes or how the forward uses them.
_SHAPE_ATTRS = (
    "in_channels", "out_channels", "groups", "num_features", "in_features", "out_features",
    "normalized_shape", "num_channels", "num_groups", "embed_dim", "num_heads", "head_dim",
)


# spec["type"] -> fn(spec) -> nn.Module, for modules that replace a layer (see netcompress_spec).
MODULE_BUILDERS: dict[str, Callable[[dict], nn.Module]] = {}
# Modules whose import registers builders; imported on demand so load_model works in a fresh process.
BUILDER_PROVIDERS = ("netcompress.compression.lowrank",)


def register_module_builder(kind: str, builder: Callable[[dict], nn.Module]) -> None:
    MODULE_BUILDERS[kind] = builder


def _builder(kind: str) -> Callable[[dict], nn.Module]:
    if kind not in MODULE_BUILDERS:
        for provider in BUILDER_PROVIDERS:
            importlib.import_module(provider)
    if kind not in MODULE_BUILDERS:
        raise ValueError(f"saved architecture replaces a layer by an unknown module type {kind!r}; "
                         f"known: {sorted(MODULE_BUILDERS)}")
    return MODULE_BUILDERS[kind]


def architecture_of(net: nn.Module) -> dict[str, Any]:
    """Shapes of every parameter/buffer and the shape-defining attributes of every module."""
    tensors = {k: list(v.shape) for k, v in net.state_dict().items()}
    replace = {name: m.netcompress_spec() for name, m in net.named_modules() if hasattr(m, "netcompress_spec")}
    modules = {}
    for name, module in net.named_modules():
        attrs = {}
        for attr in _SHAPE_ATTRS:
            value = module.__dict__.get(attr)
            if isinstance(value, (int, tuple, list)) and not isinstance(value, bool):
                attrs[attr] = list(value) if isinstance(value, (tuple, list)) else value
        if attrs:
            modules[name] = attrs
    arch = {"tensors": tensors, "modules": modules}
    if replace:
        arch["replace"] = replace
    return arch


def reshape_to(net: nn.Module, arch: dict[str, Any]) -> nn.Module:
    """Resize ``net`` in place so its layers have the widths recorded in ``arch``.

    Values are left uninitialised: the caller loads a state_dict right after.
    """
    for name, spec in arch.get("replace", {}).items():  # outermost first: named_modules order
        parent_name, _, leaf = name.rpartition(".")
        try:
            parent = net.get_submodule(parent_name) if parent_name else net
        except AttributeError as exc:
            raise ValueError(f"saved architecture replaces module '{name}' that the rebuilt model lacks") from exc
        setattr(parent, leaf, _builder(spec["type"])(dict(spec)))
    named = dict(net.named_modules())
    for name, attrs in arch["modules"].items():
        if name not in named:
            raise ValueError(
                f"saved architecture has a module '{name}' that the rebuilt model lacks; "
                "was the file made with another model.name or model kwargs?"
            )
        module = named[name]
        for attr, value in attrs.items():
            current = getattr(module, attr, None)
            setattr(module, attr, tuple(value) if isinstance(current, tuple) else value)
    for key, shape in arch["tensors"].items():
        owner_name, _, leaf = key.rpartition(".")
        owner = named.get(owner_name)
        if owner is None:
            raise ValueError(f"saved tensor '{key}' has no owning module in the rebuilt model")
        current = owner._parameters.get(leaf) if leaf in owner._parameters else owner._buffers.get(leaf)
        if current is None or list(current.shape) == list(shape):
            continue
        fresh = torch.empty(shape, dtype=current.dtype, device=current.device)
        if leaf in owner._parameters:
            owner._parameters[leaf] = nn.Parameter(fresh, requires_grad=current.requires_grad)
        else:
            owner._buffers[leaf] = fresh
    return net


def save_model(net: nn.Module, path: str | os.PathLike, model_name: str, num_classes: int,
               model_kwargs: dict | None = None, extra: dict | None = None) -> int:
    """Write the deployable model file atomically; returns its size in bytes."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    payload = {
        "format": FORMAT,
        "model_name": model_name,
        "num_classes": int(num_classes),
        "model_kwargs": dict(model_kwargs or {}),
        "arch": architecture_of(net),
        "state_dict": {k: v.detach().cpu() for k, v in net.state_dict().items()},
        "extra": dict(extra or {}),
    }
    tmp = path.with_suffix(path.suffix + ".tmp")
    torch.save(payload, tmp)
    os.replace(tmp, path)
    return path.stat().st_size


def why_unreadable(path: Path, exc: BaseException) -> str:
    """Why ``torch.load(path, weights_only=True)`` failed, in words that lead somewhere.

    Never repeats torch's advice to retry with ``weights_only=False``: for a file that is not
    ours that would run whatever code its pickle names.
    """
    message = str(exc)
    code = re.search(r"Unsupported global: GLOBAL ([\w.]+)", message)
    if code:
        return f"it is a pickle that asks to run {code.group(1)}, which is never executed"
    with open(path, "rb") as f:
        head = f.read(4)
    if zipfile.is_zipfile(path):
        return "a torch file that holds more than tensors, numbers and strings, or is damaged"
    if head[:1] == b"\x80":
        return "a plain pickle, not a torch.save file (not unpickled: a pickle can run code)"
    return "neither a torch.save zip file nor a pickle: a text file, or truncated or corrupt"


def load_model(path: str | os.PathLike) -> nn.Module:
    """Rebuild a model saved by :func:`save_model` (no pickled code is executed)."""
    from netcompress.models.factory import create_model

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"model file {path} does not exist")
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # truncated or foreign file
        raise ValueError(f"model file {path} is not a netcompress model/checkpoint ({why_unreadable(path, exc)})"
                         ) from None
    if not isinstance(payload, dict) or payload.get("format") != FORMAT:
        raise ValueError(f"model file {path} is not a {FORMAT} file (a Lightning checkpoint? "
                         "use load_net)")
    net = create_model(payload["model_name"], num_classes=payload["num_classes"], **payload["model_kwargs"])
    reshape_to(net, payload["arch"])
    net.load_state_dict(payload["state_dict"])
    return net.eval()


# ----- any saved network: model.pt or a run.py checkpoint (.ckpt) ----------------------------------
_HINT = "a model.pt or checkpoints/last.ckpt written by run.py"


@dataclass
class SavedNet:
    """What a model.pt or run.py checkpoint says about its network."""

    path: Path
    key: str
    spec: dict = field(default_factory=dict)   # model_name, num_classes, model_kwargs ({} if not recorded)
    arch: dict | None = None                   # architecture_of the saved net
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

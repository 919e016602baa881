"""Turn a checkpoint or exported model file back into a network, with clear errors for bad files."""
from __future__ import annotations

import os
from pathlib import Path

import torch
from torch import nn

from lightning_modules.classification import CHECKPOINT_KEY
from models.serialization import FORMAT, load_model, reshape_to


def read_checkpoint(path: str | os.PathLike, key: str = "ckpt_path") -> dict:
    """Load a Lightning checkpoint as plain data, or raise an error naming the config key."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{key}={str(path)!r} does not exist; point {key} at a .ckpt written by run.py "
                                "(outputs/<date>/<time>/checkpoints/last.ckpt)")
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise ValueError(f"{key}={str(path)!r} is not a readable checkpoint (truncated or corrupt?): {exc}") from exc
    if not isinstance(checkpoint, dict) or "state_dict" not in checkpoint:
        raise ValueError(f"{key}={str(path)!r} has no state_dict; is it a Lightning checkpoint?")
    return checkpoint


def load_net(path: str | os.PathLike, key: str = "ckpt_path") -> nn.Module:
    """A network from a run.py checkpoint (.ckpt) or an exported model file (model.pt), in eval mode."""
    from models.factory import create_model

    path = Path(path)
    if path.is_file() and path.suffix == ".pt":
        head = torch.load(path, map_location="cpu", weights_only=True)
        if isinstance(head, dict) and head.get("format") == FORMAT:
            return load_model(path)
    checkpoint = read_checkpoint(path, key)
    saved = checkpoint.get(CHECKPOINT_KEY) or {}
    spec = saved.get("net_spec") or {}
    if "model_name" not in spec:
        raise ValueError(f"{key}={str(path)!r} does not record which model it holds (not written by run.py)")
    net = create_model(spec["model_name"], num_classes=spec["num_classes"], **spec.get("model_kwargs", {}))
    reshape_to(net, saved["arch"])
    prefix = "net."
    state = {k[len(prefix):]: v for k, v in checkpoint["state_dict"].items() if k.startswith(prefix)}
    net.load_state_dict(state)
    return net.eval()

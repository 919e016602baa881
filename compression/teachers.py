"""Where distillation teachers come from: a run's checkpoint or model.pt, a timm name, or ``initial``.

A teacher source is one string:

* ``initial``: a frozen copy of the student as it is when fit starts (with ``init_from=<dense
  run>/model.pt`` the dense parent teaches its own pruned or slimmed version, as in
  prune-then-distill);
* a path to a ``.ckpt`` written by run.py or an exported ``model.pt`` (thinned nets included,
  rebuilt by ``models.serialization.load_net``);
* a timm model name (``resnet56_cifar``, ``hf-hub:org/repo``), with its pretrained weights,
  which must be available offline.

A list of sources is an ensemble (Hinton et al. 2015): the callback averages the teachers'
softened probabilities. Teachers come back frozen: eval mode, ``requires_grad=False``.
"""
from __future__ import annotations

import copy
import difflib
import os
import warnings
from pathlib import Path
from typing import Any, Sequence

import timm
from torch import nn

INITIAL = "initial"
_PATH_SUFFIXES = (".ckpt", ".pt", ".pth")
_TIMM_PREFIXES = ("hf-hub:", "local-dir:")


def kind_of(source: str) -> str:
    """'initial', 'path' or 'timm' for one teacher source string."""
    if source == INITIAL:
        return "initial"
    if source.startswith(_TIMM_PREFIXES):
        return "timm"
    if source.endswith(_PATH_SUFFIXES) or os.sep in source or "/" in source or Path(source).is_file():
        return "path"
    return "timm"


def check_sources(value: Any, key: str) -> list[str]:
    """The teacher sources as a list of strings; missing files and unknown timm names fail here."""
    if isinstance(value, str):
        sources = [value]
    elif isinstance(value, Sequence) and not isinstance(value, (bytes, str)):
        sources = list(value)
    else:
        sources = None
    if not sources or not all(isinstance(s, str) and s for s in sources):
        raise ValueError(f"{key} must be a teacher source or a non-empty list of them (a run's .ckpt or "
                         f"model.pt, a timm model name, or '{INITIAL}'); got {value!r}")
    for source in sources:
        kind = kind_of(source)
        if kind == "path" and not Path(source).is_file():
            raise FileNotFoundError(f"{key}: teacher file {source!r} does not exist; point it at a run's "
                                    "model.pt or checkpoints/last.ckpt")
        if kind == "timm" and ":" not in source and not timm.is_model(source):
            close = difflib.get_close_matches(source, timm.list_models(), n=5, cutoff=0.6)
            hint = f"did you mean: {', '.join(close)}? " if close else ""
            raise ValueError(f"{key}: {source!r} is neither an existing file nor a timm model name; {hint}"
                             f"(a path must exist; '{INITIAL}' means a frozen copy of the student at fit start)")
    return sources


def num_classes_of(net: nn.Module) -> int | None:
    """Output classes of a classifier network (timm ``num_classes`` or the classifier's out_features)."""
    get_classifier = getattr(net, "get_classifier", None)
    if get_classifier is not None:
        out = getattr(get_classifier(), "out_features", None)
        if out:
            return int(out)
    classes = getattr(net, "num_classes", None)
    return int(classes) if classes else None


def freeze(net: nn.Module) -> nn.Module:
    """Eval mode and no gradients: teachers are never trained."""
    net.eval()
    net.requires_grad_(False)
    return net


def _timm_teacher(name: str, num_classes: int, pretrained: bool, kwargs: dict, key: str) -> nn.Module:
    from netcompress.models.factory import create_model

    if not pretrained:
        warnings.warn(f"{key}: teacher {name!r} is built with random weights ({key.rsplit('.', 1)[0]}"
                      ".pretrained=false); useful for smoke tests only", stacklevel=3)
        return create_model(name, num_classes=num_classes, **kwargs)
    # Keep the pretrained head: timm would silently replace it by a random one for another class count.
    classes = num_classes
    if ":" not in name:
        cfg = timm.models.get_pretrained_cfg(name)
        classes = int(cfg.num_classes) if cfg is not None and cfg.num_classes else num_classes
    try:
        return create_model(name, num_classes=classes, pretrained=True, **kwargs)
    except (ValueError, RuntimeError, FileNotFoundError) as exc:
        raise type(exc)(f"{key}: cannot load pretrained teacher {name!r}: {exc}") from exc


def load_teacher(source: str, student: nn.Module, pretrained: bool = True, timm_kwargs: dict | None = None,
                 key: str = "callbacks.kd.teachers") -> nn.Module:
    """The frozen teacher network of one source, on the CPU; its class count must equal the student's."""
    from netcompress.models.serialization import load_net

    student_classes = num_classes_of(student)
    kind = kind_of(source)
    if kind == "initial":
        net = copy.deepcopy(student)
    elif kind == "path":
        net = load_net(source, key=key)
    else:
        net = _timm_teacher(source, student_classes, pretrained, dict(timm_kwargs or {}), key)
    teacher_classes = num_classes_of(net)
    if teacher_classes != student_classes:
        raise ValueError(f"{key}: teacher {source!r} predicts {teacher_classes} classes but the student "
                         f"predicts {student_classes}; distillation needs the same classes (a teacher "
                         "trained on the same data set)")
    return freeze(net)

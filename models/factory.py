"""Model factory: ``create_model`` (timm by name, offline-safe) and shared helpers for the CIFAR nets.

Every network is built through timm's registry, so the CIFAR architectures registered in
``models/`` (He et al. 2016 ResNets, Liu et al. 2017 slimming VGGs, Frankle & Carbin 2019
Conv-2/4/6) and any timm ImageNet model share one API: ``forward_features``/``forward_head``,
``get_classifier``/``reset_classifier`` and ``pretrained_cfg["first_conv"]``/``["classifier"]``,
which compression callbacks read to leave the stem and the classifier alone.
"""
from __future__ import annotations

import difflib
import os
from typing import Any, Callable, Dict, Optional, Tuple

import timm
import torch.nn as nn
from timm.models import build_model_with_cfg, resolve_pretrained_cfg

__all__ = [
    "CIFAR_MEAN", "CIFAR_STD", "cifar_cfg", "build_cifar_model", "check_width",
    "create_model", "model_input_size", "first_and_last_layer_names",
]

# CIFAR-10 training-set channel statistics (the values used by the pruning papers' code).
CIFAR_MEAN = (0.4914, 0.4822, 0.4465)
CIFAR_STD = (0.2470, 0.2435, 0.2616)

_LIST_HINT = "(python -c 'import timm, netcompress.models; print(timm.list_models(\"*cifar*\"))' lists them)"
_PRETRAINED_HINT = (
    "set model.pretrained=false, or make the weights available offline: put them in the Hugging Face "
    "cache (HF_HOME) or pass +model.pretrained_cfg_overlay='{file: /path/to/weights.pth}'"
)


def cifar_cfg(first_conv: str, classifier: str, **kwargs: Any) -> Dict[str, Any]:
    """timm pretrained_cfg for a 32x32 CIFAR net trained from scratch (no weight source)."""
    return {
        "url": "", "num_classes": 10, "input_size": (3, 32, 32), "pool_size": None,
        "crop_pct": 1.0, "interpolation": "bilinear", "mean": CIFAR_MEAN, "std": CIFAR_STD,
        "first_conv": first_conv, "classifier": classifier, **kwargs,
    }


def check_width(width: Any) -> float:
    """Validate the ``model.width`` multiplier shared by all CIFAR nets."""
    if isinstance(width, bool) or not isinstance(width, (int, float)) or not width > 0:
        raise ValueError(f"model.width must be a positive int or float (e.g. 0.5, 1, 2); got {width!r}")
    return float(width)


def _has_weight_source(cfg: Any) -> bool:
    return bool(cfg.url or cfg.file or cfg.hf_hub_id or cfg.state_dict)


def build_cifar_model(model_cls: Callable[..., nn.Module], variant: str, pretrained: bool,
                      default_args: Dict[str, Any], **kwargs: Any) -> nn.Module:
    """timm ``build_model_with_cfg`` with caller kwargs overriding the variant's fixed arguments.

    The CIFAR nets have no published weights, so ``pretrained=True`` fails here, before the model
    is built, unless the caller supplies a source (``pretrained_cfg_overlay=dict(file=...)``).
    """
    if pretrained:
        cfg = resolve_pretrained_cfg(variant, kwargs.get("pretrained_cfg"), kwargs.get("pretrained_cfg_overlay"))
        if not _has_weight_source(cfg):
            raise ValueError(
                f"pretrained=True but no pretrained weights are available for '{variant}' "
                f"(netcompress CIFAR nets are trained from scratch); {_PRETRAINED_HINT}"
            )
    return build_model_with_cfg(model_cls, variant, pretrained, **dict(default_args, **kwargs))


# --------------------------------------------------------------------------- create_model


def _network_errors() -> Tuple[type, ...]:
    """Exception types a failed download raises (OSError covers requests/urllib/HF cache misses)."""
    errors: list = [OSError, ConnectionError, TimeoutError]
    try:
        from huggingface_hub.errors import HfHubHTTPError, LocalEntryNotFoundError
        errors += [HfHubHTTPError, LocalEntryNotFoundError]
    except ImportError:  # pragma: no cover - huggingface_hub is a timm dependency
        pass
    return tuple(errors)


def _unknown_name_error(name: str) -> ValueError:
    arch = timm.models.get_arch_name(name) if isinstance(name, str) else str(name)
    close = difflib.get_close_matches(arch, timm.list_models(), n=5, cutoff=0.6)
    hint = f"did you mean: {', '.join(close)}? " if close else ""
    return ValueError(f"model.name={name!r} is not a timm model; {hint}{_LIST_HINT}")


def _cached_offline(cfg: Any) -> bool:
    """True when timm's registered weight source for ``cfg`` is already on disk."""
    if cfg.hf_hub_id:
        try:
            from huggingface_hub import try_to_load_from_cache
        except ImportError:  # pragma: no cover
            return False
        repo, _, revision = cfg.hf_hub_id.partition("@")
        names = [cfg.hf_hub_filename] if cfg.hf_hub_filename else []
        names += ["model.safetensors", "pytorch_model.bin", "open_clip_model.safetensors",
                  "open_clip_pytorch_model.bin"]
        for filename in names:
            hit = try_to_load_from_cache(repo, filename, revision=revision or None)
            if isinstance(hit, str) and os.path.isfile(hit):
                return True
    if cfg.url:
        from timm.models._hub import check_cached_file  # timm's own torch-hub cache lookup
        return check_cached_file(cfg.url, check_hash=False)
    return False


def _check_pretrained_available(name: str, kwargs: Dict[str, Any]) -> None:
    """Fail before any download attempt when the weights for ``name`` cannot be loaded offline."""
    arch, tag = timm.models.split_model_name_tag(name)
    try:
        cfg = resolve_pretrained_cfg(arch, kwargs.get("pretrained_cfg") or tag or None,
                                     kwargs.get("pretrained_cfg_overlay"))
    except RuntimeError as exc:  # invalid pretrained tag
        tags = ", ".join(timm.list_pretrained(f"{arch}.*")) or "none"
        raise ValueError(f"model.name={name!r}: {exc}; valid pretrained names: {tags}") from exc
    if cfg.state_dict is not None:
        return
    if cfg.file:
        if not os.path.isfile(cfg.file):
            raise FileNotFoundError(f"model.pretrained_cfg_overlay.file={cfg.file!r} does not exist")
        return
    if not _has_weight_source(cfg):
        raise ValueError(f"model.pretrained=true but no pretrained weights are available for {name!r}; "
                         f"{_PRETRAINED_HINT}")
    if not _cached_offline(cfg):
        source = cfg.hf_hub_id or cfg.url
        raise RuntimeError(f"model.pretrained=true but the weights for {name!r} ({source}) are not in the "
                           f"local cache and cannot be downloaded offline; {_PRETRAINED_HINT}")


def create_model(name: str, num_classes: int, pretrained: bool = False, **kwargs: Any) -> nn.Module:
    """Build ``timm.create_model(name, num_classes=..., **kwargs)`` with config-level error messages.

    Unknown names raise ``ValueError`` listing close timm names; ``pretrained=True`` is checked
    offline first (local ``file``, in-memory state_dict, or the HF / torch-hub cache) so a missing
    weight file fails fast instead of hanging on a download.
    """
    from . import cifar_resnet, cifar_vgg, lth_conv  # noqa: F401  (registers the CIFAR nets)

    if isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < 0:
        raise ValueError(f"model.num_classes must be an int >= 0 (0 = no classifier); got {num_classes!r}")
    if not isinstance(name, str) or not name:
        raise ValueError(f"model.name must be a non-empty timm model name; got {name!r}")
    remote = ":" in name  # 'hf-hub:org/repo' or 'local-dir:/path' sources are resolved by timm
    if not remote and not timm.is_model(name):
        raise _unknown_name_error(name)
    if pretrained and not remote:
        _check_pretrained_available(name, kwargs)
    try:
        return timm.create_model(name, pretrained=pretrained, num_classes=num_classes, **kwargs)
    except _network_errors() as exc:
        if not pretrained and not remote:
            raise
        raise RuntimeError(f"could not load weights for model.name={name!r} ({type(exc).__name__}: {exc}); "
                           f"{_PRETRAINED_HINT}") from exc
    except TypeError as exc:
        if "unexpected keyword argument" not in str(exc):
            raise
        raise TypeError(f"model.name={name!r} does not accept one of the extra model kwargs "
                        f"{sorted(kwargs)}: {exc}") from exc


# --------------------------------------------------------------------------- layer metadata


def model_input_size(model: nn.Module) -> Tuple[int, ...]:
    """(C, H, W) the model expects, from ``pretrained_cfg['input_size']`` (default (3, 224, 224))."""
    cfg = getattr(model, "pretrained_cfg", None) or {}
    return tuple(cfg.get("input_size") or (3, 224, 224))


_MISSING = object()


def _resolve(model: nn.Module, name: Any, types: Tuple[type, ...]) -> Any:
    """The cfg name if it is a layer of ``types``, None if it names a non-layer, _MISSING if absent."""
    if isinstance(name, (list, tuple)):  # timm allows several stem convs; the first is the input
        name = name[0] if name else None
    module = dict(model.named_modules()).get(name) if isinstance(name, str) else None
    if module is None:
        return _MISSING
    return name if isinstance(module, types) else None


def first_and_last_layer_names(model: nn.Module) -> Tuple[Optional[str], Optional[str]]:
    """(first conv, classifier) module names that compression leaves dense by default.

    Read from timm's ``pretrained_cfg['first_conv'/'classifier']``. A name the model lacks (or no
    cfg at all) falls back to the first ``nn.Conv2d`` / last ``nn.Linear`` in module order; a name
    that is no longer a layer (``num_classes=0`` leaves ``nn.Identity``) gives ``None``.
    """
    cfg = getattr(model, "pretrained_cfg", None) or {}
    layer_types = (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.Linear)
    first = _resolve(model, cfg.get("first_conv"), layer_types)
    last = _resolve(model, cfg.get("classifier"), layer_types)
    if first is _MISSING:
        first = next((n for n, m in model.named_modules() if isinstance(m, nn.Conv2d)), None)
    if last is _MISSING:
        last = next((n for n, m in reversed(list(model.named_modules())) if isinstance(m, nn.Linear)), None)
    return first, last

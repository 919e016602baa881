"""Extra evaluators run after test, picked as a config list like compression: ``evaluation=[retention]``.

Each evaluator is one small class, one ``@register_evaluator("<name>")`` entry here and one
``conf/evaluation/<name>.yaml`` (``# @package evaluators``, one top-level key ``<name>`` holding
its ``_target_`` and arguments, so the config checks validate them before training). It is
called as ``evaluator(net, datamodule, parent, out_dir) -> {"<stage>/<name>": value}`` with the
final network, the run's datamodule, the dense **parent** net (``init_from``'s network, the KD
teacher or a protocol's dense stage; ``module.parent``) or None, and the run folder (or None)
for files it writes (ids, PNGs; their names go in the figures). It returns figures and reports
nothing itself (the pipeline merges them into results.json).

Evaluators live one per module (``evaluation/retention.py``, ``robustness.py``, ``saliency.py``,
``cost.py``), built on ``evaluation.evaluate.evaluate`` and the metrics of ``evaluation/metrics.py``;
``BUILTIN`` below imports them so that they register.
"""
from __future__ import annotations

import importlib
from pathlib import Path
from typing import Any, Callable, Mapping, Protocol, runtime_checkable

from torch import nn


KEY = "evaluators"  # where conf/evaluation/*.yaml land (# @package evaluators)


@runtime_checkable
class Evaluator(Protocol):
    """``evaluator(net, datamodule, parent, out_dir) -> {key: value}``; ``parent`` is the dense parent
    net or None, ``out_dir`` the run folder for the files it writes (None: write none)."""

    name: str

    def __call__(self, net: nn.Module, datamodule: Any, parent: nn.Module | None,
                 out_dir: Path | None = None) -> dict[str, Any]: ...


EVALUATORS: dict[str, type] = {}
# modules whose evaluators register themselves (imported on first use: they import this module)
BUILTIN = ("netcompress.evaluation.retention", "netcompress.evaluation.robustness",
           "netcompress.evaluation.saliency", "netcompress.evaluation.cost")


def load_builtin() -> None:
    """Import the built-in evaluator modules that exist (each registers its evaluators)."""
    for module in BUILTIN:
        try:
            importlib.import_module(module)
        except ModuleNotFoundError as exc:
            if exc.name != module:
                raise


def register_evaluator(name: str) -> Callable[[type], type]:
    """Class decorator: make an evaluator available as ``evaluation=[<name>]`` (and set its ``name``)."""
    def register(cls: type) -> type:
        if name in EVALUATORS and EVALUATORS[name] is not cls:
            raise ValueError(f"an evaluator named '{name}' is already registered ({EVALUATORS[name].__qualname__})")
        cls.name = name
        EVALUATORS[name] = cls
        return cls
    return register


def build_evaluators(entries: Mapping[str, Any] | None) -> list[Evaluator]:
    """The evaluators of the config's ``evaluators`` node (``{name: {_target_, args} or null}``), in order.

    An entry's key must be a registered name; its ``_target_`` (optional) must be that evaluator's class.
    Each evaluator checks its arguments when built, so ``pipeline/build.py`` builds them before training.
    """
    import hydra
    from hydra.errors import InstantiationException
    from omegaconf import DictConfig, OmegaConf

    load_builtin()
    if isinstance(entries, DictConfig):
        entries = OmegaConf.to_container(entries, resolve=True)
    evaluators = []
    for name, entry in (entries or {}).items():
        if entry is None:  # disabled: evaluators.<name>=null
            continue
        if name not in EVALUATORS:
            raise ValueError(f"`{KEY}.{name}` is not an evaluator; registered: {', '.join(sorted(EVALUATORS))} "
                             f"(pick them as evaluation=[{', '.join(sorted(EVALUATORS))}])")
        if not isinstance(entry, dict):
            raise TypeError(f"`{KEY}.{name}` must be a mapping of the evaluator's arguments (or null); got {entry!r}")
        if "_target_" in entry:
            try:
                evaluator = hydra.utils.instantiate(entry, _convert_="all")
            except InstantiationException as exc:  # the evaluator's own clear input error, not Hydra's wrapper
                if isinstance(exc.__cause__, (ValueError, TypeError)):
                    raise exc.__cause__ from None
                raise
            if type(evaluator) is not EVALUATORS[name]:
                raise ValueError(f"`{KEY}.{name}._target_`={entry['_target_']!r} builds a "
                                 f"{type(evaluator).__name__}, not the evaluator registered as '{name}' "
                                 f"({EVALUATORS[name].__module__}.{EVALUATORS[name].__qualname__})")
        else:
            evaluator = EVALUATORS[name](**entry)
        evaluators.append(evaluator)
    return evaluators


def run_evaluators(cfg: Mapping[str, Any], objects: Mapping[str, Any], parent: nn.Module | None = None,
                   out_dir: Path | None = None) -> dict[str, Any]:
    """Run the configured evaluators (``cfg.evaluators``) on the tested net; returns their merged figures.

    ``objects`` is ``fit_and_test``'s ``{"trainer", "module", "datamodule"}``; the net judged is
    ``module.evaluated_net`` (``module.net`` unless a quantization callback set its quantized net);
    ``out_dir`` the run folder for their files. Two evaluators reporting one key is an error, not a
    silent overwrite.
    """
    evaluators = build_evaluators(cfg.get(KEY))
    figures: dict[str, Any] = {}
    if out_dir is not None:
        Path(out_dir).mkdir(parents=True, exist_ok=True)
    for evaluator in evaluators:
        module = objects["module"]
        found = evaluator(getattr(module, "evaluated_net", module.net), objects["datamodule"], parent, out_dir)
        clash = sorted(set(found) & set(figures))
        if clash:
            raise ValueError(f"evaluator '{evaluator.name}' reports {clash}, already reported by another evaluator")
        figures.update(found)
    return figures


__all__ = ["Evaluator", "EVALUATORS", "BUILTIN", "load_builtin", "register_evaluator", "build_evaluators", "run_evaluators"]

"""The one fit -> collect val/* -> test -> merge sequence, shared by run.py and the protocols.

``fit_and_test(cfg)`` builds the run, optionally starts it from a given network (a protocol's
rewound or thinned net) with extra callbacks, fits, tests the final weights and returns
``(results, objects)``. An input error raised while building is marked ``before_training`` so
the entry point can print it as one line.
"""
from __future__ import annotations

import time
from pathlib import Path
from typing import Any, Sequence

import pytorch_lightning as pl
import torch
from omegaconf import DictConfig

from netcompress.evaluation.evaluators import run_evaluators
from netcompress.pipeline.build import build

INPUT_ERRORS = (ValueError, TypeError, FileNotFoundError)


def set_start(module, start: torch.nn.Module | None) -> None:
    """Start ``module`` from ``start``: its weights when the shapes match, else the (thinner) net itself."""
    if start is None:
        return
    same = {k: list(v.shape) for k, v in module.net.state_dict().items()} == \
        {k: list(v.shape) for k, v in start.state_dict().items()}
    if same:
        module.net.load_state_dict(start.state_dict())
    else:  # a thinner network (structured pruning)
        module.replace_net(start)


def run_folder(cfg: DictConfig) -> Path | None:
    """This run's folder (``paths.output_dir``) for the evaluators' files; None outside a Hydra run."""
    try:
        folder = cfg.paths.output_dir
    except Exception:  # noqa: BLE001 - ${hydra:...} does not resolve outside a Hydra app
        return None
    return Path(folder) if folder else None


def val_metrics(trainer: pl.Trainer) -> dict[str, float]:
    """The last validation figures of a fit (``val/*``)."""
    return {k: float(v) for k, v in trainer.callback_metrics.items() if k.startswith("val/")}


def fit_and_test(cfg: DictConfig, start: torch.nn.Module | None = None, callbacks: Sequence[pl.Callback] = (),
                 fit: bool = True, test: bool = True, parent: torch.nn.Module | None = None
                 ) -> tuple[dict[str, Any], dict[str, Any]]:
    """Build ``cfg``, start from ``start``, add ``callbacks``, fit (unless ``fit=False``), test the
    final weights (unless ``test=False``) and run the configured evaluators (``evaluation=[...]``)
    against the dense ``parent`` (a protocol's dense stage; else the module's own, e.g. init_from's);
    returns (results, {"trainer", "module", "datamodule"})."""
    try:
        datamodule, module, trainer = build(cfg)
    except INPUT_ERRORS as exc:
        exc.before_training = True  # run.py prints it as one line
        raise
    set_start(module, start)
    if parent is not None:
        module.set_parent(parent, source="protocol:dense", replace=True)
    trainer.callbacks.extend(callbacks)
    # one image through the net: Lightning's model summary then shows real FLOPs (and sizes), not 0
    module.example_input_array = torch.zeros(1, *datamodule.input_size)
    results: dict[str, Any] = {}
    if fit:
        t0 = time.perf_counter()
        trainer.fit(module, datamodule=datamodule, ckpt_path=cfg.get("ckpt_path"))
        results.update(val_metrics(trainer))
        results.update(epochs=trainer.current_epoch, global_step=trainer.global_step,
                       train_time_s=time.perf_counter() - t0)
    if test:
        tested = trainer.test(module, datamodule=datamodule, verbose=False)
        results.update(tested[0] if tested else {})
    results["world_size"] = trainer.world_size
    results.update(module.extra_results)
    objects = {"trainer": trainer, "module": module, "datamodule": datamodule}
    if test and trainer.is_global_zero:
        results.update(run_evaluators(cfg, objects, module.parent, run_folder(cfg)))
    return results, objects

"""netcompress entry point: train (and compress) a timm backbone from a Hydra config.

    python run.py                                   # the default experiment (dense ResNet-20, CIFAR-10)
    python run.py experiment=quickstart data.root=../shared/data/cifar10-jpeg
    python run.py -m 'compression=[],[noop]' seed=0,1,2

Every run writes results.json (metrics, model cost, provenance, resolved config) into its
output folder, also when it fails.
"""
from __future__ import annotations

import signal
import sys
import threading
import time
import traceback
from pathlib import Path
from typing import Any

import hydra
import pytorch_lightning as pl
from pytorch_lightning.utilities import rank_zero_only
import torch
from hydra.core.hydra_config import HydraConfig
from hydra.errors import InstantiationException
from hydra.types import RunMode
from omegaconf import DictConfig, OmegaConf

import models  # noqa: F401  (registers the CIFAR networks in timm)
import pipeline.resolvers  # noqa: F401  (${launch_dir:} in conf/paths)
from pipeline.config_checks import check_config
from pipeline.entries import reshaping_entries
from evaluation import model_stats, provenance
from evaluation.results import new_results, write_results
from lightning_modules.checkpoint_io import SavedNet, build_net, check_same_model, read_saved_net
from models.serialization import save_model


def instantiate(config: DictConfig, **kwargs: Any) -> Any:
    """hydra.utils.instantiate, re-raising our own clear input errors instead of Hydra's wrapper."""
    try:
        return hydra.utils.instantiate(config, **kwargs)
    except InstantiationException as exc:
        if isinstance(exc.__cause__, (ValueError, TypeError, FileNotFoundError)):
            raise exc.__cause__ from None
        raise


def instantiate_group(group: DictConfig | None) -> list[Any]:
    """Objects of a dict-of-configs group (callbacks, loggers), in config order."""
    if not group:
        return []
    return [instantiate(entry) for entry in group.values() if entry and "_target_" in entry]


def check_callback_combination(callbacks: list[pl.Callback]) -> None:
    """Let each callback reject the others it cannot work with (before any training)."""
    for callback in callbacks:
        check = getattr(callback, "check_combination", None)
        if check is not None:
            check([other for other in callbacks if other is not callback])


def model_kwargs(cfg: DictConfig) -> dict:
    return {k: v for k, v in OmegaConf.to_container(cfg.model, resolve=True).items()
            if k not in ("_target_", "name", "pretrained")}


def initial_weights(net, saved: SavedNet | str, spec: dict | None = None):
    """The network of ``init_from`` (a run's .ckpt or model.pt, thinned or not) in place of a fresh init.

    Refused when it holds another model than the config's (``spec``): another model.name, width or
    class count would be trained while the config and results.json name the configured one.
    """
    if not isinstance(saved, SavedNet):
        saved = read_saved_net(saved, key="init_from")
    loaded = build_net(saved)
    expected = net.get_classifier().out_features
    got = loaded.get_classifier().out_features
    if got != expected:
        raise ValueError(f"init_from={str(saved.path)!r} has {got} classes but the data has {expected}; "
                         "point init_from at a run on the same data set")
    if spec is not None:
        check_same_model(saved, net, spec, thinned_by=None)
    return loaded.train()


def build(cfg: DictConfig):
    """Datamodule, module, callbacks and trainer from config; every check that can fail runs here."""
    check_config(cfg)  # every value, key and _target_ argument, before any data is read
    pl.seed_everything(cfg.seed, workers=True)
    resume = read_saved_net(cfg.ckpt_path, key="ckpt_path", mmap=True) if cfg.ckpt_path else None
    init = read_saved_net(cfg.init_from, key="init_from") if cfg.get("init_from") else None
    datamodule = instantiate(cfg.data)
    net = instantiate(cfg.model, num_classes=datamodule.num_classes)
    spec = {"model_name": cfg.model.name, "num_classes": datamodule.num_classes, "model_kwargs": model_kwargs(cfg)}
    if resume is not None:  # the checkpoint's network is this config's model (thinned only by its compression)
        thinned_by = reshaping_entries(cfg.get("callbacks")) + (["protocol"] if cfg.get("protocol") else [])
        check_same_model(resume, net, spec, thinned_by=thinned_by)
    if init is not None:
        net = initial_weights(net, init, spec)
    module = instantiate(
        cfg.module, net=net, net_spec=spec,
        optimizer=hydra.utils.instantiate(cfg.optimizer),
        scheduler=hydra.utils.instantiate(cfg.scheduler) if cfg.get("scheduler") else None,
    )
    callbacks = instantiate_group(cfg.get("callbacks"))
    check_callback_combination(callbacks)
    loggers = instantiate_group(cfg.get("logger"))
    trainer = instantiate(cfg.trainer, callbacks=callbacks, logger=loggers or False)
    return datamodule, module, trainer


def measure(module, datamodule, output_dir: Path, cfg: DictConfig) -> dict:
    """Cost figures of the final network (rank 0 only)."""
    net = module.net
    total, nonzero = model_stats.count_parameters(net)
    figures = {"params_total": total, "params_nonzero": nonzero,
               "flops": model_stats.count_flops(net, tuple(datamodule.input_size)),
               "latency_ms": model_stats.measure_latency_ms(net, tuple(datamodule.input_size),
                                                            repeats=cfg.latency_repeats)}
    if cfg.save_model:
        figures["size_bytes"] = save_model(net, output_dir / "model.pt", cfg.model.name,
                                           datamodule.num_classes, model_kwargs(cfg))
    return figures


def train(cfg: DictConfig) -> tuple[dict, dict]:
    """Fit, test the final weights, measure, and return (results, objects)."""
    if cfg.get("protocol"):  # multi-stage protocols (protocols/): same return shape
        from protocols import run_protocol

        return run_protocol(cfg)
    datamodule, module, trainer = build(cfg)
    # one image through the net: Lightning's model summary then shows real FLOPs (and sizes), not 0
    module.example_input_array = torch.zeros(1, *datamodule.input_size)
    start = time.perf_counter()
    trainer.fit(module, datamodule=datamodule, ckpt_path=cfg.ckpt_path)
    train_time = time.perf_counter() - start
    fit_metrics = {k: float(v) for k, v in trainer.callback_metrics.items() if k.startswith("val/")}
    test_metrics = trainer.test(module, datamodule=datamodule, verbose=False)
    results = {**fit_metrics, **(test_metrics[0] if test_metrics else {}),
               "epochs": trainer.current_epoch, "global_step": trainer.global_step, "world_size": trainer.world_size,
               "train_time_s": train_time}
    results.update(module.extra_results)
    return results, {"trainer": trainer, "module": module, "datamodule": datamodule}


def print_summary(results: dict) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(title=f"netcompress run: {results.get('model_name')} (seed {results.get('seed')})")
    table.add_column("metric")
    table.add_column("value", justify="right")
    for key, value in results.items():
        if key in ("config", "provenance", "traceback") or isinstance(value, (dict, list)):
            continue
        table.add_row(key, f"{value:.4g}" if isinstance(value, float) else str(value))
    Console().print(table)


class Terminated(Exception):
    """The job received SIGTERM (killed by the user or the cluster scheduler) or SIGINT (Ctrl-C).

    An ordinary exception on purpose: Lightning turns a KeyboardInterrupt into ``sys.exit(1)``,
    which would leave results.json saying "running"; this one reaches run()'s handler."""


def _raise_terminated(signum, frame) -> None:
    name = "SIGINT (Ctrl-C)" if signum == signal.SIGINT else signal.Signals(signum).name
    raise Terminated(f"received {name}")


def _install_signal_handlers(handlers: dict | None) -> dict | None:
    """Install {signal: handler} (main thread only); returns the previous handlers."""
    if threading.current_thread() is not threading.main_thread() or handlers is None:
        return None
    return {signum: signal.signal(signum, handler) for signum, handler in handlers.items()}


def run(cfg: DictConfig) -> dict:
    """train() wrapped so that results.json is written whatever happens (rank 0 only)."""
    output_dir = Path(HydraConfig.get().runtime.output_dir)
    results = new_results(cfg.seed, cfg.model.name, OmegaConf.to_container(cfg, resolve=True), provenance.collect())
    objects: dict = {}
    if rank_zero_only.rank == 0:
        write_results(output_dir, results)  # status "running": a killed job still leaves a record
    previous_handlers = _install_signal_handlers({signal.SIGTERM: _raise_terminated, signal.SIGINT: _raise_terminated})
    try:
        metrics, objects = train(cfg)
        if not objects["trainer"].is_global_zero:
            return metrics
        results.update(metrics)
        results.update(measure(objects["module"], objects["datamodule"], output_dir, cfg))
        results["status"] = "ok"
    except BaseException as exc:  # SystemExit too: whatever ends the run, results.json says so
        results.update(status="failed", error=f"{type(exc).__name__}: {exc}", traceback=traceback.format_exc())
        write_results(output_dir, results)
        raise
    finally:
        _install_signal_handlers(previous_handlers)
    write_results(output_dir, results)
    for logger in objects["trainer"].loggers:
        if type(logger).__name__ == "WandbLogger":
            logger.experiment.summary.update({k: v for k, v in results.items() if not isinstance(v, (dict, list))})
    print_summary(results)
    return results


@hydra.main(version_base="1.3", config_path="conf", config_name="config")
def main(cfg: DictConfig) -> float | None:
    multirun = HydraConfig.get().mode == RunMode.MULTIRUN
    try:
        results = run(cfg)
    except Exception:
        if not multirun:
            raise
        traceback.print_exc()
        return float("nan")  # the sweep goes on; the failed job's results.json says why
    finally:
        if "wandb" in (cfg.get("logger") or {}):
            import wandb

            wandb.finish()
    value = results.get(cfg.optimized_metric)
    return float(value) if value is not None else None


if __name__ == "__main__":
    from pipeline.preflight import preflight_or_exit

    preflight_or_exit(sys.argv[1:])  # command-line mistakes: one line on stderr, exit 2, before Hydra
    main()

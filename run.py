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
import traceback
from pathlib import Path

import hydra
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from omegaconf import DictConfig, OmegaConf
from pytorch_lightning.utilities import rank_zero_only

from netcompress import models  # noqa: F401  (registers the CIFAR networks in timm)
from netcompress.pipeline import resolvers  # noqa: F401  (${launch_dir:} in conf/paths)
from netcompress.evaluation import model_stats, provenance
from netcompress.evaluation.results import new_results, write_results
from netcompress.models.serialization import save_model
from netcompress.pipeline.build import apply_threads, model_kwargs
from netcompress.pipeline.fit import fit_and_test
from netcompress.pipeline.wandb_config import log_run_end


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
    """Fit, test the final weights and return (results, objects); a protocol runs its stages instead."""
    if cfg.get("protocol"):  # multi-stage protocols (protocols/): same return shape
        from netcompress.protocols import run_protocol

        return run_protocol(cfg)
    return fit_and_test(cfg)


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
    apply_threads(cfg)  # before provenance records torch_threads
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
        if type(logger).__name__ == "WandbLogger":  # summary, per-class table, saliency grid
            log_run_end(logger.experiment, results, output_dir)
    print_summary(results)
    return results


@hydra.main(version_base="1.3", config_path="conf", config_name="config")
def main(cfg: DictConfig) -> float | None:
    multirun = HydraConfig.get().mode == RunMode.MULTIRUN
    try:
        results = run(cfg)
    except Exception as exc:
        if not multirun:
            if getattr(exc, "before_training", False):  # a bad setting: one line, results.json has the rest
                print(f"netcompress: error: {exc}", file=sys.stderr)
                sys.exit(2)
            raise
        traceback.print_exc()
        return float("nan")  # the sweep goes on; the failed job's results.json says why
    finally:
        if "wandb" in (cfg.get("logger") or {}):
            import wandb

            wandb.finish()
    value = results.get(cfg.optimized_metric)
    return float(value) if value is not None else None


def cli() -> None:
    """``python run.py ...`` and the installed ``netcompress ...`` command: pre-flight, then Hydra."""
    from netcompress.pipeline.preflight import preflight_or_exit

    preflight_or_exit(sys.argv[1:])  # command-line mistakes: one line on stderr, exit 2, before Hydra
    main()


if __name__ == "__main__":
    cli()

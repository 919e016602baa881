"""What compression bought (``evaluation=[cost]``): size, FLOPs, CPU latency and energy of the net and its parent.

The cost side of the accuracy/cost trade-off every compression paper plots (Han et al. 2016, "Deep
Compression"; Blalock et al. 2020, "What is the state of neural network pruning?", which asks for
parameters, FLOPs *and* measured speed-up next to each other). Parameters, non-zero parameters, the
size of the model file run.py writes (``models.serialization.save_model``), FLOPs
(``model_stats.count_flops``), batch-1 and batch-64 CPU latency of net and parent timed interleaved in
one window (``model_stats.interleaved_latency_ms``), and energy per image (evaluation/energy.py:
RAPL when readable, else Horowitz 2014's per-operation estimate). Ratios are parent / child, so
> 1 means the child is smaller / faster. Keys: ``cost/*`` (docs/retention.md (Cost)).
"""
from __future__ import annotations

import logging
import math
import tempfile
from pathlib import Path
from typing import Any, Sequence

import torch
from torch import nn

from netcompress.evaluation import model_stats
from netcompress.evaluation.energy import POWERCAP, EnergyMeter, Rapl, estimate_energy
from netcompress.evaluation.evaluators import register_evaluator
from netcompress.models.serialization import save_model

log = logging.getLogger(__name__)

ENERGY_MODES = ("auto", "estimated")


def _positive_int(value: Any, key: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"`evaluators.cost.{key}` must be an int >= 1; got {value!r}")
    return value


def model_name_of(net: nn.Module) -> str:
    """The timm name the net was built from (``pretrained_cfg["architecture"]``), else its class name."""
    cfg = getattr(net, "pretrained_cfg", None) or {}
    return str(cfg.get("architecture") or type(net).__name__)


def saved_size_bytes(net: nn.Module, num_classes: int, model_name: str | None = None,
                     model_kwargs: dict | None = None) -> int:
    """Bytes of the file ``save_model`` writes for ``net`` (run.py's model.pt), written to a temp folder
    under the same file name (torch.save names the zip's records after the file, so the name counts).

    run.py records the config's model kwargs (e.g. ``width``) in model.pt; the evaluator is not given
    the config, so unless ``model_kwargs`` is passed the file lacks those few characters."""
    with tempfile.TemporaryDirectory() as folder:
        return save_model(net, Path(folder) / "model.pt", model_name or model_name_of(net), num_classes,
                          model_kwargs)


@register_evaluator("cost")
class Cost:
    """Cost figures of the net and, with a parent, parent/child ratios and speed-ups.

    Args:
        batch_sizes: batch sizes timed (keys ``cost/latency_ms_b<n>``, ``cost/speedup_b<n>``).
        repeats_b1: timed forward passes per net at batch size 1 (median reported).
        repeats_b64: timed forward passes per net at every batch size > 1.
        warmup: untimed passes per net before timing.
        threads: torch CPU threads while timing (None: ``torch.get_num_threads()``); ``cost/threads``.
        energy: ``auto`` (RAPL measured when readable, else estimated) or ``estimated`` (always the model).
        rapl_root: the powercap folder RAPL is read from.
        seed: seeds the random timing inputs (a forked RNG: the global one is left alone).
    """

    def __init__(self, batch_sizes: Sequence[int] = (1, 64), repeats_b1: int = 20, repeats_b64: int = 5,
                 warmup: int = 1, threads: int | None = None, energy: str = "auto",
                 rapl_root: str = POWERCAP, seed: int = 0) -> None:
        if isinstance(batch_sizes, (str, bytes)) or not isinstance(batch_sizes, Sequence) or not batch_sizes:
            raise ValueError(f"`evaluators.cost.batch_sizes` must be a non-empty list of ints >= 1, e.g. [1, 64]; "
                             f"got {batch_sizes!r}")
        self.batch_sizes = [_positive_int(b, "batch_sizes") for b in batch_sizes]
        if len(set(self.batch_sizes)) != len(self.batch_sizes):
            raise ValueError(f"`evaluators.cost.batch_sizes` has a batch size twice; got {list(batch_sizes)!r}")
        self.repeats_b1 = _positive_int(repeats_b1, "repeats_b1")
        self.repeats_b64 = _positive_int(repeats_b64, "repeats_b64")
        if isinstance(warmup, bool) or not isinstance(warmup, int) or warmup < 0:
            raise ValueError(f"`evaluators.cost.warmup` must be an int >= 0; got {warmup!r}")
        self.warmup = warmup
        self.threads = None if threads is None else _positive_int(threads, "threads")
        if energy not in ENERGY_MODES:
            raise ValueError(f"`evaluators.cost.energy` must be one of {', '.join(ENERGY_MODES)}; got {energy!r}")
        self.energy = energy
        if not isinstance(rapl_root, (str, Path)):
            raise TypeError(f"`evaluators.cost.rapl_root` must be a folder path; got {rapl_root!r}")
        self.rapl_root = str(rapl_root)
        if isinstance(seed, bool) or not isinstance(seed, int):
            raise TypeError(f"`evaluators.cost.seed` must be an int; got {seed!r}")
        self.seed = seed

    def __call__(self, net: nn.Module, datamodule: Any, parent: nn.Module | None,
                 out_dir: Path | None = None) -> dict[str, Any]:
        input_size = tuple(datamodule.input_size)
        num_classes = int(datamodule.num_classes)
        nets = {"": net} if parent is None else {"": net, "parent_": parent}
        if parent is None:
            log.info("evaluation.%s: parent ratios and speed-ups skipped, this run has no parent net (init_from, "
                     "a KD teacher or a protocol's dense stage)", self.name)
        static = {prefix: self.static_figures(n, input_size, num_classes) for prefix, n in nets.items()}
        figures: dict[str, Any] = {f"cost/{k}": v for k, v in static[""].items()}
        timing = self.timed_figures(nets, input_size)
        figures.update({k: v for k, v in timing.items() if not k.startswith("cost/parent_")})
        if parent is None:
            return figures
        mine, theirs = static[""], static["parent_"]
        for key, name in (("params", "params"), ("nonzero_params", "nonzero_params"), ("size_bytes", "size"),
                          ("flops", "flops")):
            figures[f"cost/{name}_ratio"] = _ratio(theirs[key], mine[key])
        figures.update({k: v for k, v in timing.items() if k.startswith("cost/parent_")})
        for b in self.batch_sizes:
            figures[f"cost/speedup_b{b}"] = _ratio(timing[f"cost/parent_latency_ms_b{b}"],
                                                   timing[f"cost/latency_ms_b{b}"])
        return figures

    def static_figures(self, net: nn.Module, input_size: tuple[int, ...], num_classes: int) -> dict[str, Any]:
        """Counts that need no timing: parameters, non-zero parameters, model-file bytes, FLOPs."""
        total, nonzero = model_stats.count_parameters(net)
        return {"params": total, "nonzero_params": nonzero,
                "size_bytes": saved_size_bytes(net, num_classes),
                "flops": model_stats.count_flops(net, input_size)}

    def timed_figures(self, nets: dict[str, nn.Module], input_size: tuple[int, ...]) -> dict[str, Any]:
        """Latency of every net at every batch size (nets interleaved per batch size) and energy per image."""
        rapl = Rapl.find(self.rapl_root) if self.energy == "auto" else None
        metered_batch = max(self.batch_sizes)
        meters = {prefix: EnergyMeter(rapl, metered_batch) for prefix in nets} if rapl is not None else {}
        previous_threads = torch.get_num_threads()
        threads = self.threads or previous_threads
        figures: dict[str, Any] = {"cost/threads": threads}
        torch.set_num_threads(threads)
        try:
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(self.seed)
                for b in self.batch_sizes:
                    runners = {}
                    for prefix, n in nets.items():
                        run = model_stats.eager_runner(n, input_size, b)
                        runners[prefix] = meters[prefix].wrap(run) if meters and b == metered_batch else run
                    repeats = self.repeats_b1 if b == 1 else self.repeats_b64
                    times = model_stats.interleaved_latency_ms(runners, warmup=self.warmup, repeats=repeats)
                    figures.update({f"cost/{prefix}latency_ms_b{b}": t for prefix, t in times.items()})
        finally:
            torch.set_num_threads(previous_threads)
        if meters:
            figures["cost/energy_source"] = "measured"
            figures.update({f"cost/{prefix}energy_j_per_image": m.joules_per_image for prefix, m in meters.items()})
        else:
            figures["cost/energy_source"] = "estimated"
            figures.update({f"cost/{prefix}energy_j_per_image": estimate_energy(n, input_size).joules
                            for prefix, n in nets.items()})
        return figures


def _ratio(parent_value: float, child_value: float) -> float:
    """parent / child (> 1: the child is smaller or faster); NaN when the child's figure is 0."""
    return float(parent_value) / float(child_value) if child_value else math.nan


__all__ = ["Cost", "ENERGY_MODES", "model_name_of", "saved_size_bytes"]

"""Sensitivity analysis -> per-layer budget allocation -> fine-tune, in one config (``protocol=sensitivity``).

Li et al. 2017 ("Pruning Filters for Efficient ConvNets", section 4.1): prune each layer alone at
a grid of ratios and evaluate without retraining (``compression.sensitivity``); choose one ratio
per layer so that the network keeps ``budget.target`` of its FLOPs, parameters or measured CPU
latency (``compression.budget``, equal accuracy drop across layers); then prune the dense net one-shot at
those ratios and fine-tune with ``callbacks.magnitude_pruning`` (structured: the filters are
physically removed at the end). The dense net is ``init_from`` or, with ``train_dense: true``, the
lottery protocol's shared dense stage (trained once with this run's config, kept in the store).

Writes ``sensitivity.csv`` (one row per layer and ratio: acc1, drop, predicted cost of that single
choice) and ``sensitivity.png`` (drop vs ratio, a line per layer) into the run folder, and reports
predicted vs achieved budget as ``sensitivity/*`` keys of results.json.
"""
from __future__ import annotations

import copy
import csv
import logging
import time
from pathlib import Path
from typing import Mapping, Sequence

import torch
from omegaconf import DictConfig, OmegaConf, open_dict

from netcompress.compression.budget import (ALLOCATORS, MEASURED, CostModel, allocate, check_metric, check_reachable,
                                             check_target)
from netcompress.compression.checks import check_int, plain
from netcompress.compression.importance import check_weight_criterion
from netcompress.compression.masks import check_choice
from netcompress.compression.sensitivity import KINDS, Sensitivity, candidate_layers, check_ratios, sensitivity_table
from netcompress.evaluation.model_stats import count_flops, count_parameters
from netcompress.pipeline.fit import fit_and_test, run_folder

log = logging.getLogger(__name__)
KEY = "protocol"
CSV = "sensitivity.csv"
PNG = "sensitivity.png"
CALLBACK = "magnitude_pruning"


def _patterns(value: object, key: str) -> list[str]:
    if isinstance(value, str) or not isinstance(value, Sequence) or not all(isinstance(p, str) for p in value):
        raise ValueError(f"`{key}` must be a list of module-name patterns (e.g. ['layer*']); got {value!r}")
    return list(value)


class SensitivityProtocol:
    """Analyse, allocate, fine-tune; one object per job.

    Args:
        kind: ``structured`` (output filters of the convs that can lose them alone; removed at the end)
            or ``unstructured`` (single weights of every selected Conv2d/Linear).
        importance: criterion of ``compression.importance`` (``l1``: filter L1 norm / |w|).
        ratios: fractions of each layer pruned in the analysis (increasing, in (0, 1)); the largest
            also caps the allocation (no extrapolation beyond the measured curve).
        include/exclude/skip_first_last: layer selection (as magnitude pruning: fnmatch patterns; skip
            the stem conv and the classifier by default).
        budget: ``metric`` (flops | params, predicted; latency_ms: median batch-1 CPU latency, measured on
            thinned copies, structured only) and ``target`` (the fraction of the dense net's metric to keep,
            in (0, 1]).
        allocator: a name of ``compression.budget.ALLOCATORS`` (``equal_drop``).
        limit_batches: evaluate the analysis on the first N validation batches only (null = all).
        train_dense: without ``init_from``, train the dense net first (the lottery protocol's dense
            stage in ``store_dir``, reused by every job with the same config); false = init_from required.
        store_dir: the shared stage store (``${paths.store_dir}``).
        finetune: ``lr`` and ``epochs`` of the fine-tuning (null = the run's optimizer.lr / trainer.max_epochs).
    """

    def __init__(self, kind: str = "structured", importance: str = "l1",
                 ratios: Sequence[float] = (0.1, 0.3, 0.5, 0.7, 0.9), include: Sequence[str] = ("*",),
                 exclude: Sequence[str] = (), skip_first_last: bool = True, budget: Mapping | None = None,
                 allocator: str = "equal_drop", limit_batches: int | None = None, train_dense: bool = False,
                 store_dir: str | None = None, finetune: Mapping | None = None) -> None:
        self.kind = check_choice(kind, KINDS, f"`{KEY}.kind`")
        self.importance = check_weight_criterion(importance, f"`{KEY}.importance`")
        self.ratios = check_ratios(plain(ratios), f"{KEY}.ratios")
        self.include = _patterns(plain(include), f"{KEY}.include")
        self.exclude = _patterns(plain(exclude), f"{KEY}.exclude")
        if not isinstance(skip_first_last, bool):
            raise ValueError(f"`{KEY}.skip_first_last` must be true or false; got {skip_first_last!r}")
        self.skip_first_last = skip_first_last
        budget = dict(plain(budget) or {})
        unknown = set(budget) - {"metric", "target"}
        if unknown:
            raise ValueError(f"{KEY}.budget has unknown keys {sorted(unknown)}; valid keys: metric, target")
        self.metric = check_metric(budget.get("metric", "flops"), f"{KEY}.budget", self.kind)
        self.target = check_target(budget.get("target", 0.5), f"{KEY}.budget")
        self.allocator = check_choice(allocator, tuple(ALLOCATORS), f"`{KEY}.allocator`")
        self.limit_batches = None if limit_batches is None else check_int(limit_batches, f"{KEY}.limit_batches", 1)
        if not isinstance(train_dense, bool):
            raise ValueError(f"`{KEY}.train_dense` must be true or false; got {train_dense!r}")
        self.train_dense = train_dense
        self.store_dir = store_dir
        finetune = dict(plain(finetune) or {})
        unknown = set(finetune) - {"lr", "epochs"}
        if unknown:
            raise ValueError(f"{KEY}.finetune has unknown keys {sorted(unknown)}; valid keys: lr, epochs")
        lr = finetune.get("lr")
        if lr is not None and (isinstance(lr, bool) or not isinstance(lr, (int, float)) or lr <= 0):
            raise ValueError(f"`{KEY}.finetune.lr` must be null or a positive number; got {lr!r}")
        epochs = finetune.get("epochs")
        if epochs is not None:
            check_int(epochs, f"{KEY}.finetune.epochs", 0)
        self.finetune = {"lr": lr, "epochs": epochs}

    # ----- the job ----------------------------------------------------------------------------
    def run(self, cfg: DictConfig) -> tuple[dict, dict]:
        """Dense net -> analysis -> allocation -> fine-tune; run.train's (results, objects)."""
        if (cfg.get("callbacks") or {}).get(CALLBACK):
            raise ValueError(f"protocol=sensitivity configures callbacks.{CALLBACK} itself (the allocated "
                             f"layer_sparsity); remove {CALLBACK} from compression=[...]")
        if not cfg.get("init_from") and not self.train_dense:
            raise ValueError("protocol=sensitivity needs the dense net to analyse: set init_from=<run>/model.pt, or "
                             f"{KEY}.train_dense=true to train it first with this config (kept in {KEY}.store_dir)")
        import hydra

        datamodule = hydra.utils.instantiate(cfg.data)
        datamodule.setup("validate")
        input_size = tuple(int(s) for s in datamodule.input_size)
        dense, source = self._dense_net(cfg)
        if int(dense.get_classifier().out_features) != int(datamodule.num_classes):
            raise ValueError(f"init_from has {dense.get_classifier().out_features} classes but the data has "
                             f"{datamodule.num_classes}; point init_from at a run on the same data set")
        example = torch.zeros(1, *input_size)
        layers, skipped = candidate_layers(dense, self.include, self.exclude, self.skip_first_last, self.kind,
                                           example, key=KEY)
        cost = CostModel(dense, list(layers), input_size, self.kind)
        latency = None
        if self.metric in MEASURED:
            from netcompress.compression.latency_model import MeasuredLatency

            latency = MeasuredLatency(dense, list(layers), input_size, self.importance,
                                      repeats=int(cfg.get("latency_repeats") or 30))
        check_reachable(cost, self.metric, self.target, self.ratios[-1], f"{KEY}.budget", latency)  # before analysis
        for name, why in skipped.items():
            log.info("sensitivity: skipping %s (%s)", name, why)

        t0 = time.perf_counter()
        device = torch.device("cuda" if torch.cuda.is_available() and cfg.trainer.get("accelerator") in
                              ("gpu", "cuda", "auto") else "cpu")
        batches = list(datamodule.val_dataloader())
        if self.limit_batches is not None:
            batches = batches[:self.limit_batches]
        sens = sensitivity_table(dense.to(device), batches, list(layers), self.ratios, self.kind, self.importance,
                                 int(datamodule.num_classes), example.to(device), skipped)
        dense.cpu()
        analysis_s = time.perf_counter() - t0
        folder = run_folder(cfg) or Path.cwd()
        folder.mkdir(parents=True, exist_ok=True)
        write_csv(sens, cost, folder / CSV)
        plot(sens, folder / PNG)

        allocation = allocate(sens, cost, self.metric, self.target, self.allocator, key=f"{KEY}.budget",
                              latency=latency)
        log.info("sensitivity: %s target %.3f -> predicted %s, ratios %s", self.metric, self.target,
                 allocation.predicted, allocation.ratios)
        results, objects = self._finetune(cfg, dense, list(layers), allocation.ratios, source)
        achieved = self._achieved(objects, dense, input_size, latency)
        extra = {"sensitivity/kind": self.kind, "sensitivity/importance": self.importance,
                 "sensitivity/metric": self.metric, "sensitivity/target": self.target,
                 "sensitivity/allocator": self.allocator, "sensitivity/dense_source": source,
                 "sensitivity/dense_val_acc1": sens.dense_acc1, "sensitivity/analysis_time_s": analysis_s,
                 "sensitivity/val_images": sum(len(b[1]) for b in batches),
                 "sensitivity/threshold": allocation.threshold,
                 "sensitivity/layer_ratios": allocation.ratios, "sensitivity/layer_pruned": allocation.pruned,
                 "sensitivity/layer_drops": allocation.drops, "sensitivity/skipped_layers": sorted(skipped),
                 "sensitivity/predicted_flops_fraction": allocation.predicted["flops"],
                 "sensitivity/predicted_params_fraction": allocation.predicted["params"],
                 "sensitivity/achieved_flops_fraction": achieved["flops"],
                 "sensitivity/achieved_params_fraction": achieved["params"],
                 "sensitivity/budget_queries": allocation.queries}
        if latency is not None:
            extra.update({"sensitivity/predicted_latency_ms_fraction": allocation.predicted["latency_ms"],
                          "sensitivity/achieved_latency_ms_fraction": achieved["latency_ms"],
                          "sensitivity/latency_measurements": latency.measurements})
        module = objects["module"]
        for key, value in extra.items():
            module.report_result(key, value)
        results.update(extra)
        _tell_wandb(objects["trainer"], folder / PNG, extra)
        return results, objects

    def _dense_net(self, cfg: DictConfig) -> tuple[torch.nn.Module, str]:
        from netcompress.models.serialization import build_net, read_saved_net

        if cfg.get("init_from"):
            return build_net(read_saved_net(cfg.init_from, key="init_from")).eval(), f"init_from:{cfg.init_from}"
        from netcompress.protocols.lottery import job_base
        from netcompress.protocols.stage_store import StageStore
        from netcompress.protocols.stages import Stages, load_stage_net

        stages = Stages(StageStore(self.store_dir), rounds=None, snapshot_steps=[0], rewind_step=0, dense_callbacks=[])
        folder = stages.dense(job_base(cfg))
        return load_stage_net(folder).eval(), f"store:{folder.name}"

    def _finetune(self, cfg: DictConfig, dense: torch.nn.Module, layers: list[str], ratios: Mapping[str, float],
                  source: str) -> tuple[dict, dict]:
        cfg = copy.deepcopy(cfg)
        with open_dict(cfg):
            if self.finetune["lr"] is not None:
                cfg.optimizer.lr = self.finetune["lr"]
            if self.finetune["epochs"] is not None:
                cfg.trainer.max_epochs = self.finetune["epochs"]
            if cfg.get("callbacks") is None:
                cfg.callbacks = {}
            cfg.callbacks[CALLBACK] = OmegaConf.create(pruning_callback(layers, ratios, self.kind, self.importance))
        if source.startswith("init_from:"):
            return fit_and_test(cfg)  # build() starts from init_from and makes it the parent
        return fit_and_test(cfg, start=copy.deepcopy(dense).train(), parent=copy.deepcopy(dense).eval())

    def _achieved(self, objects: dict, dense: torch.nn.Module, input_size: tuple,
                  latency=None) -> dict[str, float]:
        net = objects["module"].net.cpu()
        if self.kind == "structured":
            achieved = {"flops": count_flops(net, input_size) / count_flops(dense, input_size),
                        "params": count_parameters(net)[0] / count_parameters(dense)[0]}
            if latency is not None:  # the fine-tuned thin net against the dense one, timed side by side
                achieved["latency_ms"] = latency.ratio(net)
            return achieved
        from netcompress.protocols.retrain_init import effective_flops

        masks = next(cb.masks for cb in objects["trainer"].callbacks if type(cb).__name__ == "MagnitudePruning")
        return {"flops": effective_flops(net, masks, input_size) / count_flops(dense, input_size),
                "params": count_parameters(net)[1] / count_parameters(dense)[1]}


def pruning_callback(layers: Sequence[str], ratios: Mapping[str, float], kind: str, importance: str) -> dict:
    """The callbacks.magnitude_pruning entry that prunes ``ratios`` one-shot at the start of fine-tuning."""
    return {"_target_": "netcompress.callbacks.magnitude_pruning.MagnitudePruning", "sparsity": 0.0,
            "granularity": kind, "importance": importance, "scope": "layer", "schedule": "oneshot",
            "unit": "epoch", "start": 0, "include": list(layers), "exclude": [], "skip_first_last": False,
            "remove_filters": kind == "structured", "layer_sparsity": {name: float(ratios[name]) for name in layers}}


def write_csv(sens: Sensitivity, cost: CostModel, path: Path) -> None:
    """sensitivity.csv: layer, ratio, pruned, units, acc1, drop, and the predicted params / FLOPs fraction
    kept when only that layer is pruned that far; the first row is the dense net (layer ``dense``)."""
    fields = ["layer", "ratio", "pruned", "units", "acc1", "drop", "params_fraction", "flops_fraction"]
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=fields)
        writer.writeheader()
        writer.writerow({"layer": "dense", "ratio": 0.0, "pruned": 0, "units": "", "acc1": sens.dense_acc1,
                         "drop": 0.0, "params_fraction": 1.0, "flops_fraction": 1.0})
        for row in sens.rows():
            kept = cost.fraction({row["layer"]: row["pruned"]})
            writer.writerow({**row, "params_fraction": kept["params"], "flops_fraction": kept["flops"]})


def plot(sens: Sensitivity, path: Path) -> None:
    """sensitivity.png: accuracy drop (percentage points) vs ratio pruned, one line per layer."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for layer, by_ratio in sens.table.items():
        xs = [0.0, *by_ratio]
        ys = [0.0, *[100 * (sens.dense_acc1 - a) for a in by_ratio.values()]]
        ax.plot(xs, ys, marker="o", markersize=3, label=layer)
    ax.set_xlabel(f"fraction of the layer's {'filters' if sens.kind == 'structured' else 'weights'} pruned "
                  f"({sens.importance})")
    ax.set_ylabel("val top-1 drop (points)")
    ax.set_title(f"Per-layer sensitivity (dense val top-1 {100 * sens.dense_acc1:.2f}%)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=6, ncol=2 if len(sens.table) > 12 else 1, loc="upper left")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def _tell_wandb(trainer, png: Path, extra: Mapping) -> None:
    """The curves' image and the scalar figures, when the run logs to wandb."""
    for logger in getattr(trainer, "loggers", []) or []:
        if type(logger).__name__ == "WandbLogger":
            import wandb

            logger.experiment.log({"sensitivity/curves": wandb.Image(str(png))})
            logger.experiment.summary.update({k: v for k, v in extra.items() if isinstance(v, (int, float, str))})

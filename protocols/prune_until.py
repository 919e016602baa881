"""Prune until small enough: iterative structured pruning to a size budget (``protocol=prune_until``).

Iterative filter pruning with fine-tuning between steps, as in Li et al. 2017 ("Pruning Filters for
Efficient ConvNets", iterative prune-and-retrain) and Molchanov et al. 2017 ("Pruning Convolutional
Neural Networks for Resource Efficient Inference": prune, fine-tune, repeat until a FLOPs budget).
Each iteration removes ``step`` of the remaining filters of the selected convs (a criterion of
``compression.importance``, ``compression.masks.structured_masks``), cuts them out physically
(``compression.channel_removal``), fine-tunes (``pipeline.fit.fit_and_test``) and measures params /
FLOPs / val top-1 (and latency); it stops at the first iteration whose size is at most
``target.fraction`` of the dense net's, or earlier when val top-1 falls below ``accuracy_floor``
or after ``max_iterations``.

Every finished iteration is saved in the run folder (``prune_until/iter_NNN/model.pt`` +
``iteration.json``); running the same job again in that folder reuses them and continues, with
the same result as an uninterrupted run (iteration i fine-tunes with seed + i).
"""
from __future__ import annotations

import copy
import json
import logging
import time
from pathlib import Path
from typing import Any, Mapping, Sequence

import torch
from omegaconf import DictConfig

from netcompress.compression.channel_removal import remove_channels
from netcompress.compression.checks import check_int, plain
from netcompress.compression.importance import check_weight_criterion
from netcompress.compression.masks import ROUNDINGS, SCOPES, check_choice, check_round_to, structured_masks
from netcompress.compression.sensitivity import candidate_layers
from netcompress.evaluation.model_stats import count_flops, count_parameters, measure_latency_ms
from netcompress.pipeline.fit import fit_and_test, run_folder

log = logging.getLogger(__name__)
KEY = "protocol"
PREFIX = "prune_until"
METRICS = ("params", "flops", "latency_ms")
FOLDER = "prune_until"          # <run>/prune_until/: spec.json, dense.json, iter_NNN/{model.pt, iteration.json}
SPEC = "spec.json"
DENSE = "dense.json"
ROW = "iteration.json"
MODEL = "model.pt"
PNG = "prune_until.png"
# Why the loop ended (``prune_until/stop_reason``).
STOP_REASONS = ("target_reached", "accuracy_floor", "max_iterations", "stalled")


def iteration_dir(root: Path, iteration: int) -> Path:
    return Path(root) / FOLDER / f"iter_{iteration:03d}"


def _patterns(value: object, key: str) -> list[str]:
    if isinstance(value, str) or not isinstance(value, Sequence) or not all(isinstance(p, str) for p in value):
        raise ValueError(f"`{key}` must be a list of module-name patterns (e.g. ['layer*']); got {value!r}")
    return list(value)


def _fraction(value: object, key: str, what: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0.0 < value < 1.0:
        raise ValueError(f"`{key}` must be in (0, 1) ({what}); got {value!r}")
    return float(value)


class PruneUntilProtocol:
    """Prune ``step`` of the remaining filters, remove them, fine-tune, measure; repeat until the budget.

    Args:
        target: ``metric`` (params | flops | latency_ms: the network's parameter count, FLOPs of one
            image, or median CPU batch-1 latency) and ``fraction`` (of the dense value, in (0, 1)):
            the loop stops at the first iteration at or below it.
        step: fraction of the remaining filters of the selected layers pruned per iteration, in (0, 1).
        importance: criterion of ``compression.importance`` scoring each filter from its weights (l1: filter
            L1 norm, Li et al. 2017 | l2).
        scope: ``layer`` (each layer loses ``step`` of its filters) | ``global`` (one threshold over all).
        rounding: ``nearest`` | ``keep_floor`` (scope=layer; see ``compression.masks.pruned_count``).
        round_to: kept filters per layer rounded down to a multiple of this (never below one multiple);
            null = off.
        include/exclude/skip_first_last: the convs to prune (fnmatch patterns; stem conv and classifier
            skipped by default). Only convs whose filters can go alone are pruned (in a ResNet the
            block's first conv; convs tied to the residual stream are skipped, as Li et al. do).
        accuracy_floor: stop early once an iteration's val top-1 (a fraction) is below this; null = never.
        max_iterations: at most this many iterations.
        finetune: ``lr`` (null = optimizer.lr) and ``epochs`` (>= 1) of each iteration's fine-tuning.
        train_dense: without ``init_from``, train the dense net first with this run's config (the lottery
            protocol's dense stage in ``store_dir``, reused by every job with the same config); false =
            init_from is required.
        store_dir: the shared stage store (``${paths.store_dir}``).
    """

    def __init__(self, target: Mapping | None = None, step: float = 0.2, importance: str = "l1",
                 scope: str = "layer", rounding: str = "nearest", round_to: int | None = None,
                 include: Sequence[str] = ("*",), exclude: Sequence[str] = (), skip_first_last: bool = True,
                 accuracy_floor: float | None = None, max_iterations: int = 20, finetune: Mapping | None = None,
                 train_dense: bool = True, store_dir: str | None = None) -> None:
        target = dict(plain(target) or {})
        unknown = set(target) - {"metric", "fraction"}
        if unknown:
            raise ValueError(f"{KEY}.target has unknown keys {sorted(unknown)}; valid keys: metric, fraction")
        self.metric = check_choice(target.get("metric", "flops"), METRICS, f"`{KEY}.target.metric`")
        self.target = _fraction(target.get("fraction", 0.5), f"{KEY}.target.fraction",
                                "the fraction of the dense net's size to reach; 0.5 = half")
        self.step = _fraction(step, f"{KEY}.step", "the fraction of the remaining filters pruned per iteration")
        self.importance = check_weight_criterion(importance, f"`{KEY}.importance`")
        self.scope = check_choice(scope, SCOPES, f"`{KEY}.scope`")
        self.rounding = check_choice(rounding, ROUNDINGS, f"`{KEY}.rounding`")
        if self.rounding != "nearest" and self.scope != "layer":
            raise ValueError(f"`{KEY}.rounding`={rounding!r} sets each layer's filter count: it needs "
                             f"{KEY}.scope=layer; got {scope!r}")
        self.round_to = check_round_to(round_to, f"`{KEY}.round_to`")
        self.include = _patterns(plain(include), f"{KEY}.include")
        self.exclude = _patterns(plain(exclude), f"{KEY}.exclude")
        if not isinstance(skip_first_last, bool):
            raise ValueError(f"`{KEY}.skip_first_last` must be true or false; got {skip_first_last!r}")
        self.skip_first_last = skip_first_last
        if accuracy_floor is not None and (isinstance(accuracy_floor, bool) or
                                           not isinstance(accuracy_floor, (int, float)) or
                                           not 0.0 <= accuracy_floor <= 1.0):
            raise ValueError(f"`{KEY}.accuracy_floor` must be null or a val top-1 fraction in [0, 1] (0.9 = 90%); "
                             f"got {accuracy_floor!r}")
        self.accuracy_floor = None if accuracy_floor is None else float(accuracy_floor)
        self.max_iterations = check_int(max_iterations, f"{KEY}.max_iterations", 1)
        finetune = dict(plain(finetune) or {})
        unknown = set(finetune) - {"lr", "epochs"}
        if unknown:
            raise ValueError(f"{KEY}.finetune has unknown keys {sorted(unknown)}; valid keys: lr, epochs")
        lr = finetune.get("lr")
        if lr is not None and (isinstance(lr, bool) or not isinstance(lr, (int, float)) or lr <= 0):
            raise ValueError(f"`{KEY}.finetune.lr` must be null (optimizer.lr) or a positive number; got {lr!r}")
        self.finetune = {"lr": None if lr is None else float(lr),
                         "epochs": check_int(finetune.get("epochs", 1), f"{KEY}.finetune.epochs", 1)}
        if not isinstance(train_dense, bool):
            raise ValueError(f"`{KEY}.train_dense` must be true or false; got {train_dense!r}")
        self.train_dense = train_dense
        self.store_dir = store_dir

    def settings(self) -> dict:
        """What determines the iterations' networks (part of ``spec.json``); the stopping rule
        (target, accuracy_floor, max_iterations) is not: a rerun with another one reuses them."""
        return {"step": self.step, "importance": self.importance, "scope": self.scope, "rounding": self.rounding,
                "round_to": self.round_to, "include": self.include, "exclude": self.exclude,
                "skip_first_last": self.skip_first_last, "finetune": self.finetune}

    # ----- the job ----------------------------------------------------------------------------
    def run(self, cfg: DictConfig) -> tuple[dict, dict]:
        """Check, get the dense net, iterate (reusing finished iterations), test the last net."""
        from netcompress.pipeline.entries import compression_entries
        from netcompress.protocols.lottery import job_base

        if cfg.get("ckpt_path"):
            raise ValueError(f"protocol=prune_until resumes from its run folder ({FOLDER}/iter_*: run the same job "
                             f"again with hydra.run.dir=<that run>), not from ckpt_path; got "
                             f"ckpt_path={cfg.ckpt_path!r}")
        used = sorted(set(cfg.get("callbacks") or {}) & set(compression_entries()))
        if used:
            raise ValueError(f"protocol=prune_until prunes and fine-tunes by itself, without the job's compression "
                             f"callbacks; remove compression={used}")
        if not cfg.get("init_from") and not self.train_dense:
            raise ValueError(f"protocol=prune_until needs the trained dense net: set init_from=<run>/model.pt, or "
                             f"{KEY}.train_dense=true to train it first with this config (kept in {KEY}.store_dir)")
        base = job_base(cfg)
        datamodule = _instantiate(cfg.data)
        datamodule.setup("validate")
        input_size = tuple(int(s) for s in datamodule.input_size)
        num_classes = int(datamodule.num_classes)
        example = torch.zeros(1, *input_size)
        repeats = int(cfg.get("latency_repeats") or 30)

        # Before any training: the layers, and the smallest net the loop can make (the floor).
        shape_net, source = self._shape_net(cfg, base, num_classes)
        layers, skipped = candidate_layers(shape_net, self.include, self.exclude, self.skip_first_last,
                                           "structured", example, key=KEY)
        names = list(layers)
        for name, why in skipped.items():
            log.info("prune_until: skipping %s (%s)", name, why)
        floor = self._check_floor(shape_net, names, example, input_size, repeats)
        folder = (run_folder(cfg) or Path.cwd())
        spec = {"version": 1, "settings": self.settings(), "job": _job_parts(base, self.store_dir),
                "dense": source, "layers": names, "latency_measured": self.metric == "latency_ms"}
        _check_spec(folder / FOLDER, spec)

        dense = self._dense_net(cfg, base)
        if int(dense.get_classifier().out_features) != num_classes:
            raise ValueError(f"init_from has {dense.get_classifier().out_features} classes but the data has "
                             f"{num_classes}; point init_from at a run on the same data set")
        dense_row = self._dense_row(base, dense, folder, names, input_size, repeats)

        history, stop_reason, resumed = [dense_row], None, 0
        net = dense
        train_time = 0.0
        for it in range(1, self.max_iterations + 1):
            row_file = iteration_dir(folder, it) / ROW
            if row_file.is_file():  # finished before: reuse
                row = json.loads(row_file.read_text())
                net = _load(iteration_dir(folder, it) / MODEL)
                resumed += 1
            else:
                masks = structured_masks({n: net.get_submodule(n) for n in names}, self.step, self.scope,
                                         self.importance, rounding=self.rounding, round_to=self.round_to)
                if all(bool(m.all()) for m in masks.values()):
                    stop_reason = "stalled"
                    log.warning("prune_until: iteration %d would prune no filter (step %.3g of layers this small "
                                "rounds to 0); stopping", it, self.step)
                    break
                row, net = self._iteration(base, cfg, net, masks, dense, dense_row, names, it, folder, example,
                                           input_size, repeats)
            train_time += float(row.get("train_time_s", 0.0))
            history.append(row)
            stop_reason = self._stop(row)
            if stop_reason:
                break
        else:
            stop_reason = "max_iterations"

        last = history[-1]
        png = folder / PNG
        plot(history, self.metric, self.target, self.accuracy_floor, floor[self.metric], png)
        final_cfg = _final_config(cfg)
        results, objects = fit_and_test(final_cfg, start=copy.deepcopy(net).train(), fit=False, test=True,
                                        parent=copy.deepcopy(dense).eval())
        results.update({k: v for k, v in last.items() if k.startswith("val/")})
        extra = {f"{PREFIX}/metric": self.metric, f"{PREFIX}/target": self.target,
                 f"{PREFIX}/history": history, f"{PREFIX}/iterations": len(history) - 1,
                 f"{PREFIX}/resumed_iterations": resumed, f"{PREFIX}/stop_reason": stop_reason,
                 f"{PREFIX}/target_reached": bool(len(history) > 1 and last[f"{self.metric}_fraction"] <= self.target),
                 f"{PREFIX}/final_params_fraction": last["params_fraction"],
                 f"{PREFIX}/final_flops_fraction": last["flops_fraction"],
                 f"{PREFIX}/final_val_acc1": last.get("val/acc1"),
                 f"{PREFIX}/dense_val_acc1": dense_row.get("val/acc1"),
                 f"{PREFIX}/dense_params": dense_row["params"], f"{PREFIX}/dense_flops": dense_row["flops"],
                 f"{PREFIX}/floor_fraction": floor[self.metric], f"{PREFIX}/layers": names,
                 f"{PREFIX}/skipped_layers": sorted(skipped), f"{PREFIX}/final_kept": last["kept"],
                 f"{PREFIX}/dense_source": source, f"{PREFIX}/train_time_s": train_time}
        if self.metric == "latency_ms":
            extra[f"{PREFIX}/final_latency_ms_fraction"] = last["latency_ms_fraction"]
        module = objects["module"]
        for key, value in extra.items():
            module.report_result(key, value)
        results.update(extra)
        _tell_wandb(objects["trainer"], png, extra)
        log.info("prune_until: %d iterations, stop: %s, %s fraction %.4f", len(history) - 1, stop_reason,
                 self.metric, last[f"{self.metric}_fraction"])
        return results, objects

    def _stop(self, row: Mapping) -> str | None:
        """The stop reason after this iteration's row, or None to go on (a floor breach wins over the
        target: the user learns that the small net is below the floor)."""
        acc = row.get("val/acc1")
        if self.accuracy_floor is not None and acc is not None and acc < self.accuracy_floor:
            return "accuracy_floor"
        if row[f"{self.metric}_fraction"] <= self.target:
            return "target_reached"
        return None

    # ----- dense net, floor ---------------------------------------------------------------------
    def _shape_net(self, cfg: DictConfig, base: dict, num_classes: int) -> tuple[torch.nn.Module, str]:
        """A net with the dense architecture (init_from's, else a fresh one: only shapes matter) and
        where the dense weights come from."""
        if cfg.get("init_from"):
            from netcompress.models.serialization import build_net, read_saved_net

            path = Path(str(cfg.init_from)).expanduser().resolve()
            return build_net(read_saved_net(cfg.init_from, key="init_from")).eval(), f"init_from:{path}"
        net = _instantiate(cfg.model, num_classes=num_classes).eval()
        stages = self._stages()
        return net, f"store:{stages.store.path('dense', stages.dense_parts(base)).name}"

    def _stages(self):
        from netcompress.protocols.stage_store import StageStore
        from netcompress.protocols.stages import Stages

        return Stages(StageStore(self.store_dir), rounds=None, snapshot_steps=[0], rewind_step=0, dense_callbacks=[])

    def _dense_net(self, cfg: DictConfig, base: dict) -> torch.nn.Module:
        if cfg.get("init_from"):
            from netcompress.models.serialization import build_net, read_saved_net

            return build_net(read_saved_net(cfg.init_from, key="init_from")).eval()
        from netcompress.protocols.stages import load_stage_net

        return load_stage_net(self._stages().dense(base)).eval()

    def _check_floor(self, net: torch.nn.Module, names: list[str], example: torch.Tensor,
                     input_size: tuple, repeats: int) -> dict[str, float]:
        """Fractions of the net with one filter (or one ``round_to`` multiple) left in every selected
        layer: the smallest the loop can reach. A target below it fails here, before any training."""
        keep = {}
        for name in names:
            n = int(net.get_submodule(name).out_channels)
            mask = torch.zeros(n, dtype=torch.bool)
            mask[:min(n, self.round_to or 1)] = True
            keep[name] = mask
        small = remove_channels(net, keep, example)
        floor = {"params": count_parameters(small)[0] / count_parameters(net)[0],
                 "flops": count_flops(small, input_size) / count_flops(net, input_size)}
        if self.metric == "latency_ms":
            floor["latency_ms"] = (measure_latency_ms(small, input_size, repeats=repeats) /
                                   measure_latency_ms(net, input_size, repeats=repeats))
        if self.target < floor[self.metric]:
            per = f"one multiple of round_to={self.round_to}" if self.round_to else "one filter"
            raise ValueError(f"`{KEY}.target.fraction`={self.target} cannot be reached: with {per} left in each of "
                             f"the {len(names)} prunable layers the net keeps {floor[self.metric]:.4f} of its dense "
                             f"{self.metric}; use a fraction >= {floor[self.metric]:.4f}, or prune more layers "
                             f"({KEY}.include/exclude/skip_first_last)")
        return floor

    def _dense_row(self, base: dict, dense: torch.nn.Module, folder: Path, names: list[str], input_size: tuple,
                   repeats: int) -> dict:
        """Iteration 0: the dense net's size and val figures (cached in ``prune_until/dense.json``)."""
        path = folder / FOLDER / DENSE
        if path.is_file():
            return json.loads(path.read_text())
        row = {"iteration": 0, **self._measure(dense, names, input_size, repeats)}
        row.update({f"{k}_fraction": 1.0 for k in METRICS if k in row})
        row.update(_validate(base, dense, folder / FOLDER))
        path.parent.mkdir(parents=True, exist_ok=True)
        _write_json(path, row)
        return row

    def _measure(self, net: torch.nn.Module, names: list[str], input_size: tuple, repeats: int) -> dict:
        row = {"params": count_parameters(net)[0], "flops": count_flops(net, input_size),
               "kept": {n: int(net.get_submodule(n).out_channels) for n in names}}
        if self.metric == "latency_ms":
            row["latency_ms"] = measure_latency_ms(net, input_size, repeats=repeats)
        return row

    # ----- one iteration ------------------------------------------------------------------------
    def _iteration(self, base: dict, cfg: DictConfig, net: torch.nn.Module, masks: Mapping, dense: torch.nn.Module,
                   dense_row: Mapping, names: list[str], it: int, folder: Path, example: torch.Tensor,
                   input_size: tuple, repeats: int) -> tuple[dict, torch.nn.Module]:
        """Remove the masked filters, fine-tune with seed + it, save, measure; (row, the saved net reloaded)."""
        from netcompress.protocols.stages import _stage_config, save_net, with_overrides

        out = iteration_dir(folder, it)
        out.mkdir(parents=True, exist_ok=True)
        thin = remove_channels(net, dict(masks), example).train()
        overrides = {"seed": int(base["seed"]) + it, "trainer.max_epochs": self.finetune["epochs"],
                     "trainer.max_steps": -1}
        if self.finetune["lr"] is not None:
            overrides["optimizer.lr"] = self.finetune["lr"]
        t0 = time.perf_counter()
        metrics, objects = fit_and_test(_stage_config(with_overrides(base, overrides), out), start=thin, test=False)
        train_time = time.perf_counter() - t0
        val = {k: v for k, v in metrics.items() if k.startswith("val/")}
        if "val/acc1" not in val:  # no validation ran in the fine-tune (check_val_every_n_epoch > epochs)
            trainer, module, datamodule = objects["trainer"], objects["module"], objects["datamodule"]
            val = {k: float(v) for k, v in trainer.validate(module, datamodule=datamodule, verbose=False)[0].items()
                   if k.startswith("val/")}
        save_net(objects["module"].net.cpu(), out / MODEL, base)
        net = _load(out / MODEL)  # the next iteration starts from the saved net, as a resumed run does
        row = {"iteration": it, "seed": int(base["seed"]) + it, **self._measure(net, names, input_size, repeats),
               **val, "train_time_s": train_time}
        row.update({f"{k}_fraction": row[k] / dense_row[k] for k in METRICS if k in row})
        _write_json(out / ROW, row)  # written last: an iteration folder without it is redone
        log.info("prune_until: iteration %d: params %.4f, flops %.4f of dense, val/acc1 %s", it,
                 row["params_fraction"], row["flops_fraction"], row.get("val/acc1"))
        return row, net


# ----- helpers ----------------------------------------------------------------------------------

def _instantiate(config: Any, **kwargs: Any) -> Any:
    from netcompress.pipeline.build import instantiate

    return instantiate(config, **kwargs)


def _load(path: Path) -> torch.nn.Module:
    from netcompress.models.serialization import load_model

    return load_model(path).train()


def _write_json(path: Path, value: Any) -> None:
    from netcompress.protocols.stage_store import write_json_atomic

    write_json_atomic(Path(path), value)


def _job_parts(base: dict, store_dir: str | None) -> dict:
    """The job settings that determine the iterations (the dense stage's key parts: data, model,
    module, optimizer, scheduler, trainer, seed, threads)."""
    from netcompress.protocols.stage_store import StageStore
    from netcompress.protocols.stages import Stages

    parts = Stages(StageStore(store_dir or "unused"), rounds=None, snapshot_steps=[0], rewind_step=0,
                   dense_callbacks=[]).dense_parts(base)
    parts.pop("snapshot_steps", None)
    parts.pop("stage", None)
    return json.loads(json.dumps(parts, sort_keys=True, default=str))


def _check_spec(root: Path, spec: dict) -> None:
    """Write ``spec.json`` on the first run; a rerun in the same folder must have the same one."""
    path = root / SPEC
    spec = json.loads(json.dumps(spec, sort_keys=True, default=str))
    if path.is_file():
        old = json.loads(path.read_text())
        if old != spec:
            differ = sorted(k for k in set(old) | set(spec) if old.get(k) != spec.get(k))
            inner = [f"{k}.{j}" for k in differ if isinstance(old.get(k), dict) and isinstance(spec.get(k), dict)
                     for j in sorted(set(old[k]) | set(spec[k])) if old[k].get(j) != spec[k].get(j)]
            raise ValueError(f"the run folder's {root}/ holds iterations made with other settings ({inner or differ}); "
                             "run in a new folder (hydra.run.dir=...) or delete it; only protocol.target, "
                             "accuracy_floor and max_iterations may change between reruns")
        return
    root.mkdir(parents=True, exist_ok=True)
    _write_json(path, spec)


def _validate(base: dict, net: torch.nn.Module, folder: Path) -> dict[str, float]:
    """val/* of ``net`` with the job's data and module (one validation pass, no training)."""
    from netcompress.pipeline.build import build
    from netcompress.pipeline.fit import set_start
    from netcompress.protocols.stages import _stage_config

    datamodule, module, trainer = build(_stage_config(base, folder))
    set_start(module, copy.deepcopy(net).train())
    out = trainer.validate(module, datamodule=datamodule, verbose=False)
    return {k: float(v) for k, v in (out[0] if out else {}).items() if k.startswith("val/")}


def _final_config(cfg: DictConfig) -> DictConfig:
    """The job's config for testing the last net (its weights come as ``start``, not from init_from)."""
    from omegaconf import open_dict

    cfg = copy.deepcopy(cfg)
    with open_dict(cfg):
        cfg.init_from = None
        cfg.ckpt_path = None
    return cfg


def plot(history: Sequence[Mapping], metric: str, target: float, floor_acc: float | None, floor: float,
         path: Path) -> None:
    """prune_until.png: val top-1 vs the size fraction (params, FLOPs; latency if measured) per iteration."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.5, 4.5))
    keys = [k for k in METRICS if f"{k}_fraction" in history[0]]
    for key in keys:
        xs = [row[f"{key}_fraction"] for row in history]
        ys = [100 * row.get("val/acc1", float("nan")) for row in history]
        ax.plot(xs, ys, marker="o", markersize=4, label=key)
        if key == metric:
            for row, x, y in zip(history, xs, ys):
                ax.annotate(str(row["iteration"]), (x, y), textcoords="offset points", xytext=(3, 3), fontsize=7)
    ax.axvline(target, color="k", linestyle="--", linewidth=1, label=f"target {metric} {target:g}")
    ax.axvspan(0, floor, color="0.85", label=f"unreachable (< {floor:.3f})")
    if floor_acc is not None:
        ax.axhline(100 * floor_acc, color="r", linestyle=":", linewidth=1, label=f"accuracy floor {100 * floor_acc:g}%")
    ax.set_xlim(0, 1.02)
    ax.invert_xaxis()
    ax.set_xlabel("fraction of the dense net kept")
    ax.set_ylabel("val top-1 (%)")
    ax.set_title("prune_until: accuracy per iteration (labels: iteration)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)


def _tell_wandb(trainer, png: Path, extra: Mapping) -> None:
    """The plot and the scalar figures, when the run logs to wandb."""
    for logger in getattr(trainer, "loggers", []) or []:
        if type(logger).__name__ == "WandbLogger":
            import wandb

            logger.experiment.log({f"{PREFIX}/curve": wandb.Image(str(png))})
            logger.experiment.summary.update({k: v for k, v in extra.items() if isinstance(v, (int, float, str))})

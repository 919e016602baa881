"""The CPU importance mini study end to end: which filter criterion keeps the most accuracy at one FLOPs budget?

    python bench/bench_importance_mini.py --data-root ../shared/data/cifar10-jpeg --threads 1 --publish
    python bench/bench_importance_mini.py --smoke          # the same pipeline on synthetic data, < 3 min

Filter-importance criteria (compression/importance.py: Li et al. 2017 L1 norm, Molchanov et al. 2019
Taylor, mean activation, Liu et al. 2017 BN gamma, ShrinkBench's random baseline) and Li et al.'s
sensitivity-driven per-layer ratios, all removing ~49% of a narrow ResNet-20's FLOPs (half the
filters of every block's conv1) from the same dense parents and fine-tuned alike (4 epochs, lr 0.01),
with the presets conf/experiment/importance_mini_*.yaml:

1. dense: ``run.py -m experiment=importance_mini_dense seed=0,1`` into ``<out>/dense/seed_<seed>``;
2. filter: ``-m experiment=importance_mini_filter callbacks.magnitude_pruning.importance=l1,taylor,activation,random
   seed=0,1 init_from=<out>/dense/seed_${seed}/model.pt`` into ``<out>/compressed/<task_name>/seed_<seed>``
   (``${seed}`` resolves per job, so each seed's child starts from the same seed's parent; the preset's
   task_name is importance_mini_<criterion>);
3. bn_gamma: ``-m experiment=importance_mini_bn_gamma ...`` (slimming on the same BN channels: magnitude
   pruning cannot score conv filters by their BN's gamma; a sweep of its own, as it has no
   callbacks.magnitude_pruning to sweep);
4. sensitivity: ``-m experiment=importance_mini_sensitivity ...`` (protocol=sensitivity, l1, the same
   FLOPs budget).

Prints each phase's wall time, a table per criterion (test top-1 mean +- std over seeds, the per-seed
paired difference to l1 with its 95% CI, FLOPs and parameters kept, fine-tuning time) and the report
(report.py's tables and plots: accuracy vs FLOPs, one line per criterion). report.py labels a run by its
compression callbacks (all criteria would read ``magnitude_pruning``, the sensitivity arm ``dense``), so
the rows are relabelled here by task_name before the report is written. ``--threads`` sets ``threads=``
and OMP/MKL threads of each job, ``--jobs`` runs that many jobs of a sweep at once
(hydra/launcher=local_parallel); the cores may be shared, so quote wall times with the load they ran
under. ``--publish`` copies report.md/csv, the PNG plots and the table to docs/results/importance_mini/.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import statistics
import subprocess
import sys
import time
from collections import defaultdict
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

DENSE = "importance_mini_dense"
FILTER = "importance_mini_filter"            # swept over callbacks.magnitude_pruning.importance
CRITERIA = ["l1", "taylor", "activation", "random"]
OTHER = ["importance_mini_bn_gamma", "importance_mini_sensitivity"]  # one sweep each (no magnitude_pruning key)
PREFIX = "importance_mini_"
BASELINE = "l1"                              # the paired differences are to this criterion
TITLE = "Importance mini: criteria at ~49% fewer FLOPs (ResNet-20 x0.5, CIFAR-10)"  # fits the plots' width
PUBLISH_DIR = ROOT / "docs/results/importance_mini"

# --smoke: the same presets on tiny synthetic data, one (fine-tuning) epoch, tiny evaluator settings.
SMOKE = ["data=synthetic", "~data.train_subset", "data.train_size=64", "data.val_size=32", "data.test_size=32",
         "data.batch_size=32", "latency_repeats=2", "evaluators.cost.batch_sizes=[1,8]", "evaluators.cost.repeats_b1=3",
         "evaluators.cost.repeats_b64=2", "evaluators.retention.top_k_file=10"]
SMOKE_EPOCHS = {"importance_mini_bn_gamma": 2}  # its no-op epoch 0 + one fine-tuning epoch; the others: 1


def sweep(name: str, cmd: list[str], env: dict) -> float:
    """Run one ``run.py -m`` sweep; returns its wall time in seconds (a failed job does not stop it)."""
    print(f"\n== {name}: python {' '.join(cmd[1:])}", flush=True)
    start = time.perf_counter()
    proc = subprocess.run(cmd, cwd=ROOT, env=env)
    wall = time.perf_counter() - start
    print(f"== {name}: exit code {proc.returncode}, wall time {wall / 60:.2f} min", flush=True)
    return wall


def _number(value) -> float | None:
    return float(value) if isinstance(value, (int, float)) and not isinstance(value, bool) \
        and math.isfinite(float(value)) else None


def criterion_rows(root: Path) -> tuple[list[dict], list[dict]]:
    """report.collect's rows relabelled by criterion (task_name without the prefix), with the whole-net
    FLOPs / params fractions of the parent (cost/*_ratio), the fine-tuning lr and, for slimming (which
    reports no compress/sparsity), the fraction of channels removed; and the failed jobs."""
    from netcompress.report import collect

    rows, failed = collect(root)
    for row in rows:
        r = json.loads((Path(row["dir"]) / "results.json").read_text())
        config = r.get("config") or {}
        row["label"] = str(config.get("task_name", "?")).removeprefix(PREFIX)
        if row["label"] == "dense":
            row["flops_fraction"] = row["params_fraction"] = 1.0
        for key, ratio in (("flops_fraction", "cost/flops_ratio"), ("params_fraction", "cost/params_ratio")):
            value = _number(r.get(ratio))
            if value:
                row[key] = 1.0 / value  # parent / child -> child / parent
        slimming = (config.get("callbacks") or {}).get("slimming")
        if isinstance(slimming, dict):
            row["lr"] = slimming.get("finetune_lr") or row["lr"]  # epoch 0 runs at lr ~0; this is the fine-tuning lr
            row["sparsity"] = float(r.get("compress/channels_pruned") or 0.0)
            row["sparsity_recorded"] = r.get("compress/channels_pruned") is not None
        row["train_time_s"] = _number(r.get("train_time_s"))
    by_label = defaultdict(list)
    for row in rows:
        by_label[row["label"]].append(row)
    for members in by_label.values():  # one report line per criterion: its seeds' mean pruned fraction
        mean = statistics.fmean(m["sparsity"] for m in members)
        for m in members:
            m["sparsity"], m["remaining"] = mean, 1.0 - mean
    return rows, failed


def _mean_std(values: list[float], scale: float = 1.0, spec: str = ".2f") -> str:
    values = [v * scale for v in values if v is not None]
    if not values:
        return ""
    if len(values) == 1:
        return format(values[0], spec)
    return f"{format(statistics.fmean(values), spec)} +- {format(statistics.stdev(values), spec)}"


def criterion_table(rows: list[dict]) -> list[str]:
    """Markdown lines: one row per criterion (dense first, then by mean accuracy)."""
    from netcompress.report import ci95

    by_label: dict[str, list[dict]] = defaultdict(list)
    for row in rows:
        by_label[row["label"]].append(row)
    base = {r["seed"]: float(r["acc1"]) for r in by_label.get(BASELINE, [])}
    lines = [f"| criterion | n | test acc1 (%) | minus {BASELINE} (points, paired) | 95% CI | FLOPs kept (%) "
             "| params kept (%) | train time (s) |", "|---|---:|---:|---:|---:|---:|---:|---:|"]
    order = sorted(by_label, key=lambda k: (k != "dense", -statistics.fmean(float(r["acc1"]) for r in by_label[k])))
    for label in order:
        runs = by_label[label]
        diffs = [float(r["acc1"]) - base[r["seed"]] for r in runs if r["seed"] in base]
        diff = ci = ""
        if label not in ("dense", BASELINE) and diffs:
            diff = _mean_std(diffs, 100)
            half = ci95(statistics.stdev(diffs) if len(diffs) > 1 else None, len(diffs))
            ci = "" if half is None else (f"[{100 * (statistics.fmean(diffs) - half):+.2f}, "
                                          f"{100 * (statistics.fmean(diffs) + half):+.2f}]")
        lines.append(f"| {label} | {len(runs)} | {_mean_std([float(r['acc1']) for r in runs], 100)} | {diff} | {ci} "
                     f"| {_mean_std([r.get('flops_fraction') for r in runs], 100, '.1f')} "
                     f"| {_mean_std([r.get('params_fraction') for r in runs], 100, '.1f')} "
                     f"| {_mean_std([r.get('train_time_s') for r in runs], 1, '.0f')} |")
    return lines


def write_report(root: Path, rows: list[dict], failed: list[dict], title: str) -> list[Path]:
    """report.py's report (make_report's steps) of the relabelled rows: report.md/csv, accuracy vs
    FLOPs and vs remaining filters (one line per criterion), and the retention plots."""
    from netcompress import report

    table = report.aggregate(rows)
    paths = [root / name for name in report.OUTPUTS]
    report._plot(table, "remaining", "filters remaining (%) of the pruned layers, log scale", paths[2], title,
                 invert=True)
    report._plot(table, "flops_mean", "MFLOPs per image, log scale", paths[3], title, invert=True)
    extra = report.retention_plots(rows, root, title)
    report.write_markdown(table, failed, paths[0], title, root, report.paired_differences(rows),
                          figures=[p.name for p in extra])
    report.write_csv(table, paths[1])
    return paths + extra


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data-root", default=str(ROOT.parent / "shared/data/cifar10-jpeg"))
    parser.add_argument("--threads", type=int, default=1, help="torch/OMP threads per job (threads=)")
    parser.add_argument("--jobs", type=int, default=1, help="jobs of a sweep run at once (hydra/launcher=local_parallel)")
    parser.add_argument("--seeds", default="0,1", help="comma-separated seeds, e.g. 0,1,2")
    parser.add_argument("--criteria", default=",".join(CRITERIA), help="importance_mini_filter's swept criteria")
    parser.add_argument("--out", default=None, help="study folder (default logs/bench_importance_mini[_smoke]); wiped")
    parser.add_argument("--smoke", action="store_true", help="tiny synthetic-data run of the same pipeline (< 3 min)")
    parser.add_argument("--publish", action="store_true", help=f"copy report, plots and table to {PUBLISH_DIR}")
    parser.add_argument("overrides", nargs="*", help="extra Hydra overrides for every job")
    args = parser.parse_args()
    if args.smoke and args.publish:
        parser.error("--publish with --smoke would publish synthetic-data figures; drop one of them")

    out = Path(args.out or ROOT / ("logs/bench_importance_mini" + ("_smoke" if args.smoke else ""))).resolve()
    shutil.rmtree(out, ignore_errors=True)
    env = {**os.environ, "OMP_NUM_THREADS": str(args.threads), "MKL_NUM_THREADS": str(args.threads),
           "WANDB_MODE": "offline", "PYTHONUNBUFFERED": "1"}
    common = [f"seed={args.seeds}", f"threads={args.threads}", "~hydra.callbacks.report",  # one report at the end
              *(SMOKE if args.smoke else [f"data.root={args.data_root}"]),
              *([f"hydra/launcher=local_parallel", f"hydra.launcher.n_jobs={args.jobs}"] if args.jobs > 1 else []),
              *args.overrides]

    def epochs(preset: str) -> list[str]:
        return [f"trainer.max_epochs={SMOKE_EPOCHS.get(preset, 1)}"] if args.smoke else []

    run = [sys.executable, str(ROOT / "run.py"), "-m"]
    parent = f"init_from={out}/dense/seed_${{seed}}/model.pt"  # resolved per job: the same seed's parent
    per_arm = [f"hydra.sweep.dir={out}/compressed", "hydra.sweep.subdir=${task_name}/seed_${seed}"]

    walls = {"dense": sweep("dense", [*run, f"experiment={DENSE}", *common, *epochs(DENSE),
                                      f"hydra.sweep.dir={out}/dense", "hydra.sweep.subdir=seed_${seed}"], env)}
    walls["filter"] = sweep("filter", [*run, f"experiment={FILTER}", *common, *epochs(FILTER),
                                       f"callbacks.magnitude_pruning.importance={args.criteria}", parent, *per_arm], env)
    for preset in OTHER:
        walls[preset.removeprefix(PREFIX)] = sweep(preset.removeprefix(PREFIX),
                                                   [*run, f"experiment={preset}", *common, *epochs(preset), parent,
                                                    *per_arm], env)
    total = sum(walls.values())
    times = [f"{name}: {wall / 60:.2f} min" for name, wall in walls.items()] + [f"total: {total / 60:.2f} min"]
    load = f"({args.threads} thread(s) per job, {args.jobs} job(s) at once)"
    print("\nwall time " + "; ".join(times) + " " + load)

    rows, failed = criterion_rows(out)
    lines = criterion_table(rows)
    print("\n".join(lines))
    print(f"failed jobs: {len(failed)}", *[f"{f['dir']}: {f['error']}" for f in failed], sep="\n  ")

    title = TITLE + (" [SMOKE]" if args.smoke else "")
    written = write_report(out, rows, failed, title)
    print((out / "report.md").read_text())
    print("report files:", ", ".join(str(p) for p in written))
    command = " ".join(["python bench/bench_importance_mini.py", f"--threads {args.threads}", f"--jobs {args.jobs}",
                        f"--seeds {args.seeds}", f"--criteria {args.criteria}", *(["--smoke"] if args.smoke else []),
                        *args.overrides])
    summary = [f"# {title}", "", "Half the filters of every block's conv1 (48.6% of the FLOPs) removed from the same dense "
               "parents by each criterion, fine-tuned 4 epochs at lr 0.01 (conf/experiment/importance_mini_*.yaml)"
               + (" [SMOKE: synthetic data, 1 epoch]" if args.smoke else "") + ".", "", f"command: `{command}`", "",
               "wall time " + "; ".join(times) + " " + load, "",
               "Test top-1 mean +- sample std over seeds; *minus l1*: per-seed paired difference to the l1 arm "
               "(same parent), mean +- std and 95% CI (Student t); FLOPs / params kept: the thin net's whole-net "
               "figures as a fraction of its parent (cost/flops_ratio, cost/params_ratio); train time: the "
               "job's fit (bn_gamma: + its no-op epoch; sensitivity: without the analysis).", "", *lines, "",
               f"failed jobs: {len(failed)}", *[f"- {f['dir']}: {f['error']}" for f in failed]]
    (out / "importance_table.md").write_text("\n".join(summary) + "\n")
    if args.publish:
        PUBLISH_DIR.mkdir(parents=True, exist_ok=True)
        for path in [*written, out / "importance_table.md"]:
            if path.is_file():
                shutil.copy(path, PUBLISH_DIR / path.name)
        print("published to", PUBLISH_DIR)
    sys.exit(1 if failed else 0)


if __name__ == "__main__":
    main()

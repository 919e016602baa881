"""The CPU retention mini study end to end: what do ~4x-compressed nets keep of their dense parent?

    python bench/bench_retention_mini.py --data-root ../shared/data/cifar10-jpeg --threads 1 --publish
    python bench/bench_retention_mini.py --smoke          # the same pipeline on synthetic data, < 3 min
    python bench/bench_retention_mini.py --only retention_mini_qat8 retention_mini_qat4 --publish  # re-run two presets

Hooker et al. 2019 ("What do compressed deep neural networks forget?") on a narrow ResNet-20 (width 0.5)
and 10k CIFAR-10 images, with the presets conf/experiment/retention_mini_*.yaml:

1. dense: ``run.py -m experiment=retention_mini_dense seed=0,1`` into ``<out>/dense/seed_<seed>``;
2. compressed: ONE sweep over the techniques that start from the parent's weights,
   ``-m experiment=retention_mini_{magnitude_pruning,slimming,qat8,qat4} seed=0,1
   init_from=<out>/dense/seed_${seed}/model.pt`` into ``<out>/compressed/<task_name>/seed_<seed>``
   (``${seed}`` resolves per job, so each seed's child starts from the same seed's parent);
3. kd: ``-m experiment=retention_mini_kd seed=0,1 callbacks.kd.teachers=<out>/dense/seed_${seed}/model.pt``
   into ``<out>/kd/...``. A sweep of its own: overriding ``callbacks.kd.teachers`` in the compressed
   sweep would give its non-KD jobs a ``callbacks.kd`` entry without a ``_target_``, which the config
   checks refuse; and the KD student (width 0.25) cannot take the parent's weights via ``init_from``.

Every job evaluates [retention, cost, robustness, saliency] against its parent. Prints the wall time
of each phase and in all, a table of the headline figures per technique (mean +- std over seeds) and
report.py's report of ``<out>``. ``--threads`` sets ``threads=`` and OMP/MKL threads of each job,
``--jobs`` runs that many jobs of a sweep at once (hydra/launcher=local_parallel); the cores may be
shared, so quote wall times with the load they ran under. ``--publish`` copies report.md/csv, the
PNG plots, the table and the wall times to docs/results/retention_mini/.
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

DENSE = "retention_mini_dense"
FROM_PARENT = ["retention_mini_magnitude_pruning", "retention_mini_slimming", "retention_mini_qat8",
               "retention_mini_qat4"]  # init_from = the dense parent's model.pt
KD = "retention_mini_kd"               # callbacks.kd.teachers = the dense parent's model.pt
TITLE = "Retention mini study: ~4x-compressed narrow ResNet-20s vs their dense parent (CIFAR-10, 10k images)"
PUBLISH_DIR = ROOT / "docs/results/retention_mini"

# --smoke: the same presets on tiny synthetic data, one epoch, tiny evaluator settings. The presets'
# data.train_subset is not a synthetic-data argument, so it is deleted; '++' first (set or add) makes the
# delete valid also in the sweep's master config, which Hydra composes without the swept experiment=
# (and so without the presets' evaluation list, which the smoke settings below need: given again here).
SMOKE = ["data=synthetic", "++data.train_subset=1", "~data.train_subset", "evaluation=[retention,cost,robustness,saliency]",
         "data.train_size=128", "data.val_size=32", "data.test_size=64",
         "data.batch_size=32", "trainer.max_epochs=1", "latency_repeats=2",
         "evaluators.robustness.max_samples=32", "evaluators.robustness.severities=[1,3]",
         "evaluators.robustness.corruptions=[gaussian_noise,contrast]", "evaluators.robustness.adversarial_samples=16",
         "evaluators.robustness.pgd_steps=2", "evaluators.saliency.samples=8", "evaluators.saliency.grid_images=2",
         "evaluators.cost.batch_sizes=[1,8]", "evaluators.cost.repeats_b1=3", "evaluators.cost.repeats_b64=2",
         "evaluators.retention.top_k_file=10"]

# (column, results.json key, scale): the headline figures printed per technique
COLUMNS = [("test acc1 %", "test/acc1", 100), ("agree %", "retention/agreement", 100),
           ("forget %", "retention/forgetting", 100), ("new %", "retention/new_learning", 100),
           ("KL", "retention/kl", 1), ("ECE %", "retention/ece", 100),
           ("corr acc %", "robust/corruption_acc", 100), ("rel mCE", "robust/relative_mce", 1),
           ("PGD acc %", "robust/pgd_acc", 100), ("gradcam rho", "saliency/gradcam_spearman", 1),
           ("params x", "cost/params_ratio", 1), ("nonzero x", "cost/nonzero_params_ratio", 1),
           ("int8 size x", "int8_size_ratio", 1), ("int8 ORT speedup b1", "int8/speedup_vs_fp32_ort", 1)]
# Not listed: cost/speedup_b1. Before commit 'eager_runner: time both nets contiguous' it timed the trained
# child in channels_last against a contiguous parent (not like with like), and this study ran before it;
# for QAT it times the fake-quant PyTorch net anyway. int8/speedup_vs_fp32_ort is onnxruntime int8 vs fp32.


def int8_size_ratio(r: dict) -> float | None:
    """Parent model.pt bytes / the int8 ONNX file's (QAT runs; the evaluators see the fp32 net, whose
    cost/size_ratio is ~1): parent bytes = cost/size_ratio * cost/size_bytes."""
    ratio, size, int8 = r.get("cost/size_ratio"), r.get("cost/size_bytes"), r.get("int8/size_bytes")
    return ratio * size / int8 if ratio and size and int8 else None


def sweep(name: str, cmd: list[str], env: dict) -> float:
    """Run one ``run.py -m`` sweep; returns its wall time in seconds (a failed job does not stop it)."""
    print(f"\n== {name}: python {' '.join(cmd[1:])}", flush=True)
    start = time.perf_counter()
    proc = subprocess.run(cmd, cwd=ROOT, env=env)
    wall = time.perf_counter() - start
    print(f"== {name}: exit code {proc.returncode}, wall time {wall / 60:.2f} min", flush=True)
    return wall


def technique_table(root: Path) -> tuple[list[str], list[str]]:
    """Markdown lines of the headline figures, one row per task_name (mean +- std over seeds), and
    the folders of failed jobs."""
    by_task: dict[str, list[dict]] = defaultdict(list)
    failed = []
    for path in sorted(root.rglob("results.json")):
        r = json.loads(path.read_text())
        if r.get("status") != "ok":
            failed.append(f"{path.parent}: {r.get('error') or r.get('status')}")
            continue
        by_task[(r.get("config") or {}).get("task_name", "?")].append({**r, "int8_size_ratio": int8_size_ratio(r)})
    header = "| technique | n | " + " | ".join(c for c, _, _ in COLUMNS) + " |"
    lines = [header, "|---|---:|" + "---:|" * len(COLUMNS)]
    order = [DENSE, *FROM_PARENT, KD]
    for task in sorted(by_task, key=lambda t: (order.index(t) if t in order else len(order), t)):
        runs = by_task[task]
        cells = []
        for _, key, scale in COLUMNS:
            values = [float(r[key]) * scale for r in runs if isinstance(r.get(key), (int, float))
                      and math.isfinite(float(r[key]))]
            if not values:
                cells.append("")
            elif len(values) == 1:
                cells.append(f"{values[0]:.3g}")
            else:
                cells.append(f"{statistics.fmean(values):.3g} +- {statistics.stdev(values):.2g}")
        lines.append(f"| {task.removeprefix('retention_mini_')} | {len(runs)} | " + " | ".join(cells) + " |")
    return lines, failed


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data-root", default=str(ROOT.parent / "shared/data/cifar10-jpeg"))
    parser.add_argument("--threads", type=int, default=1, help="torch/OMP threads per job (threads=)")
    parser.add_argument("--jobs", type=int, default=1, help="jobs of a sweep run at once (hydra/launcher=local_parallel)")
    parser.add_argument("--seeds", default="0,1", help="comma-separated seeds, e.g. 0,1,2")
    parser.add_argument("--out", default=None, help="study folder (default logs/bench_retention_mini[_smoke]); wiped")
    parser.add_argument("--smoke", action="store_true", help="tiny synthetic-data run of the same pipeline (< 3 min)")
    parser.add_argument("--publish", action="store_true", help=f"copy report, plots and table to {PUBLISH_DIR}")
    parser.add_argument("--report-only", action="store_true",
                        help="run no job: rebuild the table and report of an existing study folder")
    parser.add_argument("--only", nargs="+", default=None, metavar="PRESET",
                        help="re-run only these compressed presets (e.g. retention_mini_qat8) in an existing study "
                             "folder, keeping its dense parents and other jobs; the report covers all of them")
    parser.add_argument("overrides", nargs="*", help="extra Hydra overrides for every job")
    args = parser.parse_args()
    if args.smoke and args.publish:
        parser.error("--publish with --smoke would publish synthetic-data figures; drop one of them")

    out = Path(args.out or ROOT / ("logs/bench_retention_mini" + ("_smoke" if args.smoke else ""))).resolve()
    only = [] if args.report_only else args.only
    if only is not None:
        unknown = sorted(set(only) - set(FROM_PARENT) - {KD})
        if unknown:
            parser.error(f"--only takes presets among {', '.join(FROM_PARENT + [KD])}; got {unknown}")
        if not (out / "dense").is_dir():
            parser.error(f"--only re-runs jobs of an existing study, but {out / 'dense'} does not exist")
        for preset in only:  # the old jobs of these presets go; the rest of the study stays
            shutil.rmtree(out / ("kd" if preset == KD else "compressed") / preset, ignore_errors=True)
    else:
        shutil.rmtree(out, ignore_errors=True)
    env = {**os.environ, "OMP_NUM_THREADS": str(args.threads), "MKL_NUM_THREADS": str(args.threads),
           "WANDB_MODE": "offline", "PYTHONUNBUFFERED": "1"}
    common = [f"seed={args.seeds}", f"threads={args.threads}", "~hydra.callbacks.report",  # one report at the end
              *(SMOKE if args.smoke else [f"data.root={args.data_root}"]),
              *([f"hydra/launcher=local_parallel", f"hydra.launcher.n_jobs={args.jobs}"] if args.jobs > 1 else []),
              *args.overrides]
    run = [sys.executable, str(ROOT / "run.py"), "-m"]
    parent = f"{out}/dense/seed_${{seed}}/model.pt"  # resolved per job: the same seed's parent
    per_technique = "hydra.sweep.subdir=${task_name}/seed_${seed}"

    walls = {}
    from_parent = [p for p in FROM_PARENT if only is None or p in only]
    if only is None:
        walls["dense"] = sweep("dense", [*run, f"experiment={DENSE}", *common, f"hydra.sweep.dir={out}/dense",
                                         "hydra.sweep.subdir=seed_${seed}"], env)
    if from_parent:
        walls["compressed"] = sweep("compressed", [*run, f"experiment={','.join(from_parent)}", *common,
                                                   f"init_from={parent}", f"hydra.sweep.dir={out}/compressed",
                                                   per_technique], env)
    if only is None or KD in only:
        walls["kd"] = sweep("kd", [*run, f"experiment={KD}", *common, f"callbacks.kd.teachers={parent}",
                                   f"hydra.sweep.dir={out}/kd", per_technique], env)
    total = sum(walls.values())

    lines, failed = technique_table(out)
    times = [f"{name}: {wall / 60:.2f} min" for name, wall in walls.items()] + [f"total: {total / 60:.2f} min"]
    # every run of this study folder, so a re-run's table still shows what the other rows cost
    history_file = out / "wall_times.json"
    history = json.loads(history_file.read_text()) if only is not None and history_file.is_file() else []
    if walls:
        history.append({"presets": only or "all", "threads": args.threads, "jobs": args.jobs,
                        "minutes": {name: round(wall / 60, 2) for name, wall in walls.items()}})
    history_file.write_text(json.dumps(history, indent=2))
    print("\nwall time " + "; ".join(times) + f" ({args.threads} thread(s) per job, {args.jobs} job(s) at once)")
    print("\n".join(lines))
    print(f"failed jobs: {len(failed)}", *failed, sep="\n  ")

    from netcompress.report import make_report

    written = make_report(out, title=TITLE + (" [SMOKE: synthetic data]" if args.smoke else ""))
    print((out / "report.md").read_text())
    print("report files:", ", ".join(str(p) for p in written))
    command = " ".join(["python bench/bench_retention_mini.py", f"--threads {args.threads}", f"--jobs {args.jobs}",
                        f"--seeds {args.seeds}", *(["--smoke"] if args.smoke else []),
                        *(["--only", *only] if only else []), *(["--report-only"] if args.report_only else []),
                        *args.overrides])
    rerun = [f"This run re-ran only {', '.join(only)}; the other rows are the study folder's earlier jobs "
             "(their results.json record the commit that produced them).", ""] if only else []
    if only == []:
        rerun = ["Report rebuilt from the existing study folder (no job run).", ""]
    runs = [f"- {'all presets' if h['presets'] == 'all' else ', '.join(h['presets'])}: "
            + "; ".join(f"{k} {v:.2f} min" for k, v in h["minutes"].items())
            + f" ({h['threads']} thread(s) per job, {h['jobs']} job(s) at once)" for h in history]
    this_run = ["wall time " + "; ".join(times) + f" ({args.threads} thread(s) per job, {args.jobs} job(s) at once)",
                ""] if walls else []
    summary = [f"# {TITLE}", "", f"command: `{command}`", "", *rerun, *this_run,
               *(["runs of this study folder (wall_times.json):", *runs, ""] if history and only is not None else []),
               "Mean +- sample std over seeds; ratios are parent / child (> 1 = smaller or faster); "
               "key definitions: docs/retention.md, docs/_parts/robustness.md, docs/_parts/saliency.md, "
               "docs/_parts/cost.md.", "", *lines, "", f"failed jobs: {len(failed)}", *[f"- {f}" for f in failed]]
    (out / "retention_table.md").write_text("\n".join(summary) + "\n")
    if args.publish:
        PUBLISH_DIR.mkdir(parents=True, exist_ok=True)
        for path in [*written, out / "retention_table.md"]:
            if path.is_file():
                shutil.copy(path, PUBLISH_DIR / path.name)
        print("published to", PUBLISH_DIR)
    sys.exit(1 if failed else 0)


if __name__ == "__main__":
    main()

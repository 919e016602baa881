"""The CPU mini Lottery-Ticket study end to end: one sweep, its wall time, the report table and plots.

    python bench/bench_lottery_mini.py --data-root ../shared/data/cifar10-jpeg --threads 2 --publish
    python bench/bench_lottery_mini.py --threads 2 --keep-store --publish   # continue an interrupted run

Runs ``python run.py -m experiment=lth_resnet20_cifar10_mini`` (its sweep: 5 seeds x 2 IMP rounds x
{dense, rewind k=0, reinit, dense_reinit_seed, dense_compute_matched}) into a fresh sweep folder with
a fresh stage store, so the dense runs and IMP rounds are trained inside the measured time, then
prints the wall time, how many trainings the shared stages saved, and the report (mean +- std over
seeds, paired differences with 95% CIs, compute). ``--keep-store`` keeps the stage store of an
earlier run (its finished dense runs, masks and retrainings are reused; the wall time then covers
only the rest). ``--threads`` sets OMP/torch threads of the jobs: the machine's cores are shared, so
quote figures together with the load they ran under. ``--publish`` copies the table and plots to
docs/results/.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data-root", default=str(ROOT.parent / "shared/data/cifar10-jpeg"))
    parser.add_argument("--threads", type=int, default=2, help="torch/OMP threads per job (cores are shared)")
    parser.add_argument("--experiment", default="lth_resnet20_cifar10_mini")
    parser.add_argument("--out", default=None, help="sweep folder (default logs/bench_<experiment>: each preset its own, "
                                                     "so one study never wipes another's stage store)")
    parser.add_argument("--publish", action="store_true", help="copy report.md/csv/png to docs/results/")
    parser.add_argument("--keep-store", action="store_true",
                        help="keep <out>/store from an earlier (e.g. interrupted) run: its finished stages are reused, "
                             "so the wall time covers only what is left")
    parser.add_argument("overrides", nargs="*", help="extra Hydra overrides")
    args = parser.parse_args()

    out = Path(args.out or ROOT / "logs" / f"bench_{args.experiment}")
    if args.keep_store and (out / "store").is_dir():
        for child in out.iterdir():  # the jobs' folders go; the stage store stays
            if child.name != "store":
                shutil.rmtree(child) if child.is_dir() else child.unlink()
    else:
        shutil.rmtree(out, ignore_errors=True)
    env = {**os.environ, "OMP_NUM_THREADS": str(args.threads), "MKL_NUM_THREADS": str(args.threads),
           "WANDB_MODE": "offline", "PYTHONUNBUFFERED": "1"}
    cmd = [sys.executable, str(ROOT / "run.py"), "-m", f"experiment={args.experiment}", f"data.root={args.data_root}",
           f"hydra.sweep.dir={out}", f"paths.store_dir={out}/store", f"threads={args.threads}", *args.overrides]
    print("command:", " ".join(cmd[1:]), flush=True)
    start = time.perf_counter()
    proc = subprocess.run(cmd, cwd=ROOT, env=env)
    wall = time.perf_counter() - start

    from netcompress.report import collect, make_report

    rows, failed = collect(out)
    stages = sorted((out / "store").glob("*-*[0-9a-f]"))
    stage_times = {s.name.split("-")[0]: [] for s in stages}
    for s in stages:
        metrics = s / "metrics.json"
        if metrics.is_file() and "train_time_s" in json.loads(metrics.read_text()):
            stage_times[s.name.split("-")[0]].append(json.loads(metrics.read_text())["train_time_s"])
    job_times = [r["train_time_s"] for r in rows if not r.get("reused")]
    trainings = sum(len(v) for v in stage_times.values()) + len(job_times)
    jobs_ok = sum(1 for f in out.glob("*/results.json") if json.loads(f.read_text()).get("status") == "ok")
    print(f"\nexit code {proc.returncode}; wall time {wall / 60:.1f} min for {jobs_ok} jobs ok "
          f"({len(rows)} distinct results: a control repeated per swept round counts once), {len(failed)} failed; "
          f"{trainings} trainings run")
    print(f"{'what':<12}{'n':>4}{'mean train s':>14}")
    for kind, times in [*stage_times.items(), ("job retrain", job_times)]:
        if times:
            print(f"{kind:<12}{len(times):>4}{sum(times) / len(times):>14.1f}")
    from omegaconf import OmegaConf

    sweep = OmegaConf.load(out / "multirun.yaml") if (out / "multirun.yaml").is_file() else None
    title = OmegaConf.select(sweep, "hydra.callbacks.report.title") if sweep is not None else None
    written = make_report(out, title=title)  # the preset's title, as the end-of-multirun report has it
    print((out / "report.md").read_text())
    if args.publish:
        dest = ROOT / "docs/results" / args.experiment
        dest.mkdir(parents=True, exist_ok=True)
        for path in written:
            shutil.copy(path, dest / path.name)
        flags = " ".join(sys.argv[1:])
        started = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime(time.time() - wall))
        (dest / "bench.txt").write_text(f"command: python bench/bench_lottery_mini.py {flags}\n"
                                        f"started: {started}; {os.cpu_count()} CPU cores; load average at the end "
                                        f"{os.getloadavg()[0]:.1f}\n"
                                        f"wall_min: {wall / 60:.1f}\n"
                                        + ("stages_reused_from_an_earlier_run: true (wall_min is this run's only)\n"
                                           if args.keep_store else "")
                                        + f"jobs_ok: {jobs_ok}\ndistinct_results: {len(rows)}\n"
                                        f"jobs_failed: {len(failed)}\ntrainings: {trainings}\n")
        print("published to", dest)


if __name__ == "__main__":
    main()

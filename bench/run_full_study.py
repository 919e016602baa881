"""A full CIFAR study preset on one GPU, several sweep jobs at once: one command, its wall time and report.

    python bench/run_full_study.py --n-jobs 8 --publish        # lth_resnet20_cifar10, seed 0, on GPU 0
    python bench/run_full_study.py --preset lth_vgg16_cifar10 --seeds 0,1,2
    python bench/run_full_study.py --dry-run                   # the same pipeline on the CPU, tiny

Runs the preset's sweep (default ``lth_resnet20_cifar10``: Frankle & Carbin 2019 IMP tickets vs
random re-init and random pruning, one seed) as ``python run.py -m experiment=<preset>
hydra/launcher=joblib hydra.launcher.n_jobs=N trainer=gpu``: N jobs run at once as processes on
the same GPU, each holding CIFAR-10 on that GPU (``datamodules/tensor_datamodule.py`` moves the
splits to the trainer's CUDA device) with its own CUDA context. The shared stages (dense runs, IMP
rounds) go to a fresh store in the sweep folder; ``protocols/stage_store.py`` locks each stage, so
one job trains it and the jobs that need it wait on its lock. The sweep is reordered with the
IMP round outermost (``hydra.sweeper.params=null`` plus the same sweep on the command line in
that order), so the N running jobs belong to different IMP chains (lr, rewind step, seed) instead
of queueing on one chain's locks; the jobs and results are the preset's.

Prints the GPU, the wall time, jobs ok / failed, trainings run, and the report (mean +- std over
seeds). ``--publish`` copies the report and a ``bench.txt`` (command, GPU, wall time, n_jobs) to
``docs/results/<preset>_gpu/``. Without CUDA it refuses to start (exit code 2) unless
``--dry-run``: synthetic data, 1 epoch, the first values of each swept key (two IMP rounds and two
methods), 2 concurrent jobs on the CPU; it proves the wiring, its figures mean nothing.
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import shlex
import shutil
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
CONF = ROOT / "conf"
OUTERMOST = ("protocol.prune.round",)  # looped first: concurrent jobs then sit on different IMP chains
DRY_TWO = ("protocol.prune.round", "protocol.method")  # the dry run keeps two values of these, one of the others
DRY_OVERRIDES = [  # the tiny CPU wiring check (``--dry-run``)
    "trainer=cpu", "data=synthetic", "data.batch_size=32", "data.val_size=64", "trainer.max_epochs=1",
    "protocol.snapshot_steps=[0]", "protocol.finetune.epochs=1", "latency_repeats=2",
]
DRY_FIXED = {"protocol.rewind_step": "0"}  # only step 0 is reached in one tiny epoch
NO_CUDA_MESSAGE = ("run_full_study: error: CUDA is not available (torch.cuda.is_available() is False): this runner "
                   "trains a full preset on one GPU and would take days on the CPU. Run it on a machine with a CUDA "
                   "GPU, or pass --dry-run to check the wiring on the CPU with tiny settings.")


class StudyError(ValueError):
    """A bad runner argument (preset, sweep override): printed as one line, exit code 2."""


def _positive_int(flag: str):
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            value = 0
        if value < 1:
            raise argparse.ArgumentTypeError(f"{flag} must be an integer >= 1; got {text!r}")
        return value
    return parse


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                     epilog="Extra Hydra overrides go before --sweep (or after --).")
    parser.add_argument("--preset", default="lth_resnet20_cifar10", help="a sweep preset in conf/experiment/")
    parser.add_argument("--seeds", default="0", help="the seed sweep, e.g. 0 or 0,1,2 (replaces the preset's)")
    parser.add_argument("--n-jobs", type=_positive_int("--n-jobs"), default=None,
                        help="jobs at once on the GPU (default 8; --dry-run: 2)")
    parser.add_argument("--threads", type=_positive_int("--threads"), default=None,
                        help="torch CPU threads per job (default: CPU cores // n_jobs)")
    parser.add_argument("--gpu", type=int, default=0, help="the one GPU used (CUDA_VISIBLE_DEVICES of the jobs)")
    parser.add_argument("--data-root", default=str(ROOT.parent / "shared/data/cifar10-jpeg"),
                        help="data.root of the jobs: the CIFAR-10 folder (not used by --dry-run)")
    parser.add_argument("--logger", default="csv", help="logger config of the jobs (csv needs no network)")
    parser.add_argument("--out", default=None, help="sweep folder (default logs/full_study/<preset>[_dry]); emptied")
    parser.add_argument("--sweep", nargs="+", action="extend", default=[], metavar="KEY=VALUES",
                        help="replace or add swept keys, e.g. 'protocol.method=rewind,reinit' 'protocol.prune.round=1'")
    parser.add_argument("--dry-run", action="store_true", help="tiny CPU run of the same pipeline (no CUDA needed)")
    parser.add_argument("--publish", action="store_true", help="copy report + bench.txt to docs/results/<preset>_gpu/")
    parser.add_argument("--print-command", action="store_true", help="print the run.py command line and the job count; "
                                                                     "run nothing")
    parser.add_argument("--progress-s", type=float, default=60.0, help="seconds between progress lines")
    parser.add_argument("overrides", nargs="*", help="extra Hydra overrides for every job")
    args = parser.parse_args(argv)
    if args.publish and args.dry_run:
        parser.error("--publish with --dry-run: a dry run's figures are not results; drop one of them")
    if args.n_jobs is None:
        args.n_jobs = 2 if args.dry_run else 8
    if args.threads is None:
        args.threads = 1 if args.dry_run else max(1, (os.cpu_count() or 1) // args.n_jobs)
    return args


def _parse(overrides: list[str], what: str) -> list:
    from hydra.core.override_parser.overrides_parser import OverridesParser
    from hydra.errors import HydraException

    try:
        return OverridesParser.create().parse_overrides(overrides)
    except HydraException as exc:
        raise StudyError(f"{what}: cannot parse {overrides}: {exc}") from None


def preset_sweep(preset: str) -> dict[str, str]:
    """``hydra.sweeper.params`` of ``conf/experiment/<preset>.yaml``, in the file's order."""
    from omegaconf import OmegaConf

    def sweep_presets() -> str:
        return ", ".join(sorted(p.stem for p in (CONF / "experiment").glob("*.yaml")
                                if OmegaConf.select(OmegaConf.load(p), "hydra.sweeper.params")))

    path = CONF / "experiment" / f"{preset}.yaml"
    if not path.is_file():
        raise StudyError(f"--preset {preset!r}: no conf/experiment/{preset}.yaml; sweep presets: {sweep_presets()}")
    params = OmegaConf.select(OmegaConf.load(path), "hydra.sweeper.params")
    if not params:
        raise StudyError(f"--preset {preset!r} has no sweep (hydra.sweeper.params); sweep presets: {sweep_presets()}")
    return {str(k): str(v) for k, v in params.items()}


def plan_sweep(preset: str, seeds: str, sweep: list[str], dry_run: bool) -> list[tuple[str, list[str]]]:
    """The swept keys and their values, in loop order (outermost first): the preset's sweep, the seeds,
    in a dry run the first value(s) of each key, then the ``--sweep`` overrides; ``OUTERMOST`` first."""
    params = {key: [f"{key}={value}"] for key, value in preset_sweep(preset).items()}
    params["seed"] = [f"seed={seeds}"]
    values: dict[str, list[str]] = {}
    for key, (text,) in params.items():
        (override,) = _parse([text], "--seeds" if key == "seed" else f"the preset's sweep of {key}")
        values[key] = (list(override.sweep_string_iterator()) if override.is_sweep_override()
                       else [override.get_value_element_as_str()])
    if dry_run:
        values = {key: [DRY_FIXED[key]] if key in DRY_FIXED else vals[:2 if key in DRY_TWO else 1]
                  for key, vals in values.items()}
    for text in sweep:
        (override,) = _parse([text], "--sweep")
        if override.is_delete() or override.is_add() or override.value_type is None:
            raise StudyError(f"--sweep {text!r}: give KEY=VALUE[,VALUE...], e.g. 'protocol.method=rewind,reinit'")
        if override.is_sweep_override() and not override.is_discrete_sweep():
            raise StudyError(f"--sweep {text!r}: only lists of values (a,b,c or range) can be swept here")
        values[override.get_key_element()] = (list(override.sweep_string_iterator()) if override.is_sweep_override()
                                              else [override.get_value_element_as_str()])
    order = [k for k in OUTERMOST if k in values] + [k for k in values if k not in OUTERMOST]
    return [(key, values[key]) for key in order]


def job_count(plan: list[tuple[str, list[str]]]) -> int:
    count = 1
    for _, vals in plan:
        count *= len(vals)
    return count


def default_out(args: argparse.Namespace) -> Path:
    return Path(args.out) if args.out else ROOT / "logs/full_study" / (args.preset + ("_dry" if args.dry_run else ""))


def build_command(args: argparse.Namespace) -> tuple[list[str], int]:
    """The ``run.py -m`` command line of the study (without the interpreter) and its number of jobs."""
    plan = plan_sweep(args.preset, args.seeds, args.sweep, args.dry_run)
    out = default_out(args)
    device = DRY_OVERRIDES if args.dry_run else ["trainer=gpu", f"data.root={args.data_root}"]
    cmd = ["run.py", "-m", f"experiment={args.preset}", "hydra.sweeper.params=null",
           *[f"{key}={','.join(vals)}" for key, vals in plan],
           "hydra/launcher=joblib", f"hydra.launcher.n_jobs={args.n_jobs}",
           f"hydra.sweep.dir={out}", f"paths.store_dir={out}/store", f"threads={args.threads}",
           f"logger={args.logger}", *device, *args.overrides]
    return cmd, job_count(plan)


def cuda_device_name(gpu: int) -> str | None:
    """The name of CUDA device ``gpu`` as the jobs will see it, or None without CUDA."""
    import torch

    if not torch.cuda.is_available():
        return None
    if not 0 <= gpu < torch.cuda.device_count():
        raise StudyError(f"--gpu {gpu}: this machine has CUDA devices 0..{torch.cuda.device_count() - 1}")
    return torch.cuda.get_device_name(gpu)


def job_states(out: Path) -> dict[str, int]:
    """How many job folders say ok / failed / running in their results.json."""
    states = {"ok": 0, "failed": 0, "running": 0}
    for path in out.glob("[0-9]*/results.json"):
        try:
            status = json.loads(path.read_text()).get("status")
        except (OSError, json.JSONDecodeError):
            continue  # being written
        states[status if status in states else "failed"] += 1
    return states


def stage_times(store: Path) -> dict[str, list[float]]:
    """Training seconds of each shared stage in the store, per kind (dense, train)."""
    times: dict[str, list[float]] = {}
    for stage in sorted(store.glob("*-*[0-9a-f]")):
        metrics = stage / "metrics.json"
        if stage.is_dir() and metrics.is_file():
            value = json.loads(metrics.read_text()).get("train_time_s")
            if value is not None:
                times.setdefault(stage.name.split("-")[0], []).append(float(value))
    return times


def run_sweep(cmd: list[str], env: dict, out: Path, total: int, progress_s: float) -> tuple[int, float]:
    """Run the sweep with its output in ``<out>/sweep.log``; a progress line every ``progress_s``."""
    start = time.perf_counter()
    last = -progress_s
    with open(out / "sweep.log", "w") as log:
        proc = subprocess.Popen([sys.executable, *cmd], cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT)
        while proc.poll() is None:
            time.sleep(2.0)
            elapsed = time.perf_counter() - start
            if elapsed - last >= progress_s:
                last = elapsed
                s = job_states(out)
                print(f"[{elapsed / 60:6.1f} min] jobs: {s['ok']} ok, {s['failed']} failed, {s['running']} running, "
                      f"{total - sum(s.values())} waiting (of {total})", flush=True)
    return proc.returncode, time.perf_counter() - start


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        cmd, total = build_command(args)
        if args.print_command:
            print("python " + shlex.join(cmd))
            print(f"jobs: {total}")
            return 0
        gpu = "none (dry run on the CPU)" if args.dry_run else cuda_device_name(args.gpu)
    except StudyError as exc:
        print(f"run_full_study: error: {exc}", file=sys.stderr)
        return 2
    if gpu is None:
        print(NO_CUDA_MESSAGE, file=sys.stderr)
        return 2

    out = default_out(args)
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True)
    env = {**os.environ, "OMP_NUM_THREADS": str(args.threads), "MKL_NUM_THREADS": str(args.threads),
           "PYTHONUNBUFFERED": "1", "WANDB_MODE": "offline"}
    if args.dry_run:
        env["CUDA_VISIBLE_DEVICES"] = ""  # the CPU path, even on a GPU machine
    else:  # --gpu counts the devices this process sees: keep an outer CUDA_VISIBLE_DEVICES's numbering
        visible = [d for d in os.environ.get("CUDA_VISIBLE_DEVICES", "").split(",") if d.strip()]
        env["CUDA_VISIBLE_DEVICES"] = visible[args.gpu] if args.gpu < len(visible) else str(args.gpu)
    command = "python " + shlex.join(cmd)
    print(f"GPU: {gpu}\njobs: {total}, {args.n_jobs} at once, {args.threads} CPU threads each\n"
          f"command: {command}\nlog: {out / 'sweep.log'}", flush=True)
    started = datetime.datetime.now(datetime.timezone.utc)
    rc, wall = run_sweep(cmd, env, out, total, args.progress_s)

    from omegaconf import OmegaConf

    from netcompress.report import collect, make_report

    try:
        rows, failed = collect(out)
    except FileNotFoundError:
        rows, failed = [], []
    missing = max(0, total - len(rows) - len(failed))  # jobs that never started (the sweep died early)
    times = stage_times(out / "store")
    retrains = [r["train_time_s"] for r in rows if not r.get("reused") and r.get("train_time_s") is not None]
    print(f"\nsweep exit code {rc}; GPU {gpu}; wall time {wall / 60:.1f} min for {total} jobs, {args.n_jobs} at once: "
          f"{len(rows)} ok, {len(failed) + missing} failed; "
          f"{sum(len(v) for v in times.values()) + len(retrains)} trainings run")
    for kind, values in [*sorted(times.items()), ("job retrain", retrains)]:
        if values:
            print(f"  {kind:<12} n={len(values):<4} mean train time {sum(values) / len(values):8.1f} s")
    for job in failed[:10]:
        print(f"  failed: {job['dir']}: {str(job['error']).splitlines()[-1] if job['error'] else '?'}")
    if rc != 0 or not rows:
        print(f"the end of {out / 'sweep.log'}:\n" + "".join((out / "sweep.log").read_text().splitlines(True)[-30:]))
    if not rows:
        return 1
    sweep = OmegaConf.load(out / "multirun.yaml") if (out / "multirun.yaml").is_file() else None
    title = OmegaConf.select(sweep, "hydra.callbacks.report.title") if sweep is not None else None
    written = make_report(out, title=title)
    print((out / "report.md").read_text())
    if args.publish:
        dest = ROOT / "docs/results" / f"{args.preset}_gpu"
        dest.mkdir(parents=True, exist_ok=True)
        for path in written:
            shutil.copy(path, dest / path.name)
        argv_text = shlex.join(sys.argv[1:] if argv is None else argv)
        (dest / "bench.txt").write_text(
            f"command: python bench/run_full_study.py {argv_text}\nrun.py command: {command}\nGPU: {gpu}\n"
            f"n_jobs: {args.n_jobs}\nthreads_per_job: {args.threads}\nwall_min: {wall / 60:.1f}\n"
            f"jobs_ok: {len(rows)}\njobs_failed: {len(failed) + missing}\n"
            f"started: {started:%Y-%m-%d %H:%M} UTC\n"
            + "".join(f"{kind}_trainings: {len(v)} (mean {sum(v) / len(v):.1f} s)\n"
                      for kind, v in [*sorted(times.items()), ("job_retrain", retrains)] if v))
        print("published to", dest)
    return 0 if rc == 0 and not failed and not missing else 1


if __name__ == "__main__":
    sys.exit(main())

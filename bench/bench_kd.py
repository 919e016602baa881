"""What does knowledge distillation cost per step, and what does it buy in a short real run?

Part ``step`` (one process, CPU, ``--threads`` threads, default 1 because the cores are shared):
times, interleaved over ``--repeats`` rounds on the same batch, the medians of
  * student step: ClassificationModule.training_step + backward + SGD step, no loss terms;
  * teacher forward: the teacher alone under torch.inference_mode (what KD must pay at least);
  * KD step: the same student step with the KD callback's loss term
    (and, in two more rows, its FitNets / attention-transfer feature terms);
and prints KD / student and KD / (student + teacher forward): the callback should add nothing
beyond the teacher's forward, i.e. the last ratio should be ~1.

Part ``real``: short runs of ``run.py experiment=kd_mini`` on real CIFAR-10 (--root), the student
alone and with KD from --teacher at equal epochs, for each of --seeds; prints test/acc1 per run
and the means. Each run is a subprocess with OMP_NUM_THREADS=--threads.

    .venv/bin/python bench/bench_kd.py --part step --threads 1
    .venv/bin/python bench/bench_kd.py --part real --root ../shared/data/cifar10-jpeg \
        --teacher <a trained run>/model.pt --seeds 0 1 --threads 1
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
import warnings
from functools import partial
from pathlib import Path
from types import SimpleNamespace

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from netcompress import models  # noqa: E402,F401
from netcompress.callbacks.kd import KD  # noqa: E402
from netcompress.lightning_modules.classification import ClassificationModule  # noqa: E402
from netcompress.models.serialization import save_model  # noqa: E402


def make_module(name: str, seed: int) -> ClassificationModule:
    torch.manual_seed(seed)
    net = models.create_model(name, num_classes=10)
    module = ClassificationModule(net, optimizer=partial(torch.optim.SGD, lr=0.05, momentum=0.9, weight_decay=1e-4))
    module.setup("fit")  # channels_last, as in training
    return module


def attach_kd(module: ClassificationModule, teacher_file: Path, **kwargs) -> KD:
    """The real callback, wired as the Trainer would (setup, then on_fit_start), without a Trainer."""
    from pytorch_lightning.plugins.precision import Precision

    kd = KD(teachers=str(teacher_file), **kwargs)
    kd.setup(SimpleNamespace(datamodule=SimpleNamespace(input_size=(3, 32, 32))), module, "fit")
    kd.on_fit_start(SimpleNamespace(strategy=SimpleNamespace(precision_plugin=Precision())), module)
    return kd


def timed_step(module: ClassificationModule, optimizer, batch, kd: KD | None) -> float:
    start = time.perf_counter()
    if kd is not None:
        kd.on_train_batch_start(None, module, batch, 0)
    optimizer.zero_grad(set_to_none=True)
    loss = module.training_step(batch, 0)
    loss.backward()
    optimizer.step()
    if kd is not None:
        kd.on_train_batch_end(None, module, None, batch, 0)
    return time.perf_counter() - start


def bench_step(args) -> None:
    torch.set_num_threads(args.threads)
    warnings.filterwarnings("ignore")
    folder = Path(tempfile.mkdtemp(prefix="bench_kd_"))
    torch.manual_seed(0)
    teacher_net = models.create_model(args.teacher_model, num_classes=10)
    teacher_file = folder / "teacher.pt"
    save_model(teacher_net, teacher_file, args.teacher_model, 10)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(args.batch_size, 3, 32, 32, generator=g).contiguous(memory_format=torch.channels_last)
    batch = (x, torch.randint(0, 10, (args.batch_size,), generator=g))

    variants = {"student alone": None, "KD (logits)": {},
                "KD + FitNets (layer?)": {"feature_loss": "fitnets", "student_layers": ["layer?"], "feature_weight": 1.0},
                "KD + attention (layer?)": {"feature_loss": "attention", "student_layers": ["layer?"]}}
    runs = {}
    for label, kwargs in variants.items():
        module = make_module(args.student_model, 0)
        kd = attach_kd(module, teacher_file, **kwargs) if kwargs is not None else None
        # SGD over the net and the FitNets adapters, as ClassificationModule.configure_optimizers builds it.
        # (a small lr: the same batch is stepped on again and again, and a timing run must not diverge,
        # which the module's non-finite-loss check would stop)
        optimizer = torch.optim.SGD(list(module.net.parameters()) + list(module.aux.parameters()), lr=0.002, momentum=0.9)
        runs[label] = (module, optimizer, kd)
    teacher = runs["KD (logits)"][2].teachers[0]

    def teacher_forward() -> float:
        start = time.perf_counter()
        with torch.inference_mode():
            teacher(x)
        return time.perf_counter() - start

    times: dict[str, list[float]] = {label: [] for label in runs}
    times["teacher forward"] = []
    for round_ in range(args.warmup + args.repeats):  # interleaved, so load changes hit every row alike
        for label, (module, optimizer, kd) in runs.items():
            t = timed_step(module, optimizer, batch, kd)
            if round_ >= args.warmup:
                times[label].append(t)
        t = teacher_forward()
        if round_ >= args.warmup:
            times["teacher forward"].append(t)
    med = {label: statistics.median(v) * 1000 for label, v in times.items()}
    base, teach = med["student alone"], med["teacher forward"]
    print(f"\nper-step cost, {args.student_model} student, {args.teacher_model} teacher, batch {args.batch_size}, "
          f"{args.threads} thread(s), median of {args.repeats} interleaved rounds (torch {torch.__version__})")
    print(f"{'row':<26}{'ms/step':>10}{'/ student':>11}{'/ (student + teacher fwd)':>27}")
    print(f"{'student alone':<26}{base:>10.1f}{1.0:>11.2f}{'':>27}")
    print(f"{'teacher forward':<26}{teach:>10.1f}{teach / base:>11.2f}{'':>27}")
    print(f"{'student + teacher fwd':<26}{base + teach:>10.1f}{(base + teach) / base:>11.2f}{1.0:>27.2f}")
    for label in list(variants)[1:]:
        print(f"{label:<26}{med[label]:>10.1f}{med[label] / base:>11.2f}{med[label] / (base + teach):>27.2f}")


def bench_real(args) -> None:
    if "kd" in args.runs and (not args.teacher or not Path(args.teacher).is_file()):
        raise SystemExit("--part real needs --teacher <a trained run's model.pt>")
    out = Path(args.out or tempfile.mkdtemp(prefix="bench_kd_real_"))
    env = {**os.environ, "OMP_NUM_THREADS": str(args.threads), "WANDB_MODE": "offline"}
    common = ["experiment=kd_mini", f"data.root={args.root}", "logger=none", "callbacks=none",
              "trainer.enable_progress_bar=false", "latency_repeats=3", "save_model=false",
              f"model.name={args.student_model}", f"trainer.max_epochs={args.epochs}",
              f"data.train_subset={args.train_subset}", "data.val_size=0", "trainer.limit_val_batches=0",
              *args.extra]
    if args.student_width != 1.0:
        common.append(f"+model.width={args.student_width}")
    rows = []
    for seed in args.seeds:
        for key, label in (("alone", "student alone"), ("kd", "student + KD")):
            run_dir = out / f"{key}_seed{seed}"
            done = run_dir / "results.json"
            if done.is_file() and json.loads(done.read_text()).get("status") == "ok":
                print(f"{label:<16} seed {seed}: reusing {done}")  # a finished run is not repeated
            elif key not in args.runs:
                continue
            else:
                extra = ["compression=[]"] if key == "alone" else [f"callbacks.kd.teachers={Path(args.teacher).resolve()}"]
                cmd = [sys.executable, str(ROOT / "run.py"), *common, *extra, f"seed={seed}", f"hydra.run.dir={run_dir}"]
                proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True)
                if proc.returncode != 0:
                    raise SystemExit(f"{label} seed {seed} failed:\n{proc.stderr[-3000:]}")
            results = json.loads(done.read_text())
            rows.append((label, seed, results["test/acc1"], results["train_time_s"]))
            print(f"{label:<16} seed {seed}: test/acc1 {results['test/acc1']:.4f}  train {results['train_time_s']:.0f} s",
                  flush=True)
    print(f"\n{args.student_model} (width {args.student_width}) on CIFAR-10, {args.train_subset} training images, "
          f"{args.epochs} epochs, teacher {args.teacher}, {args.threads} thread(s)")
    print(f"{'run':<16}{'test/acc1 mean':>16}{'per seed':>26}{'train s (mean)':>16}")
    means = {}
    for label in sorted({r[0] for r in rows}, reverse=True):
        accs = [r[2] for r in rows if r[0] == label]
        secs = [r[3] for r in rows if r[0] == label]
        means[label] = statistics.mean(accs)
        print(f"{label:<16}{means[label]:>16.4f}{', '.join(f'{a:.4f}' for a in accs):>26}{statistics.mean(secs):>16.0f}")
    if len(means) == 2:
        print(f"KD - alone: {100 * (means['student + KD'] - means['student alone']):+.2f} points")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--part", choices=("step", "real", "all"), default="step")
    parser.add_argument("--threads", type=int, default=1, help="torch / OMP threads (cores are shared: keep 1)")
    parser.add_argument("--student-model", default="resnet20_cifar")
    parser.add_argument("--teacher-model", default="resnet56_cifar", help="step part: teacher architecture")
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=8)
    parser.add_argument("--root", default="../shared/data/cifar10-jpeg", help="real part: CIFAR-10 root")
    parser.add_argument("--teacher", default=None, help="real part: the teacher's model.pt")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--train-subset", type=int, default=10000)
    parser.add_argument("--student-width", type=float, default=1.0)
    parser.add_argument("--runs", nargs="+", choices=("alone", "kd"), default=["alone", "kd"],
                        help="real part: which runs to train (finished ones in --out are reused)")
    parser.add_argument("--out", default=None, help="real part: folder for the runs (default: a temp folder)")
    parser.add_argument("extra", nargs="*", help="real part: extra run.py overrides")
    args = parser.parse_args()
    if args.part in ("step", "all"):
        bench_step(args)
    if args.part in ("real", "all"):
        bench_real(args)


if __name__ == "__main__":
    main()

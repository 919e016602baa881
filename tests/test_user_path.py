"""The paths a new user takes, taken as a user takes them: ``python run.py``, ``python run.py -m`` and
``make run`` in a scratch copy of the repository, stdout not a terminal, and no ``hydra.*`` override
(the in-process helpers of conftest.py set the run folder themselves, so they cannot see a broken
default of hydra.run.dir or of the launch)."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from conftest import TINY_DATA, scratch_copy

pytestmark = pytest.mark.slow
ENV = {**os.environ, "WANDB_MODE": "offline", "PYTHONUNBUFFERED": "1"}


@pytest.fixture(scope="module")
def repo(tmp_path_factory) -> Path:
    return scratch_copy(tmp_path_factory.mktemp("clone") / "netcompress")


def run_python(repo: Path, args: list[str], timeout: int = 300) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "run.py", *args], cwd=repo, capture_output=True, text=True,
                          timeout=timeout, env=ENV)


def results_under(folder: Path) -> list[dict]:
    return [json.loads(p.read_text()) for p in sorted(folder.rglob("results.json"))]


def test_plain_run_with_default_hydra_settings_writes_results_and_progress(repo):
    proc = run_python(repo, [*TINY_DATA, "trainer.max_epochs=2", "latency_repeats=3", "logger=csv",
                             "callbacks.progress_bar.every_n_steps=2"])
    assert proc.returncode == 0, proc.stderr[-3000:]
    runs = list((repo / "logs" / "train" / "runs").iterdir())
    assert len(runs) == 1, runs
    (results,) = results_under(runs[0])
    assert results["status"] == "ok" and results["epochs"] == 2 and 0.0 <= results["test/acc1"] <= 1.0
    out = proc.stdout + proc.stderr
    # 64 images / batch 16 = 4 steps per epoch: a plain line at steps 2, 4, 6, 8 and one per epoch end
    for step in (2, 4, 6, 8):
        assert f"step {step}/8" in out, out[-3000:]
    assert "epoch 1/2 done" in out and "epoch 2/2 done" in out
    assert "img/s" in out and "ETA" in out
    log_file = (runs[0] / "train.log").read_text()
    assert "step 8/8" in log_file and "epoch 2/2 done" in log_file  # the run's log file too
    assert "Total FLOPs: 0" not in out and "Total FLOPs" in out  # the model summary shows real FLOPs


def test_second_run_started_at_once_gets_its_own_folder(repo):
    args = [*TINY_DATA, "trainer.max_epochs=1", "latency_repeats=3", "logger=none", "callbacks=none",
            "task_name=twice"]
    procs = [subprocess.Popen([sys.executable, "run.py", *args], cwd=repo, env=ENV, stdout=subprocess.DEVNULL,
                              stderr=subprocess.PIPE, text=True) for _ in range(2)]
    errors = [p.communicate(timeout=300)[1] for p in procs]
    assert [p.returncode for p in procs] == [0, 0], errors
    assert len(list((repo / "logs" / "twice" / "runs").iterdir())) == 2


def test_multirun_sweep_writes_one_results_per_job_and_a_report(repo):
    proc = run_python(repo, ["-m", "seed=0,1", *TINY_DATA, "trainer.max_epochs=1", "latency_repeats=3",
                             "logger=none", "callbacks=none", "task_name=sweep"], timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    (sweep,) = list((repo / "logs" / "sweep" / "multiruns").iterdir())
    jobs = {int(p.parent.name): json.loads(p.read_text()) for p in sweep.glob("*/results.json")}
    assert sorted(jobs) == [0, 1]
    assert [jobs[i]["seed"] for i in (0, 1)] == [0, 1] and all(j["status"] == "ok" for j in jobs.values())
    report = (sweep / "report.md").read_text()  # every multirun ends with report.py's table
    assert "| dense | 100.0% |" in report and "| 2 |" in report and "Failed jobs: 0" in report


def tiny_cifar_tree(root: Path, per_class: dict[str, int]) -> Path:
    """A CIFAR-10-like ImageFolder tree of random 32x32 JPEGs, ``{split: images per class}``."""
    rng = np.random.default_rng(0)
    classes = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]
    for split, count in per_class.items():
        for label in classes:
            folder = root / split / label
            folder.mkdir(parents=True)
            for i in range(count):
                Image.fromarray(rng.integers(0, 255, (32, 32, 3), dtype=np.uint8)).save(folder / f"{i}.jpg")
    return root


def fake_venv(folder: Path) -> Path:
    """A VENV for ``make VENV=...`` whose python is this interpreter and whose setup is marked done, so
    the test runs the README's target without reinstalling into (or next to) the venv running it."""
    bin_dir = folder / "bin"
    bin_dir.mkdir(parents=True)
    python = bin_dir / "python"
    python.write_text(f'#!/bin/sh\nexec "{sys.executable}" "$@"\n')
    python.chmod(0o755)
    (bin_dir / ".installed").touch()
    return folder


@pytest.mark.skipif(shutil.which("make") is None, reason="make is not installed")
def test_make_run_redirected_to_a_file_prints_progress_and_writes_results(repo, tmp_path):
    data = tiny_cifar_tree(tmp_path / "cifar", {"train": 4, "test": 2})
    venv = fake_venv(tmp_path / "venv")
    os.utime(repo / "pyproject.toml", (0, 0))  # older than the venv's .installed: setup is up to date
    log = tmp_path / "make_run.log"
    with log.open("w") as out:
        proc = subprocess.run(["make", "run", f"VENV={venv}", f"DATA_ROOT={data}",
                               "ARGS=trainer.max_epochs=2 data.val_size=10 data.batch_size=10 latency_repeats=3 "
                               "callbacks.progress_bar.every_n_steps=1"],
                              cwd=repo, stdout=out, stderr=subprocess.STDOUT, env=ENV, timeout=600)
    text = log.read_text()
    assert proc.returncode == 0, text[-3000:]
    assert "step 3/6" in text and "epoch 2/2 done" in text, text[-3000:]  # 30 train images / 10 = 3 steps
    (results,) = results_under(repo / "logs" / "quickstart" / "runs")
    assert results["status"] == "ok" and results["config"]["data"]["root"] == str(data)
    assert results["test/class_counts"] == [2] * 10

"""bench/run_full_study.py (a full preset on one GPU, jobs at once via Hydra's joblib launcher):
argument checks, the refusal without CUDA, the composed run.py command line and its job list.
Nothing here trains (the runner's --dry-run does that, see docs/lottery_vs_rethinking.md)."""
from __future__ import annotations

import importlib.util
import itertools
import os
import subprocess
import sys
from pathlib import Path

import pytest
from omegaconf import OmegaConf

ROOT = Path(__file__).resolve().parents[1]
RUNNER = ROOT / "bench" / "run_full_study.py"


@pytest.fixture(scope="module")
def runner():
    spec = importlib.util.spec_from_file_location("run_full_study", RUNNER)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _run(*args: str, cuda_visible: str | None = None) -> subprocess.CompletedProcess:
    env = dict(os.environ)
    if cuda_visible is not None:
        env["CUDA_VISIBLE_DEVICES"] = cuda_visible
    return subprocess.run([sys.executable, str(RUNNER), *args], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=120)


def _jobs(plan) -> set[frozenset]:
    return {frozenset(zip([k for k, _ in plan], combo)) for combo in itertools.product(*[v for _, v in plan])}


@pytest.mark.slow  # a subprocess that imports torch: ~3 s on an idle machine, ~9 s on the shared one
def test_refuses_without_cuda(tmp_path):
    out = tmp_path / "sweep"
    proc = _run("--out", str(out), cuda_visible="")  # no visible GPU, whatever the machine has
    assert proc.returncode == 2
    assert "CUDA is not available" in proc.stderr and "--dry-run" in proc.stderr
    assert not out.exists()  # refused before any folder or job


def test_dry_run_command_uses_joblib_on_the_cpu(tmp_path):
    proc = _run("--dry-run", "--print-command", "--out", str(tmp_path / "dry"), cuda_visible="")
    assert proc.returncode == 0, proc.stderr
    command = proc.stdout.splitlines()[0].split()
    assert command[:3] == ["python", "run.py", "-m"]
    for part in ["hydra/launcher=joblib", "hydra.launcher.n_jobs=2", "experiment=lth_resnet20_cifar10",
                 "trainer=cpu", "data=synthetic", "trainer.max_epochs=1", "hydra.sweeper.params=null",
                 f"hydra.sweep.dir={tmp_path / 'dry'}", f"paths.store_dir={tmp_path / 'dry'}/store"]:
        assert part in command, part
    assert "trainer=gpu" not in command
    # first value of each swept key, two IMP rounds x two methods: 1 * 1 * 1 * 2 * 2
    assert "jobs: 4" in proc.stdout


def test_gpu_command_and_job_list(runner):
    args = runner.parse_args(["--n-jobs", "6"])
    cmd, total = runner.build_command(args)
    assert {"hydra/launcher=joblib", "hydra.launcher.n_jobs=6", "trainer=gpu", "seed=0"} <= set(cmd)
    assert not any(part.startswith("data=") for part in cmd)  # the preset's CIFAR-10 datamodule
    # the preset: 2 lr x 2 rewind steps x 7 rounds x 3 methods, one seed
    assert total == 2 * 2 * 7 * 3 == 84
    plan = runner.plan_sweep("lth_resnet20_cifar10", "0", [], dry_run=False)
    assert plan[0][0] == "protocol.prune.round"  # round outermost: concurrent jobs on different IMP chains
    params = OmegaConf.load(ROOT / "conf/experiment/lth_resnet20_cifar10.yaml").hydra.sweeper.params
    reference = [(k, ["0"] if k == "seed" else str(v).split(",")) for k, v in params.items()]
    assert _jobs(plan) == _jobs(reference)  # reordered, but the preset's jobs exactly
    # the first jobs of the loop: round 1, every other key still varying
    first = list(itertools.product(*[v for _, v in plan]))[:12]
    assert {combo[0] for combo in first} == {"1"}
    assert len({combo[2:4] for combo in first}) == 4  # all four (lr, rewind step) chains


def test_sweep_overrides_replace_preset_values(runner):
    args = runner.parse_args(["--dry-run", "--sweep", "protocol.method=rewind,reinit", "protocol.prune.round=1"])
    cmd, total = runner.build_command(args)
    assert "protocol.method=rewind,reinit" in cmd and "protocol.prune.round=1" in cmd
    assert total == 2
    plan = dict(runner.plan_sweep("lth_resnet20_cifar10", "0,1,2", ["optimizer.lr=0.01"], dry_run=False))
    assert plan["seed"] == ["0", "1", "2"] and plan["optimizer.lr"] == ["0.01"]
    assert plan["protocol.rewind_step"] == ["0", "2000"]


@pytest.mark.parametrize("argv, message", [
    (["--n-jobs", "0"], "--n-jobs must be an integer >= 1; got '0'"),
    (["--threads", "x"], "--threads must be an integer >= 1; got 'x'"),
    (["--dry-run", "--publish"], "--publish with --dry-run"),
])
def test_bad_arguments_exit_2(runner, capsys, argv, message):
    with pytest.raises(SystemExit) as info:
        runner.parse_args(argv)
    assert info.value.code == 2
    assert message in capsys.readouterr().err


@pytest.mark.parametrize("argv, message", [
    (["--preset", "nope"], "--preset 'nope': no conf/experiment/nope.yaml; sweep presets: "),
    (["--preset", "quickstart"], "--preset 'quickstart' has no sweep"),
    (["--sweep", "protocol.method"], "--sweep: cannot parse"),
    (["--sweep", "~seed"], "give KEY=VALUE"),
])
def test_bad_preset_or_sweep_exit_2(runner, capsys, argv, message):
    assert runner.main([*argv, "--print-command"]) == 2
    assert message in capsys.readouterr().err

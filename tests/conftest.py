"""Shared test helpers: compose the real Hydra config and shrink it (tiny data, no logger, tmp output)."""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, open_dict

import netcompress.pipeline.resolvers  # noqa: F401  (${launch_dir:} in conf/paths)

ROOT = Path(__file__).resolve().parents[1]
CONF = ROOT / "conf"
torch.set_num_threads(1)  # tiny models: thread overhead dominates; also steadier on shared cores

# The small, fast setting every end-to-end test starts from.
TINY_DATA = ["data=synthetic", "data.train_size=64", "data.val_size=32", "data.test_size=32", "data.batch_size=16"]
TINY_RUN = [
    "logger=none", "callbacks=none", "trainer.max_epochs=1", "trainer.enable_progress_bar=false",
    "trainer.enable_model_summary=false", "latency_repeats=3",
]
TINY = TINY_DATA + TINY_RUN


def compose_config(overrides: list[str], output_dir: Path) -> DictConfig:
    """The real config with ``overrides``, its Hydra runtime pointed at ``output_dir``.

    In-process only: it cannot see a broken default of hydra.run.dir or of the Hydra launch itself;
    tests/test_user_path.py runs ``python run.py`` and ``make run`` as a user would for that."""
    GlobalHydra.instance().clear()
    with initialize_config_dir(str(CONF), version_base="1.3"):
        cfg = compose("config", overrides=overrides, return_hydra_config=True)
    output_dir.mkdir(parents=True, exist_ok=True)
    with open_dict(cfg):
        cfg.hydra.runtime.output_dir = str(output_dir)
        cfg.hydra.runtime.cwd = str(ROOT)
        cfg.hydra.job.num = 0
        if not any(o.lstrip("+").startswith("paths.store_dir=") for o in overrides):
            cfg.paths.store_dir = str(output_dir / "store")  # the stage store / evaluator caches stay in tmp
    HydraConfig().set_config(cfg)
    with open_dict(cfg):
        del cfg["hydra"]  # as in a real run: the app config without the hydra node
    return cfg


@pytest.fixture
def tiny_config(tmp_path):
    """compose_config with the TINY overrides first, then the test's own."""
    def make(*overrides: str) -> DictConfig:
        return compose_config([*TINY, *overrides], tmp_path / "run")
    return make


@pytest.fixture(autouse=True)
def _keep_omp_num_threads():
    """``threads=`` writes OMP_NUM_THREADS (pipeline.build.apply_threads); no test leaks it into the next."""
    before = os.environ.get("OMP_NUM_THREADS")
    yield
    if before is None:
        os.environ.pop("OMP_NUM_THREADS", None)
    else:
        os.environ["OMP_NUM_THREADS"] = before


def run_cli(args: list[str], cwd: Path = ROOT, timeout: int = 300, env: dict | None = None) -> subprocess.CompletedProcess:
    """``python run.py ARGS`` in a subprocess (multirun, DDP, command-line errors)."""
    full_env = {**os.environ, "WANDB_MODE": "offline", "PYTHONUNBUFFERED": "1", **(env or {})}
    return subprocess.run([sys.executable, str(ROOT / "run.py"), *args], cwd=cwd, capture_output=True,
                          text=True, timeout=timeout, env=full_env)


class StopAfterEpochs:
    """A callback that ends fit after ``epochs`` epochs, as if the job were killed (the schedule
    still spans trainer.max_epochs, so resuming must reproduce the uninterrupted run)."""

    def __new__(cls, epochs: int):
        import pytorch_lightning as pl

        class _Stop(pl.Callback):
            def on_train_epoch_end(self, trainer, pl_module):
                if trainer.current_epoch + 1 >= epochs:
                    trainer.should_stop = True

        return _Stop()


def fit_interrupted(cfg: DictConfig, epochs: int) -> Path:
    """Fit ``cfg`` but stop after ``epochs`` epochs; returns the last.ckpt to resume from."""
    from netcompress.pipeline.build import build

    datamodule, module, trainer = build(cfg)
    trainer.callbacks.append(StopAfterEpochs(epochs))
    trainer.fit(module, datamodule=datamodule)
    return Path(cfg.paths.output_dir) / "checkpoints" / "last.ckpt"


def assert_same_model_files(dir_a: Path, dir_b: Path) -> dict:
    """The model.pt of two runs hold bit-identical tensors (resumed == uninterrupted); returns one state_dict."""
    a = torch.load(Path(dir_a) / "model.pt", weights_only=True)["state_dict"]
    b = torch.load(Path(dir_b) / "model.pt", weights_only=True)["state_dict"]
    assert a.keys() == b.keys()
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=0, atol=0, msg=key)
    return a


def straight_and_resumed(base: list[str], tmp_path: Path, stop_after: int) -> tuple[dict, dict, dict]:
    """run() ``base`` uninterrupted, and again stopped after ``stop_after`` epochs then resumed from
    its last.ckpt; asserts both model.pt files are bit-identical. Returns (straight, resumed, state_dict)."""
    from netcompress.run import run

    straight = run(compose_config(base, tmp_path / "straight"))
    checkpoint = fit_interrupted(compose_config(base, tmp_path / "first"), epochs=stop_after)
    resumed = run(compose_config([*base, f"ckpt_path={checkpoint}"], tmp_path / "resumed"))
    state = assert_same_model_files(tmp_path / "straight", tmp_path / "resumed")
    return straight, resumed, state


def scratch_copy(destination: Path) -> Path:
    """The working tree as a fresh clone would have it plus uncommitted changes (tracked and new,
    non-ignored files), without venv, logs or caches."""
    listed = subprocess.run(["git", "ls-files", "--cached", "--others", "--exclude-standard", "-z"], cwd=ROOT,
                            capture_output=True, text=True, check=True).stdout.split("\0")
    for name in filter(None, listed):
        source = ROOT / name
        if source.is_file():
            target = destination / name
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(source, target)
    return destination

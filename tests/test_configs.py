"""Every config option composes and instantiates (CONVENTIONS 7); launcher and sweeper configs compose."""
from __future__ import annotations

from pathlib import Path

import hydra
import pytest
import torch
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from torch import nn

from conftest import CONF, TINY, compose_config

OPTIONS = {group: sorted(p.stem for p in (CONF / group).glob("*.yaml"))
           for group in ("model", "module", "optimizer", "scheduler", "trainer", "logger", "callbacks")}


def test_every_group_has_the_documented_options():
    assert {"cpu", "gpu", "ddp"} <= set(OPTIONS["trainer"])
    assert {"wandb", "csv", "tensorboard", "none"} <= set(OPTIONS["logger"])
    assert {"multistep", "cosine", "warmup_constant"} <= set(OPTIONS["scheduler"])
    assert {"cifar10", "imagefolder", "imagenet", "synthetic"} <= {p.stem for p in (CONF / "data").glob("*.yaml")}


@pytest.mark.parametrize("name", OPTIONS["optimizer"])
def test_optimizer_options_build_an_optimizer(tmp_path, name):
    cfg = compose_config([*TINY, f"optimizer={name}"], tmp_path)
    optimizer = hydra.utils.instantiate(cfg.optimizer)([nn.Parameter(torch.zeros(2))])
    assert isinstance(optimizer, torch.optim.Optimizer)


@pytest.mark.parametrize("name", OPTIONS["scheduler"])
def test_scheduler_options_build_a_schedule(tmp_path, name):
    cfg = compose_config([*TINY, f"scheduler={name}"], tmp_path)
    if cfg.scheduler is None:
        assert name == "none"
        return
    optimizer = torch.optim.SGD([nn.Parameter(torch.zeros(2))], lr=0.1)
    scheduler = hydra.utils.instantiate(cfg.scheduler)(optimizer, total_steps=100, steps_per_epoch=10)
    scheduler.step()
    assert 0 < optimizer.param_groups[0]["lr"] <= 0.1


@pytest.mark.parametrize("name", [n for n in OPTIONS["trainer"] if n != "default"])
def test_trainer_options_build_a_trainer(tmp_path, name):
    if name == "gpu" and not torch.cuda.is_available():
        pytest.skip("no GPU on this machine")
    overrides = [*TINY, f"trainer={name}"] + (["trainer.accelerator=cpu"] if name == "ddp" else [])
    cfg = compose_config(overrides, tmp_path)
    trainer = hydra.utils.instantiate(cfg.trainer)
    assert trainer.max_epochs == cfg.trainer.max_epochs


@pytest.mark.parametrize("name", OPTIONS["logger"])
def test_logger_options_build_loggers(tmp_path, name, monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "offline")
    from netcompress.pipeline.build import instantiate_group

    cfg = compose_config([*TINY, f"logger={name}"], tmp_path)
    loggers = instantiate_group(cfg.logger)
    assert len(loggers) == (0 if name == "none" else 1)


@pytest.mark.parametrize("name", OPTIONS["callbacks"])
def test_callback_options_build_callbacks(tmp_path, name):
    from netcompress.pipeline.build import instantiate_group

    cfg = compose_config([*TINY, f"callbacks={name}"], tmp_path)
    callbacks = instantiate_group(cfg.callbacks)
    names = sorted(type(c).__name__ for c in callbacks)
    expected = {"none": [], "default": ["EpochSummary", "LearningRateMonitor", "ModelCheckpoint", "PlainProgress"]}
    assert names == expected.get(name, names) and len(names) == len(expected.get(name, [None]))


@pytest.mark.parametrize("launcher", ["local_parallel", "slurm"])
def test_launcher_configs_compose(launcher):
    GlobalHydra.instance().clear()
    with initialize_config_dir(str(CONF), version_base="1.3"):
        cfg = compose("config", overrides=[f"hydra/launcher={launcher}"], return_hydra_config=True)
    assert cfg.hydra.launcher._target_.endswith("JoblibLauncher" if launcher == "local_parallel"
                                                else "SlurmLauncher")


def test_optuna_search_config_composes():
    GlobalHydra.instance().clear()
    with initialize_config_dir(str(CONF), version_base="1.3"):
        cfg = compose("config", overrides=["hparams_search=optuna_lr"], return_hydra_config=True)
    assert cfg.hydra.sweeper._target_.endswith("OptunaSweeper")
    assert cfg.optimized_metric == "val/acc1"


def test_cifar10_config_points_at_data_root(tmp_path):
    cfg = compose_config(["data=cifar10", f"data.root={tmp_path}"], tmp_path / "run")
    datamodule = hydra.utils.instantiate(cfg.data)
    assert datamodule.num_classes == 10 and tuple(datamodule.input_size) == (3, 32, 32)
    assert Path(cfg.data.root) == tmp_path

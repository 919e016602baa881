"""Every experiment preset composes and runs one step end to end (fast_dev_run) on synthetic data.

Presets that need a trained parent (``init_from: ???``, ``callbacks.kd.teachers: ???``) get an
untrained model file of the preset's own architecture: this checks wiring, not accuracy.
"""
from __future__ import annotations

import pytest
from omegaconf import OmegaConf, open_dict

from conftest import CONF, TINY, TINY_RUN, compose_config
from netcompress.models.factory import create_model
from netcompress.models.serialization import save_model
from netcompress.pipeline.build import model_kwargs
from netcompress.run import run

PRESETS = sorted(p.stem for p in (CONF / "experiment").glob("*.yaml"))


def parent_model(cfg, path) -> str:
    """An untrained model.pt of the preset's architecture, standing in for a trained parent."""
    kwargs = model_kwargs(cfg)
    save_model(create_model(cfg.model.name, num_classes=10, **kwargs), path, cfg.model.name, 10, kwargs)
    return str(path)


@pytest.mark.slow
@pytest.mark.parametrize("preset", PRESETS)
def test_preset_runs_one_step(tmp_path, preset):
    synthetic = compose_config(TINY, tmp_path / "data_cfg").data
    cfg = compose_config([f"experiment={preset}", *TINY_RUN, "trainer.fast_dev_run=true",
                          "trainer.accelerator=cpu", "trainer.devices=1", "latency_repeats=1",
                          f"paths.store_dir={tmp_path / 'store'}"], tmp_path / "run")
    with open_dict(cfg):
        cfg.data = synthetic
        cfg.trainer.pop("strategy", None)
        cfg.trainer.precision = "32-true"
        for key in OmegaConf.missing_keys(cfg):
            parent = parent_model(cfg, tmp_path / "parent.pt")
            OmegaConf.update(cfg, key, [parent] if key.endswith("teachers") else parent)
    results = run(cfg)
    assert results["status"] == "ok", results.get("error")
    assert 0.0 <= results["test/acc1"] <= 1.0

"""A run resumed from a mid-run checkpoint writes the same results.json as the uninterrupted run.

Convention 3 (CONVENTIONS.md): a resumed run must equal the uninterrupted one, and that includes
what it reports, not only its weights. Every compression entry runs 3 epochs straight, and again
stopped after 2 epochs (after its compression event) then resumed; both results.json files must
agree key by key, timings and provenance aside. Slimming used to lose ``compress/slimming``,
``compress/channels_pruned`` and ``compress/params_ratio`` on resume (reported only when it slimmed).
"""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from conftest import TINY, straight_and_resumed

# Measured wall-clock figures and where the code came from: these legitimately differ between runs.
TIMING_KEYS = {"train_time_s", "latency_ms", "provenance"}
# Width 0.5, not 0.25: the 0.25 net's Conv2d(4, 8, 1, stride=2) shortcut corrupts the heap in its channels_last
# backward on torch 2.14.1's CPU oneDNN (the process aborts).
NET = ["model.name=resnet20_cifar", "+model.width=0.5", "data.image_size=16"]
BASE = [*TINY, *NET, "callbacks=model_checkpoint", "trainer.max_epochs=3", "optimizer.lr=0.01"]

# One short setting per compression entry, its event at epoch 1 so the checkpoint after epoch 2 is past it.
ENTRIES = {
    "noop": ["compression=[noop]"],
    "magnitude_pruning": ["compression=[magnitude_pruning]", "callbacks.magnitude_pruning.schedule=agp",
                          "callbacks.magnitude_pruning.start=0", "callbacks.magnitude_pruning.end=2"],
    "magnitude_pruning_remove_filters": [
        "compression=[magnitude_pruning]", "callbacks.magnitude_pruning.granularity=structured",
        "callbacks.magnitude_pruning.remove_filters=true", "callbacks.magnitude_pruning.start=1",
        "callbacks.magnitude_pruning.include=[layer*.conv1]", "callbacks.magnitude_pruning.sparsity=0.5"],
    "bn_sparsity": ["compression=[bn_sparsity]", "callbacks.bn_sparsity.lam=1e-3", "callbacks.bn_sparsity.until_epoch=2"],
    "slimming": ["compression=[bn_sparsity,slimming]", "callbacks.slimming.at_epochs=[1]",
                 "callbacks.slimming.prune_ratio=0.5", "callbacks.slimming.finetune_lr=0.005"],
    "kd": ["compression=[kd]", "callbacks.kd.teachers=initial"],
    "qat": ["compression=[qat]", "callbacks.qat.start_epoch=1", "callbacks.qat.export_int8=false"],
    "ptq": ["compression=[ptq]", "callbacks.ptq.export_int8=false"],
    "cluster": ["compression=[cluster]", "callbacks.cluster.bits=3", "callbacks.cluster.at_epoch=1"],
    "lowrank": ["compression=[lowrank]", "callbacks.lowrank.at_epoch=1", "callbacks.lowrank.energy=0.8"],
}


def is_timing(key: str) -> bool:
    """Keys that hold a measured time (``latency_ms``, ``int8/latency_ms``, ``train_time_s``, ``cost/speedup_b1``, ...)."""
    return key in TIMING_KEYS or "latency" in key or key.endswith("_time_s") or key.startswith("cost/speedup")


def comparable_config(config: dict, run_dir: Path) -> str:
    """The resolved config without ``ckpt_path`` and with the run's own folder replaced by a placeholder."""
    config = {k: v for k, v in config.items() if k != "ckpt_path"}
    return json.dumps(config, sort_keys=True).replace(str(run_dir), "<run>")


def test_every_compression_entry_is_listed():
    entries = {p.stem for p in (Path(__file__).resolve().parents[1] / "conf" / "compression").glob("*.yaml")}
    covered = {o.split("[", 1)[1].rstrip("]") for overrides in ENTRIES.values() for o in overrides
               if o.startswith("compression=")}
    assert entries <= {name for c in covered for name in c.split(",")}


@pytest.mark.slow
@pytest.mark.parametrize("entry", list(ENTRIES))
def test_resumed_results_json_equals_the_uninterrupted_one(tmp_path, entry):
    straight, resumed, _ = straight_and_resumed([*BASE, *ENTRIES[entry]], tmp_path, stop_after=2)
    assert straight["status"] == resumed["status"] == "ok"
    saved = {name: json.loads((tmp_path / name / "results.json").read_text()) for name in ("straight", "resumed")}
    a, b = saved["straight"], saved["resumed"]
    assert comparable_config(a.pop("config"), tmp_path / "straight") == \
        comparable_config(b.pop("config"), tmp_path / "resumed")
    keys_a = {k for k in a if not is_timing(k)}
    keys_b = {k for k in b if not is_timing(k)}
    assert keys_a == keys_b, f"only straight: {sorted(keys_a - keys_b)}; only resumed: {sorted(keys_b - keys_a)}"
    for key in sorted(keys_a):
        assert a[key] == b[key], key

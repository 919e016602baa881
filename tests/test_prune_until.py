"""protocol=prune_until: stops at the first iteration at/below the budget, round_to, accuracy floor, resume, errors."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from netcompress import models  # noqa: F401  (registers the CIFAR nets)
from conftest import TINY, assert_same_model_files, compose_config
from netcompress.evaluation.model_stats import count_flops, count_parameters
from netcompress.models.serialization import load_model
from netcompress.pipeline.build import instantiate
from netcompress.protocols.prune_until import iteration_dir
from netcompress.run import run

# Conv-4 at 1/4 width: convs 16,16 | 32,32 (the stem is skipped: three prunable convs), FC 64,64.
NET = ["model.name=conv4_lth", "+model.width=0.25", "scheduler=none"]
LAYERS = ["features.2", "features.5", "features.7"]
DENSE_KEPT = {"features.2": 16, "features.5": 32, "features.7": 32}
INPUT = (3, 32, 32)


@pytest.fixture(scope="module")
def store(tmp_path_factory) -> Path:
    """One stage store for the module: the dense net is trained once and reused by every test."""
    return tmp_path_factory.mktemp("store")


def make_cfg(folder: Path, store: Path, *overrides: str, evaluators: bool = False):
    """The tiny job; the default evaluators (retention vs the dense parent) only where asked (they cost ~1 s)."""
    quiet = [] if evaluators else ["evaluation=[]"]
    return compose_config([*TINY, *NET, *quiet, "protocol=prune_until", f"paths.store_dir={store}", *overrides],
                          folder)


def dense_dir(store: Path) -> Path:
    (folder,) = [p for p in store.glob("dense-*") if p.is_dir()]
    return folder


def dense_net(store: Path) -> torch.nn.Module:
    return load_model(dense_dir(store) / "model.pt")


def saved_results(folder: Path) -> dict:
    return json.loads((folder / "results.json").read_text())


@pytest.mark.slow
def test_stops_at_the_first_iteration_at_or_below_the_target(tmp_path, store):
    out = tmp_path / "run"
    cfg = make_cfg(out, store, "protocol.step=0.3", "protocol.target.metric=flops", "protocol.target.fraction=0.3",
                   evaluators=True)
    results = run(cfg)
    history = results["prune_until/history"]
    dense = dense_net(store)
    dense_flops, dense_params = count_flops(dense, INPUT), count_parameters(dense)[0]
    assert history[0]["flops"] == dense_flops and history[0]["kept"] == DENSE_KEPT
    kept = dict(DENSE_KEPT)
    for row in history[1:]:
        net = load_model(iteration_dir(out, row["iteration"]) / "model.pt")
        # sizes recorded = sizes of the saved net, fractions of the dense net's
        assert row["flops"] == count_flops(net, INPUT) and row["params"] == count_parameters(net)[0]
        assert row["flops_fraction"] == pytest.approx(row["flops"] / dense_flops, rel=1e-12)
        assert row["params_fraction"] == pytest.approx(row["params"] / dense_params, rel=1e-12)
        # scope=layer, nearest: each conv loses round(0.3 * n) of its n remaining filters
        kept = {n: k - round(0.3 * k) for n, k in kept.items()}
        assert row["kept"] == kept == {n: net.get_submodule(n).out_channels for n in LAYERS}
        assert row["seed"] == 0 + row["iteration"]
    # every iteration before the last is above the target, the last at or below it
    assert all(row["flops_fraction"] > 0.3 for row in history[1:-1])
    assert history[-1]["flops_fraction"] <= 0.3 and len(history) - 1 == results["prune_until/iterations"] >= 2
    assert not iteration_dir(out, len(history)).exists()  # nothing pruned past the target
    assert results["prune_until/stop_reason"] == "target_reached" and results["prune_until/target_reached"]
    assert results["prune_until/final_flops_fraction"] == history[-1]["flops_fraction"]
    # the run's model.pt is the last iteration's net, and results.json holds the history
    assert_same_model_files(out, iteration_dir(out, len(history) - 1))
    saved = saved_results(out)
    assert saved["prune_until/history"] == json.loads(json.dumps(history)) and saved["flops"] == history[-1]["flops"]
    assert (out / "prune_until.png").stat().st_size > 0
    # the evaluators compare the final net with the dense parent: its test top-1, counted here by hand
    datamodule = instantiate(cfg.data)
    datamodule.setup("test")
    hits = total = 0
    with torch.no_grad():
        for x, y in datamodule.test_dataloader():
            hits, total = hits + (dense.eval()(x).argmax(1) == y).sum().item(), total + len(y)
    assert total == 32 and results["retention/parent_test_acc1"] == pytest.approx(hits / total)


def test_round_to_keeps_multiples_in_every_layer(tmp_path, store):
    out = tmp_path / "run"
    results = run(make_cfg(out, store, "protocol.step=0.3", "protocol.round_to=4", "protocol.target.metric=params",
                           "protocol.target.fraction=0.2"))
    history = results["prune_until/history"]
    kept = dict(DENSE_KEPT)
    for row in history[1:]:
        net = load_model(iteration_dir(out, row["iteration"]) / "model.pt")
        counts = {n: net.get_submodule(n).out_channels for n in LAYERS}
        assert counts == row["kept"] and all(k % 4 == 0 for k in counts.values())
        # round(0.3 n) pruned, the kept count rounded down to a multiple of 4, never below 4
        kept = {n: max(4, (k - round(0.3 * k)) // 4 * 4) for n, k in kept.items()}
        assert counts == kept
    assert history[-1]["params_fraction"] <= 0.2 < history[-2]["params_fraction"]


def test_accuracy_floor_stops_early_with_the_reason(tmp_path, store):
    if not any(store.glob("dense-*")):  # run alone: train the dense net first
        run(make_cfg(tmp_path / "dense", store, "protocol.max_iterations=1"))
    out = tmp_path / "run"
    results = run(make_cfg(out, store, f"init_from={dense_dir(store) / 'model.pt'}", "protocol.train_dense=false",
                           "protocol.step=0.2", "protocol.target.fraction=0.1", "protocol.accuracy_floor=1.0"))
    history = results["prune_until/history"]
    assert history[1]["val/acc1"] < 1.0  # so the floor is breached at iteration 1
    assert results["prune_until/iterations"] == 1 and results["prune_until/stop_reason"] == "accuracy_floor"
    assert not results["prune_until/target_reached"] and not iteration_dir(out, 2).exists()
    assert results["prune_until/dense_source"].startswith("init_from:")
    assert saved_results(out)["prune_until/stop_reason"] == "accuracy_floor"


def test_a_step_too_small_to_prune_a_filter_stops_as_stalled(tmp_path, store):
    # round(0.01 * n) = 0 for every conv (n <= 32): nothing to prune, so nothing is fine-tuned
    out = tmp_path / "run"
    results = run(make_cfg(out, store, "protocol.step=0.01"))
    assert results["prune_until/stop_reason"] == "stalled" and results["prune_until/iterations"] == 0
    assert results["prune_until/final_flops_fraction"] == 1.0 and not iteration_dir(out, 1).exists()
    assert results["flops"] == count_flops(dense_net(store), INPUT)


def _without_times(history):
    return [{k: v for k, v in row.items() if k != "train_time_s"} for row in history]


@pytest.mark.slow
def test_resume_mid_loop_equals_uninterrupted(tmp_path, store):
    args = ["protocol.step=0.5", "protocol.target.fraction=0.3"]  # two iterations: 0.40, then 0.20 of the FLOPs
    straight = run(make_cfg(tmp_path / "straight", store, *args))
    first = run(make_cfg(tmp_path / "resumed", store, *args, "protocol.max_iterations=1"))
    assert first["prune_until/stop_reason"] == "max_iterations" and first["prune_until/iterations"] == 1
    resumed = run(make_cfg(tmp_path / "resumed", store, *args))
    n = straight["prune_until/iterations"]
    assert n >= 2 and resumed["prune_until/iterations"] == n and resumed["prune_until/resumed_iterations"] == 1
    assert _without_times(resumed["prune_until/history"]) == _without_times(straight["prune_until/history"])
    for it in range(1, n + 1):
        assert_same_model_files(iteration_dir(tmp_path / "straight", it), iteration_dir(tmp_path / "resumed", it))
    assert_same_model_files(tmp_path / "straight", tmp_path / "resumed")
    # the same folder with settings that change the iterations is refused
    with pytest.raises(ValueError, match=r"other settings \(\['settings.step'\]\)"):
        run(make_cfg(tmp_path / "resumed", store, "protocol.step=0.3", "protocol.target.fraction=0.3"))


def test_impossible_target_fails_before_training(tmp_path):
    # floor: one filter per prunable conv keeps ~9% of the FLOPs; nothing may be trained first
    empty_store = tmp_path / "store"
    cfg = make_cfg(tmp_path / "run", empty_store, "protocol.target.fraction=0.05")
    with pytest.raises(ValueError, match=r"`protocol.target.fraction`=0.05 cannot be reached.*one filter"):
        run(cfg)
    assert not empty_store.exists()
    cfg = make_cfg(tmp_path / "run2", empty_store, "protocol.target.fraction=0.2", "protocol.round_to=8")
    with pytest.raises(ValueError, match=r"`protocol.target.fraction`=0.2 cannot be reached.*round_to=8"):
        run(cfg)
    assert not empty_store.exists()


@pytest.mark.parametrize("override, match", [
    ("protocol.target.fraction=1.0", r"`protocol.target.fraction` must be in \(0, 1\).*got 1.0"),
    ("protocol.target.fraction=0", r"`protocol.target.fraction` must be in \(0, 1\).*got 0"),
    ("protocol.step=0", r"`protocol.step` must be in \(0, 1\).*got 0"),
    ("protocol.step=1.5", r"`protocol.step` must be in \(0, 1\).*got 1.5"),
    ("protocol.target.metric=energy",
     r"`protocol.target.metric` must be one of params, flops, latency_ms; got 'energy'"),
    ("protocol.round_to=0", r"`protocol.round_to` must be null .* or an int >= 1.*got 0"),
    ("protocol.round_to=2.5", r"`protocol.round_to` must be null .*got 2.5"),
    ("protocol.importance=bn_gamma", r"`protocol.importance`='bn_gamma' is not scored from a layer's own weights"),
    ("protocol.scope=global", None),
])
def test_bad_settings_fail_at_construction(tmp_path, override, match):
    cfg = make_cfg(tmp_path / "run", tmp_path / "store", override)
    if match is None:  # a valid value: constructs
        instantiate(cfg.protocol)
        return
    with pytest.raises(ValueError, match=match):
        instantiate(cfg.protocol)


def test_no_prunable_layer_fails_before_training(tmp_path):
    store = tmp_path / "store"
    with pytest.raises(ValueError, match=r"`protocol`: none of the selected layers can lose filters alone"):
        run(make_cfg(tmp_path / "run", store, "protocol.include=[fc1]"))
    with pytest.raises(ValueError, match=r"protocol: pattern 'nope\*' matches no"):
        run(make_cfg(tmp_path / "run2", store, "protocol.include=[nope*]"))
    with pytest.raises(ValueError, match=r"needs the trained dense net: set init_from"):
        run(make_cfg(tmp_path / "run3", store, "protocol.train_dense=false"))
    assert not store.exists()

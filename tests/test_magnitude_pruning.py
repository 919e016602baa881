"""MagnitudePruning: masks equal torch.nn.utils.prune, exact sparsity, schedules match their formulas,
pruned weights stay zero under SGD momentum, resume == uninterrupted, sparse storage, clear errors."""
from __future__ import annotations

import copy

import pytest
import pytorch_lightning as pl
import torch
import torch.nn.utils.prune as prune

from netcompress.callbacks.magnitude_pruning import MagnitudePruning
from netcompress.compression.layer_selection import first_match, unmatched_patterns
from netcompress.compression.pruning_schedules import PruningSchedule, agp_sparsity
from netcompress.compression.sparse_storage import decode_bitmask, decode_csr, encode_bitmask, encode_csr, storage_bytes
from conftest import TINY, compose_config, fit_interrupted
from netcompress.pipeline.build import build

PRUNE = "callbacks.magnitude_pruning"
SMALL = ["+model.width=0.25", "data.val_size=16", "data.test_size=16"]  # resnet20 with 4/8/16 channels


def pruning_config(tiny_config, *overrides):
    return tiny_config(*SMALL, "compression=[magnitude_pruning]", *overrides)


def fit(cfg, *extra_callbacks):
    datamodule, module, trainer = build(cfg)
    trainer.callbacks.extend(extra_callbacks)
    initial = copy.deepcopy(module.net)
    trainer.fit(module, datamodule=datamodule)
    callback = next(c for c in trainer.callbacks if isinstance(c, MagnitudePruning))
    return initial, module, trainer, callback


def frozen(*overrides):
    """No weight decay and an lr (1e-30) whose updates are below float32 resolution of any weight, so
    the weights after fit are the initial weights times the masks (optimizer.lr must be > 0)."""
    return ["optimizer.lr=1e-30", "optimizer.weight_decay=0.0", "scheduler=none", *overrides]


@pytest.mark.parametrize("scope", ["global", "layer"])
def test_unstructured_masks_equal_torch_prune_l1(tiny_config, scope):
    cfg = pruning_config(tiny_config, *frozen(f"{PRUNE}.sparsity=0.6", f"{PRUNE}.scope={scope}"))
    initial, module, _, callback = fit(cfg)
    reference = dict(initial.named_modules())
    layers = [(reference[name], "weight") for name in callback.masks]
    if scope == "global":
        prune.global_unstructured(layers, pruning_method=prune.L1Unstructured, amount=0.6)
    else:
        for layer, _ in layers:
            prune.l1_unstructured(layer, "weight", amount=0.6)
    net = dict(module.net.named_modules())
    total = pruned = 0
    for name, mask in callback.masks.items():
        assert torch.equal(mask, reference[name].weight_mask.bool()), name
        torch.testing.assert_close(net[name].weight, reference[name].weight, rtol=0, atol=0)  # pruned init
        total += mask.numel()
        pruned += int((net[name].weight == 0).sum())
    if scope == "global":  # exact sparsity: round(s * n) weights, as torch.nn.utils.prune
        assert pruned == round(0.6 * total)
        assert callback.global_sparsity() == round(0.6 * total) / total
    assert module.net.fc.weight.ne(0).all() and module.net.conv1.weight.ne(0).all()  # first/last skipped


def test_structured_masks_equal_torch_ln_structured(tiny_config):
    cfg = pruning_config(tiny_config, *frozen(f"{PRUNE}.sparsity=0.5", f"{PRUNE}.granularity=structured",
                                              f"{PRUNE}.scope=layer"))
    initial, module, _, callback = fit(cfg)
    reference = dict(initial.named_modules())
    for name, mask in callback.masks.items():
        prune.ln_structured(reference[name], "weight", amount=0.5, n=1, dim=0)
        assert torch.equal(mask, reference[name].weight_mask.flatten(1).any(1)), name
        assert int((~mask).sum()) == round(0.5 * mask.numel())


def test_pruned_weights_and_momentum_stay_zero_through_sgd(tiny_config):
    cfg = pruning_config(tiny_config, "trainer.max_epochs=3", f"{PRUNE}.sparsity=0.7", "optimizer.lr=0.2")
    _, module, trainer, callback = fit(cfg)
    optimizer = trainer.optimizers[0]
    net = dict(module.net.named_modules())
    for name, mask in callback.masks.items():
        weight = net[name].weight
        assert weight[~mask].eq(0).all() and weight[mask].ne(0).any(), name
        assert optimizer.state[weight]["momentum_buffer"][~mask].eq(0).all(), name
    assert callback.global_sparsity() == pytest.approx(0.7, abs=1e-4)
    assert trainer.global_step == 12  # 3 epochs x 4 steps: many steps after the one-shot pruning


@pytest.mark.parametrize("step,expected_k", [(0, 0), (1, 0), (2, 1), (5, 2), (6, 3), (7, 3)])
def test_agp_formula(step, expected_k):
    s_i, s_f, t0, n, dt = 0.1, 0.8, 0, 3, 2  # events at 0, 2, 4, 6
    expected = s_f + (s_i - s_f) * (1 - expected_k * dt / (n * dt)) ** 3  # Zhu & Gupta eq. 1
    assert agp_sparsity(step, s_i, s_f, t0, t0 + n * dt, dt) == pytest.approx(expected)


def test_iterative_and_oneshot_schedules():
    it = PruningSchedule("iterative", final=0.875, rate=0.5, start=4, every=4, times=3)
    assert [it.target(s) for s in (3, 4, 7, 8, 12, 40)] == [0.0, 0.5, 0.5, 0.75, 0.875, 0.875]
    assert it.events() == [4, 8, 12]
    one = PruningSchedule("oneshot", final=0.3, start=5)
    assert [one.is_event(s) for s in (4, 5, 6)] == [False, True, False] and one.target(9) == 0.3


class SparsityProbe(pl.Callback):
    """Records the pruning callback's sparsity as each step starts (after any event of that step)."""

    def __init__(self):
        self.seen = {}

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        callback = next(c for c in trainer.callbacks if isinstance(c, MagnitudePruning))
        self.seen[trainer.global_step] = callback.global_sparsity() if callback.masks else 0.0


def test_agp_callback_reaches_the_formula_exactly_at_each_step(tiny_config):
    probe = SparsityProbe()
    cfg = pruning_config(tiny_config, "trainer.max_epochs=2", f"{PRUNE}.schedule=agp", f"{PRUNE}.unit=step",
                         f"{PRUNE}.start=1", f"{PRUNE}.end=7", f"{PRUNE}.every=2", f"{PRUNE}.sparsity=0.8",
                         f"{PRUNE}.initial_sparsity=0.2")
    _, _, _, callback = fit(cfg, probe)
    total = sum(m.numel() for m in callback.masks.values())
    for step, value in probe.seen.items():
        k = 0 if step < 1 else min(3, (step - 1) // 2)
        expected = 0.0 if step < 1 else 0.8 + (0.2 - 0.8) * (1 - k / 3) ** 3
        assert value == pytest.approx(round(expected * total) / total, abs=1e-9), step


@pytest.mark.slow
def test_resume_mid_schedule_equals_uninterrupted(tmp_path):
    base = [*TINY, *SMALL, "callbacks=model_checkpoint", "compression=[magnitude_pruning]", "trainer.max_epochs=3",
            f"{PRUNE}.schedule=agp", f"{PRUNE}.start=0", f"{PRUNE}.end=2", f"{PRUNE}.every=1",
            f"{PRUNE}.sparsity=0.75", "save_model=false", "latency_repeats=1"]
    straight = compose_config(base, tmp_path / "straight")
    datamodule, module_a, trainer_a = build(straight)
    trainer_a.fit(module_a, datamodule=datamodule)
    checkpoint = fit_interrupted(compose_config(base, tmp_path / "first"), epochs=1)
    resumed = compose_config([*base, f"ckpt_path={checkpoint}"], tmp_path / "resumed")
    datamodule, module_b, trainer_b = build(resumed)
    trainer_b.fit(module_b, datamodule=datamodule, ckpt_path=str(checkpoint))
    masks = [next(c for c in t.callbacks if isinstance(c, MagnitudePruning)).masks for t in (trainer_a, trainer_b)]
    assert masks[0].keys() == masks[1].keys()
    for name in masks[0]:
        assert torch.equal(masks[0][name], masks[1][name]), name
    a, b = module_a.net.state_dict(), module_b.net.state_dict()
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=0, atol=0, msg=key)


def test_structured_removal_at_end_keeps_outputs_and_reports_sizes(tiny_config):
    class Snapshot(pl.Callback):
        def on_train_end(self, trainer, pl_module):
            self.masked = copy.deepcopy(pl_module.net).eval()

    snapshot = Snapshot()
    cfg = pruning_config(tiny_config, "trainer.max_epochs=2", f"{PRUNE}.granularity=structured",
                         f"{PRUNE}.sparsity=0.5", f"{PRUNE}.remove_filters=true", f"{PRUNE}.start=1",
                         f"{PRUNE}.include=[layer*.conv1]")  # Li et al.: the first conv of each block
    datamodule, module, trainer = build(cfg)
    trainer.callbacks.insert(0, snapshot)  # runs on_train_end before the removal
    trainer.fit(module, datamodule=datamodule)
    thin = module.net.eval()
    assert sum(p.numel() for p in thin.parameters()) < sum(p.numel() for p in snapshot.masked.parameters())
    x = torch.randn(4, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(thin(x), snapshot.masked(x), rtol=1e-5, atol=1e-5)
    results = module.extra_results
    assert results["compress/sparsity"] > 0
    assert results["compress/size_bitmask_bytes"] < results["compress/size_dense_bytes"]


def test_sparse_storage_round_trips_and_sizes():
    torch.manual_seed(0)
    w = torch.randn(6, 4, 3, 3)
    w[torch.rand_like(w) < 0.8] = 0
    torch.testing.assert_close(decode_bitmask(encode_bitmask(w)), w, rtol=0, atol=0)
    torch.testing.assert_close(decode_csr(encode_csr(w)), w, rtol=0, atol=0)
    nnz, n = int((w != 0).sum()), w.numel()
    assert storage_bytes({"w": w}, "bitmask") == min(4 * n, (n + 7) // 8 + 4 * nnz)
    assert storage_bytes({"w": w}, "csr") == min(4 * n, 8 * nnz + 4 * (6 + 1))
    assert storage_bytes({"w": w}, "dense") == 4 * n


# ----- bad input: clear errors before training ----------------------------------------------------

@pytest.mark.parametrize("kwargs,match", [
    ({"sparsity": 1.5}, r"magnitude_pruning\.sparsity`? must be a fraction in \[0, 1\).*1\.5"),
    ({"sparsity": -0.1}, r"sparsity.*\[0, 1\)"),
    ({"granularity": "blocks"}, "granularity.*unstructured, structured.*'blocks'"),
    ({"importance": "l3"}, r"magnitude_pruning\.importance`? must be one of l1, l2, .*'l3'"),
    ({"schedule": "agp"}, "end.*required with schedule=agp"),
    ({"remove_filters": True}, "remove_filters.*needs granularity=structured"),
    ({"layer_sparsity": {"layer1.*": 0.5}}, "layer_sparsity.*needs scope=layer and schedule=oneshot"),
])
def test_bad_arguments_fail_at_construction(kwargs, match):
    with pytest.raises(ValueError, match=match):
        MagnitudePruning(**kwargs)


def test_first_matching_pattern_wins_and_unmatched_patterns_are_named():
    by_pattern = {"layer1.*": 0.3, "layer1.0.*": 0.9, "fc": 0.1}  # layer1.0.conv1 matches two: the first wins
    assert first_match("layer1.0.conv1", by_pattern) == 0.3
    assert first_match("fc", by_pattern) == 0.1
    assert first_match("layer2.0.conv1", by_pattern) is None
    assert first_match("layer2.0.conv1", by_pattern, 0.5) == 0.5
    assert unmatched_patterns(by_pattern, ["layer1.0.conv1", "layer2.0.conv1"]) == ["fc"]


def test_pattern_matching_no_layer_fails_before_training(tiny_config):
    cfg = pruning_config(tiny_config, f"{PRUNE}.include=[nolayer.*]")
    datamodule, module, trainer = build(cfg)
    with pytest.raises(ValueError, match=r"pattern 'nolayer\.\*' matches no Conv2d/Linear layer"):
        trainer.fit(module, datamodule=datamodule)
    assert trainer.global_step == 0


def test_removal_of_residual_filters_without_their_partners_is_refused(tiny_config):
    cfg = pruning_config(tiny_config, f"{PRUNE}.granularity=structured", f"{PRUNE}.remove_filters=true")
    datamodule, module, trainer = build(cfg)
    with pytest.raises(ValueError, match=r"layer 'layer1\.0\.conv2'.*shared with 'conv1'"):
        trainer.fit(module, datamodule=datamodule)


def test_schedule_past_the_end_of_training_fails_before_training(tiny_config):
    cfg = pruning_config(tiny_config, f"{PRUNE}.schedule=iterative", f"{PRUNE}.times=4", f"{PRUNE}.every=1")
    datamodule, module, trainer = build(cfg)
    with pytest.raises(ValueError, match="last pruning event is at epoch 3 but training has 1 epochs"):
        trainer.fit(module, datamodule=datamodule)
    assert trainer.global_step == 0

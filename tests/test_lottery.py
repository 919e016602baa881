"""Lottery Ticket vs Rethinking protocol: rewinding, re-init, Scratch-B, shared stages, IMP schedule, errors."""
from __future__ import annotations

import json
import multiprocessing
import os
import time
from pathlib import Path

import pytest
import pytorch_lightning as pl
import torch
from omegaconf import OmegaConf
from torch import nn

from netcompress import models  # noqa: F401
import netcompress.protocols.stages as stages
from netcompress.protocols.fixed_mask import FixedMask
from netcompress.compression.masks import sparsity_of
from conftest import TINY, StopAfterEpochs, compose_config
from netcompress.protocols import stage_store
from netcompress.protocols.lottery import LotteryProtocol, job_base, load_masks
from netcompress.protocols.retraining import RETRAINING, Retraining, register_retraining
from netcompress.protocols.retrain_init import effective_flops, random_masks_like, scratch_b_budget
from netcompress.protocols.stage_store import StageStore
from netcompress.pipeline.build import build
from netcompress.run import run

# A tiny Conv-2 (Frankle & Carbin's small net at 1/8 width): 4 optimizer steps per epoch.
NET = ["model.name=conv2_lth", "+model.width=0.125", "scheduler=none"]


def make_cfg(tmp_path: Path, name: str, *overrides: str):
    return compose_config([*TINY, *NET, "protocol=lottery", f"paths.store_dir={tmp_path / 'store'}", *overrides],
                          tmp_path / name)


def protocol_of(cfg) -> LotteryProtocol:
    from netcompress.pipeline.build import instantiate

    return instantiate(cfg.protocol)


def test_rewind_restores_step_k_weights_on_survivors_and_zero_elsewhere(tmp_path):
    cfg = make_cfg(tmp_path, "job", "protocol.snapshot_steps=[0,2]", "protocol.rewind_step=2")
    protocol = protocol_of(cfg)
    base = job_base(cfg)
    dense_dir = protocol.stages.dense(base)
    # Independent reference for step 2: the same run stopped after 2 batches (no lr schedule, so
    # the first two updates are the same), and for step 0 a freshly built network with the seed.
    ref_cfg = compose_config([*TINY, *NET, "trainer.limit_train_batches=2"], tmp_path / "ref")
    datamodule, module, trainer = build(ref_cfg)
    init = {k: v.clone() for k, v in module.net.state_dict().items()}
    trainer.fit(module, datamodule=datamodule)
    step2 = module.net.state_dict()
    snap0 = torch.load(dense_dir / stage_store.snapshot_file(0), weights_only=True)
    snap2 = torch.load(dense_dir / stage_store.snapshot_file(2), weights_only=True)
    for key in init:
        torch.testing.assert_close(snap0[key], init[key], rtol=0, atol=0)
        torch.testing.assert_close(snap2[key], step2[key].cpu(), rtol=1e-6, atol=1e-7)
    assert any(not torch.equal(snap2[k], init[k]) for k in init)  # two real updates happened

    masks = load_masks(protocol.stages.mask(base, 1))
    start = RETRAINING["rewind"](protocol).start_network(base, dense_dir, masks).state_dict()
    for name, mask in masks.items():
        weight = start[f"{name}.weight"]
        assert torch.equal(weight[mask], snap2[f"{name}.weight"][mask])
        assert torch.count_nonzero(weight[~mask]) == 0
    untouched = [k for k in start if not any(k == f"{n}.weight" for n in masks)]
    for key in untouched:  # biases, stem and classifier: exactly step 2
        assert torch.equal(start[key], snap2[key])


def test_reinit_has_the_same_mask_but_new_values(tmp_path):
    cfg = make_cfg(tmp_path, "job")
    protocol, base = protocol_of(cfg), job_base(cfg)
    dense_dir = protocol.stages.dense(base)
    masks = load_masks(protocol.stages.mask(base, 1))
    rewound = RETRAINING["rewind"](protocol).start_network(base, dense_dir, masks).state_dict()
    fresh = RETRAINING["reinit"](protocol).start_network(base, dense_dir, masks).state_dict()
    again = RETRAINING["reinit"](protocol).start_network(base, dense_dir, masks).state_dict()
    for name, mask in masks.items():
        w = fresh[f"{name}.weight"]
        assert torch.equal(w != 0, mask)  # same support: exactly the surviving weights
        assert not torch.allclose(w[mask], rewound[f"{name}.weight"][mask])
        assert torch.equal(w, again[f"{name}.weight"])  # a function of seed + seed_offset


def test_random_prune_mask_keeps_each_layers_count():
    masks = {"a": torch.rand(8, 4, 3, 3) > 0.7, "b": torch.rand(10, 20) > 0.2}
    rand = random_masks_like(masks, seed=3)
    for name in masks:
        assert int(rand[name].sum()) == int(masks[name].sum()) and not torch.equal(rand[name], masks[name])
    assert all(torch.equal(rand[n], random_masks_like(masks, seed=3)[n]) for n in masks)


def test_scratch_b_budget_follows_the_paper_formula():
    # Liu et al. 2019: epochs x FLOPs(dense) / FLOPs(pruned), optionally capped (2x on ImageNet)
    assert scratch_b_budget(160, 4.0e8, 1.0e8) == 640
    assert scratch_b_budget(160, 4.0e8, 1.0e8, max_factor=2) == 320
    assert scratch_b_budget(10, 3.0, 2.0) == 15
    assert scratch_b_budget(3, 1.0, 1.0) == 3
    with pytest.raises(ValueError, match="Scratch-B"):
        scratch_b_budget(10, 0, 1)


def test_effective_flops_counts_only_unpruned_weights():
    net = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(8 * 32 * 32, 10))
    masks = {"0": torch.rand(8, 3, 3, 3) > 0.5, "3": torch.rand(10, 8 * 32 * 32) > 0.9}
    conv = 2 * (8 * 32 * 32) * (3 * 9)   # 2 x output elements x fan-in
    fc = 2 * 10 * 8 * 32 * 32
    from netcompress.evaluation.model_stats import count_flops
    other = count_flops(net, (3, 32, 32)) - conv - fc  # whatever else the counter counts (bias adds)
    expected = other + conv * masks["0"].float().mean() + fc * masks["3"].float().mean()
    assert effective_flops(net, masks, (3, 32, 32)) == pytest.approx(float(expected), abs=1)


def test_scratch_b_job_trains_for_the_flops_budget(tmp_path):
    cfg = make_cfg(tmp_path, "job", "protocol.method=reinit", "protocol.reinit.budget=flops",
                   "protocol.prune.schedule=oneshot", "+protocol.prune.sparsity=0.5", "protocol.prune.round=1")
    results = run(cfg)
    saved = json.loads((Path(cfg.paths.output_dir) / "results.json").read_text())
    ratio = saved["lottery/dense_flops"] / saved["lottery/effective_flops"]
    dense_steps = json.loads(next(Path(cfg.paths.store_dir).glob("dense-*/metrics.json")).read_text())["global_step"]
    assert saved["global_step"] == round(dense_steps * ratio) > dense_steps  # steps, not rounded epochs
    assert saved["lottery/epochs_trained"] == pytest.approx(saved["global_step"] / dense_steps, abs=1e-3)
    assert results["lottery/label"] == "reinit (Scratch-B)"


def count_dense_trainings(monkeypatch) -> list:
    """Every dense-stage training builds one RewindSnapshot; count them."""
    made = []

    class Counting(stages.RewindSnapshot):
        def __init__(self, *args, **kwargs):
            made.append(1)
            super().__init__(*args, **kwargs)

    monkeypatch.setattr(stages, "RewindSnapshot", Counting)
    return made


@pytest.mark.slow
def test_three_jobs_of_a_sweep_train_the_dense_stage_once(tmp_path, monkeypatch):
    made = count_dense_trainings(monkeypatch)
    results = {}
    for i, method in enumerate(["rewind", "reinit", "random_prune"]):
        cfg = make_cfg(tmp_path, f"job{i}", f"protocol.method={method}", "protocol.prune.round=2")
        results[method] = run(cfg)
    assert len(made) == 1
    keys = {r["lottery/dense_key"] for r in results.values()}
    assert len(keys) == 1 and {r["lottery/mask_key"] for r in results.values()} == {results["rewind"]["lottery/mask_key"]}
    assert all(r["lottery/sparsity"] == pytest.approx(0.36, abs=1e-3) for r in results.values())
    # the dense key ignores prune/retrain settings but not what determines the dense run
    key = lambda *o: protocol_of(make_cfg(tmp_path, "k", *o)).stages.dense_parts(  # noqa: E731
        job_base(make_cfg(tmp_path, "k", *o)))
    assert key() == key("protocol.prune.rate=0.5", "protocol.method=finetune", "protocol.finetune.lr=0.1")
    assert key() != key("seed=1") and key() != key("optimizer.lr=0.05") and key() != key("trainer.max_epochs=2")
    assert key() == key("trainer.fast_dev_run=false", "+trainer.max_steps=-1")  # spelled-out Trainer defaults
    relative = os.path.relpath(tmp_path / "data", Path.cwd())
    assert key(f"++data.root={relative}") == key(f"++data.root={tmp_path / 'data'}") != key("++data.root=/elsewhere")
    for r in results.values():  # every job's pruned weights are really zero in its final net
        assert r["params_nonzero"] < r["params_total"]


def _make_slowly(root: str, counter: str) -> None:
    def make(folder: Path) -> None:
        with open(counter, "a") as f:
            f.write("made\n")
        time.sleep(0.5)
        (folder / "payload.txt").write_text("x")

    StageStore(root).ensure("dense", {"a": 1}, make)


def test_concurrent_jobs_make_a_stage_once(tmp_path):
    counter = tmp_path / "count.txt"
    ctx = multiprocessing.get_context("fork")
    procs = [ctx.Process(target=_make_slowly, args=(str(tmp_path / "store"), str(counter))) for _ in range(3)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(30)
    assert [p.exitcode for p in procs] == [0, 0, 0]
    assert counter.read_text().count("made") == 1
    folder = StageStore(tmp_path / "store").path("dense", {"a": 1})
    assert (folder / "done").is_file() and (folder / "payload.txt").read_text() == "x"
    assert json.loads((folder / "spec.json").read_text()) == {"a": 1}


def test_a_ddp_rank_above_zero_trains_each_stage_alongside_rank0_without_its_lock(tmp_path, monkeypatch):
    """Rank 0 holds the stage's lock while it trains; rank 1 (RANK=1) must train too (DDP collectives pair up),
    not wait on that lock: it makes the stage into a private folder, then returns rank 0's once it is done."""
    import threading

    from filelock import FileLock

    store = StageStore(tmp_path)
    final = store.path("dense", {"a": 1})
    rank0_lock = FileLock(str(final) + ".lock")
    rank0_lock.acquire()  # a second FileLock on this path (even in this process) would wait forever

    def rank0_finishes() -> None:
        time.sleep(0.3)
        final.mkdir()
        (final / "model.pt").write_text("rank 0")
        (final / "done").write_text("ok\n")

    made = []

    def make(folder: Path) -> None:
        made.append(folder)
        (folder / "model.pt").write_text("rank 1")
        threading.Thread(target=rank0_finishes).start()  # rank 0's training ends with rank 1's

    monkeypatch.setenv("RANK", "1")
    try:
        assert store.ensure("dense", {"a": 1}, make) == final
    finally:
        rank0_lock.release()
    assert (final / "model.pt").read_text() == "rank 0"  # rank 1's copy is thrown away
    assert len(made) == 1 and made[0] != final and not made[0].exists()
    assert store.ensure("dense", {"a": 1}, lambda folder: made.append(folder)) == final and len(made) == 1  # done

    other = StageStore(tmp_path, follow_timeout_s=0.2)  # rank 0 never finishes: a clear error, not a hang
    with pytest.raises(TimeoutError, match=r"rank 1 finished stage dense-.* but rank 0 wrote no .*done within 0 s"):
        other.ensure("dense", {"b": 2}, lambda folder: None)
    monkeypatch.setenv("RANK", "0")
    assert stage_store.process_rank() == 0
    monkeypatch.delenv("RANK")
    monkeypatch.setenv("LOCAL_RANK", "3")
    assert stage_store.process_rank() == 3


STRUCTURED_FINETUNE = ["protocol.method=finetune", "protocol.prune.kind=structured", "protocol.prune.criterion=l1_filter",
                       "protocol.prune.schedule=oneshot", "protocol.prune.sparsity=0.5", "protocol.prune.scope=layer"]


@pytest.mark.slow
@pytest.mark.parametrize("job,expected_stages", [(["protocol.method=rewind", "protocol.prune.round=1"],
                                                  ["dense", "mask", "train"]),
                                                 (STRUCTURED_FINETUNE, ["dense", "mask"])])
def test_lottery_job_under_ddp_on_two_cpu_processes_trains_each_stage_once(tmp_path, monkeypatch, job,
                                                                            expected_stages):
    """Both ranks run the protocol: rank 1 must train each stage with rank 0 (not wait on its lock), and both
    must key the stages alike (the thread count Lightning gives each rank is fixed before any key). A thin
    (structured) net is built by every rank before DDP wraps it."""
    from conftest import run_cli

    store = tmp_path / "store"
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)  # Lightning's own thread rule applies
    result = run_cli([*TINY, "trainer=ddp", "trainer.accelerator=cpu", "trainer.devices=2", "protocol=lottery", *job,
                      f"protocol.store_dir={store}", f"hydra.run.dir={tmp_path / 'run'}"], timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    saved = json.loads((tmp_path / "run" / "results.json").read_text())
    assert saved["status"] == "ok" and saved["world_size"] == 2
    if "protocol.prune.kind=structured" in job:  # channels removed: the net itself is smaller
        assert saved["params_total"] < saved["lottery/dense_params"] and saved["lottery/flops_fraction"] < 0.9
    else:  # masked: same shapes, zeros
        assert saved["params_nonzero"] < saved["params_total"]
    stages = sorted(p.name.split("-")[0] for p in store.iterdir() if p.is_dir())
    assert stages == expected_stages, stages  # one of each: no rank keyed its own
    assert not [p for p in store.iterdir() if ".rank" in p.name]  # rank 1's private copies are gone


def test_a_failed_make_leaves_nothing_and_is_retried(tmp_path):
    store = StageStore(tmp_path)

    def broken(folder):
        (folder / "half").write_text("x")
        raise RuntimeError("killed")

    with pytest.raises(RuntimeError):
        store.ensure("dense", {"a": 1}, broken)
    assert not store.path("dense", {"a": 1}).exists()
    assert [p.name for p in tmp_path.iterdir() if not p.name.endswith(".lock")] == []
    store.ensure("dense", {"a": 1}, lambda folder: (folder / "ok").write_text("y"))
    assert store.is_done("dense", {"a": 1})


def test_iterative_rounds_reach_the_scheduled_sparsity(tmp_path):
    cfg = make_cfg(tmp_path, "job", "protocol.prune.rate=0.2")
    protocol, base = protocol_of(cfg), job_base(cfg)
    previous = None
    for r in range(1, 5):
        masks = load_masks(protocol.stages.mask(base, r))
        n = sum(m.numel() for m in masks.values())
        assert sparsity_of(masks) == pytest.approx(1 - 0.8 ** r, abs=1.0 / n)
        assert protocol.rounds.target_sparsity(r) == pytest.approx(1 - 0.8 ** r)
        if previous is not None:  # masks only shrink: a pruned weight stays pruned
            assert all(not (masks[k] & ~previous[k]).any() for k in masks)
        previous = masks


def test_fixed_mask_keeps_pruned_weights_at_zero_and_resumes_equal(tmp_path):
    base = [*TINY, *NET, "callbacks=model_checkpoint", "trainer.max_epochs=2"]
    cfg = compose_config(base, tmp_path / "full")
    datamodule, module, trainer = build(cfg)
    torch.manual_seed(0)
    masks = {n: torch.rand_like(m.weight) > 0.5 for n, m in module.net.named_modules()
             if isinstance(m, nn.Conv2d)}
    fixed = FixedMask(masks=masks)
    trainer.callbacks.append(fixed)
    trainer.fit(module, datamodule=datamodule)
    full = module.net.state_dict()
    for name, mask in masks.items():
        assert torch.count_nonzero(full[f"{name}.weight"][~mask]) == 0
        assert torch.count_nonzero(full[f"{name}.weight"][mask]) == int(mask.sum())
    assert fixed.state_dict()["masks"].keys() == masks.keys()

    cfg = compose_config(base, tmp_path / "first")
    datamodule, module, trainer = build(cfg)
    trainer.callbacks += [FixedMask(masks=masks), StopAfterEpochs(1)]
    trainer.fit(module, datamodule=datamodule)
    ckpt = Path(cfg.paths.output_dir) / "checkpoints" / "last.ckpt"
    cfg = compose_config([*base, f"ckpt_path={ckpt}"], tmp_path / "resumed")
    datamodule, module, trainer = build(cfg)
    other = {n: torch.ones_like(m) for n, m in masks.items()}  # the checkpoint's masks must win
    resumed_mask = FixedMask(masks=other)
    trainer.callbacks.append(resumed_mask)
    trainer.fit(module, datamodule=datamodule, ckpt_path=cfg.ckpt_path)
    assert all(torch.equal(resumed_mask.masks[n], masks[n]) for n in masks)
    for key, value in module.net.state_dict().items():
        torch.testing.assert_close(value, full[key], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("overrides, match", [
    (["protocol.method=lth"], r"protocol.method must be one of dense, dense_reinit_seed, dense_compute_matched, finetune, rewind, reinit, random_prune, scratch_e, scratch_b; got 'lth'"),
    (["protocol.rewind_step=5"], r"`protocol.rewind_step`=5 must be one of protocol.snapshot_steps=\[0\]"),
    (["protocol.prune.rate=1.2"], r"`protocol.prune.rate` must be in \(0, 1\).*got 1.2"),
    (["protocol.prune.round=0"], r"`protocol.prune.round` must be an int >= 1; got 0"),
    (["protocol.prune.schedule=oneshot"], r"`protocol.prune.sparsity` is required"),
    (["protocol.prune.kind=structured"], r"`protocol.prune.criterion` must be one of l1_filter, bn_scale"),
    (["protocol.prune.kind=structured", "protocol.prune.criterion=l1_filter"],
     r"`protocol.prune.schedule` must be oneshot with prune.kind=structured"),
    (["protocol.reinit.budget=compute"], r"protocol.reinit.budget must be one of epochs, flops; got 'compute'"),
    (["protocol.reinit.max_factor=0.5"], r"`protocol.reinit.max_factor` must be null or a number >= 1"),
    (["protocol.finetune.lr=0"], r"`protocol.finetune.lr` must be a positive number; got 0"),
    (["protocol.snapshot_steps=[-1]"], r"protocol.snapshot_steps must be a non-empty list of optimizer steps"),
    (["+protocol.prune.amount=0.3"], r"protocol.prune has unknown keys \['amount'\]"),
])
def test_bad_protocol_settings_fail_clearly(tmp_path, overrides, match):
    cfg = make_cfg(tmp_path, "job", *overrides)
    with pytest.raises(ValueError, match=match):
        protocol_of(cfg)


@pytest.fixture
def stub_method():
    """A retraining method added the way a user adds one: one class, one decorator, nothing else edited."""
    starts = []

    @register_retraining("stub_trained")
    class StubTrained(Retraining):
        """The dense stage's trained weights, masked, retrained for 2 epochs."""

        def unpruned_start(self, base, dense_dir, round_):
            starts.append(dense_dir)
            return stages.load_stage_net(dense_dir)

        def budget(self, job, start):
            return {"trainer.max_epochs": 2}, 2

    StubTrained.starts = starts
    yield StubTrained
    RETRAINING.pop("stub_trained")


def test_a_registered_retraining_method_is_selectable_by_name(tmp_path, stub_method):
    cfg = make_cfg(tmp_path, "job", "protocol.method=stub_trained")
    assert isinstance(protocol_of(cfg).retraining, stub_method)
    results = run(cfg)
    assert len(stub_method.starts) == 1 and stub_method.starts[0].name == results["lottery/dense_key"]
    assert results["lottery/method"] == results["lottery/label"] == "stub_trained"
    assert results["lottery/epochs_trained"] == 2 and results["global_step"] == 2 * 4  # its budget, 4 steps/epoch
    assert results["lottery/sparsity"] == pytest.approx(0.2, abs=0.01) and results["params_nonzero"] < results["params_total"]
    with pytest.raises(ValueError, match="'stub_trained' is already registered"):
        register_retraining("stub_trained")(stub_method)


def test_an_unknown_method_lists_the_registered_ones(tmp_path, stub_method):
    names = list(RETRAINING)
    assert names[:9] == ["dense", "dense_reinit_seed", "dense_compute_matched", "finetune", "rewind", "reinit",
                         "random_prune", "scratch_e", "scratch_b"]
    assert names[-1] == "stub_trained"
    with pytest.raises(ValueError, match=rf"protocol.method must be one of {', '.join(names)}; got 'lth'"):
        protocol_of(make_cfg(tmp_path, "job", "protocol.method=lth"))


def test_aliases_report_as_reinit_with_their_budget(tmp_path):
    for alias, label in [("scratch_e", "reinit (Scratch-E)"), ("scratch_b", "reinit (Scratch-B)")]:
        protocol = protocol_of(make_cfg(tmp_path, "job", f"protocol.method={alias}"))
        assert (protocol.method, protocol.label) == ("reinit", label)
    assert protocol_of(make_cfg(tmp_path, "job", "protocol.method=reinit", "protocol.reinit.budget=flops")).label \
        == "reinit (Scratch-B)"
    assert protocol_of(make_cfg(tmp_path, "job", "protocol.rewind_step=0")).label == "rewind k=0"


def test_unreachable_snapshot_step_fails_before_training(tmp_path):
    cfg = make_cfg(tmp_path, "job", "protocol.snapshot_steps=[0,50]")  # 1 epoch = 4 steps
    with pytest.raises(ValueError, match=r"protocol.snapshot_steps \[50\] are beyond the run's 4 optimizer steps"):
        run(cfg)


def test_bad_layer_pattern_and_mask_shapes_fail_clearly(tmp_path):
    cfg = make_cfg(tmp_path, "job", "protocol.prune.include=[nope*]")
    protocol = protocol_of(cfg)
    net = models.factory.create_model("conv2_lth", num_classes=10, width=0.125)
    with pytest.raises(ValueError, match="protocol.prune: pattern 'nope\\*' matches no"):
        protocol.rounds.selected(net)
    with pytest.raises(ValueError, match="must hold only 0 and 1"):
        FixedMask(masks={"x": torch.tensor([0.0, 0.5])})
    with pytest.raises(ValueError, match="exactly one of `masks` or `path`"):
        FixedMask()
    with pytest.raises(FileNotFoundError, match="fixed_mask.path="):
        FixedMask(path=tmp_path / "missing.pt")
    with pytest.raises(ValueError, match="protocol.store_dir must be a folder path"):
        StageStore("")


@pytest.mark.slow
def test_structured_reinit_trains_a_thinner_network(tmp_path):
    cfg = make_cfg(tmp_path, "job", "model.name=resnet20_cifar", "model.width=0.25", "protocol.method=reinit", "protocol.prune.kind=structured", "protocol.prune.criterion=l1_filter",
                   "protocol.prune.schedule=oneshot", "+protocol.prune.sparsity=0.5", "protocol.prune.scope=layer",
                   "protocol.prune.include=[layer*.conv1]")
    results = run(cfg)
    dense = models.factory.create_model("resnet20_cifar", num_classes=10, width=0.25)
    assert results["params_total"] < sum(p.numel() for p in dense.parameters())
    assert results["lottery/flops_fraction"] < 0.9 and results["status"] == "ok"


PRESETS = ["lth_resnet20_cifar10", "lth_resnet20_cifar10_mini", "lth_vgg16_cifar10", "lth_vgg16_cifar10_mini",
           "rethinking_slimming_vgg19", "rethinking_slimming_vgg19_mini", "rethinking_l1norm_resnet56",
           "rethinking_l1norm_resnet56_mini"]


@pytest.mark.parametrize("preset", PRESETS)
def test_every_preset_composes_and_builds_its_protocol(tmp_path, preset):
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    from conftest import CONF

    GlobalHydra.instance().clear()
    with initialize_config_dir(str(CONF), version_base="1.3"):
        cfg = compose("config", overrides=[f"experiment={preset}", f"paths.store_dir={tmp_path}"],
                      return_hydra_config=True)
    params = cfg.hydra.sweeper.params
    assert cfg.hydra.callbacks.report._target_ == "netcompress.report.ReportOnMultirun"
    protocol = LotteryProtocol(**{k: v for k, v in OmegaConf.to_container(cfg.protocol).items() if k != "_target_"})
    for method in str(params["protocol.method"]).split(","):
        LotteryProtocol(**{**{k: v for k, v in OmegaConf.to_container(cfg.protocol).items() if k != "_target_"},
                           "method": method})
    if preset.startswith("lth_") and not preset.endswith("_mini"):  # the grid: 5+ sparsities, 3 seeds, 2 lrs
        assert len(str(params["protocol.prune.round"]).split(",")) >= 5 and str(params.seed) == "0,1,2"
        assert str(params["optimizer.lr"]) == "0.1,0.01" and protocol.prune["rate"] == 0.2
    methods = set(str(params["protocol.method"]).split(","))
    if preset.startswith("rethinking_"):
        assert protocol.prune["kind"] == "structured"
        assert methods - {"dense_reinit_seed"} == {"dense", "finetune", "scratch_e", "scratch_b"}
    if preset.endswith("_mini"):  # small studies: >= 5 seeds, paired by seed, with the init-seed control
        assert len(str(params.seed).split(",")) >= 5 and {"dense", "dense_reinit_seed"} <= methods
    if preset.startswith("lth_") and preset.endswith("_mini"):
        assert {"rewind", "reinit", "dense_compute_matched"} <= methods


@pytest.mark.parametrize("mini,full", [("lth_resnet20_cifar10_mini", "lth_resnet20_cifar10"),
                                       ("lth_vgg16_cifar10_mini", "lth_vgg16_cifar10"),
                                       ("rethinking_slimming_vgg19_mini", "rethinking_slimming_vgg19"),
                                       ("rethinking_l1norm_resnet56_mini", "rethinking_l1norm_resnet56")])
def test_a_mini_prunes_the_layers_its_full_preset_prunes(tmp_path, mini, full):
    """A mini shrinks width, data and epochs only: which layers are pruned, and how, is its paper's."""
    keys = ("kind", "criterion", "scope", "include", "exclude", "skip_first_last", "layer_sparsity", "layer_rate",
            "rounding", "round_to")
    prune = {name: OmegaConf.to_container(compose_config([f"experiment={name}"], tmp_path / name).protocol.prune)
             for name in (mini, full)}
    assert {k: prune[mini][k] for k in keys} == {k: prune[full][k] for k in keys}


class _LrProbe(pl.Callback):
    """Records the lr of every optimizer step and the number of steps."""

    def __init__(self) -> None:
        self.lrs: list[float] = []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        self.lrs.append(trainer.optimizers[0].param_groups[0]["lr"])


@pytest.mark.parametrize("schedule,steps,first_lr", [("resume", 8 - 5, 0.01 * 0.1), ("restart", 8, 0.01)])
def test_rewinding_to_step_k_trains_t_minus_k_steps_with_the_schedule_resumed_at_k(tmp_path, monkeypatch, schedule,
                                                                                  steps, first_lr):
    """Frankle et al. 2020 / open_lth: rewound to k, a network trains the remaining T - k steps, its first step
    at the dense schedule's lr of step k (resume); restart = T steps from the schedule's start."""
    import netcompress.protocols.stages as stages_module

    # 4 steps per epoch x 2 epochs = T = 8; lr 0.01 /10 at step int(0.5 * 8) = 4; k = 5
    cfg = compose_config([*TINY, "model.name=conv2_lth", "+model.width=0.125", "scheduler=multistep",
                          "scheduler.milestones=[0.5]", "optimizer.lr=0.01", "trainer.max_epochs=2",
                          "protocol=lottery", f"paths.store_dir={tmp_path / 'store'}", "protocol.snapshot_steps=[0,5]",
                          "protocol.rewind_step=5", f"protocol.rewind_schedule={schedule}"], tmp_path / "job")
    protocol, base = protocol_of(cfg), job_base(cfg)
    probe = _LrProbe()
    fit_stage = stages_module.fit_stage
    seen = []

    def probing(stage_base, folder, start=None, masks=None, callbacks=(), **kwargs):
        if start is not None:  # the IMP round's retraining (the dense fit has no start network)
            seen.append(stage_base)
            callbacks = [*callbacks, probe]
        return fit_stage(stage_base, folder, start=start, masks=masks, callbacks=callbacks, **kwargs)

    monkeypatch.setattr(stages_module, "fit_stage", probing)
    dense_dir = protocol.stages.dense(base)
    assert json.loads((dense_dir / stage_store.METRICS).read_text())["global_step"] == 8
    train_dir = protocol.stages.train(base, 1)
    metrics = json.loads((train_dir / stage_store.METRICS).read_text())
    assert metrics["global_step"] == steps == len(probe.lrs)
    assert probe.lrs[0] == pytest.approx(first_lr)
    if schedule == "resume":
        assert probe.lrs == pytest.approx([0.001] * 3)  # steps 5, 6, 7 of the dense schedule
        assert seen[0]["module"]["schedule_offset"] == 5
    else:
        assert probe.lrs == pytest.approx([0.01] * 4 + [0.001] * 4)


def test_rewind_schedule_must_be_known(tmp_path):
    cfg = make_cfg(tmp_path, "job", "protocol.rewind_schedule=rewound")
    with pytest.raises(ValueError, match="protocol.rewind_schedule must be one of resume, restart; got 'rewound'"):
        protocol_of(cfg)


def test_compute_columns_and_the_two_dense_controls(tmp_path):
    """Round-2 ticket: cumulative steps = dense T + 2 IMP trainings; dense_compute_matched trains that many
    steps from scratch; dense_reinit_seed is the dense stage of seed + seed_offset."""
    T = 4  # TINY: 64 images / batch 16, one epoch
    out = {}
    for method in ("rewind", "reinit", "dense", "dense_compute_matched", "dense_reinit_seed"):
        cfg = make_cfg(tmp_path, method, f"protocol.method={method}", "protocol.prune.round=2")
        results, _ = protocol_of(cfg).run(cfg)
        out[method] = results
    assert out["rewind"]["lottery/train_steps"] == T and out["rewind"]["lottery/cumulative_steps"] == 3 * T
    assert out["reinit"]["lottery/cumulative_steps"] == T + T + T  # dense + round 1 (its mask) + its own
    assert out["dense"]["lottery/cumulative_steps"] == T
    matched = out["dense_compute_matched"]
    assert matched["global_step"] == matched["lottery/cumulative_steps"] == 3 * T
    control = out["dense_reinit_seed"]
    assert control["lottery/init_seed"] == 1000 and control["lottery/cumulative_steps"] == T
    assert control["test/acc1"] != out["dense"]["test/acc1"] or control["test/loss"] != out["dense"]["test/loss"]

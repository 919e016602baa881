"""End-to-end behaviour of run.py: results.json, presets, data trees, multirun, resume, errors, DDP."""
from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import timm
import torch
from PIL import Image
from torch import nn

from netcompress import models  # noqa: F401
from conftest import ROOT, TINY, TINY_RUN, compose_config, run_cli, straight_and_resumed
from netcompress.evaluation.results import REQUIRED_KEYS
from netcompress.models.serialization import load_model
from netcompress.pipeline.build import build
from netcompress.run import run

CIFAR_MODELS = ["resnet20_cifar", "resnet32_cifar", "resnet44_cifar", "resnet56_cifar", "resnet110_cifar",
                "vgg11_bn_cifar", "vgg13_bn_cifar", "vgg16_bn_cifar", "vgg19_bn_cifar",
                "conv2_lth", "conv4_lth", "conv6_lth"]


def output_dir(cfg) -> str:
    return cfg.paths.output_dir


def reference_flops(net: nn.Module, input_size=(3, 32, 32)) -> int:
    """2 x multiply-adds of every Conv2d and Linear, counted with forward hooks (independent of torch's counter)."""
    total = 0

    def conv_hook(module, inputs, output):
        nonlocal total
        k = module.kernel_size[0] * module.kernel_size[1] * module.in_channels // module.groups
        total += 2 * output.numel() * k

    def linear_hook(module, inputs, output):
        nonlocal total
        total += 2 * output.numel() * module.in_features

    handles = [m.register_forward_hook(conv_hook if isinstance(m, nn.Conv2d) else linear_hook)
               for m in net.modules() if isinstance(m, (nn.Conv2d, nn.Linear))]
    with torch.no_grad():
        net.eval()(torch.zeros(1, *input_size))
    for h in handles:
        h.remove()
    return total


def test_results_json_has_every_key_with_sane_values(tiny_config):
    cfg = tiny_config("trainer.max_epochs=2")
    results = run(cfg)
    out = Path(output_dir(cfg))
    saved = json.loads((out / "results.json").read_text())
    assert saved["status"] == "ok" and saved["error"] is None
    for key in REQUIRED_KEYS:
        assert key in saved, key
    for key in ("test/acc1", "test/acc5", "val/acc1"):
        assert 0.0 <= saved[key] <= 1.0
    assert saved["test/acc5"] >= saved["test/acc1"]
    assert saved["seed"] == 0 and saved["model_name"] == "resnet20_cifar" and saved["epochs"] == 2
    net = load_model(out / "model.pt")
    total = sum(p.numel() for p in net.parameters())
    assert saved["params_total"] == total and 0 < saved["params_nonzero"] <= total
    assert saved["flops"] == reference_flops(net)
    assert saved["size_bytes"] == (out / "model.pt").stat().st_size
    assert saved["latency_ms"] > 0 and saved["train_time_s"] > 0
    assert saved["config"]["model"]["name"] == "resnet20_cifar"  # resolved config
    assert saved["provenance"]["packages"]["torch"] == torch.__version__.split("+")[0]
    assert set(saved["provenance"]["git"]) == {"commit", "dirty"}
    assert results["test/acc1"] == saved["test/acc1"]


def test_saved_model_reloads_with_same_outputs(tiny_config):
    cfg = tiny_config()
    objects_results = run(cfg)
    out = Path(output_dir(cfg))
    reloaded = load_model(out / "model.pt")
    x = torch.randn(4, 3, 32, 32)
    reference = timm.create_model("resnet20_cifar", num_classes=10)
    reference.load_state_dict(torch.load(out / "model.pt", weights_only=True)["state_dict"])
    torch.testing.assert_close(reloaded(x), reference.eval()(x))
    assert objects_results["status"] == "ok"


@pytest.mark.slow
@pytest.mark.parametrize("name", CIFAR_MODELS)
def test_each_preset_model_trains_two_steps(tiny_config, name):
    cfg = tiny_config(f"model.name={name}", "trainer.limit_train_batches=2", "trainer.limit_val_batches=1",
                      "trainer.limit_test_batches=1", "save_model=false", "latency_repeats=1")
    datamodule, module, trainer = build(cfg)
    before = [p.detach().clone() for p in module.net.parameters()]
    trainer.fit(module, datamodule=datamodule)
    assert trainer.global_step == 2
    changed = [not torch.equal(b, p) for b, p in zip(before, module.net.parameters())]
    assert all(changed), f"{sum(not c for c in changed)} parameter tensors of {name} did not train"
    assert math.isfinite(float(trainer.callback_metrics["train/loss"]))


def make_imagefolder(root: Path, classes=("cat", "dog", "frog"), per_class=6, splits=("train", "val")) -> Path:
    generator = torch.Generator().manual_seed(0)
    for split in splits:
        for index, name in enumerate(classes):
            folder = root / split / name
            folder.mkdir(parents=True)
            for i in range(per_class):
                pixels = (torch.rand(16, 16, 3, generator=generator) * 60 + index * 90).clamp(0, 255).byte()
                Image.fromarray(pixels.numpy()).save(folder / f"{i}.jpg")
    return root


def test_tiny_imagefolder_tree_trains_and_tests(tmp_path):
    root = make_imagefolder(tmp_path / "tree")
    cfg = compose_config([*TINY_RUN, "data=imagefolder", f"data.root={root}", "data.image_size=32", "data.resize_size=36",
                      "data.batch_size=6", "data.num_workers=0", "data.persistent_workers=false",
                      "data.pin_memory=false", "trainer.max_epochs=1"], tmp_path / "run")
    results = run(cfg)
    assert results["status"] == "ok"
    assert results["config"]["data"]["root"] == str(root)
    net = load_model(Path(output_dir(cfg)) / "model.pt")
    assert net.get_classifier().out_features == 3  # num_classes taken from the folder


def test_compression_list_composes_into_trainer_callbacks(tiny_config):
    from netcompress.callbacks.noop import Noop

    cfg = tiny_config("compression=[noop]")
    assert list(cfg.callbacks) == ["noop"]
    _, _, trainer = build(cfg)
    assert sum(isinstance(c, Noop) for c in trainer.callbacks) == 1
    empty = tiny_config("compression=[]")
    assert not empty.callbacks


def test_resume_equals_uninterrupted(tmp_path):
    straight, resumed, _ = straight_and_resumed([*TINY, "callbacks=model_checkpoint", "scheduler=cosine",
                                                 "trainer.max_epochs=2"], tmp_path, stop_after=1)
    assert resumed["test/acc1"] == straight["test/acc1"]


# ----- errors a user will hit: one clear line, before training ---------------------------------

def test_unknown_model_name_suggests_close_names(tiny_config):
    cfg = tiny_config("model.name=resnet21_cifar")
    with pytest.raises(ValueError, match=r"model\.name.*resnet21_cifar.*resnet20_cifar"):
        build(cfg)


def test_missing_cifar_without_network_says_how_to_set_root(tmp_path, monkeypatch):
    import torchvision

    def no_network(*args, **kwargs):
        raise OSError("no network")

    monkeypatch.setattr(torchvision.datasets.CIFAR10, "download", no_network)
    cfg = compose_config([*TINY_RUN, "data=cifar10", f"data.root={tmp_path / 'empty'}",
                          f"data.cache_dir={tmp_path / 'cache'}"], tmp_path / "run")
    with pytest.raises(FileNotFoundError, match=r"data\.root"):
        run(cfg)
    saved = json.loads((Path(output_dir(cfg)) / "results.json").read_text())
    assert saved["status"] == "failed" and "data.root" in saved["error"]
    assert saved["train_time_s"] is None


def test_folder_that_is_not_an_imagefolder_tree(tmp_path):
    (tmp_path / "flat").mkdir()
    (tmp_path / "flat" / "a.jpg").write_bytes(b"")
    cfg = compose_config([*TINY_RUN, "data=imagefolder", f"data.root={tmp_path / 'flat'}"], tmp_path / "run")
    with pytest.raises((FileNotFoundError, ValueError), match="train"):
        build(cfg)


def test_corrupt_checkpoint_is_rejected_before_training(tiny_config, tmp_path):
    bad = tmp_path / "bad.ckpt"
    bad.write_bytes(b"not a checkpoint")
    with pytest.raises(ValueError, match="ckpt_path.*not a readable checkpoint"):
        build(tiny_config(f"ckpt_path={bad}"))
    with pytest.raises(FileNotFoundError, match="ckpt_path"):
        build(tiny_config(f"ckpt_path={tmp_path / 'missing.ckpt'}"))


@pytest.mark.slow
def test_unknown_config_group_option_lists_the_choices(tmp_path):
    result = run_cli(["model=resnet_does_not_exist", f"hydra.run.dir={tmp_path}"])
    assert result.returncode != 0
    assert "Could not find 'model/resnet_does_not_exist'" in result.stderr
    assert "timm" in result.stderr  # the available options are listed


@pytest.mark.slow
def test_two_job_multirun_writes_two_results(tmp_path):
    result = run_cli(["-m", *TINY, "seed=0,1", f"hydra.sweep.dir={tmp_path}"])
    assert result.returncode == 0, result.stderr[-3000:]
    seeds = sorted(json.loads((tmp_path / str(i) / "results.json").read_text())["seed"] for i in (0, 1))
    assert seeds == [0, 1]


@pytest.mark.slow
def test_ddp_on_two_cpu_processes_writes_results_once(tmp_path):
    result = run_cli([*TINY, "trainer=ddp", "trainer.accelerator=cpu", "trainer.devices=2",
                      f"hydra.run.dir={tmp_path}"], timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    saved = json.loads((tmp_path / "results.json").read_text())
    assert saved["status"] == "ok" and saved["world_size"] == 2
    assert 0.0 <= saved["test/acc1"] <= 1.0
    assert len(list(tmp_path.rglob("results.json"))) == 1


@pytest.mark.slow
@pytest.mark.parametrize("signal_name", ["SIGTERM", "SIGINT"])  # SIGINT = Ctrl-C (Lightning calls sys.exit)
def test_killed_run_leaves_a_failed_record(tmp_path, signal_name):
    import signal
    import subprocess
    import sys
    import time

    out = tmp_path / "killed"
    process = subprocess.Popen([sys.executable, str(ROOT / "run.py"), *TINY, "data.train_size=4096",
                                "trainer.max_epochs=50", f"hydra.run.dir={out}"], cwd=ROOT,
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    while time.time() < deadline and not (out / "results.json").exists():
        time.sleep(0.5)
    assert json.loads((out / "results.json").read_text())["status"] == "running"
    time.sleep(3)
    process.send_signal(getattr(signal, signal_name))
    process.wait(timeout=120)
    saved = json.loads((out / "results.json").read_text())
    assert saved["status"] == "failed" and signal_name in saved["error"], saved["error"]


def test_threads_from_config_are_used_and_recorded(tiny_config, tmp_path):
    """`threads` fixes torch's CPU threads for the run; results.json's provenance records the count."""
    import json

    import torch

    from netcompress.run import run

    before = torch.get_num_threads()
    try:
        cfg = tiny_config("threads=2")
        run(cfg)
        results = json.loads((tmp_path / "run" / "results.json").read_text())
        assert results["provenance"]["machine"]["torch_threads"] == 2 == torch.get_num_threads()
    finally:
        torch.set_num_threads(before)


def test_ddp_thread_count_is_fixed_before_any_stage_key(tiny_config, monkeypatch):
    """threads=null under DDP: Lightning would lower rank 0's count only at fit (cores // processes), after the
    stage keys; apply_threads sets that count first (and OMP_NUM_THREADS, which the other ranks inherit)."""
    import os

    import torch

    from netcompress.pipeline.build import apply_threads, processes_per_node

    before = torch.get_num_threads()
    try:
        monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
        monkeypatch.setattr(os, "cpu_count", lambda: 6)
        ddp = tiny_config("trainer=ddp", "trainer.accelerator=cpu", "trainer.devices=3")
        assert processes_per_node(ddp) == 3 and apply_threads(ddp) == 2 == torch.get_num_threads()
        assert os.environ["OMP_NUM_THREADS"] == "2"
        torch.set_num_threads(1)
        assert apply_threads(ddp) == 1  # OMP_NUM_THREADS already set: Lightning leaves it too
        assert processes_per_node(tiny_config()) == 1
        assert apply_threads(tiny_config("threads=2")) == 2 and os.environ["OMP_NUM_THREADS"] == "2"
    finally:
        torch.set_num_threads(before)


def test_lottery_stage_keys_differ_by_thread_count(tiny_config):
    """The stage store never hands a result computed with other threads to a run (the dense key holds them)."""
    from omegaconf import OmegaConf

    from netcompress.protocols.lottery import job_base
    from netcompress.pipeline.build import instantiate
    from netcompress.protocols.stage_store import stage_key

    keys = []
    for threads in (1, 2):
        cfg = tiny_config("protocol=lottery", f"threads={threads}")
        protocol = instantiate(cfg.protocol)
        keys.append(stage_key(protocol.stages.dense_parts(job_base(cfg))))
    assert keys[0] != keys[1]

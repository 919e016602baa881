"""Bad input fails early and clearly (issue 10, "Bad input and faults"): every case names the key or
file, the value received and what is valid, before training, and results.json says failed with it."""
from __future__ import annotations

import json
import pickle
import re
from pathlib import Path

import numpy as np
import pytest
import torch
import torchvision
from PIL import Image

from conftest import TINY, TINY_RUN, compose_config, run_cli
from netcompress.datamodules import CIFAR10DataModule
from netcompress.datamodules.cifar10_store import CIFAR10_CLASSES, load_cifar10
from netcompress.models.factory import create_model
from netcompress.models.serialization import save_model
from netcompress.pipeline.preflight import CommandLineError, check_overrides
from netcompress.pipeline.build import build
from netcompress.run import run


def failed_record(output_dir: Path) -> str:
    """The error results.json records for a run that must have failed."""
    saved = json.loads((Path(output_dir) / "results.json").read_text())
    assert saved["status"] == "failed", saved.get("status")
    return saved["error"]


def run_fails(cfg, output_dir: Path, error, match: str) -> str:
    """run(cfg) raises ``error`` matching ``match`` and results.json records the same error."""
    with pytest.raises(error, match=match) as info:
        run(cfg)
    recorded = failed_record(output_dir)
    assert str(info.value) in recorded
    return str(info.value)


# ----- A. typed config values, checked in pipeline.build.build before anything else ------------------------

@pytest.mark.parametrize("override, match", [
    ("seed=abc", r"`seed` must be an int in \[0, 4294967295\]; got 'abc' \(e\.g\. seed=0\)"),
    ("optimizer.lr=-0.1", r"`optimizer\.lr` must be a float > 0; got -0\.1"),
    ("optimizer.lr=abc", r"`optimizer\.lr` must be a float > 0; got 'abc'"),
    ("trainer.max_epochs=-1", r"`trainer\.max_epochs` must be an int >= 0; got -1"),
    ("data.batch_size=0", r"`data\.batch_size` must be an int >= 1; got 0"),
    ("latency_repeats=0", r"`latency_repeats` must be an int >= 1; got 0"),
    ("save_model=yes", r"`save_model` must be true or false; got 'yes'"),
])
def test_typed_values_are_checked_before_training(tiny_config, tmp_path, override, match):
    run_fails(tiny_config(override), tmp_path / "run", ValueError, match)


def test_zero_epochs_refused_unless_nothing_needs_training(tiny_config, tmp_path):
    message = run_fails(tiny_config("trainer.max_epochs=0"), tmp_path / "run", ValueError,
                        r"`trainer\.max_epochs`=0 would report an untrained network")
    assert "compression=[ptq]" in message and "init_from" in message
    from netcompress.pipeline.config_checks import check_config

    check_config(tiny_config("trainer.max_epochs=0", "compression=[ptq]"))  # calibration only: fine


@pytest.mark.parametrize("overrides, match", [
    (["+callbacks.slimming.prune_ratio=0.5"], r"callbacks\.slimming has no _target_: add slimming to compression=\["),
    (["+callbacks.kd.temperature=2.0"], r"callbacks\.kd has no _target_: add kd to compression=\["),
])
def test_settings_of_an_entry_not_in_the_compression_list_are_refused(tiny_config, tmp_path, overrides, match):
    run_fails(tiny_config(*overrides), tmp_path / "run", ValueError, match)


@pytest.mark.parametrize("overrides, match", [
    (["compression=[slimming]", "+callbacks.slimming.prune_ratoi=0.5"],
     r"`callbacks\.slimming\.prune_ratoi` is not an argument of netcompress\.callbacks\.slimming\.Slimming "
     r"\(did you mean prune_ratio[^)]*\?\); valid keys under callbacks\.slimming: prune_ratio, at_epochs"),
    (["+optimizer.lrr=0.1"], r"`optimizer\.lrr` is not an argument of torch\.optim\.SGD \(did you mean lr\?\); "
                             r"valid keys under optimizer: lr, momentum"),
    (["+data.image_sise=32"], r"`data\.image_sise` is not an argument of .*SyntheticDataModule \(did you mean "
                              r"image_size\?\)"),
])
def test_unknown_keys_list_the_valid_ones(tiny_config, overrides, match):
    with pytest.raises(ValueError, match=match):
        build(tiny_config(*overrides))


def test_required_value_left_unset_names_the_key(tmp_path):
    cfg = compose_config([*TINY, "experiment=kd_mini"], tmp_path / "run")
    with pytest.raises(ValueError, match=r"`callbacks\.kd\.teachers` must be set: the config leaves it \?\?\?"):
        build(cfg)


def test_entry_listed_twice_is_refused_in_process(tiny_config, tmp_path):
    run_fails(tiny_config("compression=[noop,noop]"), tmp_path / "run", ValueError,
              r"compression=\[noop,noop\]: noop appears twice; list each entry once .* compression=\[noop\]")


# ----- B. command-line pre-flight ----------------------------------------------------------------

@pytest.mark.parametrize("argv, match", [
    (["compression=[slimmming]"], r"no compression entry 'slimmming' \(did you mean slimming\?\); valid entries "
                                  r"\(conf/compression/\*\.yaml\): bn_sparsity, .*slimming"),
    (["compression=[],[noop,noop]"], r"compression=\[noop,noop\]: noop appears twice"),
    (["compression=choice([],[kd,qat,kd])"], r"kd appears twice"),
    (["compression=[slimming]", "callbacks.slimming.prune_ratoi=0.5"],
     r"`callbacks\.slimming\.prune_ratoi` is not an argument .* valid keys under callbacks\.slimming: prune_ratio"),
    (["+callbacks.model_checkpoint.every_n_epoch=2"],
     r"`callbacks\.model_checkpoint\.every_n_epoch` is not an argument of .*ModelCheckpoint \(did you mean "
     r"every_n_epochs"),
    (["+callbacks.kd.temperature=2"], r"\+callbacks\.kd\.temperature=2: kd is not in compression=\[\.\.\.\], so "
                                      r"this value would be ignored; add kd to the list, e.g\. compression=\[kd\]"),
    (["compression=[],[slimming]", "callbacks.slimming.at_epochs=[1]"],
     r"slimming is not in every option of the sweep compression=\[\] / \[slimming\]"),
    (["seed=0,1,abc"], r"`seed` must be an int in \[0, 4294967295\]; got 'abc'"),
    (["optimizer.lr=-0.1"], r"`optimizer\.lr` must be a float > 0; got -0\.1 \(e\.g\. optimizer\.lr=0\.1\)"),
])
def test_preflight_rejects_command_line_mistakes(argv, match):
    with pytest.raises(CommandLineError, match=match):
        check_overrides(argv)


@pytest.mark.parametrize("argv", [
    ["compression=[slimming,qat]", "callbacks.slimming.prune_ratio=0.5", "+callbacks.qat.bits=4"],
    ["compression=[],[noop]", "seed=0,1"],
    ["experiment=kd_mini", "callbacks.kd.temperature=2"],  # the preset lists kd: only the composed config knows
    ["compression=glob(*)"],
    ["optimizer.lr=tag(log,interval(1e-4,1e-1))", "seed=range(0,3)", "data.root=${oc.env:HOME}/data"],
])
def test_preflight_accepts_valid_command_lines(argv):
    check_overrides(argv)


def _assert_preflight_error(result, run_dir: Path, needle: str) -> None:
    assert result.returncode == 2, result.stderr[-2000:]
    errors = [line for line in result.stderr.splitlines() if line.startswith("netcompress: error:")]
    assert len(errors) == 1 and needle in errors[0], result.stderr[-2000:]
    assert "Traceback" not in result.stderr
    assert not run_dir.exists()  # Hydra never started: no run folder, no training


@pytest.mark.slow
def test_cli_duplicate_entry_exits_2_before_hydra(tmp_path):
    result = run_cli([*TINY, "compression=[noop,noop]", f"hydra.run.dir={tmp_path / 'run'}"])
    _assert_preflight_error(result, tmp_path / "run", "compression=[noop,noop]: noop appears twice")


@pytest.mark.slow
def test_cli_misspelled_entry_in_a_sweep_exits_2_before_hydra(tmp_path):
    result = run_cli(["-m", *TINY, "compression=[],[slimmming]", f"hydra.sweep.dir={tmp_path / 'sweep'}"])
    _assert_preflight_error(result, tmp_path / "sweep", "no compression entry 'slimmming' (did you mean slimming?)")


# ----- C. init_from / ckpt_path / teacher files -------------------------------------------------

def model_file(path: Path, name: str = "resnet20_cifar", width: float = 0.25, thin: bool = False) -> Path:
    net = create_model(name, num_classes=10, width=width)
    if thin:  # as slimming leaves it: two of layer1.0's four channels removed
        from netcompress.compression.channel_removal import remove_channels

        net = remove_channels(net, {"layer1.0.bn1": torch.tensor([True, False, True, False])},
                              torch.zeros(1, 3, 32, 32))
    save_model(net, path, name, 10, {"width": width})
    return path


def checkpoint_file(path: Path, **kwargs) -> Path:
    """A run.py-style checkpoint (state_dict + netcompress's arch/net_spec) of the model_file network."""
    from netcompress.models.serialization import CHECKPOINT_KEY

    saved = torch.load(model_file(path.with_suffix(".pt"), **kwargs), weights_only=True)
    spec = {k: saved[k] for k in ("model_name", "num_classes", "model_kwargs")}
    torch.save({"state_dict": {f"net.{k}": v for k, v in saved["state_dict"].items()},
                CHECKPOINT_KEY: {"arch": saved["arch"], "phase": {"start_step": 0, "optimizer_overrides": {}},
                                 "net_spec": spec}}, path)
    return path


def test_init_from_another_model_is_refused_with_both_named(tiny_config, tmp_path):
    path = model_file(tmp_path / "other.pt", name="resnet32_cifar")
    run_fails(tiny_config("+model.width=0.25", f"init_from={path}"), tmp_path / "run", ValueError,
              r"init_from=.* holds another model: resnet32_cifar\(width=0\.25\), 10 classes, but the config builds "
              r"resnet20_cifar\(width=0\.25\), 10 classes \(.*modules only in the saved net: layer1\.3")


def test_init_from_another_width_is_refused_but_a_thinned_run_is_fine_tuned(tiny_config, tmp_path):
    wide = model_file(tmp_path / "wide.pt", width=0.5)
    with pytest.raises(ValueError, match=r"init_from=.* holds another model: resnet20_cifar\(width=0\.5\), 10 "
                                         r"classes, but the config builds resnet20_cifar\(width=0\.25\).*layer "
                                         r"widths saved vs configured: conv1\.out_channels 8 vs 4"):
        build(tiny_config("+model.width=0.25", f"init_from={wide}"))
    thin = model_file(tmp_path / "thin.pt", thin=True)  # this model, slimmed: what init_from is for
    _, module, _ = build(tiny_config("+model.width=0.25", f"init_from={thin}"))
    assert module.net.layer1[0].conv1.out_channels == 2


def test_ckpt_path_of_another_width_is_refused(tiny_config, tmp_path):
    path = checkpoint_file(tmp_path / "wide.ckpt", width=0.5)
    run_fails(tiny_config("+model.width=0.25", f"ckpt_path={path}"), tmp_path / "run", ValueError,
              r"ckpt_path=.* holds another model: resnet20_cifar\(width=0\.5\), 10 classes, but the config builds "
              r"resnet20_cifar\(width=0\.25\).*conv1\.out_channels 8 vs 4.*resume with the model settings")


def test_thinned_checkpoint_without_a_channel_removing_entry_is_named(tiny_config, tmp_path, caplog):
    path = checkpoint_file(tmp_path / "thin.ckpt", thin=True)
    with caplog.at_level("WARNING", logger="netcompress.lightning_modules.checkpoint_io"):
        build(tiny_config("+model.width=0.25", f"ckpt_path={path}", "compression=[slimming]",
                          "callbacks.slimming.at_epochs=[1]"))  # its own slimming run: resumes quietly
        assert not caplog.records
        build(tiny_config("+model.width=0.25", f"ckpt_path={path}"))
    assert len(caplog.records) == 1
    assert re.search(r"ckpt_path=.* holds a thinned resnet20_cifar\(width=0\.25\), 10 classes \(layer widths saved "
                     r"vs configured: layer1\.0\.conv1\.out_channels 2 vs 4.*no compression entry that removes",
                     caplog.records[0].getMessage())


class _RunsCode:
    """Unpickling this would create ``marker`` (stands in for any code a pickle can name)."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (self.marker,))


def _bad_files(tmp_path: Path) -> dict[str, Path]:
    text = tmp_path / "notes.pt"
    text.write_text("these are my notes, not a model\n")
    code = tmp_path / "code.pt"
    code.write_bytes(pickle.dumps({"state_dict": _RunsCode(tmp_path / "MARKER")}))
    zipped = tmp_path / "zipped_code.ckpt"
    torch.save({"state_dict": {}, "x": _RunsCode(tmp_path / "MARKER")}, zipped)
    return {"text": text, "code": code, "zipped": zipped}


@pytest.mark.parametrize("key", ["init_from", "ckpt_path"])
@pytest.mark.parametrize("kind", ["text", "code", "zipped"])
def test_file_that_is_not_a_netcompress_model_is_refused_without_running_it(tiny_config, tmp_path, key, kind):
    path = _bad_files(tmp_path)[kind]
    message = run_fails(tiny_config(f"{key}={path}"), tmp_path / "run", ValueError,
                        rf"{key}=.*{path.name}' is not a netcompress model/checkpoint")
    assert "weights_only" not in message and "\n" not in message
    assert not (tmp_path / "MARKER").exists()


def test_teacher_file_that_is_not_a_netcompress_model_is_refused(tmp_path):
    files = _bad_files(tmp_path)
    cfg = compose_config([*TINY, "+model.width=0.25", "compression=[kd]",
                          f"callbacks.kd.teachers=[{files['code']}]"], tmp_path / "run")
    message = run_fails(cfg, tmp_path / "run", ValueError,
                        r"callbacks\.kd\.teachers=.*code\.pt' is not a netcompress model/checkpoint .*a plain "
                        r"pickle, not a torch\.save file \(not unpickled: a pickle can run code\)")
    assert "weights_only" not in message
    assert not (tmp_path / "MARKER").exists()


# ----- D. data -------------------------------------------------------------------------------------

def write_batches(folder: Path, per_batch: int = 2, doctored: str | None = None, marker: Path | None = None,
                  protocol: int = 2) -> dict[str, dict]:
    """cifar-10-batches-py in the official layout (dicts with bytes keys, uint8 'data', list 'labels'),
    pickled with protocol 2 as Python 2's cPickle wrote them; ``doctored`` gets code instead."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(3)
    batches = {}
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        batch = {b"batch_label": name.encode(), b"labels": rng.integers(0, 10, per_batch).tolist(),
                 b"data": rng.integers(0, 256, (per_batch, 3072), dtype=np.uint8),
                 b"filenames": [f"img_{i}.png".encode() for i in range(per_batch)]}
        if name == doctored:
            batch[b"labels"] = _RunsCode(marker)
        batches[name] = batch
        (folder / name).write_bytes(pickle.dumps(batch, protocol=protocol))
    return batches


def test_doctored_cifar_batch_is_refused_and_never_executed(tmp_path):
    batches = write_batches(tmp_path / "official" / "cifar-10-batches-py")  # the official format still loads
    data = load_cifar10(tmp_path / "official", allow_download=False)
    train = np.concatenate([batches[f"data_batch_{i}"][b"data"] for i in range(1, 6)]).reshape(-1, 3, 32, 32)
    assert np.array_equal(data["train"]["images"].numpy(), train)
    assert data["test"]["labels"].tolist() == batches["test_batch"][b"labels"]

    marker = tmp_path / "MARKER"
    write_batches(tmp_path / "data" / "cifar-10-batches-py", doctored="data_batch_1", marker=marker)
    cfg = compose_config([*TINY_RUN, "data=cifar10", f"data.root={tmp_path / 'data'}", "data.download=false",
                          f"data.cache_dir={tmp_path / 'cache'}", "data.val_size=2", "+model.width=0.25"],
                         tmp_path / "run")
    run_fails(cfg, tmp_path / "run", ValueError,
              r"data\.root: .*/data_batch_1 is not an official CIFAR-10 batch file: it asks to load \S+, which the "
              r"official files never contain \(refused, nothing was run\)")
    assert not marker.exists()


def make_cifar_tree(root: Path, truncated: str | None = None) -> Path:
    """A CIFAR-10 ImageFolder tree (one 32x32 JPEG per class and split); ``truncated`` is cut in half."""
    rng = np.random.default_rng(4)
    for split in ("train", "test"):
        for name in CIFAR10_CLASSES:
            (root / split / name).mkdir(parents=True)
            Image.fromarray(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)).save(root / split / name / "0.jpg")
    if truncated:
        data = (root / truncated).read_bytes()
        (root / truncated).write_bytes(data[:len(data) // 2])
    return root


def test_truncated_jpeg_in_cifar_tree_names_the_file_or_is_skipped(tmp_path):
    root = make_cifar_tree(tmp_path / "tree", truncated="train/cat/0.jpg")
    cfg = compose_config([*TINY_RUN, "data=cifar10", f"data.root={root}", "data.download=false",
                          "data.val_size=2", "data.batch_size=4", "+model.width=0.25"], tmp_path / "run")
    message = run_fails(cfg, tmp_path / "run", ValueError,
                        r"data\.root: cannot decode image .*train/cat/0\.jpg .*data\.skip_bad_images=true")
    assert "\n" not in message
    dm = CIFAR10DataModule(root, val_size=2, download=False, skip_bad_images=True)
    dm.setup()
    assert dm.skipped_images == 1 and dm.train_size + dm.val_size == 9 and dm.test_size == 10


def test_truncated_jpeg_in_imagefolder_data_names_the_file(tmp_path):
    rng = np.random.default_rng(5)
    for split in ("train", "val"):
        for name in ("a", "b"):
            (tmp_path / "tree" / split / name).mkdir(parents=True)
            for i in range(2):
                Image.fromarray(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)).save(
                    tmp_path / "tree" / split / name / f"{i}.jpg")
    bad = tmp_path / "tree" / "train" / "b" / "1.jpg"
    bad.write_bytes(bad.read_bytes()[:200])
    cfg = compose_config([*TINY_RUN, "data=imagefolder", f"data.root={tmp_path / 'tree'}", "data.batch_size=4",
                          "data.num_workers=0", "data.persistent_workers=false", "data.image_size=32",
                          "data.resize_size=32", "+model.width=0.25"], tmp_path / "run")
    run_fails(cfg, tmp_path / "run", ValueError, r"data\.root: cannot decode image .*train/b/1\.jpg \(OSError")


def test_mistyped_cifar_root_is_not_created(tmp_path, monkeypatch):
    typo = tmp_path / "dataa" / "cifar10"
    cfg = compose_config([*TINY_RUN, "data=cifar10", f"data.root={typo}", "data.download=false"], tmp_path / "run")
    with pytest.raises(FileNotFoundError, match=r"data\.root=.*dataa/cifar10 does not exist \(and data\.download="
                                                r"false"):
        build(cfg)

    def offline(*args, **kwargs):
        raise OSError("no network")
    monkeypatch.setattr(torchvision.datasets.CIFAR10, "download", offline)
    cfg = compose_config([*TINY_RUN, "data=cifar10", f"data.root={typo}", f"data.cache_dir={tmp_path / 'cache'}",
                          "+model.width=0.25"], tmp_path / "run2")
    run_fails(cfg, tmp_path / "run2", FileNotFoundError, r"no CIFAR-10 under data\.root=.*download failed")
    assert not (tmp_path / "dataa").exists()  # the failed download left nothing behind
    with pytest.raises(FileNotFoundError, match=r"`data\.root`=.*elsewhere does not exist"):
        build(compose_config([*TINY_RUN, "data=imagefolder", f"data.root={tmp_path / 'elsewhere'}"], tmp_path / "r3"))
    assert not (tmp_path / "elsewhere").exists()


# ----- E. options a data module cannot honour -----------------------------------------------------

def test_cifar_num_workers_is_refused_not_ignored(tmp_path):
    cfg = compose_config([*TINY_RUN, "data=cifar10", f"data.root={tmp_path}", "data.num_workers=4"], tmp_path / "run")
    with pytest.raises(ValueError, match=r"`data\.num_workers` must be 0 for CIFAR-10; got 4: the images are held "
                                         r"in memory"):
        build(cfg)

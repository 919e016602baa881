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
@pytest.mark.parametrize("preset", [p for p in PRESETS if not p.endswith("_imagenet")])  # those: on an ImageFolder tree below
def test_preset_runs_one_step(tmp_path, preset):
    synthetic = compose_config(TINY, tmp_path / "data_cfg").data
    cfg = compose_config([f"experiment={preset}", *TINY_RUN, "trainer.fast_dev_run=true",
                          "trainer.accelerator=cpu", "trainer.devices=1", "latency_repeats=1",
                          f"paths.store_dir={tmp_path / 'store'}"], tmp_path / "run")
    with open_dict(cfg):
        cfg.data = synthetic
        cfg.trainer.pop("strategy", None)
        cfg.trainer.precision = "32-true"
        # ??? values and the keys the preset `requires` (its init_from) get an untrained parent
        for key in sorted(set(OmegaConf.missing_keys(cfg)) | set(cfg.get("requires") or [])):
            parent = parent_model(cfg, tmp_path / "parent.pt")
            OmegaConf.update(cfg, key, [parent] if key.endswith("teachers") else parent)
    results = run(cfg)
    assert results["status"] == "ok", results.get("error")
    assert 0.0 <= results["test/acc1"] <= 1.0


def _paper_table() -> list[tuple[str, str, str, str]]:
    """Rows (preset, key, value, source) of docs/presets.md's table."""
    rows = []
    for line in (CONF.parent / "docs" / "presets.md").read_text().splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if len(cells) == 4 and line.startswith("|") and cells[0] not in ("preset", "---"):
            rows.append(tuple(cells))
    return rows


PAPER_ROWS = _paper_table()


def test_paper_table_covers_the_protocol_presets():
    named = {row[0] for row in PAPER_ROWS}
    assert {"rethinking_l1norm_resnet56", "lth_resnet20_cifar10", "lth_vgg16_cifar10",
            "rethinking_slimming_vgg19", "l1norm_resnet56_a", "l1norm_resnet56_b"} <= named
    assert named <= set(PRESETS)
    assert all(row[3].startswith("[") for row in PAPER_ROWS)  # every value cites a source


@pytest.mark.parametrize("preset", sorted({row[0] for row in PAPER_ROWS}))
def test_preset_follows_its_paper(tmp_path, preset):
    """Each setting the docs table attributes to a paper is what the composed preset holds."""
    import yaml

    cfg = compose_config([f"experiment={preset}"], tmp_path / "run")
    for _, key, value, source in (row for row in PAPER_ROWS if row[0] == preset):
        got = OmegaConf.select(cfg, key, throw_on_missing=False)
        got = OmegaConf.to_container(got) if OmegaConf.is_config(got) else got
        assert got == yaml.safe_load(value), f"{preset}: {key} = {got!r}, docs/presets.md says {value} ({source})"


@pytest.mark.parametrize("preset,pruned", [("rethinking_l1norm_resnet56", [2, 4, 7]),
                                           ("rethinking_l1norm_resnet56_mini", [1, 1, 2])])
def test_l1norm_presets_prune_the_authors_filter_counts(tmp_path, preset, pruned):
    """res56prune.py keeps int(n * 0.9) filters: 2/4/7 of 16/32/64 pruned (3/6 with round(0.1 * n))."""
    import timm

    from netcompress.protocols.pruning_rounds import PruningRounds

    cfg = compose_config([f"experiment={preset}"], tmp_path / "run")
    net = timm.create_model(cfg.model.name, **model_kwargs(cfg))
    prune = OmegaConf.to_container(cfg.protocol.prune, resolve=True)
    masks = PruningRounds(prune).compute_masks(net, 1, None)
    by_stage = {f"layer{s}": {int((~m).sum()) for n, m in masks.items() if n.startswith(f"layer{s}.")} for s in (1, 2, 3)}
    assert by_stage == {f"layer{s}": {p} for s, p in zip((1, 2, 3), pruned)}


@pytest.mark.parametrize("preset", sorted(p for p in PRESETS
                                          if "requires:" in (CONF / "experiment" / f"{p}.yaml").read_text()))
def test_a_preset_that_needs_a_parent_refuses_to_start_without_one(tmp_path, preset):
    """A preset that fine-tunes a trained net must not silently train a random one when init_from is forgotten."""
    from netcompress.pipeline.config_checks import check_config

    cfg = compose_config([f"experiment={preset}"], tmp_path / "run")
    assert "init_from" in cfg.requires and cfg.init_from is None
    with pytest.raises(ValueError, match=r"`init_from` must be set"):
        check_config(cfg)


# ----- ImageNet presets (Liu et al. 2019, the authors' imagenet/ code) -----------------------------

def _authors_resnet34_keep(net, version: str) -> dict[str, int]:
    """Filters kept per block conv1 by the authors' imagenet/l1-norm-pruning/prune.py, transcribed:
    3x3 convs numbered from the stem (1) in module order, 1x1 shortcuts not counted; even ids (block
    conv1s) outside ``skip`` keep int(n * (1 - prune_prob[stage]))."""
    import torch

    skip = [2, 8, 14, 16, 26, 28, 30, 32]
    prune_prob = {"A": [0.3, 0.3, 0.3, 0.0], "B": [0.5, 0.6, 0.4, 0.0]}[version]
    keep, layer_id = {}, 1
    for name, m in net.named_modules():
        if not isinstance(m, torch.nn.Conv2d) or m.kernel_size == (1, 1):
            continue
        if layer_id % 2 == 0 and layer_id not in skip:
            stage = 0 if layer_id <= 6 else 1 if layer_id <= 14 else 2 if layer_id <= 26 else 3
            keep[name] = int(m.out_channels * (1 - prune_prob[stage]))
        layer_id += 1
    return keep


@pytest.mark.parametrize("preset,version", [("rethinking_l1norm_resnet34_imagenet", "A"),
                                            ("rethinking_l1norm_resnet34b_imagenet", "B")])
def test_resnet34_presets_keep_the_authors_filters(tmp_path, preset, version):
    import timm

    from netcompress.protocols.pruning_rounds import PruningRounds

    cfg = compose_config([f"experiment={preset}"], tmp_path / "run")
    net = timm.create_model(cfg.model.name, **model_kwargs(cfg))
    masks = PruningRounds(OmegaConf.to_container(cfg.protocol.prune, resolve=True)).compute_masks(net, 1, None)
    assert {name: int(m.sum()) for name, m in masks.items()} == _authors_resnet34_keep(net, version)


# Fraction of the selected filters / weights / BN channels each preset prunes, by hand: ResNet-34's 8
# unskipped block conv1s (2 in stage 1, 2 in stage 2, 4 in stage 3) lose n - int(n (1 - p)) filters.
IMAGENET_SPARSITY = {
    "rethinking_l1norm_resnet34_imagenet": (2 * 20 + 2 * 39 + 4 * 77) / (2 * 64 + 2 * 128 + 4 * 256),
    "rethinking_l1norm_resnet34b_imagenet": (2 * 32 + 2 * 77 + 4 * 103) / (2 * 64 + 2 * 128 + 4 * 256),
    "rethinking_weight_level_resnet50_imagenet": 0.3,
    "rethinking_slimming_vgg11_imagenet": 0.5,   # of the 2752 conv BN channels: one global threshold
}


def _image_tree(root, classes: int = 2, per_class: int = 4, size: int = 32):
    """root/{train,val}/class<i>/<j>.png: random RGB images, the ImageNet folder layout."""
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(0)
    for split in ("train", "val"):
        for c in range(classes):
            folder = root / split / f"class{c}"
            folder.mkdir(parents=True)
            for j in range(per_class):
                Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8)).save(folder / f"{j}.png")
    return root


def test_imagenet_sparsity_table_covers_the_imagenet_presets():
    assert set(IMAGENET_SPARSITY) == {p for p in PRESETS if p.endswith("_imagenet")}


@pytest.mark.slow
@pytest.mark.parametrize("preset,decode", [*((p, None) for p in sorted(IMAGENET_SPARSITY)),
                                           ("rethinking_l1norm_resnet34_imagenet", "device")])
def test_imagenet_preset_runs_one_step_on_an_imagefolder_tree(tmp_path, preset, decode):
    """Each ImageNet preset, through its own ImageNet datamodule on a 2-class ImageFolder tree of
    32x32 images, trains dense, prunes and fine-tunes (its default method) one step each on the CPU:
    the pruned fraction is the authors' and the classifier has the tree's 2 classes. Its default
    ``data.decode=auto`` decodes in the workers on the CPU; once more with the decoding on the device."""
    from netcompress.models.serialization import load_model

    overrides = [f"experiment={preset}", *TINY_RUN, *([f"data.decode={decode}"] if decode else []), "trainer=cpu", "trainer.accelerator=cpu", "trainer.devices=1",
                 "trainer.precision=32-true", "trainer.fast_dev_run=true", "latency_repeats=1", "evaluation=[]",
                 f"data.root={_image_tree(tmp_path / 'images')}", "data.image_size=32", "data.resize_size=32",
                 "data.batch_size=4", "data.num_workers=0", f"paths.store_dir={tmp_path / 'store'}"]
    if "vgg11" in preset:  # a 64-wide first head conv instead of 4096 x 512 x 7 x 7: 5 s instead of 150 s
        overrides.append("+model.mlp_ratio=0.015625")
    cfg = compose_config(overrides, tmp_path / "run")
    assert cfg.data._target_ == "netcompress.datamodules.imagefolder.ImageNetDataModule"
    assert cfg.data.decode == (decode or "auto")
    results = run(cfg)
    assert results["status"] == "ok", results.get("error")
    assert results["lottery/method"] == "finetune"
    assert results["lottery/sparsity"] == pytest.approx(IMAGENET_SPARSITY[preset], abs=1e-6)
    assert load_model(tmp_path / "run" / "model.pt").get_classifier().out_features == 2

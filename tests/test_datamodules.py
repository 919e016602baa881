"""Tests for datamodules/: batched augmentation against a per-sample reference, epoch determinism
and resume (also through a real Lightning Trainer), distributed slicing, the CIFAR-10 sources and
cache, the ImageFolder layout checks, and the synthetic data set's learnability."""
from __future__ import annotations

import os
import pickle
import stat
import urllib.error
from pathlib import Path

import numpy as np
import pytest
import pytorch_lightning as pl
import torch
import torch.nn.functional as F
import torchvision
from PIL import Image
from pytorch_lightning.callbacks import ModelCheckpoint
from torchvision.transforms.functional import normalize

from netcompress.datamodules import (AugmentedTensorLoader, CIFAR10DataModule, ImageFolderDataModule, ImageNetDataModule,
                         SyntheticDataModule)
from netcompress.datamodules import cifar10_store
from netcompress.datamodules.cifar10_store import CIFAR10_CLASSES, load_cifar10
from netcompress.datamodules.tensor_loader import crop_flip_nhwc

MEAN, STD = (0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)


def random_images(n: int, h: int = 8, w: int = 10, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (n, 3, h, w), generator=g, dtype=torch.uint8)


def reference_augment(image_chw: torch.Tensor, offset: tuple[int, int], flip: bool, pad: int) -> torch.Tensor:
    """One sample, plain slicing: zero-pad, crop at (row, col), maybe mirror."""
    _, h, w = image_chw.shape
    padded = torch.zeros(3, h + 2 * pad, w + 2 * pad, dtype=image_chw.dtype)
    padded[:, pad:pad + h, pad:pad + w] = image_chw
    oy, ox = offset
    crop = padded[:, oy:oy + h, ox:ox + w]
    return crop.flip(-1) if flip else crop


def reference_normalize(images_u8: torch.Tensor, mean=MEAN, std=STD) -> torch.Tensor:
    return normalize(images_u8.double() / 255, mean, std).float()


def collect(loader) -> list[tuple[torch.Tensor, torch.Tensor]]:
    return [(x.clone(), y.clone()) for x, y in loader]


# -- AugmentedTensorLoader ---------------------------------------------------------------------
def test_crop_flip_matches_per_sample_slicing():
    images = random_images(32, h=8, w=10)  # non-square catches row/column mix-ups
    pad = 3
    g = torch.Generator().manual_seed(1)
    offsets = torch.randint(0, 2 * pad + 1, (32, 2), generator=g)
    flips = torch.rand(32, generator=g) < 0.5
    got = crop_flip_nhwc(images.permute(0, 2, 3, 1).contiguous(), offsets, flips, pad).permute(0, 3, 1, 2)
    for i in range(32):
        ref = reference_augment(images[i], (int(offsets[i, 0]), int(offsets[i, 1])), bool(flips[i]), pad)
        assert torch.equal(got[i], ref), f"sample {i}"
    assert flips.any() and (~flips).any() and (offsets != pad).any()


def test_train_batches_are_plan_augmented_and_normalised():
    images, labels = random_images(40), torch.arange(40) * 7
    loader = AugmentedTensorLoader(images, labels, batch_size=8, mean=MEAN, std=STD, pad=2, seed=3)
    perm, offsets, flips = loader.epoch_plan(0)
    batches = collect(loader)
    assert len(batches) == len(loader) == 5
    for b, (x, y) in enumerate(batches):
        idx = perm[b * 8:(b + 1) * 8]
        assert torch.equal(y, labels[idx])
        ref = torch.stack([reference_augment(images[i], tuple(offsets[b * 8 + k].tolist()), bool(flips[b * 8 + k]), 2)
                           for k, i in enumerate(idx.tolist())])
        torch.testing.assert_close(x, reference_normalize(ref), atol=1e-5, rtol=0)
        assert x.dtype == torch.float32 and x.is_contiguous(memory_format=torch.channels_last)


def test_eval_mode_fixed_order_no_augmentation_exact_normalisation():
    images, labels = random_images(21), torch.arange(21)
    images_cl = images.contiguous(memory_format=torch.channels_last)
    loader = AugmentedTensorLoader(images_cl, labels, batch_size=8, mean=MEAN, std=STD, train=False)
    assert len(loader) == 3  # the last partial batch is kept in eval
    first, second = collect(loader), collect(loader)
    x = torch.cat([b[0] for b in first])
    assert torch.equal(torch.cat([b[1] for b in first]), labels)
    torch.testing.assert_close(x, reference_normalize(images), atol=1e-5, rtol=0)
    assert all(b[0].is_contiguous(memory_format=torch.channels_last) for b in first)
    assert all(torch.equal(a[0], b[0]) for a, b in zip(first, second))


def test_epoch_is_a_pure_function_of_seed_and_epoch():
    images, labels = random_images(48), torch.arange(48)
    make = lambda seed=0: AugmentedTensorLoader(images, labels, 16, MEAN, STD, seed=seed)  # noqa: E731
    run = make()
    epochs = [collect(run) for _ in range(3)]  # iter() advances the epoch by itself
    resumed = make()
    resumed.set_epoch(2)
    assert all(torch.equal(a[0], b[0]) and torch.equal(a[1], b[1]) for a, b in zip(epochs[2], collect(resumed)))
    assert not torch.equal(epochs[0][0][1], epochs[1][0][1])  # a new permutation each epoch
    assert not torch.equal(collect(make(seed=1))[0][1], epochs[0][0][1])
    again = make()
    assert all(torch.equal(a[0], b[0]) for a, b in zip(epochs[0], collect(again)))


def test_iterator_reads_epoch_lazily():
    """Lightning creates the iterator before calling set_epoch on resume."""
    images, labels = random_images(32), torch.arange(32)
    loader = AugmentedTensorLoader(images, labels, 8, MEAN, STD)
    it = iter(loader)
    loader.set_epoch(5)
    reference = AugmentedTensorLoader(images, labels, 8, MEAN, STD)
    reference.set_epoch(5)
    assert torch.equal(next(it)[1], next(iter(reference))[1])


def test_distributed_ranks_split_the_epoch_disjointly():
    n, ws = 64, 2
    images, labels = random_images(n), torch.arange(n)
    ranks = [AugmentedTensorLoader(images, labels, 8, MEAN, STD, seed=4, rank=r, world_size=ws) for r in range(ws)]
    for loader in ranks:
        loader.set_epoch(1)
    seen = [torch.cat([y for _, y in loader]) for loader in ranks]
    assert len(ranks[0]) == len(ranks[1]) == 4
    assert not set(seen[0].tolist()) & set(seen[1].tolist())
    assert sorted(seen[0].tolist() + seen[1].tolist()) == list(range(n))
    perm = ranks[0].epoch_plan(1)[0]
    assert torch.equal(seen[0], perm[0::2]) and torch.equal(seen[1], perm[1::2])

    evals = [AugmentedTensorLoader(images[:13], labels[:13], 4, MEAN, STD, train=False, rank=r, world_size=ws)
             for r in range(ws)]
    assert [torch.cat([y for _, y in e]).tolist() for e in evals] == [list(range(0, 13, 2)), list(range(1, 13, 2))]


def test_state_dict_resumes_mid_epoch():
    images, labels = random_images(64), torch.arange(64)
    full = AugmentedTensorLoader(images, labels, 8, MEAN, STD, seed=2)
    full.set_epoch(1)
    uninterrupted = collect(full)
    first = AugmentedTensorLoader(images, labels, 8, MEAN, STD, seed=2)
    first.set_epoch(1)
    it = iter(first)
    for _ in range(3):
        next(it)
    state = first.state_dict()
    assert state == {"epoch": 1, "batches": 3}
    resumed = AugmentedTensorLoader(images, labels, 8, MEAN, STD, seed=2)
    resumed.load_state_dict(state)
    resumed.set_epoch(1)  # what Lightning does on resume
    rest = collect(resumed)
    assert len(rest) == 5
    assert all(torch.equal(a[0], b[0]) and torch.equal(a[1], b[1]) for a, b in zip(uninterrupted[3:], rest))
    assert torch.equal(collect(resumed)[0][1], collect(full)[0][1])  # then on to epoch 2 in both


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_loader_matches_cpu_and_stays_on_device():
    images, labels = random_images(64), torch.arange(64)
    cpu = AugmentedTensorLoader(images, labels, 16, MEAN, STD, seed=7)
    gpu = AugmentedTensorLoader(images.cuda(), labels.cuda(), 16, MEAN, STD, seed=7)
    for (xc, yc), (xg, yg) in zip(cpu, gpu):
        assert xg.is_cuda and yg.is_cuda and xg.is_contiguous(memory_format=torch.channels_last)
        torch.testing.assert_close(xg.cpu(), xc, atol=1e-5, rtol=0)
        assert torch.equal(yg.cpu(), yc)


def test_loader_rejects_bad_input():
    with pytest.raises(TypeError, match="uint8"):
        AugmentedTensorLoader(torch.zeros(4, 3, 8, 8), torch.arange(4), 2, MEAN, STD)
    with pytest.raises(ValueError, match="`batch_size` must be a positive int; got 0"):
        AugmentedTensorLoader(random_images(4), torch.arange(4), 0, MEAN, STD)
    with pytest.raises(ValueError, match="rank"):
        AugmentedTensorLoader(random_images(4), torch.arange(4), 2, MEAN, STD, rank=2, world_size=2)


# -- Lightning integration: the epoch seen after resume ----------------------------------------
class BatchRecorder(pl.LightningModule):
    """Linear model that records a fingerprint of every training batch."""

    def __init__(self) -> None:
        super().__init__()
        self.net = torch.nn.Linear(3 * 8 * 8, 4)
        self.seen: dict[tuple[int, int], float] = {}

    def training_step(self, batch, batch_idx):
        x, y = batch
        self.seen[(self.current_epoch, batch_idx)] = float((x.double().sum() * 1000 + (y * 7919).sum()).item())
        return F.cross_entropy(self.net(x.flatten(1)), y)

    def validation_step(self, batch, batch_idx):
        x, y = batch
        self.log("val/loss", F.cross_entropy(self.net(x.flatten(1)), y))

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


def _trainer(tmp_path: Path, **kwargs) -> pl.Trainer:
    kwargs.setdefault("enable_checkpointing", False)
    return pl.Trainer(default_root_dir=tmp_path, accelerator="cpu", devices=1, logger=False,
                      enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0, **kwargs)


def _data() -> SyntheticDataModule:
    return SyntheticDataModule(num_classes=4, image_size=8, train_size=64, val_size=16, test_size=16,
                               batch_size=8, seed=5, pad=2)


@pytest.mark.filterwarnings("ignore:Be aware that when using `ckpt_path`")
def test_lightning_resume_sees_the_same_batches(tmp_path):
    full = BatchRecorder()
    _trainer(tmp_path, max_epochs=3).fit(full, datamodule=_data())
    assert len(full.seen) == 24 and len(set(full.seen.values())) == 24

    # Stopped at the end of epoch 1, resumed for epoch 2.
    part = BatchRecorder()
    trainer = _trainer(tmp_path, max_epochs=2)
    trainer.fit(part, datamodule=_data())
    trainer.save_checkpoint(tmp_path / "epoch.ckpt")
    resumed = BatchRecorder()
    _trainer(tmp_path, max_epochs=3).fit(resumed, datamodule=_data(), ckpt_path=tmp_path / "epoch.ckpt")
    assert resumed.seen == {k: v for k, v in full.seen.items() if k[0] == 2}

    # Checkpointed mid-epoch (after step 11 of 24, i.e. batch 2 of epoch 1) and resumed from there:
    # the loader state Lightning stored in the checkpoint makes it skip the batches already trained on.
    every_11 = ModelCheckpoint(dirpath=tmp_path / "ckpt", every_n_train_steps=11, save_top_k=-1, filename="{step}")
    _trainer(tmp_path, max_epochs=3, callbacks=[every_11], enable_checkpointing=True).fit(BatchRecorder(),
                                                                                        datamodule=_data())
    resumed = BatchRecorder()
    _trainer(tmp_path, max_epochs=3).fit(resumed, datamodule=_data(), ckpt_path=tmp_path / "ckpt" / "step=11.ckpt")
    assert resumed.seen == {k: v for k, v in full.seen.items() if k >= (1, 3)}


# -- synthetic ---------------------------------------------------------------------------------
def test_synthetic_is_deterministic_and_learnable():
    a, b, c = SyntheticDataModule(seed=0), SyntheticDataModule(seed=0), SyntheticDataModule(seed=1)
    assert (a.num_classes, a.input_size) == (10, (3, 32, 32))  # known before setup
    for dm in (a, b, c):
        dm.setup()
    for split in ("train", "val", "test"):
        assert torch.equal(a._splits[split][0], b._splits[split][0])
        assert torch.equal(a._splits[split][1], b._splits[split][1])
    assert not torch.equal(a._splits["train"][0], c._splits["train"][0])
    assert (a.train_size, a.val_size, a.test_size) == (256, 64, 64)

    train_x, train_y = a._splits["train"]
    test_x, test_y = a._splits["test"]
    means = torch.stack([train_x[train_y == k].float().mean(0) for k in range(10)]).flatten(1)
    pred = torch.cdist(test_x.float().flatten(1), means).argmin(1)
    assert (pred == test_y).float().mean() > 0.8
    assert test_x.float().flatten(1).std(0).mean() > 30  # noisy pixels: not trivially constant
    x, y = next(iter(a.train_dataloader()))
    assert x.shape == (32, 3, 32, 32) and x.is_contiguous(memory_format=torch.channels_last)


def test_synthetic_rejects_bad_config():
    with pytest.raises(ValueError, match=r"`data.num_classes` must be >= 2; got 1"):
        SyntheticDataModule(num_classes=1)
    with pytest.raises(ValueError, match=r"`data.batch_size` must be a positive int; got -3"):
        SyntheticDataModule(batch_size=-3)


# -- CIFAR-10 sources and cache ----------------------------------------------------------------
def make_cifar_tree(root: Path, per_class: dict[str, int] | None = None, classes=CIFAR10_CLASSES) -> None:
    """ImageFolder tree of random 32x32 JPEGs."""
    per_class = per_class or {"train": 3, "test": 2}
    rng = np.random.default_rng(0)
    for split, count in per_class.items():
        for name in classes:
            (root / split / name).mkdir(parents=True)
            for i in range(count):
                pixels = rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)
                Image.fromarray(pixels).save(root / split / name / f"{i:04d}.jpg", quality=90)


def test_imagefolder_tree_is_decoded_cached_and_reloaded(tmp_path, monkeypatch):
    root = tmp_path / "cifar"
    make_cifar_tree(root)
    data = load_cifar10(root, allow_download=False)
    cache = root / ".netcompress_cache" / "cifar10-uint8-v1.pt"
    assert cache.is_file()
    assert data["train"]["images"].shape == (30, 3, 32, 32) and data["test"]["images"].shape == (20, 3, 32, 32)
    assert data["train"]["labels"].tolist() == [k for k in range(10) for _ in range(3)]
    reference = np.asarray(Image.open(root / "train" / "bird" / "0001.jpg").convert("RGB")).transpose(2, 0, 1)
    decoded = data["train"]["images"][2 * 3 + 1].numpy().astype(int)
    assert np.abs(decoded - reference).max() <= 1  # same libjpeg-turbo family as PIL
    assert torch.load(cache, weights_only=True)["classes"] == list(CIFAR10_CLASSES)
    assert not list(cache.parent.glob("*.tmp"))  # written atomically

    def no_decoding(*args, **kwargs):
        raise AssertionError("decoded again although the cache exists")
    monkeypatch.setattr(cifar10_store, "read_imagefolder", no_decoding)
    dm = CIFAR10DataModule(root, val_size=5, download=False)
    dm.prepare_data()
    dm.setup()
    assert (dm.train_size, dm.val_size, dm.test_size) == (25, 5, 20)
    assert dm.num_classes == 10 and dm.input_size == (3, 32, 32)
    x, y = next(iter(dm.val_dataloader()))
    assert x.shape == (5, 3, 32, 32) and y.dtype == torch.int64


def test_pool_decoding_equals_serial(tmp_path, monkeypatch):
    root = tmp_path / "cifar"
    make_cifar_tree(root, {"train": 2, "test": 1})
    serial = cifar10_store.read_imagefolder(root)
    monkeypatch.setattr(cifar10_store, "_SERIAL_BELOW", 0)
    pooled = cifar10_store.read_imagefolder(root)
    assert torch.equal(serial["train"]["images"], pooled["train"]["images"])
    assert torch.equal(serial["test"]["images"], pooled["test"]["images"])


def test_corrupt_cache_is_rebuilt(tmp_path):
    root = tmp_path / "cifar"
    make_cifar_tree(root, {"train": 1, "test": 1})
    cache = root / ".netcompress_cache" / "cifar10-uint8-v1.pt"
    cache.parent.mkdir()
    cache.write_bytes(b"half a file")
    data = load_cifar10(root, allow_download=False)
    assert data["train"]["images"].shape[0] == 10
    assert torch.load(cache, weights_only=True)["format"] == cifar10_store.CACHE_FORMAT


def test_read_only_root_caches_in_cache_dir(tmp_path):
    root, cache_dir = tmp_path / "shared", tmp_path / "cache"
    make_cifar_tree(root, {"train": 1, "test": 1})
    os.chmod(root, 0o555)  # honoured even when the tests run as root
    try:
        load_cifar10(root, cache_dir=cache_dir, allow_download=False)
        assert not (root / ".netcompress_cache").exists()
        cached = list(cache_dir.glob("*/cifar10-uint8-v1.pt"))
        assert len(cached) == 1 and len(cached[0].parent.name) == 40  # sha1 of the root
        assert cifar10_store.read_cache(cached[0]) is not None
    finally:
        os.chmod(root, stat.S_IRWXU)


def test_official_batches_py_folder_loads(tmp_path):
    folder = tmp_path / "cifar-10-batches-py"
    folder.mkdir(parents=True)
    rng = np.random.default_rng(1)
    batches = {}
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        batch = {b"data": rng.integers(0, 256, (4, 3072), dtype=np.uint8), b"labels": rng.integers(0, 10, 4).tolist()}
        batches[name] = batch
        with open(folder / name, "wb") as f:
            pickle.dump(batch, f)
    with open(folder / "batches.meta", "wb") as f:
        pickle.dump({b"label_names": [c.encode() for c in CIFAR10_CLASSES]}, f)
    data = load_cifar10(tmp_path, allow_download=False)
    train = np.concatenate([batches[f"data_batch_{i}"][b"data"] for i in range(1, 6)]).reshape(-1, 3, 32, 32)
    assert np.array_equal(data["train"]["images"].numpy(), train)
    assert data["train"]["labels"].tolist() == sum((batches[f"data_batch_{i}"][b"labels"] for i in range(1, 6)), [])
    assert np.array_equal(data["test"]["images"].numpy(), batches["test_batch"][b"data"].reshape(-1, 3, 32, 32))
    # torchvision reads the first row the same way (HWC of our CHW)
    hwc = batches["data_batch_1"][b"data"].reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1)
    assert np.array_equal(data["train"]["images"][0].permute(1, 2, 0).numpy(), hwc[0])


def test_missing_data_and_no_network_raises_actionable_error(tmp_path, monkeypatch):
    def offline(*args, **kwargs):
        raise urllib.error.URLError("[Errno -3] Temporary failure in name resolution")
    monkeypatch.setattr(torchvision.datasets.cifar, "download_and_extract_archive", offline)
    root = tmp_path / "empty"
    dm = CIFAR10DataModule(root, cache_dir=tmp_path / "cache")
    with pytest.raises(FileNotFoundError) as info:
        dm.prepare_data()
    message = str(info.value)
    assert "\n" not in message
    assert f"no CIFAR-10 under data.root={root.resolve()}, download failed (URLError:" in message
    assert message.endswith("set data.root to a folder with cifar-10-batches-py or an ImageFolder train/ test/ "
                            "tree, e.g. data.root=../shared/data/cifar10-jpeg")
    with pytest.raises(FileNotFoundError, match=r"data.root=.*empty does not exist \(and data.download=false"):
        CIFAR10DataModule(root, download=False, cache_dir=tmp_path / "cache")
    root.mkdir()
    with pytest.raises(FileNotFoundError, match=r"download failed \(not attempted: data.download=false\)"):
        CIFAR10DataModule(root, download=False, cache_dir=tmp_path / "cache").setup()


def test_cifar_tree_with_wrong_classes_is_rejected(tmp_path):
    make_cifar_tree(tmp_path, {"train": 1, "test": 1}, classes=("cats", "dogs"))
    with pytest.raises(ValueError, match=r"train/ has class folders \['cats', 'dogs'\]; a CIFAR-10 ImageFolder"):
        load_cifar10(tmp_path, allow_download=False)


def test_validation_split_is_fixed_across_run_seeds(tmp_path):
    make_cifar_tree(tmp_path, {"train": 3, "test": 1})
    modules = [CIFAR10DataModule(tmp_path, val_size=6, seed=s, download=False) for s in (0, 1)]
    for dm in modules:
        dm.setup()
    assert torch.equal(modules[0]._splits["val"][0], modules[1]._splits["val"][0])
    train_ids = {tuple(x.flatten()[:16].tolist()) for x in modules[0]._splits["train"][0]}
    val_ids = {tuple(x.flatten()[:16].tolist()) for x in modules[0]._splits["val"][0]}
    assert len(train_ids) == 24 and len(val_ids) == 6 and not train_ids & val_ids

    on_test = CIFAR10DataModule(tmp_path, val_size=0, train_subset=7, download=False)
    on_test.setup()
    assert (on_test.train_size, on_test.val_size, on_test.test_size) == (7, 10, 10)
    assert torch.equal(on_test._splits["val"][0], on_test._splits["test"][0])
    with pytest.raises(ValueError, match=r"`data.batch_size`=128 is larger than the 7 training images"):
        on_test.train_dataloader()


def test_cifar_rejects_bad_config(tmp_path):
    with pytest.raises(ValueError, match=r"`data.val_size` must be < 50000 \(the train set\); got 50000"):
        CIFAR10DataModule(tmp_path, val_size=50000)
    with pytest.raises(ValueError, match=r"`data.train_subset` must be <= 45000 .*got 45001"):
        CIFAR10DataModule(tmp_path, train_subset=45001)
    make_cifar_tree(tmp_path, {"train": 1, "test": 1})
    with pytest.raises(ValueError, match=r"`data.val_size` must be < 10 .*got 10"):
        CIFAR10DataModule(tmp_path, val_size=10, download=False).setup()


# -- ImageFolder -------------------------------------------------------------------------------
def make_folder(root: Path, splits=("train", "val"), classes=("a", "b", "c"), count: int = 2, size=(40, 36)) -> None:
    rng = np.random.default_rng(2)
    for split in splits:
        for name in classes:
            (root / split / name).mkdir(parents=True)
            for i in range(count):
                Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)).save(
                    root / split / name / f"{i}.jpg")


def test_imagefolder_module_reads_classes_and_serves_batches(tmp_path):
    make_folder(tmp_path)
    dm = ImageFolderDataModule(tmp_path, batch_size=4, num_workers=0, image_size=32, resize_size=36)
    assert dm.num_classes == 3 and dm.classes == ["a", "b", "c"] and dm.input_size == (3, 32, 32)
    assert dm.test_dir == dm.val_dir == tmp_path / "val"
    dm.setup()
    x, y = next(iter(dm.train_dataloader()))
    assert x.shape == (4, 3, 32, 32) and y.dtype == torch.int64
    xs = torch.cat([x for x, _ in dm.val_dataloader()])
    ys = torch.cat([y for _, y in dm.test_dataloader()])
    assert xs.shape == (6, 3, 32, 32) and ys.tolist() == [0, 1, 2, 0, 1, 2]  # classes interleaved (eval_order.py)
    assert isinstance(ImageNetDataModule(tmp_path, num_workers=0), ImageFolderDataModule)


def test_imagefolder_module_falls_back_to_test_and_honours_val_dir(tmp_path):
    make_folder(tmp_path, splits=("train", "test", "holdout"))
    assert ImageFolderDataModule(tmp_path).val_dir == tmp_path / "test"
    dm = ImageFolderDataModule(tmp_path, val_dir="holdout", train_subset=4, num_workers=0, image_size=32,
                               resize_size=32)
    assert dm.val_dir == tmp_path / "holdout" and dm.test_dir == tmp_path / "test"
    dm.setup()
    assert len(dm.train_set) == 4


@pytest.mark.parametrize("build, error, pattern", [
    (lambda r: make_folder(r, splits=("images",)), FileNotFoundError, r"no folder .*train \(found \['images/'\]"),
    (lambda r: make_folder(r, splits=("train",)), FileNotFoundError, r"no folder .*test"),
    (lambda r: (make_folder(r), (r / "train" / "empty").mkdir()), FileNotFoundError,
     r"class folders without images .*\['empty'\]"),
    (lambda r: (make_folder(r, splits=("train",)), make_folder(r, splits=("val",), classes=("a", "b"))), ValueError,
     "the splits must have the same class folders"),
])
def test_imagefolder_bad_layout_is_explained(tmp_path, build, error, pattern):
    build(tmp_path)
    with pytest.raises(error, match=pattern) as info:
        ImageFolderDataModule(tmp_path)
    if error is FileNotFoundError:
        assert r"root/train/<class>/*.jpg + root/val/<class>/*.jpg" in str(info.value)


def test_imagefolder_missing_root(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"`data.root`=.*nowhere does not exist; expected root/train"):
        ImageFolderDataModule(tmp_path / "nowhere")

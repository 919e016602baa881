"""val/test are served classes interleaved: a limited evaluation sees every class, the full one is unchanged."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from netcompress.datamodules.eval_order import stratified_order


def test_order_is_a_permutation_whose_prefixes_are_balanced():
    labels = torch.arange(5).repeat_interleave(20)  # sorted by class, as CIFAR's test split
    order = stratified_order(labels)
    assert sorted(order.tolist()) == list(range(100))
    served = labels[order]
    for k in (1, 3, 20):  # the first k * C images hold k of each class
        assert torch.bincount(served[:5 * k], minlength=5).tolist() == [k] * 5
    assert torch.equal(order, stratified_order(labels))  # fixed: the same subset in every run


def test_uneven_classes_stay_interleaved_until_the_small_class_runs_out():
    labels = torch.tensor([0] * 6 + [1] * 2 + [2] * 4)
    served = labels[stratified_order(labels)].tolist()
    assert served[:6] == [0, 1, 2, 0, 1, 2] and sorted(served) == sorted(labels.tolist())


def test_a_limited_cifar_test_sees_every_class(tmp_path):
    """trainer.limit_test_batches=1 on CIFAR-10's test split (sorted by class) used to test one class."""
    from netcompress.datamodules.cifar10 import CIFAR10DataModule

    from test_user_path import tiny_cifar_tree

    dm = CIFAR10DataModule(root=str(tiny_cifar_tree(tmp_path / "cifar", {"train": 2, "test": 3})), batch_size=4,
                           eval_batch_size=10, val_size=0, download=False)
    dm.setup("test")
    _, labels = next(iter(dm.test_dataloader()))
    assert sorted(labels.tolist()) == list(range(10))  # the first batch of 10 holds one image per class
    original = dm.load_splits()["test"][1]
    assert torch.equal(original[dm.eval_order["test"]].cpu(), dm._splits["test"][1].cpu())


def test_imagefolder_test_set_is_interleaved(tmp_path):
    from netcompress.datamodules.imagefolder import ImageFolderDataModule

    rng = np.random.default_rng(0)
    for split in ("train", "val"):
        for name in ("a", "b", "c"):
            (tmp_path / split / name).mkdir(parents=True)
            for i in range(4):
                Image.fromarray(rng.integers(0, 255, (8, 8, 3), dtype=np.uint8)).save(tmp_path / split / name / f"{i}.png")
    dm = ImageFolderDataModule(root=str(tmp_path), batch_size=3, num_workers=0, image_size=8)
    dm.setup("test")
    labels = [dm.test_set[i][1] for i in range(6)]
    assert labels[:3] != [labels[0]] * 3 and sorted(labels[:3]) == [0, 1, 2]

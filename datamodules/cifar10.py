"""CIFAR-10 (Krizhevsky 2009) held in memory as uint8 tensors, augmented in batches on the device.

The standard recipe of He et al. 2016 (random crop with 4-pixel zero padding + horizontal flip),
done airbench-style on whole batches where the model runs; see ``tensor_loader.py``.
"""
from __future__ import annotations

import os

import torch

from netcompress.datamodules.checks import check_nonnegative_int, check_positive_int
from netcompress.datamodules.cifar10_store import CIFAR10_CLASSES, check_root, load_cifar10
from netcompress.datamodules.tensor_datamodule import Split, TensorDataModule

CIFAR10_MEAN = (0.4914, 0.4822, 0.4465)
CIFAR10_STD = (0.2470, 0.2435, 0.2616)  # per-pixel std of the train set (not the often-copied 0.2023, ...)
CIFAR10_TRAIN_SIZE = 50_000
SPLIT_SEED = 0  # fixed: every run, whatever its seed, holds out the same validation images


class CIFAR10DataModule(TensorDataModule):
    """CIFAR-10 with a fixed validation split, served from memory (on the GPU when training there).

    Args:
        root: folder holding CIFAR-10: a ``cifar-10-batches-py/`` folder, or an ImageFolder tree
            ``train/<class>/*.jpg`` + ``test/<class>/*.jpg`` with the 10 classes (e.g.
            ``../shared/data/cifar10-jpeg``), or where to download it.
        batch_size: training images per batch and per device.
        num_workers: must be 0: the images are already decoded tensors in memory and augmentation
            is a few batched tensor ops on the training device, so there is no loader worker to
            run; any other value is refused rather than silently ignored. Kept so the ``data``
            configs share one interface.
        train_subset: train on only the first N of the non-held-out train images (a fixed
            shuffled order, so not exactly class-balanced); null = all of them.
        val_size: number of train images held out for validation by a fixed permutation
            (seeded by a constant, not by ``seed``, so all runs share the split). 0 = validate on
            the test set, as many papers do (then val and test metrics are the same numbers).
        download: download with torchvision when no local copy is found.
        cache_dir: where to cache the decoded tensors when ``root`` is read-only (in a
            ``<sha1 of root>`` subfolder); null = ``~/.cache/netcompress``. A writable root caches
            in ``<root>/.netcompress_cache/``.
        pad: zero padding of the random crop; 0 = no crop.
        seed: seeds each epoch's order and augmentation (with the epoch number).
        eval_batch_size: validation/test batch size; null = 2 * batch_size.
        skip_bad_images: building the cache from an ImageFolder tree, leave undecodable images
            out (their number is logged and kept as ``skipped_images``) instead of failing on
            the first one (the error names the file).

    After ``setup``: ``train_size``, ``val_size`` (images validated on; 10000 with val_size=0),
    ``test_size``.
    """

    num_classes = len(CIFAR10_CLASSES)
    input_size = (3, 32, 32)
    mean = CIFAR10_MEAN
    std = CIFAR10_STD
    classes = CIFAR10_CLASSES

    def __init__(
        self,
        root: str | os.PathLike,
        batch_size: int = 128,
        num_workers: int = 0,
        train_subset: int | None = None,
        val_size: int = 5000,
        download: bool = True,
        cache_dir: str | os.PathLike | None = None,
        pad: int = 4,
        seed: int = 0,
        eval_batch_size: int | None = None,
        skip_bad_images: bool = False,
    ) -> None:
        super().__init__(batch_size=batch_size, eval_batch_size=eval_batch_size, pad=pad, seed=seed)
        if not isinstance(root, (str, os.PathLike)) or not str(root):
            raise ValueError(f"`data.root` must be a folder path; got {root!r}")
        check_nonnegative_int("data.num_workers", num_workers)
        if num_workers != 0:
            raise ValueError(f"`data.num_workers` must be 0 for CIFAR-10; got {num_workers}: the images are held "
                             "in memory as one tensor and augmented in batches on the training device, so there "
                             "are no loader workers to start (remove the override, or use data.num_workers=0)")
        if not isinstance(skip_bad_images, bool):
            raise ValueError(f"`data.skip_bad_images` must be true or false; got {skip_bad_images!r}")
        check_nonnegative_int("data.val_size", val_size)
        if val_size >= CIFAR10_TRAIN_SIZE:
            raise ValueError(f"`data.val_size` must be < {CIFAR10_TRAIN_SIZE} (the train set); got {val_size}")
        check_positive_int("data.train_subset", train_subset, allow_none=True)
        if train_subset is not None and train_subset > CIFAR10_TRAIN_SIZE - val_size:
            raise ValueError(f"`data.train_subset` must be <= {CIFAR10_TRAIN_SIZE - val_size} (train images left "
                             f"after data.val_size={val_size}); got {train_subset}")
        check_root(root, cache_dir, download)  # a mistyped root fails here, not at fit
        self.save_hyperparameters()
        self.root = root
        self.num_workers = num_workers
        self.train_subset = train_subset
        self.holdout = val_size
        self.val_size = val_size  # replaced after setup by the number of validation images
        self.download = download
        self.cache_dir = cache_dir
        self.skip_bad_images = skip_bad_images
        self.skipped_images = 0  # after setup: images of an ImageFolder tree left out as undecodable

    def prepare_data(self) -> None:
        """Download / decode once and write the cache (Lightning runs this on one process per node)."""
        load_cifar10(self.root, self.cache_dir, self.download, self.skip_bad_images)

    def load_splits(self) -> dict[str, Split]:
        data = load_cifar10(self.root, self.cache_dir, self.download, self.skip_bad_images)
        self.skipped_images = len(data.get("skipped", []))
        images, labels = data["train"]["images"], data["train"]["labels"]
        n = len(labels)
        if self.holdout >= n:
            raise ValueError(f"`data.val_size` must be < {n} (train images under data.root={self.root}); "
                             f"got {self.holdout}")
        order = torch.randperm(n, generator=torch.Generator().manual_seed(SPLIT_SEED))
        val_idx, train_idx = order[:self.holdout], order[self.holdout:]
        if self.train_subset is not None:
            if self.train_subset > len(train_idx):
                raise ValueError(f"`data.train_subset` must be <= {len(train_idx)} (train images left after "
                                 f"data.val_size={self.holdout}); got {self.train_subset}")
            train_idx = train_idx[:self.train_subset]
        train_idx, val_idx = train_idx.sort().values, val_idx.sort().values
        test = (data["test"]["images"], data["test"]["labels"])
        val = (images[val_idx], labels[val_idx]) if self.holdout else test
        return {"train": (images[train_idx], labels[train_idx]), "val": val, "test": test}

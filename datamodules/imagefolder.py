"""Any ``root/train/<class>/*.jpg`` + ``root/val/<class>/*.jpg`` tree (ImageNet and the like),
with the standard Inception-style training crops of Szegedy et al. 2015 as used for ResNets
(RandomResizedCrop + flip; eval: Resize + CenterCrop): decoded by PIL in worker processes, or on
the training device (``decode``, ``device_decode.py``) so that a GPU is not starved for JPEGs.
"""
from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

import pytorch_lightning as pl
import torch
from PIL import Image
from torch.utils.data import DataLoader, Dataset, Subset
from torchvision import transforms
from torchvision.datasets import ImageFolder
from torchvision.datasets.folder import IMG_EXTENSIONS

from netcompress.datamodules.checks import as_float_tuple, check_nonnegative_int, check_positive_int
from netcompress.datamodules.device_decode import DeviceDecodeLoader, EncodedImages
from netcompress.datamodules.eval_order import stratified_order

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
SUBSET_SEED = 0  # fixed: train_subset picks the same images in every run
LAYOUT = "root/train/<class>/*.jpg + root/val/<class>/*.jpg (or root/test/<class>/*.jpg)"
DECODE = ("workers", "device", "auto")


def load_rgb(path: str) -> Image.Image:
    """torchvision's PIL loader, with an error that names the file (a truncated or corrupt image
    otherwise surfaces as PIL's "image file is truncated" from inside a worker, without a path)."""
    try:
        with open(path, "rb") as f:
            image = Image.open(f)
            return image.convert("RGB")
    except Exception as exc:
        raise ValueError(f"data.root: cannot decode image {path} ({type(exc).__name__}: {exc}); delete or "
                         "replace the file") from None


def _has_image(folder: Path) -> bool:
    with os.scandir(folder) as entries:
        return any(e.is_file() and e.name.lower().endswith(IMG_EXTENSIONS) for e in entries)


def scan_split(folder: Path, key: str) -> list[str]:
    """Class names of an ImageFolder split; raises unless every class folder holds an image."""
    if not folder.is_dir():
        parent = folder.parent
        found = sorted(p.name + "/" for p in parent.iterdir() if p.is_dir())[:10] if parent.is_dir() else "nothing"
        raise FileNotFoundError(f"`{key}`: no folder {folder} (found {found or 'no subfolders'} in {parent}); "
                                f"expected {LAYOUT}")
    classes = sorted(d.name for d in os.scandir(folder) if d.is_dir())
    if not classes:
        raise FileNotFoundError(f"`{key}`: {folder} has no class subfolders; expected {LAYOUT}")
    empty = [c for c in classes if not _has_image(folder / c)]
    if empty:
        raise FileNotFoundError(f"`{key}`: class folders without images ({', '.join(IMG_EXTENSIONS)}) in {folder}: "
                                f"{empty[:5]}{' ...' if len(empty) > 5 else ''}; expected {LAYOUT}")
    return classes


class ImageFolderDataModule(pl.LightningDataModule):
    """Train / val / test from an ImageFolder tree, with standard ImageNet-style transforms.

    Args:
        root: folder with ``train/<class>/*.jpg`` and ``val/<class>/*.jpg`` (or ``test/``).
        batch_size: images per batch and per device (validation and test use the same).
        num_workers: DataLoader worker processes decoding JPEGs.
        image_size: side of the RandomResizedCrop (train) and CenterCrop (eval).
        resize_size: eval images are resized to this shorter side before the center crop.
        train_subset: train on only N images, chosen by a fixed seeded permutation; null = all.
        val_dir: validation folder, absolute or relative to ``root``; null = ``val/`` if present,
            else ``test/``.
        mean, std: per-channel normalisation on the [0, 1] scale.
        pin_memory: page-locked batches for faster host-to-GPU copies (only when CUDA exists).
        persistent_workers: keep workers alive between epochs (only with num_workers > 0).
        decode: ``workers``: PIL decodes and augments in the worker processes (torchvision transforms);
            ``device``: workers only read the files, and JPEG decoding (nvJPEG on a GPU) and the same
            crops run on the training device, batch by batch; ``auto``: ``device`` when the trainer
            trains on CUDA, else ``workers``.
        seed: with ``decode`` on the device, each epoch's order and crops are a function of (seed, epoch).

    ``num_classes`` (the number of class folders in ``train/``), ``classes`` and ``input_size``
    are known right after construction, which checks the folder layout. Test uses ``test/`` if
    present, else the validation folder.
    """

    def __init__(
        self,
        root: str | os.PathLike,
        batch_size: int = 256,
        num_workers: int = 4,
        image_size: int = 224,
        resize_size: int = 256,
        train_subset: int | None = None,
        val_dir: str | os.PathLike | None = None,
        mean: Sequence[float] = IMAGENET_MEAN,
        std: Sequence[float] = IMAGENET_STD,
        pin_memory: bool = True,
        persistent_workers: bool = True,
        decode: str = "workers",
        seed: int = 0,
    ) -> None:
        super().__init__()
        check_positive_int("data.batch_size", batch_size)
        check_nonnegative_int("data.num_workers", num_workers)
        check_positive_int("data.image_size", image_size)
        check_positive_int("data.resize_size", resize_size)
        if resize_size < image_size:
            raise ValueError(f"`data.resize_size` must be >= data.image_size={image_size}; got {resize_size}")
        check_positive_int("data.train_subset", train_subset, allow_none=True)
        if decode not in DECODE:
            raise ValueError(f"`data.decode` must be one of {', '.join(DECODE)}; got {decode!r}")
        self.decode, self.seed = decode, seed
        self.mean = as_float_tuple("data.mean", mean)
        self.std = as_float_tuple("data.std", std)
        if min(self.std) <= 0:
            raise ValueError(f"`data.std` must be positive; got {std!r}")
        self.save_hyperparameters()

        self.root = Path(root).expanduser().resolve()
        if not self.root.is_dir():
            raise FileNotFoundError(f"`data.root`={self.root} does not exist; expected {LAYOUT}")
        self.train_dir = self.root / "train"
        self.classes = scan_split(self.train_dir, "data.root")
        if val_dir is not None:
            self.val_dir = (self.root / val_dir).resolve()
            key = "data.val_dir"
        else:
            self.val_dir = self.root / "val" if (self.root / "val").is_dir() else self.root / "test"
            key = "data.root"
        self.test_dir = self.root / "test" if (self.root / "test").is_dir() else self.val_dir
        for folder in dict.fromkeys([self.val_dir, self.test_dir]):
            classes = scan_split(folder, key)
            if classes != self.classes:
                raise ValueError(f"`{key}`: {folder} has classes {classes[:5]}... ({len(classes)}) but "
                                 f"{self.train_dir} has {self.classes[:5]}... ({len(self.classes)}); "
                                 "the splits must have the same class folders")

        self.num_classes = len(self.classes)
        self.input_size = (3, image_size, image_size)
        self.batch_size = batch_size
        self.num_workers = num_workers
        self.image_size, self.resize_size = image_size, resize_size
        self.train_subset = train_subset
        self.pin_memory = pin_memory and torch.cuda.is_available()
        self.persistent_workers = persistent_workers and num_workers > 0
        self.train_set: Dataset | None = None
        self.val_set: Dataset | None = None
        self.test_set: Dataset | None = None

    def train_transform(self) -> transforms.Compose:
        return transforms.Compose([
            transforms.RandomResizedCrop(self.image_size),
            transforms.RandomHorizontalFlip(),
            transforms.ToTensor(),
            transforms.Normalize(self.mean, self.std),
        ])

    def eval_transform(self) -> transforms.Compose:
        return transforms.Compose([
            transforms.Resize(self.resize_size),
            transforms.CenterCrop(self.image_size),
            transforms.ToTensor(),
            transforms.Normalize(self.mean, self.std),
        ])

    def setup(self, stage: str | None = None) -> None:
        """Index the image files (once); a ``train_subset`` is a fixed seeded sample."""
        if self.train_set is not None:
            return
        train = ImageFolder(str(self.train_dir), transform=self.train_transform(), loader=load_rgb)
        if self.train_subset is not None:
            if self.train_subset > len(train):
                raise ValueError(f"`data.train_subset` must be <= {len(train)} (images in {self.train_dir}); "
                                 f"got {self.train_subset}")
            order = torch.randperm(len(train), generator=torch.Generator().manual_seed(SUBSET_SEED))
            train = Subset(train, order[:self.train_subset].sort().values.tolist())
        self.train_set = train
        val = ImageFolder(str(self.val_dir), transform=self.eval_transform(), loader=load_rgb)
        same = self.test_dir == self.val_dir
        test = val if same else ImageFolder(str(self.test_dir), transform=self.eval_transform(), loader=load_rgb)
        # classes interleaved, so a limited val/test sees every class (eval_order.py)
        self.val_set = Subset(val, stratified_order(torch.tensor(val.targets)).tolist())
        self.test_set = self.val_set if same else Subset(test, stratified_order(torch.tensor(test.targets)).tolist())

    def _device(self) -> torch.device:
        """Where the trainer trains (its root device), else the CPU."""
        return self.trainer.strategy.root_device if self.trainer is not None else torch.device("cpu")

    def decodes_on_device(self) -> bool:
        """``decode=device``, or ``auto`` with a trainer that trains on CUDA."""
        return self.decode == "device" or (self.decode == "auto" and self._device().type == "cuda")

    def _loader(self, dataset: Dataset | None, train: bool) -> DataLoader | DeviceDecodeLoader:
        if dataset is None:
            raise RuntimeError(f"{type(self).__name__}.setup() must run before asking for a dataloader")
        if self.decodes_on_device():
            trainer = self.trainer
            rank, world_size = (trainer.global_rank, trainer.world_size) if trainer is not None else (0, 1)
            return DeviceDecodeLoader(_encoded(dataset), self.batch_size, self._device, self.mean, self.std,
                                      self.image_size, self.resize_size, train, num_workers=self.num_workers,
                                      seed=self.seed, rank=rank, world_size=world_size, pin_memory=self.pin_memory)
        return DataLoader(dataset, batch_size=self.batch_size, shuffle=train, drop_last=train,
                          num_workers=self.num_workers, pin_memory=self.pin_memory,
                          persistent_workers=self.persistent_workers)

    def train_dataloader(self) -> DataLoader:
        """Shuffled, last partial batch dropped (workers: Lightning adds a DistributedSampler under DDP;
        on the device: the loader shards by rank itself)."""
        return self._loader(self.train_set, train=True)

    def val_dataloader(self) -> DataLoader:
        return self._loader(self.val_set, train=False)

    def test_dataloader(self) -> DataLoader:
        return self._loader(self.test_set, train=False)


def _encoded(dataset: Dataset) -> Dataset:
    """The same samples, in the same (Subset) order, as encoded bytes for :class:`DeviceDecodeLoader`."""
    if isinstance(dataset, Subset):
        return Subset(_encoded(dataset.dataset), dataset.indices)
    if isinstance(dataset, ImageFolder):
        return EncodedImages(dataset.samples)
    raise TypeError(f"cannot decode {type(dataset).__name__} on the device: expected an ImageFolder or a Subset of one")


class ImageNetDataModule(ImageFolderDataModule):
    """ImageNet-1k (ILSVRC 2012) as an ImageFolder tree: ``root/train/n01440764/*.JPEG`` and
    ``root/val/n01440764/*.JPEG`` (the validation images sorted into class folders, e.g. with the
    usual ``valprep.sh``). Same arguments and defaults as :class:`ImageFolderDataModule`;
    ``num_classes`` is still read from the folders (1000 for the full set)."""

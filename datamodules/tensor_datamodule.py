"""Base LightningDataModule for data sets small enough to live in memory as uint8 tensors.

Subclasses only say how to get (images, labels) per split; this class keeps the splits on the
training device (the whole set on the GPU when the trainer runs on CUDA, as in airbench) and
serves them through :class:`AugmentedTensorLoader`, which needs no worker processes.
"""
from __future__ import annotations

import pytorch_lightning as pl
import torch
from torch import Tensor

from netcompress.datamodules.checks import check_nonnegative_int, check_positive_int
from netcompress.datamodules.eval_order import stratified_order
from netcompress.datamodules.tensor_loader import AugmentedTensorLoader

Split = tuple[Tensor, Tensor]  # uint8 images (N, C, H, W), int64 labels (N,)


class TensorDataModule(pl.LightningDataModule):
    """Serves in-memory train/val/test splits with batched on-device augmentation.

    Subclasses set ``num_classes``, ``input_size``, ``mean``, ``std`` in ``__init__`` and
    implement :meth:`load_splits`. After ``setup`` the attributes ``train_size``, ``val_size``,
    ``test_size`` give the number of images per split.
    """

    num_classes: int
    input_size: tuple[int, int, int]
    mean: tuple[float, ...]
    std: tuple[float, ...]

    def __init__(self, batch_size: int, eval_batch_size: int | None, pad: int, seed: int) -> None:
        super().__init__()
        check_positive_int("data.batch_size", batch_size)
        check_positive_int("data.eval_batch_size", eval_batch_size, allow_none=True)
        check_nonnegative_int("data.pad", pad)
        if not isinstance(seed, int) or isinstance(seed, bool):
            raise ValueError(f"`data.seed` must be an int; got {seed!r}")
        self.batch_size = batch_size
        # No activations are kept for backward at eval time, so twice the training batch fits.
        self.eval_batch_size = eval_batch_size or 2 * batch_size
        self.pad = pad
        self.seed = seed
        self.rank, self.world_size = 0, 1
        self.train_size: int | None = None
        self.test_size: int | None = None
        self._splits: dict[str, Split] | None = None
        self.eval_order: dict[str, Tensor] = {}

    def load_splits(self) -> dict[str, Split]:
        """Return CPU tensors for the splits 'train', 'val' and 'test'."""
        raise NotImplementedError

    def setup(self, stage: str | None = None) -> None:
        """Load the splits once, put them on the trainer's CUDA device (else the CPU) in
        channels_last layout, and take rank / world size from the trainer."""
        device = torch.device("cpu")
        trainer = self.trainer
        if trainer is not None:
            root_device = trainer.strategy.root_device
            if root_device.type == "cuda":
                device = root_device
            self.rank, self.world_size = trainer.global_rank, trainer.world_size
        if self._splits is None:
            splits = self.load_splits()
            # val/test served classes interleaved (eval_order.py); eval_order maps a served position to the
            # image's index in the split as loaded
            self.eval_order = {name: stratified_order(splits[name][1]) for name in ("val", "test")}
            self._splits = {name: (split if name == "train" else
                                   (split[0][self.eval_order[name]], split[1][self.eval_order[name]]))
                            for name, split in splits.items()}
        self._splits = {name: self._to_device(split, device) for name, split in self._splits.items()}
        self.train_size, self.val_size, self.test_size = (len(self._splits[k][1]) for k in ("train", "val", "test"))

    @staticmethod
    def _to_device(split: Split, device: torch.device) -> Split:
        images, labels = split
        images = images.to(device).contiguous(memory_format=torch.channels_last)
        return images, labels.to(device=device, dtype=torch.int64)

    def _loader(self, split: str, train: bool) -> AugmentedTensorLoader:
        if self._splits is None:
            raise RuntimeError(f"{type(self).__name__}.setup() must run before {split}_dataloader()")
        images, labels = self._splits[split]
        return AugmentedTensorLoader(
            images, labels, self.batch_size if train else self.eval_batch_size, self.mean, self.std,
            train=train, pad=self.pad, seed=self.seed, rank=self.rank, world_size=self.world_size,
        )

    def train_dataloader(self) -> AugmentedTensorLoader:
        """Shuffled, augmented (crop with zero padding ``pad`` + flip), last partial batch dropped."""
        loader = self._loader("train", train=True)
        if len(loader) == 0:
            raise ValueError(f"`data.batch_size`={self.batch_size} is larger than the {loader.num_samples} training "
                             "images per device, so every batch would be dropped; lower data.batch_size")
        return loader

    def val_dataloader(self) -> AugmentedTensorLoader:
        """Fixed, class-interleaved order (eval_order.py), no augmentation."""
        return self._loader("val", train=False)

    def test_dataloader(self) -> AugmentedTensorLoader:
        """Fixed, class-interleaved order (eval_order.py), no augmentation."""
        return self._loader("test", train=False)

"""Random images with a learnable class signal, for fast tests of the whole training stack.

Each class has its own mean colour; every image is that colour plus strong per-pixel Gaussian
noise. The colour survives crop and flip, so a tiny network (or nearest-class-mean on raw
pixels) separates the classes, while the noise keeps single pixels uninformative.
"""
from __future__ import annotations

import torch

from netcompress.datamodules.checks import check_nonnegative_int, check_positive_int
from netcompress.datamodules.tensor_datamodule import Split, TensorDataModule

NOISE_STD = 48.0  # in uint8 pixel units
COLOUR_RANGE = (40, 216)  # class colours are drawn per channel in this range


class SyntheticDataModule(TensorDataModule):
    """Deterministic synthetic classification data served like CIFAR-10 (same loader path).

    Args:
        num_classes: number of classes (>= 2).
        image_size: height = width of the 3-channel images.
        train_size, val_size, test_size: images per split (balanced classes, shuffled).
        batch_size: training batch size; val/test use 2 * batch_size.
        seed: generates the class colours and all images (same seed -> same data), and seeds
            each epoch's order and augmentation.
        pad: zero padding of the random crop; 0 = no crop.
    """

    mean = (0.5, 0.5, 0.5)
    std = (0.27, 0.27, 0.27)  # about the pixel std: sqrt(colour spread^2 + noise^2) / 255

    def __init__(
        self,
        num_classes: int = 10,
        image_size: int = 32,
        train_size: int = 256,
        val_size: int = 64,
        test_size: int = 64,
        batch_size: int = 32,
        seed: int = 0,
        pad: int = 4,
    ) -> None:
        super().__init__(batch_size=batch_size, eval_batch_size=None, pad=pad, seed=seed)
        check_positive_int("data.num_classes", num_classes)
        if num_classes < 2:
            raise ValueError(f"`data.num_classes` must be >= 2; got {num_classes}")
        check_positive_int("data.image_size", image_size)
        check_positive_int("data.train_size", train_size)
        check_nonnegative_int("data.val_size", val_size)
        check_nonnegative_int("data.test_size", test_size)
        self.save_hyperparameters()
        self.num_classes = num_classes
        self.input_size = (3, image_size, image_size)
        self.train_size, self.val_size, self.test_size = train_size, val_size, test_size

    def load_splits(self) -> dict[str, Split]:
        g = torch.Generator().manual_seed(self.seed)
        low, high = COLOUR_RANGE
        colours = torch.randint(low, high + 1, (self.num_classes, 3), generator=g).float()
        size = self.input_size[1]

        def make(n: int) -> Split:
            labels = (torch.arange(n) % self.num_classes)[torch.randperm(n, generator=g)]
            noise = torch.randn(n, 3, size, size, generator=g) * NOISE_STD
            images = (colours[labels][:, :, None, None] + noise).round_().clamp_(0, 255).to(torch.uint8)
            return images, labels

        return {"train": make(self.train_size), "val": make(self.val_size), "test": make(self.test_size)}

"""JPEG decoding and ImageNet-style augmentation on the training device, for ImageFolder trees.

Why: with PIL in worker processes, a GPU training ResNet-50 needs more CPU cores than a node
usually has per GPU to decode and crop ~1-3k images/s. Here the workers only read the encoded
bytes; the main process decodes whole batches on the device (nvJPEG through
``torchvision.io.decode_jpeg(list, device="cuda")``; libjpeg-turbo on the CPU) and crops, resizes,
flips and normalises them there with tensor ops. ``bench/bench_imagefolder_loader.py`` measures
it against the worker path and a ResNet-50 training step.

The random crops come from a ``torch.Generator`` seeded by ``(seed, epoch)`` (as the CIFAR tensor
loader's), so a run's data are a function of its seed. torchvision marks its image decoders as
deprecated in favour of TorchCodec from 0.29 on; they are the pinned torchvision's and are used
here until TorchCodec's batched CUDA JPEG decoding replaces them.
"""
from __future__ import annotations

import math
import warnings
from collections.abc import Callable, Iterator, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.utils.data import DataLoader, Dataset, Subset

from netcompress.datamodules.tensor_loader import epoch_seed

CROP_SCALE = (0.08, 1.0)  # RandomResizedCrop's defaults (Szegedy et al. 2015)
CROP_RATIO = (3 / 4, 4 / 3)


class EncodedImages(Dataset):
    """``(encoded bytes as a 1-D uint8 tensor, class index, sample index)`` of an ImageFolder's files:
    what a worker hands over when the decoding happens on the device."""

    def __init__(self, samples: Sequence[tuple[str, int]]) -> None:
        self.samples = list(samples)

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int) -> tuple[Tensor, int, int]:
        path, target = self.samples[index]
        with open(path, "rb") as f:
            data = f.read()
        return torch.frombuffer(bytearray(data), dtype=torch.uint8), target, index


def collate_encoded(batch: list[tuple[Tensor, int, int]]) -> tuple[list[Tensor], Tensor, Tensor]:
    """Variable-length encodings stay a list; labels and sample indices become tensors."""
    data, targets, indices = zip(*batch)
    return list(data), torch.tensor(targets, dtype=torch.int64), torch.tensor(indices, dtype=torch.int64)


def decode_batch(data: list[Tensor], device: torch.device, names: Callable[[int], str]) -> list[Tensor]:
    """RGB uint8 (3, H, W) images on ``device``: one batched ``decode_jpeg`` call; if it fails (a PNG
    under a .jpg name, a CMYK JPEG nvJPEG refuses), each image is decoded on the CPU by format and
    moved; an image nothing decodes raises an error naming its file (``names(i)``)."""
    from torchvision.io import ImageReadMode, decode_image, decode_jpeg

    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", category=DeprecationWarning, module="torchvision")
        try:
            return list(decode_jpeg(data, mode=ImageReadMode.RGB, device=device))
        except RuntimeError:
            images = []
            for i, encoded in enumerate(data):
                try:
                    images.append(decode_image(encoded, mode=ImageReadMode.RGB).to(device))
                except RuntimeError as exc:
                    raise ValueError(f"data.root: cannot decode image {names(i)} ({exc}); delete or replace "
                                     "the file") from None
            return images


def crop_box(height: int, width: int, g: torch.Generator, scale: Sequence[float] = CROP_SCALE,
             ratio: Sequence[float] = CROP_RATIO) -> tuple[int, int, int, int]:
    """(top, left, h, w) of a RandomResizedCrop: torchvision's algorithm (10 tries of an area fraction
    in ``scale`` and a log-uniform aspect ratio in ``ratio``, else the centre crop clamped to
    ``ratio``), drawing from ``g`` instead of the global RNG."""
    area = height * width
    log_ratio = torch.log(torch.tensor(ratio))
    for _ in range(10):
        target_area = area * torch.empty(1).uniform_(scale[0], scale[1], generator=g).item()
        aspect = torch.exp(torch.empty(1).uniform_(log_ratio[0], log_ratio[1], generator=g)).item()
        w = int(round(math.sqrt(target_area * aspect)))
        h = int(round(math.sqrt(target_area / aspect)))
        if 0 < w <= width and 0 < h <= height:
            top = int(torch.randint(0, height - h + 1, size=(1,), generator=g).item())
            left = int(torch.randint(0, width - w + 1, size=(1,), generator=g).item())
            return top, left, h, w
    in_ratio = width / height
    if in_ratio < min(ratio):
        w, h = width, int(round(width / min(ratio)))
    elif in_ratio > max(ratio):
        h, w = height, int(round(height * max(ratio)))
    else:
        w, h = width, height
    return (height - h) // 2, (width - w) // 2, h, w


def _resize(image: Tensor, size: tuple[int, int]) -> Tensor:
    """Bilinear, antialiased resize of one uint8 (3, H, W) image to float (3, h, w) on its device
    (what ``transforms.Resize`` does to a tensor, kept in float until the batch is normalised)."""
    return F.interpolate(image[None].float(), size=size, mode="bilinear", align_corners=False, antialias=True)[0]


def train_views(images: list[Tensor], size: int, g: torch.Generator) -> Tensor:
    """RandomResizedCrop(size) + RandomHorizontalFlip of each image, as one float (B, 3, size, size) batch
    on the images' device, pixel values in [0, 255]."""
    out = []
    for image in images:
        top, left, h, w = crop_box(image.shape[1], image.shape[2], g)
        view = _resize(image[:, top:top + h, left:left + w], (size, size))
        out.append(view.flip(-1) if bool(torch.rand(1, generator=g) < 0.5) else view)
    return torch.stack(out)


def eval_views(images: list[Tensor], resize: int, size: int) -> Tensor:
    """Resize(resize) of the shorter side + CenterCrop(size), as one float batch in [0, 255]
    (``transforms.Resize``'s rounding: the longer side is ``int(resize * long / short)``)."""
    out = []
    for image in images:
        h, w = image.shape[1:]
        short, long = (h, w) if h <= w else (w, h)
        new_long = int(resize * long / short)
        new = (resize, new_long) if h <= w else (new_long, resize)
        view = _resize(image, new)
        top, left = int(round((new[0] - size) / 2.0)), int(round((new[1] - size) / 2.0))
        out.append(view[:, top:top + size, left:left + size])
    return torch.stack(out)


class _EpochHook:
    """Stands in as the loader's ``sampler``: Lightning calls ``sampler.set_epoch`` every epoch."""

    def __init__(self, loader: DeviceDecodeLoader) -> None:
        self._loader = loader

    def set_epoch(self, epoch: int) -> None:
        self._loader.set_epoch(epoch)


class DeviceDecodeLoader:
    """Iterable of normalised ``(x, y)`` batches on ``device`` from an :class:`EncodedImages` (or a
    ``Subset`` of one: a training subset, the class-interleaved eval order).

    Worker processes (``num_workers``) read the files; decoding and augmentation run on ``device``
    (a callable is asked at each ``iter()``, so a datamodule built before the trainer knows its device
    still decodes where the model lives). Training: epoch e's order and crops are a function of
    ``(seed, e)``; rank r of ``world_size`` takes positions r, r + world_size, ... of the shared
    permutation (truncated to the same length on every rank). Eval: fixed order, rank r takes
    samples ``range(r, N, world_size)``. ``x`` is float32 (B, 3, size, size), channels_last.
    """

    def __init__(self, dataset: EncodedImages | Subset, batch_size: int, device: torch.device | Callable[[], torch.device],
                 mean: Sequence[float], std: Sequence[float], image_size: int, resize_size: int, train: bool,
                 num_workers: int = 4, seed: int = 0, rank: int = 0, world_size: int = 1,
                 pin_memory: bool = False) -> None:
        self.dataset = dataset
        self.batch_size = batch_size
        self._device = device
        self.mean, self.std = tuple(mean), tuple(std)
        self.image_size, self.resize_size = image_size, resize_size
        self.train = train
        self.num_workers = num_workers
        self.seed, self.rank, self.world_size = seed, rank, world_size
        self.pin_memory = pin_memory
        self.epoch = 0
        self.sampler = _EpochHook(self)  # Lightning calls sampler.set_epoch(epoch)
        self.batch_sampler = None

    @property
    def device(self) -> torch.device:
        return torch.device(self._device() if callable(self._device) else self._device)

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def indices(self, epoch: int) -> list[int]:
        """The sample indices this rank serves in ``epoch``, in order."""
        n = len(self.dataset)
        if not self.train:
            return list(range(self.rank, n, self.world_size))
        perm = torch.randperm(n, generator=torch.Generator().manual_seed(epoch_seed(self.seed, epoch)))
        per_rank = n // self.world_size
        return perm[self.rank::self.world_size][:per_rank].tolist()

    def __len__(self) -> int:
        n = len(self.indices(0)) if not self.train else len(self.dataset) // self.world_size
        return n // self.batch_size if self.train else math.ceil(n / self.batch_size)

    def __iter__(self) -> Iterator[tuple[Tensor, Tensor]]:
        epoch = self.epoch
        self.epoch = epoch + 1
        device = self.device
        loader = DataLoader(self.dataset, batch_size=self.batch_size, sampler=self.indices(epoch),
                            drop_last=self.train, num_workers=self.num_workers, collate_fn=collate_encoded,
                            pin_memory=self.pin_memory)
        g = torch.Generator().manual_seed(epoch_seed(self.seed, epoch) ^ 0x5EED)  # crops: their own stream
        scale = torch.tensor([1 / (255 * s) for s in self.std], device=device).view(1, 3, 1, 1)
        shift = torch.tensor([-m / s for m, s in zip(self.mean, self.std)], device=device).view(1, 3, 1, 1)
        files = self.dataset
        while isinstance(files, Subset):
            files = files.dataset
        for data, targets, indices in loader:
            images = decode_batch(data, device, lambda i: files.samples[int(indices[i])][0])
            views = (train_views(images, self.image_size, g) if self.train
                     else eval_views(images, self.resize_size, self.image_size))
            x = (views * scale + shift).contiguous(memory_format=torch.channels_last)
            yield x, targets.to(device, non_blocking=True)

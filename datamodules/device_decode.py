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
from torchvision.transforms import RandomResizedCrop

from netcompress.datamodules.tensor_loader import EpochHook, epoch_seed, rank_share

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


def draw_views(shapes: Sequence[tuple[int, int]], g: torch.Generator) -> list[tuple[tuple[int, int, int, int], bool]]:
    """(RandomResizedCrop box (top, left, h, w), flip?) per image of the given (H, W): torchvision's
    ``get_params`` and a flip draw per image, run on the global CPU RNG set to ``g``'s state inside
    ``fork_rng`` (so they draw from ``g``, which advances, and the training's own RNG is untouched)."""
    views = []
    with torch.random.fork_rng(devices=[]):
        torch.set_rng_state(g.get_state())
        for height, width in shapes:
            box = RandomResizedCrop.get_params(torch.empty(0, height, width), list(CROP_SCALE), list(CROP_RATIO))
            views.append((tuple(box), bool(torch.rand(1) < 0.5)))
        g.set_state(torch.get_rng_state())
    return views


def _resize(image: Tensor, size: tuple[int, int]) -> Tensor:
    """Bilinear, antialiased resize of one uint8 (3, H, W) image to float (3, h, w) on its device
    (what ``transforms.Resize`` does to a tensor, kept in float until the batch is normalised)."""
    return F.interpolate(image[None].float(), size=size, mode="bilinear", align_corners=False, antialias=True)[0]


def train_views(images: list[Tensor], size: int, g: torch.Generator) -> Tensor:
    """RandomResizedCrop(size) + RandomHorizontalFlip of each image, as one float (B, 3, size, size) batch
    on the images' device, pixel values in [0, 255]."""
    out = []
    for image, ((top, left, h, w), flip) in zip(images, draw_views([im.shape[1:] for im in images], g)):
        view = _resize(image[:, top:top + h, left:left + w], (size, size))
        out.append(view.flip(-1) if flip else view)
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
        self.sampler = EpochHook(self)  # Lightning calls sampler.set_epoch(epoch)
        self.batch_sampler = None

    @property
    def device(self) -> torch.device:
        return torch.device(self._device() if callable(self._device) else self._device)

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def indices(self, epoch: int) -> list[int]:
        """The sample indices this rank serves in ``epoch``, in order."""
        n = len(self.dataset)
        order = (torch.randperm(n, generator=torch.Generator().manual_seed(epoch_seed(self.seed, epoch)))
                 if self.train else torch.arange(n))
        return rank_share(order, self.rank, self.world_size, equal=self.train).tolist()

    def __len__(self) -> int:
        n = len(self.indices(0))
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

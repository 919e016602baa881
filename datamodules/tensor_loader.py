"""Batched random-crop + flip over an in-memory uint8 image tensor (CPU or GPU).

Seed idea: airbench (Keller Jordan, "94% on CIFAR-10 in 3.29 seconds"): keep the whole data
set as one uint8 tensor where the model lives and augment whole batches with tensor ops, so
loading costs a small fraction of a training step and needs no worker processes.

Every epoch's order and augmentation is a pure function of ``(seed, epoch)``, so a run
resumed from a checkpoint sees exactly the data of an uninterrupted one.
"""
from __future__ import annotations

import hashlib
import math
from collections.abc import Iterator, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor


def epoch_seed(seed: int, epoch: int) -> int:
    """Seed of the per-epoch ``torch.Generator``: a hash of (seed, epoch), so nearby seeds and
    epochs give unrelated streams."""
    digest = hashlib.sha256(f"netcompress:{int(seed)}:{int(epoch)}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & ((1 << 63) - 1)


def crop_flip_nhwc(images: Tensor, offsets: Tensor, flips: Tensor, pad: int) -> Tensor:
    """Random crop with zero padding ``pad``, then horizontal flip, for a whole batch at once.

    ``images`` is uint8 (B, H, W, C); ``offsets`` (B, 2) holds each sample's (row, col) crop
    corner in the padded image, in ``[0, 2 * pad]``; ``flips`` (B,) is bool. The batch is padded
    once; the crop's rows are copied as whole padded rows (one ``index_select``), then each
    sample's columns (shifted, reversed when flipped) are picked with one ``gather``.
    Returns (B, H, W, C) of the same dtype.
    """
    b, h, w, c = images.shape
    padded = F.pad(images, (0, 0, pad, pad, pad, pad)) if pad else images
    hp, wp = h + 2 * pad, w + 2 * pad
    dev = images.device
    rows = torch.arange(b, device=dev)[:, None] * hp + offsets[:, 0, None] + torch.arange(h, device=dev)
    strips = padded.reshape(b * hp, wp * c).index_select(0, rows.reshape(-1)).view(b, h, wp, c)
    cols = torch.arange(w, device=dev).expand(b, w)
    cols = torch.where(flips[:, None], (w - 1) - cols, cols) + offsets[:, 1, None]  # (B, W)
    return torch.gather(strips, 2, cols[:, None, :, None].expand(b, h, w, c))


class EpochHook:
    """Stands in as a custom loader's ``sampler``: Lightning's fit loop calls ``sampler.set_epoch``
    with its epoch counter (restored from the checkpoint on resume) before each epoch."""

    def __init__(self, loader: Any) -> None:
        self._loader = loader

    def set_epoch(self, epoch: int) -> None:
        self._loader.set_epoch(epoch)


def rank_share(order: Tensor, rank: int, world_size: int, equal: bool) -> Tensor:
    """Positions ``rank, rank + world_size, ...`` of ``order``; ``equal``: cut to ``len // world_size``
    on every rank, so DDP ranks step together (training), else every sample once (eval)."""
    stop = len(order) // world_size * world_size if equal else len(order)
    return order[rank:stop:world_size]


class AugmentedTensorLoader:
    """Iterable of normalised ``(x, y)`` batches from uint8 ``images`` (N, 3, H, W) and int64
    ``labels`` (N,), produced on the device where ``images`` lives.

    ``x`` is float32 (B, C, H, W) in channels_last memory format, ``y`` int64 (B,).

    Args:
        images: uint8 (N, C, H, W). Pass it in channels_last memory format to avoid a copy (the
            loader works in NHWC internally).
        labels: int64 (N,), on the same device.
        batch_size: samples per batch (per rank).
        mean, std: per-channel statistics on the [0, 1] scale (like ``transforms.Normalize``);
            applied as one fused multiply-add ``x * 1/(255 std) - mean/std`` on the pixels.
        train: True: a new permutation and random crop (zero padding ``pad``) + horizontal flip
            every epoch; False: fixed order, no augmentation.
        pad: zero padding of the random crop (training only); 0 disables cropping.
        flip: random horizontal flips with probability 1/2 (training only).
        drop_last: drop the last incomplete batch; defaults to ``train``.
        seed: the epoch-e permutation and augmentation come from a ``torch.Generator`` seeded
            with ``epoch_seed(seed, e)`` -- a pure function of (seed, epoch), drawn on the CPU, so
            CPU and GPU runs and resumed runs see the same data.
        rank, world_size: distributed data parallel. Training: rank r takes positions
            r, r + world_size, ... of the shared epoch permutation (truncated to the same length
            on every rank), so the ranks cover the set once per epoch, disjointly. Eval: rank r
            takes samples ``range(r, N, world_size)``.

    Epochs: each ``iter()`` serves epoch ``self.epoch`` (read at the first ``next()``, so an
    iterator created early is not bound to a stale value) and then advances it by one;
    ``set_epoch(e)`` overrides it. Lightning calls ``set_epoch`` through the ``sampler``
    attribute before every training epoch, with its own epoch counter. ``state_dict`` /
    ``load_state_dict`` record (epoch, batches served), which Lightning stores in checkpoints,
    so a run resumed mid-epoch skips the batches it already trained on.
    """

    def __init__(
        self,
        images: Tensor,
        labels: Tensor,
        batch_size: int,
        mean: Sequence[float],
        std: Sequence[float],
        train: bool = True,
        pad: int = 4,
        flip: bool = True,
        drop_last: bool | None = None,
        seed: int = 0,
        rank: int = 0,
        world_size: int = 1,
    ) -> None:
        if not isinstance(images, Tensor) or images.dtype != torch.uint8 or images.dim() != 4:
            got = f"{images.dtype} {tuple(images.shape)}" if isinstance(images, Tensor) else type(images).__name__
            raise TypeError(f"`images` must be a uint8 tensor (N, C, H, W); got {got}")
        if not isinstance(labels, Tensor) or labels.dtype != torch.int64 or labels.shape != images.shape[:1]:
            got = f"{labels.dtype} {tuple(labels.shape)}" if isinstance(labels, Tensor) else type(labels).__name__
            raise TypeError(f"`labels` must be an int64 tensor of shape ({images.shape[0]},); got {got}")
        if labels.device != images.device:
            raise ValueError(f"`labels` must be on the device of `images` ({images.device}); got {labels.device}")
        if not isinstance(batch_size, int) or isinstance(batch_size, bool) or batch_size < 1:
            raise ValueError(f"`batch_size` must be a positive int; got {batch_size!r}")
        if not isinstance(pad, int) or isinstance(pad, bool) or pad < 0:
            raise ValueError(f"`pad` must be an int >= 0; got {pad!r}")
        channels = images.shape[1]
        if len(mean) != channels or len(std) != channels:
            raise ValueError(f"`mean` and `std` need {channels} values (one per channel); got {mean!r}, {std!r}")
        if any(s <= 0 for s in std):
            raise ValueError(f"`std` must be positive; got {std!r}")
        if not (isinstance(world_size, int) and world_size >= 1 and isinstance(rank, int) and 0 <= rank < world_size):
            raise ValueError(f"need 0 <= `rank` < `world_size`; got rank={rank!r}, world_size={world_size!r}")

        self.images = images
        self.labels = labels
        self._nhwc = images.permute(0, 2, 3, 1).contiguous()  # free if images is channels_last
        self.batch_size = batch_size
        self.train = train
        self.pad = pad if train else 0
        self.flip = flip and train
        self.drop_last = train if drop_last is None else drop_last
        self.seed = seed
        self.rank = rank
        self.world_size = world_size
        mean_t = torch.tensor(mean, dtype=torch.float64)
        std_t = torch.tensor(std, dtype=torch.float64)
        # Per-channel scale/shift tiled over H*W so the affine runs on contiguous (B, H*W*C) rows.
        pixels = images.shape[2] * images.shape[3]
        self._scale = (1.0 / (255.0 * std_t)).repeat(pixels).to(device=images.device, dtype=torch.float32)
        self._shift = (-mean_t / std_t).repeat(pixels).to(device=images.device, dtype=torch.float32)

        self.epoch = 0  # epoch served by the next iter()
        self._served = (0, 0)  # (epoch, batches) of the latest iteration, for state_dict
        self._skip: tuple[int, int] | None = None  # (epoch, batches) to skip after a mid-epoch resume
        self.sampler = EpochHook(self)  # Lightning calls sampler.set_epoch(epoch)
        self.batch_sampler = None  # read by Lightning next to `sampler`

    # -- sizes -------------------------------------------------------------------------------
    @property
    def num_samples(self) -> int:
        """Samples this rank serves per epoch (before dropping the last incomplete batch)."""
        n = self.images.shape[0]
        if self.train:
            return n // self.world_size  # equal on every rank, so DDP ranks step together
        return len(range(self.rank, n, self.world_size))

    def __len__(self) -> int:
        n = self.num_samples
        return n // self.batch_size if self.drop_last else math.ceil(n / self.batch_size)

    # -- epochs and resume -------------------------------------------------------------------
    def set_epoch(self, epoch: int) -> None:
        """Serve epoch ``epoch`` on the next ``iter()`` (called by Lightning every epoch)."""
        self.epoch = int(epoch)

    def state_dict(self) -> dict[str, int]:
        """Epoch being served and how many of its batches were handed out."""
        epoch, batches = self._served
        return {"epoch": epoch, "batches": batches}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Resume: the next iteration of ``state['epoch']`` skips the batches already served."""
        epoch, batches = int(state["epoch"]), int(state["batches"])
        if batches >= len(self):
            self.epoch, self._skip = epoch + 1, None
        else:
            self.epoch, self._skip = epoch, (epoch, batches)

    def epoch_plan(self, epoch: int) -> tuple[Tensor, Tensor, Tensor]:
        """(permutation (N,), crop offsets (N, 2) in [0, 2 pad], flips (N,)) of ``epoch``, over the
        whole set on the CPU; rank r uses positions r::world_size. A pure function of (seed, epoch)."""
        n = self.images.shape[0]
        g = torch.Generator().manual_seed(epoch_seed(self.seed, epoch))
        perm = torch.randperm(n, generator=g)
        offsets = torch.randint(0, 2 * self.pad + 1, (n, 2), generator=g)
        flips = torch.rand(n, generator=g) < 0.5 if self.flip else torch.zeros(n, dtype=torch.bool)
        return perm, offsets, flips

    # -- iteration ---------------------------------------------------------------------------
    def __iter__(self) -> Iterator[tuple[Tensor, Tensor]]:
        epoch = self.epoch
        self.epoch = epoch + 1
        start = 0
        if self._skip is not None and self._skip[0] == epoch:
            start = self._skip[1]
        self._skip = None
        self._served = (epoch, start)
        dev = self.images.device
        if self.train:
            perm, offsets, flips = self.epoch_plan(epoch)
            take = rank_share(torch.arange(len(perm)), self.rank, self.world_size, equal=True)
            index, offsets, flips = perm[take].to(dev), offsets[take].to(dev), flips[take].to(dev)
        else:
            index = rank_share(torch.arange(self.images.shape[0], device=dev), self.rank, self.world_size, equal=False)
        bs = self.batch_size
        for b in range(start, len(self)):
            sel = index[b * bs:(b + 1) * bs]
            pixels = self._nhwc[sel]
            if self.train and (self.pad or self.flip):
                pixels = crop_flip_nhwc(pixels, offsets[b * bs:(b + 1) * bs], flips[b * bs:(b + 1) * bs], self.pad)
            self._served = (epoch, b + 1)
            yield self.normalize(pixels), self.labels[sel]

    def normalize(self, pixels_nhwc: Tensor) -> Tensor:
        """uint8 (B, H, W, C) -> float32 (B, C, H, W) channels_last, ``(x / 255 - mean) / std`` as one
        fused multiply-add."""
        b, h, w, c = pixels_nhwc.shape
        flat = pixels_nhwc.reshape(b, h * w * c).float()
        return torch.addcmul(self._shift, flat, self._scale).view(b, h, w, c).permute(0, 3, 1, 2)

    def __repr__(self) -> str:
        mode = "train" if self.train else "eval"
        return (f"{type(self).__name__}({mode}, n={self.images.shape[0]}, batch_size={self.batch_size}, "
                f"batches={len(self)}, rank={self.rank}/{self.world_size}, device={self.images.device})")

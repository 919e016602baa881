"""CIFAR-10-C-style common corruptions, generated on the fly (Hendrycks & Dietterich, ICLR 2019,
"Benchmarking Neural Network Robustness to Common Corruptions and Perturbations").

Each corruption maps a batch of images in **pixel space** -- float (N, 3, H, W) in [0, 1], before
normalisation -- to a corrupted batch of the same shape, at severity 1..5, and returns values in
[0, 1]. The severity constants are those of the authors' CIFAR script,
``hendrycks/robustness: ImageNet-C/create_c/make_cifar_c.py`` (not the ImageNet ones):

================  ==========================================  ===================================
corruption        make_cifar_c.py constant, severity 1..5     what it is
================  ==========================================  ===================================
gaussian_noise    ``c = [0.04, 0.06, .08, .09, .10]``         ``clip(x + N(0, c^2))``
shot_noise        ``c = [500, 250, 100, 75, 50]``             ``clip(Poisson(c x) / c)``
gaussian_blur     ``c = [.4, .6, 0.7, .8, 1]``                Gaussian filter, sigma = c pixels
contrast          ``c = [.75, .5, .4, .3, 0.15]``             ``clip((x - m) c + m)``, m the per-channel image mean
brightness        ``c = [.05, .1, .15, .2, .3]``              HSV value ``V -> clip(V + c)``
jpeg_compression  ``c = [80, 65, 58, 50, 40]``                JPEG round trip at quality c
pixelate          ``c = [0.95, 0.9, 0.85, 0.75, 0.65]``       box resize to ``int(H c)`` and back
================  ==========================================  ===================================

Where the original relies on a library, these follow its exact semantics: the blur is
skimage's ``gaussian`` (scipy's ``gaussian_filter``: kernel radius ``int(4 sigma + 0.5)``,
edge-replicating border ``mode='nearest'``; torchvision's ``gaussian_blur`` pads by reflection,
which changes the 4-pixel border of a 32x32 image, so the filter is written out here);
brightness is skimage's RGB->HSV->RGB round trip, which for a fixed hue and saturation scales
every channel by ``V'/V``; JPEG uses Pillow with the quality above, as the original does
(torchvision's JPEG codec is deprecated since 0.29); pixelate reproduces Pillow's ``BOX``
resampling weights as two small matrices (so it runs on the GPU). The images are not quantised
to uint8 between corruption and network (the original saves uint8 files), except by JPEG.

Randomness: the noise corruptions draw from the ``torch.Generator`` passed in, on the
generator's device (a CPU generator gives the same draws for CPU and GPU images); the others
are deterministic and ignore it. ``CORRUPTIONS`` maps each name to ``fn(images, severity,
generator)``; adding a corruption is adding one entry.
"""
from __future__ import annotations

import io
from typing import Callable

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch import Tensor

Corruption = Callable[[Tensor, int, "torch.Generator | None"], Tensor]
SEVERITIES = (1, 2, 3, 4, 5)

# make_cifar_c.py's constants, severity 1..5 (see the module docstring)
GAUSSIAN_NOISE_STD = (0.04, 0.06, 0.08, 0.09, 0.10)
SHOT_NOISE_PHOTONS = (500, 250, 100, 75, 50)
GAUSSIAN_BLUR_SIGMA = (0.4, 0.6, 0.7, 0.8, 1.0)
CONTRAST_FACTOR = (0.75, 0.5, 0.4, 0.3, 0.15)
BRIGHTNESS_SHIFT = (0.05, 0.1, 0.15, 0.2, 0.3)
JPEG_QUALITY = (80, 65, 58, 50, 40)
PIXELATE_FACTOR = (0.95, 0.9, 0.85, 0.75, 0.65)


def _constant(table: tuple, severity: int):
    if isinstance(severity, bool) or not isinstance(severity, int) or not 1 <= severity <= 5:
        raise ValueError(f"severity must be an int in 1..5; got {severity!r}")
    return table[severity - 1]


def _draw(draw: Callable[[torch.device], Tensor], images: Tensor, generator: torch.Generator | None) -> Tensor:
    """``draw(device)`` on the generator's device (the default one: the images'), moved to the images."""
    device = generator.device if generator is not None else images.device
    return draw(device).to(images.device)


def gaussian_noise(images: Tensor, severity: int, generator: torch.Generator | None = None) -> Tensor:
    """Additive Gaussian noise of standard deviation c, clipped to [0, 1]."""
    std = _constant(GAUSSIAN_NOISE_STD, severity)
    noise = _draw(lambda d: torch.randn(images.shape, generator=generator, device=d, dtype=images.dtype),
                  images, generator)
    return (images + std * noise).clamp_(0, 1)


def shot_noise(images: Tensor, severity: int, generator: torch.Generator | None = None) -> Tensor:
    """Poisson (photon) noise: ``Poisson(c x) / c``, clipped to [0, 1]."""
    photons = _constant(SHOT_NOISE_PHOTONS, severity)
    rates = images.float() * photons
    counts = _draw(lambda d: torch.poisson(rates.to(d), generator=generator), images, generator)
    return (counts / photons).to(images.dtype).clamp_(0, 1)


def gaussian_blur(images: Tensor, severity: int, generator: torch.Generator | None = None) -> Tensor:
    """Gaussian blur of sigma c pixels, as scipy's ``gaussian_filter(mode='nearest', truncate=4)``."""
    sigma = _constant(GAUSSIAN_BLUR_SIGMA, severity)
    radius = int(4.0 * sigma + 0.5)
    x = torch.arange(-radius, radius + 1, device=images.device, dtype=images.dtype)
    kernel = torch.exp(-0.5 * (x / sigma) ** 2)
    kernel = kernel / kernel.sum()
    n, c, h, w = images.shape
    out = images.reshape(n * c, 1, h, w)
    out = F.conv2d(F.pad(out, (radius, radius, 0, 0), mode="replicate"), kernel.view(1, 1, 1, -1))
    out = F.conv2d(F.pad(out, (0, 0, radius, radius), mode="replicate"), kernel.view(1, 1, -1, 1))
    return out.reshape(n, c, h, w).clamp_(0, 1)


def contrast(images: Tensor, severity: int, generator: torch.Generator | None = None) -> Tensor:
    """Contrast towards each image's per-channel mean: ``(x - m) c + m``."""
    factor = _constant(CONTRAST_FACTOR, severity)
    means = images.mean(dim=(2, 3), keepdim=True)
    return ((images - means) * factor + means).clamp_(0, 1)


def brightness(images: Tensor, severity: int, generator: torch.Generator | None = None) -> Tensor:
    """HSV value ``V = max(r, g, b)`` raised by c (clipped to 1), hue and saturation kept.

    Equal to skimage's ``hsv2rgb`` of ``rgb2hsv`` with V shifted: at fixed H and S every channel is
    proportional to V, so it scales by ``V'/V``; a black pixel (V = 0, S = 0) becomes grey V' = c.
    """
    shift = _constant(BRIGHTNESS_SHIFT, severity)
    value = images.amax(dim=1, keepdim=True)
    new_value = (value + shift).clamp(max=1.0)
    scaled = images * (new_value / value.clamp(min=torch.finfo(images.dtype).tiny))
    return torch.where(value > 0, scaled, new_value.expand_as(images)).clamp_(0, 1)


def jpeg_compression(images: Tensor, severity: int, generator: torch.Generator | None = None) -> Tensor:
    """Pillow JPEG round trip at quality c (uint8, Pillow's default 4:2:0 chroma subsampling)."""
    quality = _constant(JPEG_QUALITY, severity)
    pixels = (images.detach() * 255).round_().clamp_(0, 255).to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()
    out = np.empty_like(pixels)
    for i, image in enumerate(pixels):
        buffer = io.BytesIO()
        Image.fromarray(image).save(buffer, format="JPEG", quality=quality)
        out[i] = np.asarray(Image.open(buffer).convert("RGB"))
    return torch.from_numpy(out).to(images.device).permute(0, 3, 1, 2).to(images.dtype).div_(255)


def box_resize_matrix(size_in: int, size_out: int, device=None, dtype=torch.float32) -> Tensor:
    """(size_out, size_in) weights of Pillow's ``Image.BOX`` resampling along one axis.

    Pillow's ``precompute_coeffs``: output pixel o has centre ``(o + 0.5) s`` in input units
    (``s = size_in / size_out``); input pixel i gets weight ``box((i - centre + 0.5) / max(s, 1))``
    with ``box(t) = 1`` for ``-0.5 < t <= 0.5``, and the row is normalised.
    """
    scale = size_in / size_out
    centre = (torch.arange(size_out, dtype=torch.float64) + 0.5) * scale
    t = (torch.arange(size_in, dtype=torch.float64)[None, :] - centre[:, None] + 0.5) / max(scale, 1.0)
    weights = ((t > -0.5) & (t <= 0.5)).double()
    return (weights / weights.sum(1, keepdim=True)).to(device=device, dtype=dtype)


def pixelate(images: Tensor, severity: int, generator: torch.Generator | None = None) -> Tensor:
    """Box downsampling to ``int(H c) x int(W c)`` and box upsampling back (Pillow's ``BOX``)."""
    factor = _constant(PIXELATE_FACTOR, severity)
    h, w = images.shape[-2:]
    small_h, small_w = max(int(h * factor), 1), max(int(w * factor), 1)
    matrix = lambda n, m: box_resize_matrix(n, m, images.device, images.dtype)  # noqa: E731
    rows = matrix(small_h, h) @ matrix(h, small_h)     # (h, h): down then up along the height
    cols = matrix(small_w, w) @ matrix(w, small_w)     # (w, w)
    return (rows @ images @ cols.T).clamp_(0, 1)


CORRUPTIONS: dict[str, Corruption] = {
    "gaussian_noise": gaussian_noise,
    "shot_noise": shot_noise,
    "gaussian_blur": gaussian_blur,
    "contrast": contrast,
    "brightness": brightness,
    "jpeg_compression": jpeg_compression,
    "pixelate": pixelate,
}
RANDOM = ("gaussian_noise", "shot_noise")  # the corruptions that draw from the generator


def corrupt(images: Tensor, name: str, severity: int, generator: torch.Generator | None = None) -> Tensor:
    """``CORRUPTIONS[name](images, severity, generator)`` for (N, 3, H, W) pixel-space images in [0, 1]."""
    if name not in CORRUPTIONS:
        raise ValueError(f"unknown corruption {name!r}; valid: {', '.join(CORRUPTIONS)}")
    if images.ndim != 4 or images.shape[1] != 3 or not images.is_floating_point():
        raise ValueError(f"corruptions take float images of shape (N, 3, H, W) in [0, 1]; got "
                         f"{images.dtype} {tuple(images.shape)}")
    return CORRUPTIONS[name](images, severity, generator)


__all__ = ["CORRUPTIONS", "RANDOM", "SEVERITIES", "Corruption", "corrupt", "box_resize_matrix", *CORRUPTIONS]

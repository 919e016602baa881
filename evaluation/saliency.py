"""Does a compressed net look where its dense parent looks? (``evaluation=[saliency]``).

Compares two attribution maps of the net and its parent on the first ``samples`` test images:
gradient saliency (Simonyan et al. 2014, "Deep Inside Convolutional Networks": ``|d logit_y / d x|``,
max over colour channels) and Grad-CAM (Selvaraju et al. 2017: ``relu(sum_k alpha_k A_k)``,
``alpha_k`` the spatial mean of ``d logit_y / d A_k``) of the last convolutional stage, upsampled to
the input size. Both come from captum (``Saliency``, ``LayerGradCam``, ``LayerAttribution.interpolate``).
Per image: Spearman rank correlation of the two nets' maps and IoU of their top-``top_percent``%
pixels; reported as the mean over images. ``saliency_grid.png`` in the run folder shows a few images
with both nets' maps. Keys and formulas: docs/retention.md (Saliency).
"""
from __future__ import annotations

import copy
import logging
import math
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Callable, Iterator

import torch
from torch import Tensor, nn

from netcompress.evaluation.evaluators import register_evaluator
from netcompress.models.memory_format import cpu_channels_last_unsafe

log = logging.getLogger(__name__)

GRID_FILE = "saliency_grid.png"
UPSAMPLE_MODES = ("bilinear", "nearest")
KEY = "evaluators.saliency"


# ----- map comparison ------------------------------------------------------------------------------

def average_ranks(x: Tensor) -> Tensor:
    """Ranks 0..P-1 of each row of ``x`` (N, P), ties sharing their mean rank (as scipy.stats.rankdata)."""
    values, order = x.sort(dim=1, stable=True)
    n, p = values.shape
    position = torch.arange(p, dtype=torch.float64, device=x.device).expand(n, p)
    starts = torch.ones_like(values, dtype=torch.bool)
    starts[:, 1:] = values[:, 1:] != values[:, :-1]
    group = starts.long().cumsum(1) - 1  # id of each sorted entry's tie group
    sums = torch.zeros(n, p, dtype=torch.float64, device=x.device).scatter_add_(1, group, position)
    counts = torch.zeros(n, p, dtype=torch.float64, device=x.device).scatter_add_(1, group, torch.ones_like(position))
    mean_rank = sums.gather(1, group) / counts.gather(1, group)
    return torch.empty_like(mean_rank).scatter_(1, order, mean_rank)


def spearman(a: Tensor, b: Tensor) -> Tensor:
    """Spearman rank correlation of each pair of maps (N, ...) -> (N,): the Pearson correlation of their
    average ranks. NaN where a map is constant (its ranks have no spread)."""
    ra, rb = average_ranks(a.flatten(1).double()), average_ranks(b.flatten(1).double())
    ra, rb = ra - ra.mean(1, keepdim=True), rb - rb.mean(1, keepdim=True)
    denominator = (ra.square().sum(1) * rb.square().sum(1)).sqrt()
    return torch.where(denominator > 0, (ra * rb).sum(1) / denominator, torch.full_like(denominator, math.nan))


def top_percent_mask(maps: Tensor, top_percent: float) -> Tensor:
    """Boolean (N, P) of each map's ``ceil(top_percent% of P)`` largest pixels (ties: lower pixel index first)."""
    flat = maps.flatten(1)
    k = max(1, math.ceil(flat.shape[1] * top_percent / 100 - 1e-9))
    order = flat.sort(dim=1, descending=True, stable=True).indices[:, :k]
    return torch.zeros_like(flat, dtype=torch.bool).scatter_(1, order, True)


def top_percent_iou(a: Tensor, b: Tensor, top_percent: float) -> Tensor:
    """IoU |A & B| / |A | B| of the top-``top_percent``% pixel sets of each pair of maps (N, ...) -> (N,)."""
    ma, mb = top_percent_mask(a, top_percent), top_percent_mask(b, top_percent)
    return (ma & mb).sum(1).double() / (ma | mb).sum(1).double()


def _mean(values: Tensor) -> float:
    """Mean over the images where the figure is defined (NaN, i.e. null, if none)."""
    values = values[~values.isnan()]
    return float(values.mean()) if len(values) else math.nan


# ----- attribution maps ----------------------------------------------------------------------------

class _Features(nn.Module):
    """Calls ``net.forward_features`` as a module, so captum can hook its output (the last conv stage
    before timm's ``forward_head`` pools it). Holds the net without registering it as a child."""

    def __init__(self, net: nn.Module) -> None:
        super().__init__()
        object.__setattr__(self, "net", net)

    def forward(self, x: Tensor) -> Tensor:
        return self.net.forward_features(x)


def _last_spatial_module(net: nn.Module, probe: Tensor) -> nn.Module | None:
    """The module that finishes last in a forward pass of ``probe`` among those with a 4-D output larger
    than 1x1 (global pooling excluded); else the last with any 4-D output; None for a net without one."""
    finished: list[tuple[nn.Module, bool]] = []

    def hook(module: nn.Module, inputs: Any, output: Any) -> None:
        if isinstance(output, Tensor) and output.dim() == 4:
            finished.append((module, output.shape[2] * output.shape[3] > 1))

    handles = [m.register_forward_hook(hook) for m in net.modules() if m is not net]
    try:
        with torch.no_grad():
            net(probe)
    finally:
        for handle in handles:
            handle.remove()
    spatial = [m for m, large in finished if large]
    return spatial[-1] if spatial else (finished[-1][0] if finished else None)


def gradcam_layer(net: nn.Module, probe: Tensor, layer: str | None = None) -> tuple[Callable[[Tensor], Tensor], nn.Module, str] | None:
    """``(forward_func, layer_module, description)`` for Grad-CAM of ``net``, or None without a 4-D feature map.

    ``layer`` names a module (``net.get_submodule``); else timm's ``forward_features`` output is used when
    it is 4-D and ``forward_head(forward_features(x))`` equals ``net(x)``; else the last module with a
    4-D output larger than 1x1 (see :func:`_last_spatial_module`).
    """
    if layer is not None:
        try:
            return net, net.get_submodule(layer), layer
        except AttributeError as exc:
            raise ValueError(f"`{KEY}.layer`={layer!r} is not a module of {type(net).__name__} ({exc}); "
                             "give a name from net.named_modules(), or null to use the last conv stage") from None
    if callable(getattr(net, "forward_features", None)) and callable(getattr(net, "forward_head", None)):
        features = _Features(net)
        with torch.no_grad():
            maps = features(probe)
            if (isinstance(maps, Tensor) and maps.dim() == 4
                    and torch.allclose(net.forward_head(maps), net(probe), rtol=1e-4, atol=1e-5)):
                return (lambda x: net.forward_head(features(x))), features, "forward_features"
    module = _last_spatial_module(net, probe)
    if module is None:
        return None
    name = next((n for n, m in net.named_modules() if m is module), type(module).__name__)
    return net, module, name


def gradient_maps(net: nn.Module, inputs: Tensor, targets: Tensor) -> Tensor:
    """Simonyan et al. 2014: ``max_c |d logit_target / d x_c|`` per pixel, (N, H, W), via captum's Saliency."""
    from captum.attr import Saliency

    inputs = inputs.detach().requires_grad_(True)  # a leaf of our own (captum warns when it has to set this)
    return Saliency(net).attribute(inputs, target=targets, abs=True).amax(dim=1)


def gradcam_maps(forward_func: Callable[[Tensor], Tensor], layer: nn.Module, inputs: Tensor, targets: Tensor,
                 upsample: str = "bilinear") -> Tensor:
    """Selvaraju et al. 2017: ``relu(sum_k alpha_k A_k)`` at ``layer``, alpha_k = spatial mean of
    ``d logit_target / d A_k``, upsampled to the input's H x W, (N, H, W); captum's LayerGradCam."""
    from captum.attr import LayerAttribution, LayerGradCam

    cam = LayerGradCam(forward_func, layer).attribute(inputs, target=targets, relu_attributions=True)
    return LayerAttribution.interpolate(cam, tuple(inputs.shape[2:]), interpolate_mode=upsample)[:, 0]


@contextmanager
def _attribution_mode(nets: list[nn.Module]) -> Iterator[None]:
    """Eval mode and autograd on (even inside inference_mode/no_grad); every module's mode restored after."""
    modes = [(m, m.training) for net in nets for m in net.modules()]
    try:
        for net in nets:
            net.eval()
        with torch.inference_mode(False), torch.enable_grad():
            yield
    finally:
        for module, mode in modes:
            module.training = mode


def _device(net: nn.Module) -> torch.device:
    tensor = next(net.parameters(), None)
    return tensor.device if tensor is not None else torch.device("cpu")


def _backward_safe(net: nn.Module) -> nn.Module:
    """``net``, or a contiguous-format copy of it where a channels_last CPU backward would hit the oneDNN
    bug of models/memory_format.py (the net itself is not changed)."""
    if _device(net).type != "cpu" or not cpu_channels_last_unsafe(net):
        return net
    # strides, not is_contiguous(): a channels_last 1x1 weight counts as contiguous yet steers the conv to channels_last
    if all(p.dim() != 4 or p.stride() == torch.empty(p.shape, device="meta").stride() for p in net.parameters()):
        return net
    return copy.deepcopy(net).to(memory_format=torch.contiguous_format)


# ----- evaluator -----------------------------------------------------------------------------------

def _check_int(name: str, value: Any, low: int) -> int:
    if not isinstance(value, int) or isinstance(value, bool) or value < low:
        raise ValueError(f"`{KEY}.{name}` must be an int >= {low}; got {value!r}")
    return value


@register_evaluator("saliency")
class SaliencyRetention:
    """Gradient saliency and Grad-CAM of the net vs its parent on the first ``samples`` test images.

    Target class of every map: the image's true label. Reports ``saliency/gradient_spearman``,
    ``saliency/gradcam_spearman`` (mean per-image Spearman correlation of child and parent maps),
    ``saliency/gradient_iou``, ``saliency/gradcam_iou`` (mean IoU of their top-``top_percent``% pixels)
    and ``saliency/grid_file``. Without a parent it logs one line and draws the net's maps only.

    Args:
        samples: test images compared, the first ones in the test loader's fixed order.
        top_percent: share of pixels (in %, (0, 100]) whose IoU is taken.
        grid_images: rows of saliency_grid.png (the first images); 0 = no PNG.
        batch_size: images per attribution pass (memory only; the figures do not depend on it beyond float rounding).
        upsample: interpolation of the Grad-CAM map to the input size, bilinear or nearest.
        layer: module name of the Grad-CAM layer (net.named_modules()); null = the last conv stage
            (timm's ``forward_features`` output, else the last module with a 4-D output).
    """

    def __init__(self, samples: int = 64, top_percent: float = 10.0, grid_images: int = 8, batch_size: int = 16,
                 upsample: str = "bilinear", layer: str | None = None) -> None:
        self.samples = _check_int("samples", samples, 1)
        if not isinstance(top_percent, (int, float)) or isinstance(top_percent, bool) or not 0 < top_percent <= 100:
            raise ValueError(f"`{KEY}.top_percent` must be a number in (0, 100] (percent of pixels); got {top_percent!r}")
        self.top_percent = float(top_percent)
        self.grid_images = _check_int("grid_images", grid_images, 0)
        self.batch_size = _check_int("batch_size", batch_size, 1)
        if upsample not in UPSAMPLE_MODES:
            raise ValueError(f"`{KEY}.upsample` must be one of {', '.join(UPSAMPLE_MODES)}; got {upsample!r}")
        self.upsample = upsample
        if layer is not None and (not isinstance(layer, str) or not layer):
            raise ValueError(f"`{KEY}.layer` must be a module name (e.g. 'layer3') or null; got {layer!r}")
        self.layer = layer

    def _images(self, datamodule: Any) -> tuple[Tensor, Tensor]:
        inputs, targets, count = [], [], 0
        for batch_inputs, batch_targets in datamodule.test_dataloader():
            inputs.append(batch_inputs[: self.samples - count].detach().cpu())
            targets.append(batch_targets[: self.samples - count].detach().cpu())
            count += len(targets[-1])
            if count >= self.samples:
                break
        if not count:
            raise ValueError(f"`{KEY}`: the test loader served no image")
        return torch.cat(inputs).float().contiguous().clone(), torch.cat(targets).long().clone()

    def maps(self, net: nn.Module, inputs: Tensor, targets: Tensor) -> dict[str, Tensor]:
        """``{"gradient": (N, H, W), "gradcam": (N, H, W)}`` of ``net`` (CPU tensors; no gradcam without a
        4-D feature map). ``net`` in eval mode, autograd on."""
        device = _device(net)
        dtype = next((p.dtype for p in net.parameters() if p.is_floating_point()), inputs.dtype)
        inputs = inputs.to(dtype)
        net = _backward_safe(net)
        found = gradcam_layer(net, inputs[:1].to(device), self.layer)
        out: dict[str, list[Tensor]] = {"gradient": [], "gradcam": []}
        for start in range(0, len(inputs), self.batch_size):
            x = inputs[start:start + self.batch_size].to(device).contiguous()
            y = targets[start:start + self.batch_size].to(device)
            out["gradient"].append(gradient_maps(net, x, y).detach().float().cpu())
            if found is not None:
                out["gradcam"].append(gradcam_maps(found[0], found[1], x, y, self.upsample).detach().float().cpu())
        if found is None:
            log.info("evaluation.%s: %s has no 4-D feature map, so no Grad-CAM (gradient saliency only)",
                     self.name, type(net).__name__)
        return {key: torch.cat(value) for key, value in out.items() if value}

    def __call__(self, net: nn.Module, datamodule: Any, parent: nn.Module | None,
                 out_dir: Path | None = None) -> dict[str, Any]:
        nets = [net] if parent is None else [net, parent.to(_device(net))]
        with _attribution_mode(nets):
            inputs, targets = self._images(datamodule)  # normal tensors even if the caller is in inference mode
            child = self.maps(net, inputs, targets)
            parent_maps = self.maps(parent, inputs, targets) if parent is not None else None
        figures: dict[str, Any] = {}
        if parent_maps is None:
            log.info("evaluation.%s: child-parent comparison skipped, this run has no parent net (init_from, a KD "
                     "teacher or a protocol's dense stage); drawing the net's maps only", self.name)
        else:
            for kind in ("gradient", "gradcam"):
                if kind in child and kind in parent_maps:
                    figures[f"saliency/{kind}_spearman"] = _mean(spearman(child[kind], parent_maps[kind]))
                    figures[f"saliency/{kind}_iou"] = _mean(top_percent_iou(child[kind], parent_maps[kind],
                                                                            self.top_percent))
        if out_dir is not None and self.grid_images:
            draw_grid(Path(out_dir) / GRID_FILE, inputs[: self.grid_images], targets[: self.grid_images],
                      datamodule.mean, datamodule.std, child, parent_maps)
            figures["saliency/grid_file"] = GRID_FILE
        return figures


# ----- figure --------------------------------------------------------------------------------------

def _display(image: Tensor, mean: Any, std: Any) -> Tensor:
    """A normalised (C, H, W) image back in [0, 1] pixel space, as (H, W, 3) or (H, W)."""
    mean = torch.as_tensor(mean, dtype=image.dtype).view(-1, 1, 1)
    std = torch.as_tensor(std, dtype=image.dtype).view(-1, 1, 1)
    pixels = (image * std + mean).clamp(0, 1)
    return pixels.permute(1, 2, 0) if pixels.shape[0] == 3 else pixels.mean(0)


def _scaled(saliency: Tensor) -> Tensor:
    """A map divided by its 99th percentile and clipped to [0, 1] (a few spiky gradients would hide the rest)."""
    top = torch.quantile(saliency.flatten().double(), 0.99).item()
    return (saliency / top).clamp(0, 1) if top > 0 else torch.zeros_like(saliency)


def draw_grid(path: Path, inputs: Tensor, targets: Tensor, mean: Any, std: Any, child: dict[str, Tensor],
              parent: dict[str, Tensor] | None) -> None:
    """PNG grid: one row per image; columns image, [parent] gradient, child gradient, [parent] Grad-CAM,
    child Grad-CAM (Grad-CAM drawn over the image). Each map is scaled on its own."""
    from matplotlib.figure import Figure  # no pyplot: no global state, Agg canvas

    columns: list[tuple[str, str, dict[str, Tensor]]] = []
    for kind, title in (("gradient", "|gradient|"), ("gradcam", "Grad-CAM")):
        if parent is not None and kind in parent:
            columns.append((kind, f"parent {title}", parent))
        if kind in child:
            columns.append((kind, f"child {title}", child))
    rows = len(inputs)
    figure = Figure(figsize=(1.6 * (1 + len(columns)), 1.6 * rows + 0.4), dpi=100)
    axes = figure.subplots(rows, 1 + len(columns), squeeze=False)
    for row in range(rows):
        image = _display(inputs[row], mean, std)
        gray = "gray" if image.dim() == 2 else None
        axes[row][0].imshow(image.numpy(), cmap=gray)
        axes[row][0].set_ylabel(f"#{row} y={int(targets[row])}", fontsize=7)
        for col, (kind, title, maps) in enumerate(columns, start=1):
            ax = axes[row][col]
            if kind == "gradient":
                ax.imshow(_scaled(maps[kind][row]).numpy(), cmap="hot", vmin=0, vmax=1)
            else:
                ax.imshow(image.numpy(), cmap=gray)
                top = float(maps[kind][row].max())
                scaled = maps[kind][row] / top if top > 0 else maps[kind][row]
                ax.imshow(scaled.numpy(), cmap="jet", alpha=0.5, vmin=0, vmax=1)
            if row == 0:
                ax.set_title(title, fontsize=7)
        if row == 0:
            axes[row][0].set_title("image", fontsize=7)
    for ax in axes.flat:
        ax.set_xticks([])
        ax.set_yticks([])
    figure.tight_layout()
    figure.savefig(path, format="png")


__all__ = ["SaliencyRetention", "GRID_FILE", "average_ranks", "spearman", "top_percent_mask", "top_percent_iou",
           "gradient_maps", "gradcam_maps", "gradcam_layer", "draw_grid"]

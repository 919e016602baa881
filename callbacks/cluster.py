"""Trained weight sharing + Huffman coding: stages 2 and 3 of Deep Compression (Han, Mao & Dally,
ICLR 2016, "Deep Compression: Compressing Deep Neural Networks with Pruning, Trained
Quantization and Huffman Coding").

At epoch ``at_epoch`` every selected layer's non-zero weights are clustered by 1-D k-means
(linear init) into ``2**bits`` shared values (``compression/kmeans.py``). Then training goes on
with shared-weight gradients: in ``on_before_optimizer_step`` each weight's gradient is replaced
by its cluster's gradient (one ``index_add_`` + one gather per layer on precomputed index
tensors), so with SGD (+momentum, +weight decay) or Adam every weight of a cluster gets the
same update and stays equal to the others: the centroids train, the assignments stay. Weights
that were zero (pruned by an earlier callback) get gradient 0 and stay exactly zero.

``gradient: sum`` is the paper's rule (dL/dC_k = sum of the gradients of the weights in
cluster k: the exact gradient with respect to the shared value); ``mean`` divides by the
cluster size, i.e. the same direction with a per-cluster learning rate lr / n_k, which is
stable at ordinary learning rates. At the end of fit the real stored size is reported: Huffman
codes of the cluster indices and, for pruned layers, of the relative sparse indices
(``compression/huffman.py``), plus the codebooks.
"""
from __future__ import annotations

import math
from typing import Any, Sequence

import pytorch_lightning as pl
import torch
from torch import nn

from netcompress.compression.checks import check_int
from netcompress.compression.huffman import layer_storage_bits
from netcompress.compression.kmeans import cluster_weight
from netcompress.compression.layer_selection import select_layers
from netcompress.lightning_modules.contract import require_contract

KEY = "callbacks.cluster"
GRADIENTS = ("sum", "mean")


def _patterns(value: Any, key: str) -> list[str]:
    if isinstance(value, str) or not all(isinstance(p, str) for p in (value or ())):
        raise ValueError(f"`{key}` must be a list of module-name patterns like ['features.*']; got {value!r}")
    return list(value or ())


def _compact(labels: torch.Tensor, k: int) -> torch.Tensor:
    """Labels (values 0..k) in the smallest integer dtype, for the checkpoint."""
    dtype = torch.uint8 if k <= 255 else torch.int16 if k <= 32767 else torch.int32
    return labels.to(dtype).cpu()


class Cluster(pl.Callback):
    """k-means weight sharing with shared-weight fine-tuning, and the Deep Compression size report.

    Args:
        bits: shared values per layer = ``2**bits`` (Han et al.: 8 for conv, 5 for fc layers).
        include, exclude: module-name patterns of the Conv2d/Linear layers to cluster.
        skip_first_last: leave the stem conv and the classifier unclustered (timm pretrained_cfg).
        at_epoch: epoch at whose start the layers are clustered (0 = start of fit).
        gradient: ``sum`` (the paper) or ``mean`` of the gradients of a cluster.
        lr: learning rate of the fine-tuning phase after clustering (null = keep the optimizer's).
            The optimizer is rebuilt at clustering (fresh momentum, the schedule spans the rest).
        max_iter: Lloyd iterations at most (stops earlier when no assignment changes).
        gap_bits_conv, gap_bits_fc: width of a relative sparse index for conv / linear layers
            (Han et al.: 8 and 5); only used for layers with zeros.
    """

    # rules: pipeline/combinations.py (an entry that edits weights must be done before at_epoch)
    CAPABILITIES = frozenset({"single", "clusters_weights"})

    def __init__(self, bits: int = 5, include: Sequence[str] = ("*",), exclude: Sequence[str] = (),
                 skip_first_last: bool = True, at_epoch: int = 0, gradient: str = "sum",
                 lr: float | None = None, max_iter: int = 100, gap_bits_conv: int = 8, gap_bits_fc: int = 5) -> None:
        super().__init__()
        self.bits = check_int(bits, f"{KEY}.bits", 1, 16, "(2**bits shared values per layer)")
        self.include = _patterns(include, f"{KEY}.include")
        self.exclude = _patterns(exclude, f"{KEY}.exclude")
        if not isinstance(skip_first_last, bool):
            raise ValueError(f"`{KEY}.skip_first_last` must be true or false; got {skip_first_last!r}")
        self.skip_first_last = skip_first_last
        self.at_epoch = check_int(at_epoch, f"{KEY}.at_epoch", 0)
        if gradient not in GRADIENTS:
            raise ValueError(f"`{KEY}.gradient` must be one of {', '.join(GRADIENTS)}; got {gradient!r}")
        self.gradient = gradient
        if lr is not None and (isinstance(lr, bool) or not isinstance(lr, (int, float)) or not lr > 0):
            raise ValueError(f"`{KEY}.lr` must be a positive number or null; got {lr!r}")
        self.lr = None if lr is None else float(lr)
        self.max_iter = check_int(max_iter, f"{KEY}.max_iter", 1)
        self.gap_bits_conv = check_int(gap_bits_conv, f"{KEY}.gap_bits_conv", 1, 16)
        self.gap_bits_fc = check_int(gap_bits_fc, f"{KEY}.gap_bits_fc", 1, 16)
        self.k = 2 ** self.bits
        self._labels: dict[str, torch.Tensor] = {}  # layer name -> assignment (k = pruned), weight-shaped
        self._layers: dict[str, nn.Module] = {}
        self._counts: dict[str, torch.Tensor] = {}
        self._flat: dict[str, torch.Tensor] = {}  # flattened labels on the layer's device

    # ----- checks ------------------------------------------------------------------------------
    def _select(self, net: nn.Module) -> dict[str, nn.Module]:
        return select_layers(net, self.include, self.exclude, self.skip_first_last, key=KEY)

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        require_contract(pl_module, type(self).__name__, ('net', 'replace_net', 'report_result'))
        if stage == "fit":
            self._select(pl_module.net)  # a pattern that matches no layer fails here, before training

    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        max_epochs = trainer.max_epochs
        if trainer.fast_dev_run:
            return  # a one-step smoke run: clustering at a later epoch simply does not happen
        if not self.clustered and max_epochs is not None and max_epochs >= 0 and self.at_epoch >= max_epochs:
            raise ValueError(f"`{KEY}.at_epoch` ({self.at_epoch}) must be < trainer.max_epochs ({max_epochs}), "
                             "or the layers are never clustered")

    # ----- clustering --------------------------------------------------------------------------
    @property
    def clustered(self) -> bool:
        return bool(self._labels)

    def on_train_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if not self.clustered and trainer.current_epoch >= self.at_epoch:
            self._cluster(pl_module)
        self._bind(pl_module)

    def _cluster(self, pl_module: pl.LightningModule) -> None:
        layers = self._select(pl_module.net)
        with torch.no_grad():
            for name, layer in layers.items():
                _, labels, clustered = cluster_weight(layer.weight, self.bits, self.max_iter)
                layer.weight.copy_(clustered)
                self._labels[name] = labels
        # Fresh optimizer state: old per-weight momentum would pull the weights of a cluster apart.
        pl_module.replace_net(pl_module.net, {"lr": self.lr} if self.lr is not None else None)
        self._layers = {}

    def _bind(self, pl_module: pl.LightningModule) -> None:
        """Index tensors on the layer's device, once per fit (also after resume)."""
        if not self.clustered or self._layers:
            return
        named = dict(pl_module.net.named_modules())
        for name, labels in self._labels.items():
            layer = named.get(name)
            if layer is None or tuple(layer.weight.shape) != tuple(labels.shape):
                raise ValueError(f"{KEY}: clustered layer '{name}' is missing or changed shape; "
                                 "was the network modified after clustering?")
            self._labels[name] = labels.to(device=layer.weight.device, dtype=torch.long)
            self._flat[name] = self._labels[name].flatten()
            self._layers[name] = layer
            counts = torch.bincount(self._labels[name].flatten(), minlength=self.k + 1).to(layer.weight.dtype)
            self._counts[name] = counts.clamp(min=1)

    def on_before_optimizer_step(self, trainer: pl.Trainer, pl_module: pl.LightningModule,
                                 optimizer: torch.optim.Optimizer) -> None:
        """Every weight's gradient := its cluster's gradient (sum or mean); pruned weights get 0."""
        for name, layer in self._layers.items():
            grad = layer.weight.grad
            if grad is None:
                continue
            flat = self._flat[name]
            sums = torch.zeros(self.k + 1, dtype=grad.dtype, device=grad.device)
            sums.index_add_(0, flat, grad.reshape(-1))  # reshape: logical order, also for channels_last
            if self.gradient == "mean":
                sums = sums / self._counts[name]
            sums[self.k] = 0.0
            if grad.is_contiguous():  # gather straight into the gradient (index_select beats sums[labels])
                torch.index_select(sums, 0, flat, out=grad.view(-1))
            else:
                grad.copy_(sums.index_select(0, flat).view(grad.shape))

    # ----- report ------------------------------------------------------------------------------
    def storage(self, net: nn.Module) -> dict[str, Any]:
        """Deep Compression size figures of the clustered layers of ``net`` (bytes and ratios)."""
        named = dict(net.named_modules())
        totals = {"huffman": 0, "fixed": 0, "dense": 0}
        max_distinct, clustered_params, kept = 0, 0, 0
        for name, labels in self._labels.items():
            weight = named[name].weight.detach()
            labels = torch.where(weight == 0, torch.full_like(labels, self.k), labels.to(weight.device))
            gap_bits = self.gap_bits_conv if weight.dim() > 2 else self.gap_bits_fc
            bits = layer_storage_bits(labels, self.k, gap_bits)
            totals["huffman"] += bits["huffman_total_bits"]
            totals["fixed"] += bits["fixed_total_bits"]
            totals["dense"] += weight.numel() * 32
            clustered_params += weight.numel()
            alive = weight[weight != 0]
            kept += alive.numel()
            max_distinct = max(max_distinct, int(torch.unique(alive).numel()))
        all_params = sum(p.numel() for p in net.parameters())
        other_bytes = 4 * (all_params - clustered_params)  # unclustered parameters stay fp32
        huffman_bytes = math.ceil(totals["huffman"] / 8)
        fixed_bytes = math.ceil(totals["fixed"] / 8)
        dense_bytes = totals["dense"] // 8
        return {
            "compress/cluster_bits": self.bits,
            "compress/cluster_layers": len(self._labels),
            "compress/cluster_max_distinct": max_distinct,
            "compress/cluster_density": kept / max(1, clustered_params),
            "compress/dense_bytes": dense_bytes,
            "compress/fixed_bytes": fixed_bytes,
            "compress/huffman_bytes": huffman_bytes,
            "compress/ratio_fixed": dense_bytes / max(1, fixed_bytes),
            "compress/ratio": dense_bytes / max(1, huffman_bytes),
            "compress/ratio_total": 4 * all_params / max(1, huffman_bytes + other_bytes),
        }

    def on_fit_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self.clustered and trainer.is_global_zero:
            for key, value in self.storage(pl_module.net).items():
                pl_module.report_result(key, value)

    # ----- resume --------------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        return {"bits": self.bits, "labels": {n: _compact(l, self.k) for n, l in self._labels.items()}}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        if state_dict.get("labels") and state_dict.get("bits") != self.bits:
            raise ValueError(f"the checkpoint was clustered with {KEY}.bits={state_dict.get('bits')}, "
                             f"this run has {self.bits}")
        self._labels = {n: l.long() for n, l in state_dict.get("labels", {}).items()}
        self._layers = {}

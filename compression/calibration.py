"""Calibration passes for the data-driven importance criteria of ``compression.importance``.

``activation`` (mean |z|) and ``apoz`` (1 - average percentage of zeros, Hu et al. 2016 "Network
Trimming") need forward passes over training batches, ``taylor`` (|w * dL/dw|, Molchanov et al.
2019 "Importance Estimation for Neural Network Pruning") a backward pass too, and ``random``
(ShrinkBench, Blalock et al. 2020) a seed. ``calibrated(...)`` runs them and makes the statistics
visible to the criteria's ``fn(module)`` for the duration of its ``with`` block:

    with calibrated(net, layers, "taylor", loader, batches=8):
        masks = structured_masks(layers, 0.5, importance="taylor")

What is observed, per selected layer L (Conv/Linear, or a BatchNorm for slimming):
* z = the output of the BatchNorm that directly consumes L's output (timm's conv-BN-act), else L's
  own output (a BatchNorm layer: its own output; a fused BatchNormAct: the input of its act).
  ``activation`` = mean |z| per channel over samples and positions.
* the activation module that directly consumes z (found by tensor identity during the pass);
  ``apoz`` counts its zero outputs and needs it to be a ReLU / ReLU6 (a residual add or a
  functional relu in between is refused, naming the layer: exclude it).
* ``taylor``: G = sum over the batches of each batch's gradient of the mean cross-entropy;
  the statistic is w * G (BN: gamma * G_gamma + beta * G_beta per channel).

The passes run in eval mode (BatchNorm running statistics and dropout untouched), at most
``batches`` batches, no optimizer step; gradients come from ``torch.autograd.grad``, so the
parameters' ``.grad`` are never touched. Under multi-process DDP the sums are all-reduced, so
every process builds the same masks.
"""
from __future__ import annotations

import hashlib
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Iterator, Mapping

import torch
import torch.nn.functional as F
from torch import nn

from netcompress.compression.checks import check_int
from netcompress.compression.importance import CALIBRATION, check_applies, get_criterion

# modules that end the chain layer -> [BN] -> activation; ZERO_ACTIVATIONS are those whose zeros APoZ counts
ACTIVATIONS = (nn.ReLU, nn.ReLU6, nn.Hardtanh, nn.LeakyReLU, nn.PReLU, nn.ELU, nn.CELU, nn.SELU, nn.GELU, nn.SiLU,
               nn.Mish, nn.Hardswish, nn.Hardsigmoid, nn.Sigmoid, nn.Tanh, nn.Softplus)
ZERO_ACTIVATIONS = (nn.ReLU, nn.ReLU6)
_NORMS = (nn.modules.batchnorm._BatchNorm,)


def train_batches(trainer: Any) -> Iterable:
    """The training batches of a (Lightning) trainer: its datamodule's train_dataloader(), else the
    trainer's own train dataloader (duck-typed: this layer does not import Lightning)."""
    datamodule = getattr(trainer, "datamodule", None)
    if datamodule is not None:
        return datamodule.train_dataloader()
    loader = getattr(trainer, "train_dataloader", None)
    if loader is None:
        raise ValueError("a data-driven importance criterion needs training batches, but the trainer has no "
                         "datamodule or train dataloader")
    return loader


def _channels(module: nn.Module) -> int:
    return module.num_features if isinstance(module, _NORMS) else module.weight.shape[0]


def _per_channel(t: torch.Tensor, layer: nn.Module) -> torch.Tensor:
    """``t`` as [channels, everything else]: channels on the last dim for Linear, on dim 1 otherwise."""
    dim = t.dim() - 1 if isinstance(layer, nn.Linear) else 1
    if t.dim() < 2 or t.shape[dim] != _channels(layer):
        raise ValueError(f"calibration: a {type(layer).__name__} with {_channels(layer)} channels produced an "
                         f"output of shape {tuple(t.shape)}")
    return t.detach().movedim(dim, 0).reshape(t.shape[dim], -1).float()


@dataclass
class _Observed:
    """What one selected layer's calibration saw: its BN, its activation module, running sums."""

    layer: nn.Module
    norm: nn.Module | None = None
    act: nn.Module | None = None
    sums: dict[str, torch.Tensor] = field(default_factory=dict)  # "own", "norm", "nonzero" -> [C] sums
    counts: dict[str, int] = field(default_factory=dict)  # entries per channel behind each sum

    def add(self, key: str, values: torch.Tensor, count: int) -> None:
        self.sums[key] = self.sums[key] + values if key in self.sums else values
        self.counts[key] = self.counts.get(key, 0) + count


class _Tracker:
    """Forward hooks that follow each selected layer's output into its BN and activation (by tensor
    identity within one pass) and accumulate the per-channel statistics."""

    def __init__(self, net: nn.Module, layers: Mapping[str, nn.Module], apoz: bool) -> None:
        self.observed = {name: _Observed(layer) for name, layer in layers.items()}
        self.by_layer = {id(o.layer): o for o in self.observed.values()}
        self.apoz = apoz
        self.live: list[tuple[torch.Tensor, _Observed, str]] = []  # (tensor, layer, "own" | "norm") this pass
        self.serving: dict[int, list[_Observed]] = {}  # activation module id -> the layers whose z it consumes
        self.fused: dict[int, _Observed] = {}  # id of a fused BatchNormAct's act -> its layer
        self.handles = []
        for module in {id(m): m for m in layers.values()}.values():
            self.handles.append(module.register_forward_hook(self._layer_output))
        for module in net.modules():
            if isinstance(module, _NORMS + ACTIVATIONS):
                self.handles.append(module.register_forward_pre_hook(self._consumer_input))
                self.handles.append(module.register_forward_hook(self._consumer_output))

    def remove(self) -> None:
        for handle in self.handles:
            handle.remove()

    def new_pass(self) -> None:
        self.live, self.serving, self.fused = [], {}, {}

    def _accumulate(self, observed: _Observed, key: str, t: torch.Tensor) -> None:
        flat = _per_channel(t, observed.layer)
        observed.add(key, flat.abs().sum(1), flat.shape[1])

    def _layer_output(self, module: nn.Module, inputs: tuple, output: Any) -> None:
        if not isinstance(output, torch.Tensor):
            return
        observed = self.by_layer[id(module)]
        self.live.append((output, observed, "own"))
        self._accumulate(observed, "own", output)

    def _source(self, tensor: Any) -> tuple[_Observed, str] | None:
        for live, observed, stage in self.live:
            if live is tensor:
                return observed, stage
        return None

    def _consumer_input(self, module: nn.Module, inputs: tuple) -> None:
        if not inputs or not isinstance(inputs[0], torch.Tensor):
            return
        fused = self.fused.pop(id(module), None)
        if fused is not None:  # the act inside a fused BatchNormAct: its input is z
            self._accumulate(fused, "norm", inputs[0])
            self._serve(module, fused)
            return
        found = self._source(inputs[0])
        if found is None:
            return
        observed, stage = found
        if isinstance(module, _NORMS):
            if stage == "own" and module is not observed.layer and not isinstance(observed.layer, _NORMS) \
                    and module.num_features == _channels(observed.layer):
                observed.norm = module
                act = getattr(module, "act", None)  # timm BatchNormAct2d: BN + act in one module
                if isinstance(act, ACTIVATIONS):
                    self.fused[id(act)] = observed
                else:
                    self.serving.setdefault(id(module), []).append(observed)  # its output: z
        elif isinstance(module, ACTIVATIONS):
            self._serve(module, observed)

    def _serve(self, act: nn.Module, observed: _Observed) -> None:
        observed.act = act
        self.serving.setdefault(id(act), []).append(observed)

    def _consumer_output(self, module: nn.Module, inputs: tuple, output: Any) -> None:
        waiting = self.serving.pop(id(module), None)
        if not waiting or not isinstance(output, torch.Tensor):
            return
        for observed in waiting:
            if isinstance(module, _NORMS):  # the BN after the layer: its output is z
                self.live.append((output, observed, "norm"))
                self._accumulate(observed, "norm", output)
            elif self.apoz:  # the activation consuming z: count its non-zero outputs
                flat = _per_channel(output, observed.layer)
                observed.add("nonzero", (flat != 0).sum(1).float(), flat.shape[1])


def _all_reduce_(tensors: list[torch.Tensor]) -> None:
    """Sum over the processes of a multi-process run (identity otherwise), so all build the same masks."""
    if torch.distributed.is_available() and torch.distributed.is_initialized() \
            and torch.distributed.get_world_size() > 1:
        for t in tensors:
            torch.distributed.all_reduce(t)


def memory_format(net: nn.Module) -> torch.memory_format:
    """The format the net's 4-d weights are in: inputs are passed in it, as the training step does
    (a channels_last batch into a contiguous net can hit the oneDNN crash of models/memory_format.py)."""
    for p in net.parameters():
        if p.dim() == 4 and not p.is_contiguous() and p.is_contiguous(memory_format=torch.channels_last):
            return torch.channels_last
    return torch.contiguous_format


def _inputs(batch: Any, device: torch.device, fmt: torch.memory_format) -> tuple[torch.Tensor, Any]:
    if isinstance(batch, (tuple, list)) and batch and isinstance(batch[0], torch.Tensor):
        target = batch[1].to(device) if len(batch) > 1 and isinstance(batch[1], torch.Tensor) else None
        inputs = batch[0]
    elif isinstance(batch, torch.Tensor):
        inputs, target = batch, None
    else:
        raise TypeError(f"calibration expects (inputs, targets) batches; got a {type(batch).__name__}")
    inputs = inputs.to(device)
    return (inputs.contiguous(memory_format=fmt) if inputs.dim() == 4 else inputs), target


def _taylor_params(layer: nn.Module) -> list[torch.Tensor]:
    """The parameters whose w * G the Taylor criterion sums: the weight; on a BN also beta (its gate)."""
    params = [layer.weight]
    if isinstance(layer, _NORMS) and layer.bias is not None:
        params.append(layer.bias)
    return params


@contextmanager
def _eval_pass(net: nn.Module, params: list[torch.Tensor]) -> Iterator[None]:
    """The net in eval mode with ``params`` requiring grad inside the block; modes and flags restored after."""
    modes = {m: m.training for m in net.modules()}
    wanted = [p.requires_grad for p in params]
    net.eval()
    try:
        for p in params:
            p.requires_grad_(True)
        yield
    finally:
        for p, flag in zip(params, wanted):
            p.requires_grad_(flag)
        for m, mode in modes.items():
            m.training = mode


def _limited(loader: Iterable, batches: int, criterion: str) -> Iterator[Any]:
    """At most ``batches`` batches of ``loader``, stopping before it makes one more; ValueError if it gives none."""
    if loader is None:
        raise ValueError(f"importance={criterion!r} needs training batches to calibrate on; got no loader")
    seen = 0
    for batch in loader:
        yield batch
        seen += 1
        if seen >= batches:
            return
    if seen == 0:
        raise ValueError(f"importance={criterion!r}: the training loader gave no batch to calibrate on")


def loss_gradients(net: nn.Module, params: list[torch.Tensor], criterion: str, loader: Iterable, batches: int,
                   loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] = F.cross_entropy
                   ) -> list[torch.Tensor]:
    """G per parameter of ``params``: the sum over at most ``batches`` batches of each batch's gradient of
    ``loss_fn`` (eval mode, ``torch.autograd.grad``: ``.grad`` untouched), all-reduced under DDP."""
    device, fmt = next(net.parameters()).device, memory_format(net)
    grads = [torch.zeros_like(p, dtype=torch.float32) for p in params]
    with _eval_pass(net, params):
        for batch in _limited(loader, batches, criterion):
            inputs, target = _inputs(batch, device, fmt)
            if target is None:
                raise TypeError(f"importance={criterion!r} needs (inputs, targets) batches for its loss")
            with torch.inference_mode(False), torch.enable_grad():  # also from an eval hook
                loss = loss_fn(net(inputs), target)
                got = torch.autograd.grad(loss, params, allow_unused=True)
            for total, g in zip(grads, got):
                if g is not None:
                    total.add_(g.float())
    _all_reduce_(grads)
    return grads


def collect(net: nn.Module, layers: Mapping[str, nn.Module], criterion: str, loader: Iterable, batches: int,
            loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] = F.cross_entropy,
            key: str = "calibration_batches") -> dict[nn.Module, dict[str, torch.Tensor]]:
    """{layer: {statistic: tensor}} of a data-driven ``criterion`` from at most ``batches`` batches."""
    crit = get_criterion(criterion)
    batches = check_int(batches, key, 1)
    if crit.needs_grad:
        params = [p for layer in layers.values() for p in _taylor_params(layer)]
        grads = loss_gradients(net, params, criterion, loader, batches, loss_fn)
        out, i = {}, 0
        for layer in layers.values():
            n = len(_taylor_params(layer))
            pairs = zip(_taylor_params(layer), grads[i:i + n])
            out[layer] = {"taylor": sum(p.detach().float() * g for p, g in pairs)}
            i += n
        return out
    device, fmt = next(net.parameters()).device, memory_format(net)
    tracker = _Tracker(net, layers, apoz=criterion == "apoz")
    try:
        with _eval_pass(net, []):
            for batch in _limited(loader, batches, criterion):
                inputs, _ = _inputs(batch, device, fmt)
                tracker.new_pass()
                with torch.no_grad():
                    net(inputs)
    finally:
        tracker.remove()
    return _finish(tracker, criterion)


def _finish(tracker: _Tracker, criterion: str) -> dict[nn.Module, dict[str, torch.Tensor]]:
    missing = [n for n, o in tracker.observed.items() if "own" not in o.sums]
    if missing:
        raise ValueError(f"importance={criterion!r}: layers {missing} produced no tensor output during calibration")
    if criterion == "apoz":
        bad = {n: (type(o.act).__name__ if o.act is not None else "no activation module")
               for n, o in tracker.observed.items() if not isinstance(o.act, ZERO_ACTIVATIONS)}
        if bad:
            listed = ", ".join(f"'{n}' ({what})" for n, what in list(bad.items())[:8])
            raise ValueError(f"importance='apoz' counts the zeros of the ReLU that directly follows each layer (after "
                             f"its BatchNorm), but {len(bad)} selected layers have none: {listed}; exclude them "
                             "(e.g. the last conv of a residual block, whose ReLU comes after the add) or use "
                             "importance=activation")
    keys = ["norm" if "norm" in o.sums else "own" for o in tracker.observed.values()]
    sums = [o.sums[k] for o, k in zip(tracker.observed.values(), keys)]
    counts = [torch.tensor(float(o.counts[k]), device=s.device) for o, k, s in zip(tracker.observed.values(), keys,
                                                                                    sums)]
    nonzero = [o.sums["nonzero"] for o in tracker.observed.values()] if criterion == "apoz" else []
    nz_counts = [torch.tensor(float(o.counts["nonzero"]), device=s.device)
                 for o, s in zip(tracker.observed.values(), nonzero)]
    _all_reduce_(sums + counts + nonzero + nz_counts)
    out = {}
    for i, o in enumerate(tracker.observed.values()):
        stats = {"activation": sums[i] / counts[i]}
        if criterion == "apoz":
            stats["apoz"] = nonzero[i] / nz_counts[i]  # 1 - APoZ: the fraction of non-zero outputs
        out[o.layer] = stats
    return out


def random_draws(layers: Mapping[str, nn.Module], seed: int, key: str = "seed") -> dict[nn.Module, dict]:
    """Uniform draws per weight and per filter, from a generator seeded by (``seed``, layer name): the same
    seed and layer give the same draws whatever else is selected."""
    seed = check_int(seed, key, 0)
    out = {}
    for name, layer in layers.items():
        # the CPU generator keeps 32 bits of its seed: hash (seed, name) into them
        digest = hashlib.sha256(f"{seed}/{name}".encode()).digest()
        generator = torch.Generator().manual_seed(int.from_bytes(digest[:4], "little"))
        weight = layer.weight
        out[layer] = {"random": torch.rand(weight.shape, generator=generator).to(weight.device),
                      "random_filter": torch.rand(weight.shape[0], generator=generator).to(weight.device)}
    return out


@contextmanager
def calibrated(net: nn.Module, layers: Mapping[str, nn.Module], criterion: str, loader: Iterable | None = None,
               batches: int = 8, seed: int = 0,
               loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] = F.cross_entropy,
               key: str = "calibration_batches", seed_key: str = "seed") -> Iterator[dict]:
    """Inside the block, ``criterion`` can score ``layers`` (name -> module of ``net``): the statistics
    of at most ``batches`` batches of ``loader`` (data-driven criteria) or the draws of ``seed``
    (random); a no-op for the criteria that need neither. Yields {layer: {statistic: tensor}}."""
    crit = get_criterion(criterion)
    if not crit.calibrated:
        yield {}
        return
    if not layers:
        raise ValueError(f"importance={criterion!r}: no layers selected to calibrate")
    check_applies(criterion, layers)
    if crit.dependency_group:
        from netcompress.compression.group_importance import group_stats

        params = [p for p in net.parameters() if p.is_floating_point()]
        grads = loss_gradients(net, params, criterion, loader, check_int(batches, key, 1), loss_fn) \
            if crit.needs_grad else None
        example = None if loader is None else \
            _inputs(next(iter(loader)), next(net.parameters()).device, memory_format(net))[0][:1]
        stats = group_stats(net, layers, criterion, dict(zip(params, grads)) if grads is not None else None, example)
    elif crit.needs_data:
        stats = collect(net, layers, criterion, loader, batches, loss_fn, key)
    else:
        stats = random_draws(layers, seed, seed_key)
    for layer, values in stats.items():
        CALIBRATION[layer] = values
    try:
        yield stats
    finally:
        for layer in stats:
            CALIBRATION.pop(layer, None)

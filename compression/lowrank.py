"""Low-rank factorisation of Linear and Conv2d layers by truncated SVD.

A Linear ``W`` (out x in) becomes ``Linear(in, r) -> Linear(r, out)`` with ``W ~ U_r S_r V_r^T``
(Denton et al. 2014, "Exploiting Linear Structure Within Convolutional Networks for Efficient
Evaluation"; Xue et al. 2013 for fully connected layers). A Conv2d ``W`` (out x in x kh x kw)
is unfolded to out x (in*kh*kw) and becomes ``Conv2d(in, r, k x k, stride, padding) ->
Conv2d(r, out, 1 x 1)``, the channel-decomposition of Zhang et al. 2016 ("Accelerating Very
Deep Convolutional Networks", a rank-r pair) without their nonlinear refinement. The singular
values are split as sqrt(S) into both factors so they have similar scales for fine-tuning.

The rank is either fixed or the smallest that keeps a fraction ``energy`` of sum(s_i^2).
The two new module types expose ``netcompress_spec()`` and register builders with
``models.serialization`` so a saved model.pt or checkpoint rebuilds them in a fresh process.
"""
from __future__ import annotations

from typing import Any

import torch
from torch import nn

from netcompress.models.serialization import register_module_builder


def rank_for_energy(singular_values: torch.Tensor, energy: float) -> int:
    """Smallest r with sum(s[:r]^2) >= energy * sum(s^2) (at least 1)."""
    power = singular_values.double().pow(2)
    kept = torch.cumsum(power, 0) / power.sum().clamp(min=1e-300)
    return int(min(len(power), int(torch.searchsorted(kept, torch.tensor(energy, dtype=kept.dtype) - 1e-12)) + 1))


def matrix_of(layer: nn.Module) -> torch.Tensor:
    """The layer's weight as an out x (everything else) matrix."""
    return layer.weight.detach().flatten(1)


def factorise(matrix: torch.Tensor, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(A [out x r], B [r x in]) with A @ B the best rank-r approximation (Eckart-Young)."""
    u, s, vh = torch.linalg.svd(matrix.double(), full_matrices=False)
    root = s[:rank].sqrt()
    return (u[:, :rank] * root).to(matrix.dtype), (root[:, None] * vh[:rank]).to(matrix.dtype)


class LowRankLinear(nn.Sequential):
    """Linear(in, r, no bias) -> Linear(r, out): a rank-r Linear layer."""

    def __init__(self, in_features: int, out_features: int, rank: int, bias: bool = True) -> None:
        super().__init__(nn.Linear(in_features, rank, bias=False), nn.Linear(rank, out_features, bias=bias))

    def netcompress_spec(self) -> dict[str, Any]:
        first, second = self[0], self[1]
        return {"type": "low_rank_linear", "in_features": first.in_features, "out_features": second.out_features,
                "rank": first.out_features, "bias": second.bias is not None}


class LowRankConv2d(nn.Sequential):
    """Conv2d(in, r, k x k, stride, padding, no bias) -> Conv2d(r, out, 1 x 1): a rank-r conv."""

    def __init__(self, in_channels: int, out_channels: int, rank: int, kernel_size, stride=1, padding=0,
                 dilation=1, bias: bool = True, padding_mode: str = "zeros") -> None:
        super().__init__(
            nn.Conv2d(in_channels, rank, _pair(kernel_size), stride=_pair(stride),
                      padding=padding if isinstance(padding, str) else _pair(padding),
                      dilation=_pair(dilation), bias=False, padding_mode=padding_mode),
            nn.Conv2d(rank, out_channels, 1, bias=bias),
        )

    def netcompress_spec(self) -> dict[str, Any]:
        first, second = self[0], self[1]
        return {"type": "low_rank_conv2d", "in_channels": first.in_channels, "out_channels": second.out_channels,
                "rank": first.out_channels, "kernel_size": list(first.kernel_size), "stride": list(first.stride),
                "padding": first.padding if isinstance(first.padding, str) else list(first.padding),
                "dilation": list(first.dilation), "bias": second.bias is not None,
                "padding_mode": first.padding_mode}


def _pair(value) -> tuple:
    return tuple(value) if isinstance(value, (list, tuple)) else (value, value)


def _build(spec: dict[str, Any]) -> nn.Module:
    spec = dict(spec)
    kind = spec.pop("type")
    return LowRankLinear(**spec) if kind == "low_rank_linear" else LowRankConv2d(**spec)


register_module_builder("low_rank_linear", _build)
register_module_builder("low_rank_conv2d", _build)


def full_rank(layer: nn.Module) -> int:
    out, rest = matrix_of(layer).shape
    return min(out, rest)


def decomposable(layer: nn.Module) -> bool:
    """Linear layers and ungrouped Conv2d layers (depthwise/grouped convs are left alone)."""
    return isinstance(layer, nn.Linear) or (isinstance(layer, nn.Conv2d) and layer.groups == 1)


def decompose(layer: nn.Module, rank: int) -> nn.Sequential:
    """The rank-``rank`` replacement of a Linear or Conv2d layer (same device and dtype)."""
    if not decomposable(layer):
        raise ValueError(f"only Linear and ungrouped Conv2d layers can be decomposed; got {layer}")
    if not 1 <= rank <= full_rank(layer):
        raise ValueError(f"rank must be in 1..{full_rank(layer)} for {layer}; got {rank}")
    a, b = factorise(matrix_of(layer), rank)
    bias = layer.bias is not None
    if isinstance(layer, nn.Linear):
        new = LowRankLinear(layer.in_features, layer.out_features, rank, bias)
    else:
        new = LowRankConv2d(layer.in_channels, layer.out_channels, rank, layer.kernel_size, layer.stride,
                            layer.padding, layer.dilation, bias, layer.padding_mode)
    new = new.to(device=layer.weight.device, dtype=layer.weight.dtype)
    with torch.no_grad():
        new[0].weight.copy_(b.view_as(new[0].weight))
        new[1].weight.copy_(a.view_as(new[1].weight))
        if bias:
            new[1].bias.copy_(layer.bias)
    return new


def params_of(layer: nn.Module, rank: int | None = None) -> int:
    """Weight + bias parameters of the layer, or of its rank-``rank`` replacement."""
    out, rest = matrix_of(layer).shape
    bias = out if layer.bias is not None else 0
    if rank is None:
        return out * rest + bias
    return rank * rest + out * rank + bias  # rest = in (Linear) or in*kh*kw (Conv2d)


def choose_rank(layer: nn.Module, rank: int | None, energy: float | None) -> int:
    """The fixed rank (capped at full rank), or the energy rank from the layer's singular values."""
    if rank is not None:
        return min(rank, full_rank(layer))
    singular_values = torch.linalg.svdvals(matrix_of(layer).double())
    return rank_for_energy(singular_values, energy)


def set_submodule(net: nn.Module, name: str, module: nn.Module) -> None:
    parent_name, _, leaf = name.rpartition(".")
    setattr(net.get_submodule(parent_name) if parent_name else net, leaf, module)

"""Sparse storage of pruned weights: bitmask and CSR encodings, and the bytes each takes.

Unstructured pruning (Han et al. 2016, "Deep Compression", section 2: relative-index sparse
storage) only saves memory if the zeros are not stored. Two simple, exact encodings:

* bitmask: one bit per entry (packed to uint8) + the non-zero values;
* CSR over the tensor viewed as ``[rows = shape[0], cols = rest]``: values, int32 column
  indices, int32 row pointers.

``encode``/``decode`` round-trip exactly; ``storage_bytes`` gives the size of a state_dict
stored each way (dense tensors that gain nothing from sparsity are counted dense).
"""
from __future__ import annotations

from typing import Mapping

import torch

FORMATS = ("bitmask", "csr")
_INDEX_BYTES = 4  # int32 indices


def encode_bitmask(tensor: torch.Tensor) -> dict[str, torch.Tensor]:
    """{"bits": packed uint8 (1 = non-zero), "values": non-zero entries, "shape"}."""
    flat = tensor.detach().flatten().cpu()
    nonzero = flat != 0
    padded = torch.zeros((flat.numel() + 7) // 8 * 8, dtype=torch.uint8)
    padded[: flat.numel()] = nonzero.to(torch.uint8)
    weights = torch.tensor([128, 64, 32, 16, 8, 4, 2, 1], dtype=torch.uint8)
    bits = (padded.view(-1, 8) * weights).sum(1).to(torch.uint8)
    return {"bits": bits, "values": flat[nonzero].clone(), "shape": torch.tensor(tensor.shape)}


def decode_bitmask(encoded: Mapping[str, torch.Tensor]) -> torch.Tensor:
    shape = tuple(int(s) for s in encoded["shape"])
    numel = 1
    for s in shape:
        numel *= s
    shifts = torch.tensor([7, 6, 5, 4, 3, 2, 1, 0], dtype=torch.uint8)
    bits = ((encoded["bits"].unsqueeze(1) >> shifts) & 1).flatten()[:numel].bool()
    out = torch.zeros(numel, dtype=encoded["values"].dtype)
    out[bits] = encoded["values"]
    return out.view(shape)


def encode_csr(tensor: torch.Tensor) -> dict[str, torch.Tensor]:
    """CSR of the tensor viewed as [shape[0], -1] with int32 indices."""
    matrix = tensor.detach().cpu().reshape(tensor.shape[0], -1) if tensor.dim() > 1 else tensor.detach().cpu()[None]
    csr = matrix.to_sparse_csr()
    return {"values": csr.values(), "col_indices": csr.col_indices().to(torch.int32),
            "crow_indices": csr.crow_indices().to(torch.int32), "shape": torch.tensor(tensor.shape)}


def decode_csr(encoded: Mapping[str, torch.Tensor]) -> torch.Tensor:
    shape = tuple(int(s) for s in encoded["shape"])
    rows = shape[0] if len(shape) > 1 else 1
    numel = 1
    for s in shape:
        numel *= s
    cols = numel // rows
    csr = torch.sparse_csr_tensor(encoded["crow_indices"].long(), encoded["col_indices"].long(),
                                  encoded["values"], size=(rows, cols))
    return csr.to_dense().view(shape)


def tensor_bytes(tensor: torch.Tensor, fmt: str) -> int:
    """Bytes of ``tensor`` stored as ``fmt`` ("dense", "bitmask" or "csr"), the smaller of it and dense."""
    dense = tensor.numel() * tensor.element_size()
    if fmt == "dense" or tensor.dim() == 0 or not tensor.is_floating_point():
        return dense
    nnz = int(torch.count_nonzero(tensor))
    if fmt == "bitmask":
        size = (tensor.numel() + 7) // 8 + nnz * tensor.element_size()
    else:
        rows = tensor.shape[0] if tensor.dim() > 1 else 1
        size = nnz * (tensor.element_size() + _INDEX_BYTES) + (rows + 1) * _INDEX_BYTES
    return min(dense, size)


def storage_bytes(state_dict: Mapping[str, torch.Tensor], fmt: str) -> int:
    """Total bytes of the tensors of ``state_dict`` stored as ``fmt`` (headers not counted)."""
    if fmt not in ("dense", *FORMATS):
        raise ValueError(f"storage format must be one of dense, {', '.join(FORMATS)}; got {fmt!r}")
    return sum(tensor_bytes(t, fmt) for t in state_dict.values())

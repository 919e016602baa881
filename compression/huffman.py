"""Huffman coding of integer symbol streams: the last stage of Deep Compression (Han et al. 2016,
"Deep Compression: Compressing Deep Neural Networks with Pruning, Trained Quantization and
Huffman Coding", section 4), used to report the real stored size of cluster indices and sparse
index gaps.

Codes are built from symbol counts with a heap (``heapq``), made canonical (sorted by length,
then symbol) so the decoder needs only each symbol's code length: the codebook is stored as one
byte (the code length) per alphabet symbol. Encoding is vectorised with numpy (bit extraction +
``packbits``); decoding walks the bit string (used to prove that the size we report is a real,
decodable stream, not for speed).
"""
from __future__ import annotations

import heapq
from typing import Mapping, Sequence

import numpy as np
import torch

CODEBOOK_BITS_PER_SYMBOL = 8  # one byte per alphabet symbol: its canonical code length (0 = unused)


def code_lengths(counts: Sequence[int] | np.ndarray) -> dict[int, int]:
    """Huffman code length of every symbol with a non-zero count (symbol = index into ``counts``).

    A stream with a single distinct symbol still needs one bit per symbol. Ties are broken by a
    running counter, so the result is deterministic.
    """
    counts = np.asarray(counts, dtype=np.int64)
    if counts.ndim != 1 or (counts < 0).any():
        raise ValueError("counts must be a 1-D array of non-negative integers")
    present = [int(s) for s in np.flatnonzero(counts)]
    if not present:
        return {}
    if len(present) == 1:
        return {present[0]: 1}
    # Heap items: (count, tie-break, node). Nodes 0..n-1 are leaves; each merge creates a parent
    # node, so a symbol's code length is the depth of its leaf (parents are created after children).
    heap = [(int(counts[s]), i, i) for i, s in enumerate(present)]
    heapq.heapify(heap)
    parent: list[int] = [-1] * len(present)
    while len(heap) > 1:
        c1, _, n1 = heapq.heappop(heap)
        c2, _, n2 = heapq.heappop(heap)
        node = len(parent)
        parent.append(-1)
        parent[n1] = parent[n2] = node
        heapq.heappush(heap, (c1 + c2, node, node))
    depth = [0] * len(parent)
    for node in range(len(parent) - 2, -1, -1):  # the root is the last node, depth 0
        depth[node] = depth[parent[node]] + 1
    lengths = {s: depth[i] for i, s in enumerate(present)}
    return lengths


def canonical_codes(lengths: Mapping[int, int]) -> dict[int, tuple[int, int]]:
    """Canonical Huffman codes ``{symbol: (code, length)}`` from code lengths alone."""
    codes: dict[int, tuple[int, int]] = {}
    code, previous = 0, 0
    for symbol, length in sorted(lengths.items(), key=lambda item: (item[1], item[0])):
        code <<= length - previous
        codes[symbol] = (code, length)
        code += 1
        previous = length
    return codes


def encoded_bits(counts: Sequence[int] | np.ndarray) -> int:
    """Bits of the Huffman-coded stream: sum over symbols of count x code length."""
    counts = np.asarray(counts, dtype=np.int64)
    return int(sum(int(counts[s]) * length for s, length in code_lengths(counts).items()))


def codebook_bits(alphabet_size: int) -> int:
    """Bits to store a canonical codebook: one code length byte per alphabet symbol."""
    return CODEBOOK_BITS_PER_SYMBOL * int(alphabet_size)


def encode(symbols: Sequence[int] | np.ndarray, alphabet_size: int | None = None
           ) -> tuple[bytes, int, dict[int, tuple[int, int]]]:
    """Huffman-encode ``symbols`` (ints in [0, alphabet_size)); returns (bytes, n_bits, codes)."""
    symbols = np.asarray(symbols, dtype=np.int64).ravel()
    size = int(alphabet_size if alphabet_size is not None else (symbols.max() + 1 if symbols.size else 0))
    if symbols.size and (symbols.min() < 0 or symbols.max() >= size):
        raise ValueError(f"symbols must lie in [0, {size}); got min {symbols.min()}, max {symbols.max()}")
    codes = canonical_codes(code_lengths(np.bincount(symbols, minlength=size)))
    if not symbols.size:
        return b"", 0, codes
    table_code = np.zeros(size, dtype=np.int64)
    table_len = np.zeros(size, dtype=np.int64)
    for s, (c, n) in codes.items():
        table_code[s], table_len[s] = c, n
    lens = table_len[symbols]
    total = int(lens.sum())
    owner = np.repeat(np.arange(symbols.size), lens)          # which symbol each output bit belongs to
    starts = np.cumsum(lens) - lens
    position = np.arange(total) - starts[owner]                # bit position inside that symbol's code
    bits = (table_code[symbols][owner] >> (lens[owner] - 1 - position)) & 1
    return np.packbits(bits.astype(np.uint8)).tobytes(), total, codes


def decode(data: bytes, n_bits: int, codes: Mapping[int, tuple[int, int]]) -> np.ndarray:
    """Inverse of :func:`encode`: the symbol array back from the bytes and the codes."""
    lookup = {(length, code): symbol for symbol, (code, length) in codes.items()}
    bits = np.unpackbits(np.frombuffer(data, dtype=np.uint8))[:n_bits]
    out, code, length = [], 0, 0
    for bit in bits.tolist():
        code = (code << 1) | bit
        length += 1
        symbol = lookup.get((length, code))
        if symbol is not None:
            out.append(symbol)
            code, length = 0, 0
    if length:
        raise ValueError("bit stream ends inside a code word (wrong n_bits or codes)")
    return np.asarray(out, dtype=np.int64)


# ----- Deep Compression's storage format of one clustered layer --------------------------------

def sparse_streams(labels: torch.Tensor, k: int, gap_bits: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Relative-index (gap) stream and cluster-index stream of a pruned, clustered layer.

    ``labels`` holds cluster indices 0..k-1 and ``k`` for pruned entries, in row-major order.
    Each kept weight is stored as (zeros skipped since the previous stored entry, its cluster
    index). A run longer than ``2**gap_bits - 1`` is bridged by filler entries (gap = the
    maximum, index = ``k``, a stored zero), Han et al.'s figure 2.
    """
    flat = labels.flatten()
    span = 2 ** gap_bits
    kept = torch.nonzero(flat != k).flatten()
    runs = torch.diff(kept, prepend=kept.new_full((1,), -1)) - 1
    fillers = runs // span
    repeats = fillers + 1
    owner = torch.repeat_interleave(torch.arange(kept.numel(), device=flat.device), repeats)
    last = torch.cumsum(repeats, 0) - 1  # the real entry comes after its fillers
    gaps = torch.full(owner.shape, span - 1, dtype=torch.long, device=flat.device)
    symbols = torch.full(owner.shape, k, dtype=torch.long, device=flat.device)
    gaps[last] = runs % span
    symbols[last] = flat[kept]
    return gaps, symbols


def labels_from_streams(gaps: torch.Tensor, symbols: torch.Tensor, k: int, numel: int) -> torch.Tensor:
    """Inverse of :func:`sparse_streams` (flat labels, ``k`` where nothing was stored)."""
    positions = torch.cumsum(torch.as_tensor(gaps) + 1, 0) - 1
    labels = torch.full((numel,), k, dtype=torch.long)
    labels[positions] = torch.as_tensor(symbols, dtype=torch.long)
    return labels


def layer_storage_bits(labels: torch.Tensor, k: int, gap_bits: int, value_bits: int = 32) -> dict[str, int]:
    """Stored size of one clustered layer in bits, Huffman-coded and fixed-length.

    Dense layers (nothing pruned) store one index per weight; pruned layers store the sparse
    (gap, index) streams. Both streams are Huffman-coded with their own canonical codebook;
    the shared values cost ``k * value_bits``. Everything is computed from symbol counts.
    """
    flat = labels.flatten()
    pruned = bool((flat == k).any())
    index_alphabet = k + 1 if pruned else k
    out = {"centroid_bits": k * value_bits, "gap_bits": 0, "gap_fixed_bits": 0, "gap_codebook_bits": 0}
    if pruned:
        span = 2 ** gap_bits
        kept = torch.nonzero(flat != k).flatten()
        runs = torch.diff(kept, prepend=kept.new_full((1,), -1)) - 1
        fillers = runs // span
        n_fill = int(fillers.sum())
        gap_counts = torch.bincount(runs % span, minlength=span)
        gap_counts[span - 1] += n_fill
        index_counts = torch.bincount(flat[kept], minlength=k + 1)
        index_counts[k] += n_fill
        entries = kept.numel() + n_fill
        out.update(gap_bits=encoded_bits(gap_counts.cpu().numpy()), gap_fixed_bits=entries * gap_bits,
                   gap_codebook_bits=codebook_bits(span))
    else:
        index_counts = torch.bincount(flat, minlength=k)
        entries = flat.numel()
    fixed_width = max(1, (index_alphabet - 1).bit_length())
    out.update(index_bits=encoded_bits(index_counts.cpu().numpy()), index_fixed_bits=entries * fixed_width,
               index_codebook_bits=codebook_bits(index_alphabet), entries=entries)
    out["huffman_total_bits"] = (out["index_bits"] + out["gap_bits"] + out["centroid_bits"]
                                 + out["index_codebook_bits"] + out["gap_codebook_bits"])
    out["fixed_total_bits"] = out["index_fixed_bits"] + out["gap_fixed_bits"] + out["centroid_bits"]
    return out

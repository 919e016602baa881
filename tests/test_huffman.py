"""Huffman coding and Deep Compression's sparse storage format: sizes against independent formulas, round trips."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from netcompress.compression.huffman import (code_lengths, codebook_bits, decode, encode, encoded_bits, labels_from_streams,
                                 layer_storage_bits, sparse_streams)


def merged_weight_sum(counts) -> int:
    """Huffman cost written out independently: the sum of every merged node's weight (sorted-list merging)."""
    nodes = sorted(int(c) for c in counts if c > 0)
    if len(nodes) == 1:
        return nodes[0]
    total = 0
    while len(nodes) > 1:
        merged = nodes.pop(0) + nodes.pop(0)
        total += merged
        nodes = sorted(nodes + [merged])
    return total


def test_textbook_example():
    # CLRS 16.3: frequencies a..f = 45, 13, 12, 16, 9, 5 give 224 bits, with 'a' coded in one bit.
    counts = [45, 13, 12, 16, 9, 5]
    lengths = code_lengths(counts)
    assert encoded_bits(counts) == 224 and lengths[0] == 1
    assert sorted(lengths.values()) == [1, 3, 3, 3, 4, 4]


@pytest.mark.parametrize("seed", range(6))
def test_size_equals_independent_formula_and_kraft_equality(seed):
    rng = np.random.default_rng(seed)
    counts = rng.geometric(0.05, size=rng.integers(2, 300))
    counts[rng.random(counts.size) < 0.2] = 0  # absent symbols get no code
    counts[0] = max(counts[0], 1)
    counts[-1] = max(counts[-1], 1)
    lengths = code_lengths(counts)
    assert set(lengths) == set(np.flatnonzero(counts).tolist())
    assert encoded_bits(counts) == sum(int(counts[s]) * n for s, n in lengths.items()) == merged_weight_sum(counts)
    assert sum(2.0 ** -n for n in lengths.values()) == pytest.approx(1.0)  # a full prefix code


@pytest.mark.parametrize("alphabet, n", [(1, 50), (2, 1), (7, 1000), (33, 5000), (257, 20000)])
def test_decode_of_encode_gives_the_symbols_back(alphabet, n):
    rng = np.random.default_rng(alphabet)
    probabilities = rng.dirichlet(np.full(alphabet, 0.3))
    symbols = rng.choice(alphabet, size=n, p=probabilities)
    data, n_bits, codes = encode(symbols, alphabet)
    assert n_bits == encoded_bits(np.bincount(symbols, minlength=alphabet))
    assert len(data) == -(-n_bits // 8)
    np.testing.assert_array_equal(decode(data, n_bits, codes), symbols)


def test_a_truncated_stream_is_an_error():
    symbols = np.array([0, 1, 2, 2, 2, 1, 0, 3])
    data, n_bits, codes = encode(symbols, 4)
    with pytest.raises(ValueError, match="ends inside a code word"):
        decode(data, n_bits - 1, codes)


def test_sparse_streams_use_fillers_for_long_gaps():
    # Han et al. fig. 2 with 3-bit gaps (at most 7 zeros skipped): 1 kept at position 1, the next at 12.
    k = 4
    labels = torch.full((20,), k)
    labels[1], labels[12], labels[13] = 2, 0, 3
    gaps, symbols = sparse_streams(labels, k, gap_bits=3)
    # position 1: skip 1; position 12: 10 zeros skipped > 7, so a filler at 9 (skip 7), then skip 2.
    assert gaps.tolist() == [1, 7, 2, 0]
    assert symbols.tolist() == [2, k, 0, 3]
    assert torch.equal(labels_from_streams(gaps, symbols, k, 20), labels)


@pytest.mark.parametrize("density, gap_bits", [(0.3, 5), (0.04, 5), (0.02, 8), (1.0, 5)])
def test_layer_size_equals_encoded_streams(density, gap_bits):
    gen = torch.Generator().manual_seed(int(density * 100) + gap_bits)
    k = 32
    labels = torch.randint(0, k, (300, 200), generator=gen)
    labels[torch.rand(labels.shape, generator=gen) >= density] = k
    sizes = layer_storage_bits(labels, k, gap_bits)
    if density < 1:
        gaps, symbols = sparse_streams(labels, k, gap_bits)
        assert torch.equal(labels_from_streams(gaps, symbols, k, labels.numel()), labels.flatten())
        gap_data, gap_n, gap_codes = encode(gaps.numpy(), 2 ** gap_bits)
        np.testing.assert_array_equal(decode(gap_data, gap_n, gap_codes), gaps.numpy())
        index_alphabet = k + 1
    else:
        symbols, gap_n, index_alphabet = labels.flatten(), 0, k
    index_data, index_n, index_codes = encode(symbols.numpy(), index_alphabet)
    np.testing.assert_array_equal(decode(index_data, index_n, index_codes), symbols.numpy())
    assert sizes["index_bits"] == index_n and sizes["gap_bits"] == gap_n
    expected = index_n + gap_n + 32 * k + codebook_bits(index_alphabet) + (codebook_bits(2 ** gap_bits) if density < 1 else 0)
    assert sizes["huffman_total_bits"] == expected
    assert sizes["entries"] == symbols.numel()
    assert sizes["index_bits"] <= sizes["index_fixed_bits"]  # Huffman never loses to fixed length

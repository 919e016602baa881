"""N:M semi-structured and block sparsity (compression/patterns.py, MagnitudePruning granularity=nm|block):
exact n-of-m per group along the input channels (channels-last for convs), block masks against a loop
reference, masks kept through training, resume and export, the gradual schedule ending exactly at n:m,
clear errors."""
from __future__ import annotations

import json

import pytest
import pytorch_lightning as pl
import torch
from torch import nn

from netcompress.callbacks.magnitude_pruning import MagnitudePruning
from netcompress.compression.patterns import (block_masks, check_block_layers, check_nm, check_nm_layers, nm_groups,
                                              nm_masks, nm_ungroup)
from netcompress.pipeline.build import build
from conftest import TINY, straight_and_resumed

PRUNE = "callbacks.magnitude_pruning"
SMALL = ["+model.width=0.25", "data.val_size=16", "data.test_size=16"]  # resnet20 with 4/8/16 channels


# ----- independent references: plain loops over the documented group order ---------------------------
def groups_by_loop(w: torch.Tensor, m: int) -> list[tuple[tuple, list[float]]]:
    """Every group as (index tuple, values): Linear w[o, g*m:(g+1)*m]; Conv w[o, g*m:(g+1)*m, i, j]."""
    out = []
    if w.dim() == 2:
        for o in range(w.shape[0]):
            for g in range(w.shape[1] // m):
                out.append(((o, slice(g * m, (g + 1) * m)), w[o, g * m:(g + 1) * m].tolist()))
    else:
        for o in range(w.shape[0]):
            for i in range(w.shape[2]):
                for j in range(w.shape[3]):
                    for g in range(w.shape[1] // m):
                        index = (o, slice(g * m, (g + 1) * m), i, j)
                        out.append((index, w[index].tolist()))
    return out


def reference_keep(values: list[float], n_prune: int) -> list[bool]:
    """Prune the n_prune smallest |v|, ties to the lower position (Python's sort is stable)."""
    order = sorted(range(len(values)), key=lambda k: abs(values[k]))
    pruned = set(order[:n_prune])
    return [k not in pruned for k in range(len(values))]


@pytest.mark.parametrize("n,m", [(2, 4), (1, 4), (4, 8), (1, 2)])
@pytest.mark.parametrize("shape", [(6, 16), (5, 8, 3, 3), (4, 16, 1, 2)])
def test_nm_masks_keep_the_n_largest_of_every_group(n, m, shape):
    torch.manual_seed(0)
    w = torch.randn(shape)
    mask = nm_masks({"w": w}, 1 - n / m, n=n, m=m)["w"]
    assert mask.shape == w.shape and mask.dtype == torch.bool
    groups = groups_by_loop(w, m)
    assert len(groups) * m == w.numel()  # the loops cover every weight once
    for index, values in groups:
        assert int(mask[index].sum()) == n, index
        assert mask[index].tolist() == reference_keep(values, m - n), index
    assert check_nm(w * mask, n, m)


def test_ties_pruned_by_position_and_channels_last_weights_give_the_same_masks():
    w = torch.ones(2, 8, 2, 2)
    mask = nm_masks({"w": w}, 0.5, n=2, m=4)["w"]
    assert mask[:, [0, 1, 4, 5]].logical_not().all() and mask[:, [2, 3, 6, 7]].all()  # lowest index first
    torch.manual_seed(1)
    w = torch.randn(4, 8, 3, 3)
    a = nm_masks({"w": w}, 0.5, n=2, m=4)["w"]
    b = nm_masks({"w": w.to(memory_format=torch.channels_last)}, 0.5, n=2, m=4)["w"]
    assert torch.equal(a, b)


def test_group_order_is_channels_last_for_convs():
    # conv [1, 4, 1, 2]: channels-last groups are w[0, :, 0, 0] and w[0, :, 0, 1]; PyTorch's own
    # flattening (in, kh, kw) would interleave them: c0k0 c0k1 c1k0 c1k1 | c2k0 ...
    w = torch.zeros(1, 4, 1, 2)
    w[0, :, 0, 0] = torch.tensor([1.0, 2.0, 3.0, 4.0])
    assert not check_nm(w, 2, 4)  # 4 non-zeros in the first channels-last group
    assert (w.flatten().view(-1, 4) != 0).sum(1).le(2).all()  # would pass in the default order
    w = torch.zeros(1, 4, 1, 2)
    w[0, 0:2, 0, :] = 1.0  # 2 per channels-last group, 4 in the first default-order group
    assert check_nm(w, 2, 4) and not (w.flatten().view(-1, 4) != 0).sum(1).le(2).all()
    g = nm_groups(torch.arange(16.0).view(1, 4, 2, 2), 4)  # value = c*4 + kh*2 + kw
    assert g.tolist() == [[0, 4, 8, 12], [1, 5, 9, 13], [2, 6, 10, 14], [3, 7, 11, 15]]
    x = torch.randn(3, 8, 3, 3)
    assert torch.equal(nm_ungroup(nm_groups(x, 4), x.shape), x)
    linear = torch.zeros(2, 8)  # Linear: along `in`, the layout torch's to_sparse_semi_structured reads
    linear[:, [2, 3, 4, 5]] = 1.0
    assert check_nm(linear, 2, 4) and not check_nm(linear, 1, 4)


def test_gradual_nm_prunes_round_s_m_per_group_and_masks_only_shrink():
    torch.manual_seed(2)
    w = torch.randn(4, 8, 3, 3)
    previous = None
    for s, pruned in [(0.0, 0), (0.2, 1), (0.4, 2), (0.5, 2)]:  # round(s * 4)
        mask = nm_masks({"w": w}, s, n=2, m=4, previous=previous)["w"]
        assert (nm_groups(~mask, 4).sum(1) == pruned).all(), s
        if previous is not None:
            assert not (mask & ~previous["w"]).any()  # nothing revived
        previous = {"w": mask}
    # a previously pruned large weight stays pruned; the group's other choices follow the scores
    prev = torch.ones_like(w, dtype=torch.bool)
    big = w.abs().argmax()
    prev.view(-1)[big] = False
    mask = nm_masks({"w": w}, 0.5, n=2, m=4, previous={"w": prev})["w"]
    assert not mask.view(-1)[big]
    with pytest.raises(ValueError, match="more than m - n"):
        nm_masks({"w": w}, 0.75, n=2, m=4)


def reference_block_keep(weights: dict, sparsity: float, block: tuple[int, int]) -> dict:
    """Loop reference: block scores = sum |w| over [bo, bi] tiles of [out, in*kh*kw]; prune the lowest
    round(s * blocks) over all layers, ties to the earlier (layer, row, col)."""
    bo, bi = block
    entries = []
    for li, (name, w) in enumerate(weights.items()):
        flat = w.reshape(w.shape[0], -1).abs()
        for r in range(flat.shape[0] // bo):
            for c in range(flat.shape[1] // bi):
                entries.append((float(flat[r * bo:(r + 1) * bo, c * bi:(c + 1) * bi].double().sum()), li, r, c, name))
    order = sorted(range(len(entries)), key=lambda k: entries[k][0])
    masks = {name: torch.ones(w.shape[0], w[0].numel(), dtype=torch.bool) for name, w in weights.items()}
    for k in order[:round(sparsity * len(entries))]:
        _, _, r, c, name = entries[k]
        masks[name][r * bo:(r + 1) * bo, c * bi:(c + 1) * bi] = False
    return {name: mask.view(weights[name].shape) for name, mask in masks.items()}


@pytest.mark.parametrize("block", [(1, 4), (2, 4), (4, 4)])
def test_block_masks_equal_a_loop_reference(block):
    torch.manual_seed(3)
    weights = {"conv": torch.randn(8, 4, 3, 3), "fc": torch.randn(4, 16)}
    masks = block_masks(weights, 0.4, block=list(block))
    expected = reference_block_keep(weights, 0.4, block)
    blocks = sum(w.numel() for w in weights.values()) // (block[0] * block[1])
    assert sum(int((~m).sum()) for m in masks.values()) == round(0.4 * blocks) * block[0] * block[1]
    for name in weights:
        assert torch.equal(masks[name], expected[name]), name
    per_layer = block_masks(weights, 0.5, scope="layer", block=list(block))
    for name, w in weights.items():
        n_blocks = w.numel() // (block[0] * block[1])
        assert int((~per_layer[name]).sum()) == round(0.5 * n_blocks) * block[0] * block[1]
    # masks only shrink: a previously pruned strong block stays pruned
    prev = {"conv": torch.ones_like(weights["conv"], dtype=torch.bool)}
    prev["conv"].view(8, -1)[0:block[0], 0:block[1]] = False
    again = block_masks(weights, 0.4, block=list(block), previous=prev)
    assert not again["conv"].view(8, -1)[0:block[0], 0:block[1]].any()


def test_clear_errors():
    with pytest.raises(ValueError, match=r"`callbacks.magnitude_pruning.n` must be an integer in \[1, m-1\].*got 4"):
        MagnitudePruning(granularity="nm", n=4, m=4)
    with pytest.raises(ValueError, match=r"`callbacks.magnitude_pruning.m` must be an integer >= 2.*got 0"):
        MagnitudePruning(granularity="nm", n=1, m=0)
    with pytest.raises(ValueError, match=r"`callbacks.magnitude_pruning.sparsity` must be 1 - n/m = 0.75.*got 0.5"):
        MagnitudePruning(granularity="nm", n=1, m=4, sparsity=0.5)
    with pytest.raises(ValueError, match=r"`callbacks.magnitude_pruning.block` must be two positive integers"):
        MagnitudePruning(granularity="block", block=[0, 4])
    with pytest.raises(ValueError, match=r"`callbacks.magnitude_pruning.block` must be two"):
        MagnitudePruning(granularity="block", block=[1, 2, 3])
    with pytest.raises(ValueError, match=r"granularity` must be one of unstructured, structured, nm, block; got .2:4."):
        MagnitudePruning(granularity="2:4")
    with pytest.raises(ValueError, match=r"layer 'stem' \(weight \[4, 3, 3, 3\]\) has input dimension 3, not "
                                         r"divisible by m=4.*exclude=\['stem'\]"):
        check_nm_layers({"ok": nn.Linear(8, 2), "stem": nn.Conv2d(3, 4, 3)}, 4, "callbacks.magnitude_pruning")
    with pytest.raises(ValueError, match=r"`callbacks.magnitude_pruning.block`=\[3, 4\] does not tile layer 'fc'"):
        check_block_layers({"fc": nn.Linear(8, 4)}, (3, 4), "callbacks.magnitude_pruning")


def test_indivisible_input_dim_fails_before_training(tiny_config):
    # width 0.25: layer1 convs take 4 input channels, not divisible by m=8
    cfg = tiny_config(*SMALL, "compression=[magnitude_pruning]", f"{PRUNE}.granularity=nm", f"{PRUNE}.n=4",
                      f"{PRUNE}.m=8")
    datamodule, module, trainer = build(cfg)
    with pytest.raises(ValueError, match=r"layer 'layer1.0.conv1' .* not divisible by m=8"):
        trainer.fit(module, datamodule=datamodule)
    assert trainer.global_step == 0


class GroupProbe(pl.Callback):
    """Pruned weights per group (min, max over all groups and layers) as each step starts."""

    def __init__(self):
        self.seen = {}

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        callback = next(c for c in trainer.callbacks if isinstance(c, MagnitudePruning))
        counts = torch.cat([nm_groups(~mask, 4).sum(1) for mask in callback.masks.values()]) \
            if callback.masks else torch.zeros(1)
        self.seen[trainer.global_step] = (int(counts.min()), int(counts.max()))


def test_agp_nm_trains_keeps_the_pattern_and_ends_exactly_at_n_m(tiny_config):
    probe = GroupProbe()
    cfg = tiny_config(*SMALL, "compression=[magnitude_pruning]", "trainer.max_epochs=2", "optimizer.lr=0.2",
                      f"{PRUNE}.granularity=nm", f"{PRUNE}.schedule=agp", f"{PRUNE}.unit=step", f"{PRUNE}.start=0",
                      f"{PRUNE}.end=4", f"{PRUNE}.every=2", f"{PRUNE}.initial_sparsity=0.2")
    datamodule, module, trainer = build(cfg)
    trainer.callbacks.append(probe)
    trainer.fit(module, datamodule=datamodule)
    callback = next(c for c in trainer.callbacks if isinstance(c, MagnitudePruning))
    # events at 0, 2, 4: Zhu & Gupta s_t = 0.5 + (0.2 - 0.5) (1 - k/2)^3 = 0.2, 0.4625, 0.5 -> round(4 s_t) = 1, 2, 2
    expected = {0: 1, 1: 1, 2: 2, 3: 2, 4: 2, 7: 2}
    for step, pruned in expected.items():
        assert probe.seen[step] == (pruned, pruned), step
    net = dict(module.net.named_modules())
    optimizer = trainer.optimizers[0]
    for name, mask in callback.masks.items():
        assert (nm_groups(mask, 4).sum(1) == 2).all(), name
        weight = net[name].weight
        assert check_nm(weight, 2, 4) and weight[~mask].eq(0).all() and weight[mask].ne(0).any(), name
        assert optimizer.state[weight]["momentum_buffer"][~mask].eq(0).all(), name
    assert callback.global_sparsity() == 0.5
    assert trainer.global_step == 8


@pytest.mark.slow  # three short runs each (~17 s)
@pytest.mark.parametrize("granularity", ["nm", "block"])
def test_masks_survive_resume_and_export(tmp_path, granularity):
    extra = [f"{PRUNE}.granularity=nm"] if granularity == "nm" else \
        [f"{PRUNE}.granularity=block", f"{PRUNE}.block=[2,4]", f"{PRUNE}.sparsity=0.6"]
    base = [*TINY, "model.name=resnet20_cifar", "+model.width=0.5", "data.image_size=16", "data.val_size=16",
            "data.test_size=16", "callbacks=model_checkpoint", "trainer.max_epochs=3", "optimizer.lr=0.05",
            "latency_repeats=1", "compression=[magnitude_pruning]", f"{PRUNE}.schedule=agp", f"{PRUNE}.start=0",
            f"{PRUNE}.end=2", *extra]
    straight, resumed, state = straight_and_resumed(base, tmp_path, stop_after=2)  # model.pt bit-identical
    assert straight["status"] == resumed["status"] == "ok"
    results = json.loads((tmp_path / "resumed" / "results.json").read_text())
    layers = list(results["compress/sparsity_layers"])
    assert layers and "fc" not in layers and "conv1" not in layers
    assert results["compress/granularity"] == granularity
    for name in layers:
        weight = state[f"{name}.weight"]
        if granularity == "nm":
            assert check_nm(weight, 2, 4), name
            assert (nm_groups(weight != 0, 4).sum(1) == 2).all(), name  # trained weights: exactly 2 of 4
        else:
            tiles = (weight.reshape(weight.shape[0], -1) == 0).reshape(weight.shape[0] // 2, 2, -1, 4)
            zero_tiles = tiles.all(3).all(1)
            assert (tiles.any(3).any(1) == zero_tiles).all(), name  # zeros come in whole 2x4 tiles
    if granularity == "nm":
        assert results["compress/nm"] == "2:4" and results["compress/nm_pattern_ok"] is True
        assert results["compress/sparsity"] == 0.5
    else:
        assert results["compress/block"] == [2, 4]
        total = sum(state[f"{n}.weight"].numel() for n in layers)
        assert results["compress/sparsity"] == pytest.approx(round(0.6 * total / 8) * 8 / total)

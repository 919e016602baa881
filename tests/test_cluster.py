"""Weight clustering (Deep Compression stage 2): k-means, shared-weight gradients, resume, report, errors."""
from __future__ import annotations

import json
import math

import pytest
import pytorch_lightning as pl
import torch
from torch import nn

from netcompress import models  # noqa: F401
from netcompress.callbacks.cluster import Cluster
from netcompress.compression.kmeans import cluster_weight, kmeans_1d
from conftest import TINY, compose_config, straight_and_resumed
from test_huffman import merged_weight_sum as reference_huffman_bits
from netcompress.models.serialization import load_model
from netcompress.pipeline.build import build
from netcompress.run import run

# conv2_lth at 1/8 width: convs 3->8->8, fc 2048->32->32->10 (fast on 2 cores).
TINY_NET = ["model.name=conv2_lth", "+model.width=0.125", "latency_repeats=1"]


def naive_lloyd(x: torch.Tensor, k: int, iters: int = 300) -> tuple[torch.Tensor, torch.Tensor]:
    """k-means written out: linear init, argmin distance to every centroid, mean of each cluster."""
    x = x.double()
    c = torch.linspace(float(x.min()), float(x.max()), k, dtype=torch.double)
    for _ in range(iters):
        labels = (x[:, None] - c[None, :]).abs().argmin(1)
        new = torch.stack([x[labels == j].mean() if (labels == j).any() else c[j] for j in range(k)])
        if torch.equal(new, c):
            break
        c = new
    return c, labels


@pytest.mark.parametrize("bits", [1, 3, 5])
def test_kmeans_equals_naive_lloyd_with_linear_init(bits):
    x = torch.randn(3000, generator=torch.Generator().manual_seed(bits)) ** 3  # heavy tails: uneven clusters
    centroids, labels = kmeans_1d(x, 2 ** bits)
    ref_c, ref_labels = naive_lloyd(x, 2 ** bits)
    torch.testing.assert_close(centroids.double(), ref_c, rtol=1e-6, atol=1e-7)
    assert torch.equal(labels, ref_labels)


def test_cluster_weight_keeps_zeros_out_of_the_clusters():
    w = torch.randn(40, 30, generator=torch.Generator().manual_seed(0))
    w[w.abs() < 0.8] = 0
    centroids, labels, clustered = cluster_weight(w, bits=2)
    assert torch.equal(clustered == 0, w == 0) and torch.equal(labels == 4, w == 0)
    assert set(clustered[w != 0].unique().tolist()) <= set(centroids.tolist())
    # every kept weight sits on its nearest centroid
    nearest = (w[w != 0][:, None] - centroids[None]).abs().argmin(1)
    assert torch.equal(labels[w != 0], nearest)


@pytest.mark.parametrize("gradient", ["sum", "mean"])
@pytest.mark.parametrize("kind", ["linear", "conv_channels_last"])
def test_shared_gradient_is_the_cluster_sum_or_mean(gradient, kind):
    torch.manual_seed(0)
    layer = nn.Linear(20, 15) if kind == "linear" else nn.Conv2d(6, 8, 3).to(memory_format=torch.channels_last)
    with torch.no_grad():
        layer.weight[:, :4] = 0  # pruned
    callback = Cluster(bits=2, gradient=gradient)
    _, labels, clustered = cluster_weight(layer.weight, 2)
    with torch.no_grad():
        layer.weight.copy_(clustered)
    holder = nn.Module()
    holder.net = nn.Sequential(layer)
    callback._labels = {"0": labels}
    callback._bind(holder)
    g = torch.randn(layer.weight.shape)
    layer.weight.grad = g.clone().to(memory_format=torch.channels_last) if kind != "linear" else g.clone()
    callback.on_before_optimizer_step(None, holder, None)
    expected = torch.zeros_like(g)
    for c in range(4):
        members = labels == c
        if members.any():
            expected[members] = g[members].sum() / (members.sum() if gradient == "mean" else 1)
    torch.testing.assert_close(layer.weight.grad, expected)
    assert (layer.weight.grad[:, :4] == 0).all()


class PruneBeforeFit(pl.Callback):
    """Zero the smallest half of fc1's weights, as an earlier pruning callback would have."""

    def setup(self, trainer, pl_module, stage):
        weight = pl_module.net.fc1.weight
        with torch.no_grad():
            weight[weight.abs() <= weight.abs().median()] = 0


@pytest.mark.slow
def test_distinct_values_stay_at_most_2_to_the_b_after_many_steps(tmp_path):
    """SGD with momentum 0.9 and weight decay, 24 steps, no re-snapping to the centroids."""
    bits = 3
    cfg = compose_config([*TINY, *TINY_NET, "optimizer=sgd", "optimizer.lr=0.01", "compression=[cluster]",
                          f"callbacks.cluster.bits={bits}", "callbacks.cluster.skip_first_last=false",
                          "callbacks.cluster.gradient=mean", "trainer.max_epochs=6", "save_model=false"],
                         tmp_path / "run")
    datamodule, module, trainer = build(cfg)
    seen = {}

    class Snapshot(pl.Callback):
        def on_train_epoch_start(self, trainer, pl_module):  # runs after clustering (callback order)
            if "after_clustering" not in seen:
                seen["after_clustering"] = {k: v.detach().clone() for k, v in pl_module.net.state_dict().items()}

    trainer.callbacks[:0] = [PruneBeforeFit()]
    trainer.callbacks.append(Snapshot())
    trainer.fit(module, datamodule=datamodule)
    assert trainer.global_step == 24
    callback = next(c for c in trainer.callbacks if isinstance(c, Cluster))
    start = seen["after_clustering"]
    for name, labels in callback._labels.items():
        weight = dict(module.net.named_modules())[name].weight.detach()
        before = start[f"{name}.weight"]
        alive = before != 0
        assert torch.equal(weight == 0, ~alive), name  # pruned stay zero, no kept weight became zero
        assert weight[alive].unique().numel() <= 2 ** bits, name
        assert not torch.equal(weight, before), name  # the centroids did train
        for c in labels[alive].unique():  # assignments stay: one value per cluster
            assert weight[labels == c].unique().numel() == 1, (name, int(c))
    assert (module.net.fc1.weight == 0).float().mean() >= 0.5


def test_results_report_huffman_size_and_ratio(tmp_path):
    bits = 2
    cfg = compose_config([*TINY, *TINY_NET, "optimizer.lr=0.01", "compression=[cluster]", f"callbacks.cluster.bits={bits}",
                          "callbacks.cluster.gradient=mean", "trainer.max_epochs=2"], tmp_path / "run")
    results = run(cfg)
    saved = json.loads((tmp_path / "run" / "results.json").read_text())
    net = load_model(tmp_path / "run" / "model.pt")
    k = 2 ** bits
    expected_bits, dense = 0, 0
    for name in ("features.2", "fc1", "fc2"):  # skip_first_last leaves features.0 and fc dense
        weight = dict(net.named_modules())[name].weight.detach()
        values, counts = weight.flatten().unique(return_counts=True)
        assert len(values) <= k and not (values == 0).any()
        # dense layers: Huffman index stream + k fp32 centroids + one code-length byte per symbol
        expected_bits += reference_huffman_bits(counts.tolist()) + 32 * k + 8 * k
        dense += 4 * weight.numel()
    assert saved["compress/huffman_bytes"] == math.ceil(expected_bits / 8)
    assert saved["compress/dense_bytes"] == dense
    assert saved["compress/ratio"] == pytest.approx(dense / math.ceil(expected_bits / 8))
    assert saved["compress/cluster_max_distinct"] <= k
    assert results["compress/ratio"] == saved["compress/ratio"]


@pytest.mark.slow
def test_resume_after_clustering_equals_uninterrupted(tmp_path):
    base = [*TINY, *TINY_NET, "callbacks=model_checkpoint", "optimizer.lr=0.01", "compression=[cluster]",
            "callbacks.cluster.bits=3", "callbacks.cluster.at_epoch=1", "callbacks.cluster.lr=0.005",
            "trainer.max_epochs=3"]
    straight, resumed, _ = straight_and_resumed(base, tmp_path, stop_after=2)
    assert straight["compress/huffman_bytes"] == resumed["compress/huffman_bytes"]


# ----- bad input: clear errors before training ----------------------------------------------------

@pytest.mark.parametrize("bits", [0, 17, 2.5, True])
def test_bits_outside_1_to_16_is_rejected(tiny_config, bits):
    with pytest.raises(ValueError, match=r"`callbacks\.cluster\.bits` must be an int in 1\.\.16.*got " + str(bits)):
        build(tiny_config("compression=[cluster]", f"callbacks.cluster.bits={bits}"))


def test_pattern_matching_no_layer_fails_before_training(tiny_config):
    datamodule, module, trainer = build(tiny_config(*TINY_NET, "compression=[cluster]",
                                                    "callbacks.cluster.include=[blocks.*]"))
    with pytest.raises(ValueError, match=r"callbacks\.cluster: pattern 'blocks\.\*' matches no"):
        trainer.fit(module, datamodule=datamodule)
    assert trainer.global_step == 0


@pytest.mark.parametrize("override, message", [
    ("callbacks.cluster.gradient=median", r"`callbacks\.cluster\.gradient` must be one of sum, mean; got 'median'"),
    ("callbacks.cluster.lr=-1", r"`callbacks\.cluster\.lr` must be a positive number"),
    ("callbacks.cluster.gap_bits_fc=0", r"`callbacks\.cluster\.gap_bits_fc` must be an int in 1\.\.16"),
    ("callbacks.cluster.include=fc1", r"`callbacks\.cluster\.include` must be a list"),
])
def test_other_bad_arguments_are_rejected(tiny_config, override, message):
    with pytest.raises(ValueError, match=message):
        build(tiny_config("compression=[cluster]", override))


def test_clustering_epoch_after_the_last_epoch_is_an_error(tiny_config):
    datamodule, module, trainer = build(tiny_config(*TINY_NET, "compression=[cluster]", "callbacks.cluster.at_epoch=1"))
    with pytest.raises(ValueError, match=r"`callbacks\.cluster\.at_epoch` \(1\) must be < trainer\.max_epochs \(1\)"):
        trainer.fit(module, datamodule=datamodule)
    assert trainer.global_step == 0


def test_low_rank_after_clustering_is_rejected(tiny_config):
    with pytest.raises(ValueError, match=r"`callbacks\.lowrank` changes the weights until epoch 2 but "
                                         r"`callbacks\.cluster` clusters them at epoch 1.*at_epoch` to 3 or more"):
        build(tiny_config("compression=[cluster,lowrank]", "callbacks.cluster.at_epoch=1",
                          "callbacks.lowrank.at_epoch=2"))


def test_clustering_before_the_last_pruning_event_is_rejected(tiny_config):
    with pytest.raises(ValueError, match=r"`callbacks\.magnitude_pruning` changes the weights until epoch 2.*"
                                         r"prune, retrain, then cluster.*`callbacks\.cluster\.at_epoch` to 3 or "
                                         r"more.*got at_epoch=1"):
        build(tiny_config("compression=[magnitude_pruning,cluster]", "callbacks.magnitude_pruning.schedule=iterative",
                          "callbacks.magnitude_pruning.times=2", "callbacks.magnitude_pruning.every=2",
                          "callbacks.cluster.at_epoch=1"))

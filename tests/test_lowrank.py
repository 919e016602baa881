"""Low-rank decomposition: SVD factors against the layer, parameter formulas, rank rules, model.pt reload, resume, errors."""
from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch
from torch import nn

from netcompress import models  # noqa: F401
from netcompress.compression import lowrank
from conftest import ROOT, TINY, compose_config, straight_and_resumed
from netcompress.evaluation.model_stats import count_flops
from netcompress.models.serialization import load_model, save_model
from netcompress.pipeline.build import build
from netcompress.run import run

TINY_NET = ["model.name=conv2_lth", "+model.width=0.125", "latency_repeats=1"]


@pytest.mark.parametrize("layer", [
    nn.Linear(24, 16),
    nn.Linear(10, 30, bias=False),
    nn.Conv2d(6, 10, 3, stride=2, padding=1),
    nn.Conv2d(4, 7, (3, 5), padding=(1, 2), dilation=1, bias=False),
], ids=["linear", "linear_wide_nobias", "conv_stride2", "conv_3x5_nobias"])
def test_full_rank_reproduces_the_layer_outputs(layer):
    torch.manual_seed(0)
    x = torch.randn(5, layer.in_features) if isinstance(layer, nn.Linear) else torch.randn(2, layer.in_channels, 9, 11)
    pair = lowrank.decompose(layer, lowrank.full_rank(layer))
    with torch.no_grad():
        torch.testing.assert_close(pair(x), layer(x), rtol=0, atol=1e-5)


@pytest.mark.parametrize("layer, rank, expected", [
    (nn.Linear(300, 100), 20, 20 * 300 + 100 * 20 + 100),
    (nn.Linear(300, 100, bias=False), 50, 50 * 300 + 100 * 50),
    (nn.Conv2d(64, 128, 3, padding=1, bias=False), 32, 32 * 64 * 9 + 128 * 32),
    (nn.Conv2d(16, 32, 5), 8, 8 * 16 * 25 + 32 * 8 + 32),
])
def test_rank_r_lowers_params_as_computed(layer, rank, expected):
    pair = lowrank.decompose(layer, rank)
    assert sum(p.numel() for p in pair.parameters()) == expected == lowrank.params_of(layer, rank)
    assert expected < sum(p.numel() for p in layer.parameters())


def test_truncation_error_is_eckart_young():
    torch.manual_seed(1)
    layer = nn.Linear(40, 30, bias=False)
    s = torch.linalg.svdvals(layer.weight.detach().double())
    for rank in (1, 5, 29):
        pair = lowrank.decompose(layer, rank)
        approx = (pair[1].weight @ pair[0].weight).double()
        error = torch.linalg.matrix_norm(approx - layer.weight.detach().double())
        torch.testing.assert_close(error, s[rank:].pow(2).sum().sqrt(), rtol=1e-5, atol=1e-6)


def test_energy_rank_is_the_smallest_rank_keeping_that_fraction():
    s = torch.tensor([4.0, 3.0, 2.0, 1.0])  # squares 16, 9, 4, 1: cumulative 16/30, 25/30, 29/30, 1
    u, _ = torch.linalg.qr(torch.randn(6, 4, generator=torch.Generator().manual_seed(0)))
    v, _ = torch.linalg.qr(torch.randn(5, 4, generator=torch.Generator().manual_seed(1)))
    layer = nn.Linear(5, 6)
    with torch.no_grad():
        layer.weight.copy_(u @ torch.diag(s) @ v.T)
    for energy, expected in [(0.5, 1), (16 / 30 - 1e-4, 1), (16 / 30 + 1e-4, 2), (25 / 30 - 1e-4, 2), (0.9, 3), (0.97, 4), (1.0, 4)]:
        assert lowrank.choose_rank(layer, None, energy) == expected, energy
    assert lowrank.choose_rank(layer, 3, None) == 3 and lowrank.choose_rank(layer, 99, None) == 5


def test_lowrank_run_reports_params_and_flops_before_and_after(tmp_path):
    cfg = compose_config([*TINY, *TINY_NET, "optimizer.lr=0.01", "compression=[lowrank]", "callbacks.lowrank.energy=null",
                          "callbacks.lowrank.rank=4", "callbacks.lowrank.skip_first_last=false"], tmp_path / "run")
    results = run(cfg)
    saved = json.loads((tmp_path / "run" / "results.json").read_text())
    dense = models.create_model("conv2_lth", num_classes=10, width=0.125)
    assert saved["compress/params_before"] == sum(p.numel() for p in dense.parameters())
    assert saved["compress/flops_before"] == count_flops(dense, (3, 32, 32))
    # rank 4 for every layer whose rank-4 pair is smaller than the layer; the others stay dense
    expected_params = sum(p.numel() for p in dense.parameters())
    for name, layer in dense.named_modules():
        if isinstance(layer, (nn.Linear, nn.Conv2d)) and lowrank.params_of(layer, 4) < lowrank.params_of(layer):
            expected_params += lowrank.params_of(layer, 4) - lowrank.params_of(layer)
            assert saved["compress/lowrank_ranks"][name] == 4
    assert saved["compress/params_after"] == saved["params_total"] == expected_params
    assert saved["compress/flops_after"] == saved["flops"] < saved["compress/flops_before"]
    net = load_model(tmp_path / "run" / "model.pt")
    assert isinstance(net.fc1, lowrank.LowRankLinear) and net.fc1[0].out_features == 4
    assert sum(p.numel() for p in net.parameters()) == expected_params
    assert results["status"] == "ok"


@pytest.mark.slow
def test_decomposed_model_pt_reloads_in_a_fresh_process_with_equal_outputs(tmp_path):
    net = models.create_model("vgg11_bn_cifar", num_classes=10, width=0.25).eval()
    for name in ("features.4", "fc"):
        lowrank.set_submodule(net, name, lowrank.decompose(net.get_submodule(name), 3))
    save_model(net, tmp_path / "model.pt", "vgg11_bn_cifar", 10, {"width": 0.25})
    x = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    torch.save(x, tmp_path / "x.pt")
    # A new interpreter that imports nothing of compression/: load_model must find the builders itself.
    script = ("import torch, sys; from netcompress.models.serialization import load_model; "
              "net = load_model(sys.argv[1]); torch.save(net(torch.load(sys.argv[2])), sys.argv[3])")
    done = subprocess.run([sys.executable, "-c", script, str(tmp_path / "model.pt"), str(tmp_path / "x.pt"),
                           str(tmp_path / "y.pt")], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    with torch.no_grad():
        torch.testing.assert_close(torch.load(tmp_path / "y.pt"), net(x), rtol=0, atol=0)
        torch.testing.assert_close(load_model(tmp_path / "model.pt")(x), net(x), rtol=0, atol=0)


@pytest.mark.slow
def test_resume_after_decomposition_equals_uninterrupted(tmp_path):
    base = [*TINY, *TINY_NET, "callbacks=model_checkpoint", "optimizer.lr=0.01", "compression=[lowrank]",
            "callbacks.lowrank.at_epoch=1", "callbacks.lowrank.lr=0.005", "callbacks.lowrank.energy=0.8",
            "trainer.max_epochs=3"]
    straight, resumed, state = straight_and_resumed(base, tmp_path, stop_after=2)
    assert any(".0.weight" in key for key in state)
    assert straight["compress/lowrank_ranks"] == resumed["compress/lowrank_ranks"]
    assert straight["compress/flops_after"] == resumed["compress/flops_after"]


# ----- bad input: clear errors before training ----------------------------------------------------

@pytest.mark.parametrize("overrides, message", [
    (["callbacks.lowrank.rank=8"], r"set exactly one of `callbacks\.lowrank\.rank` and `callbacks\.lowrank\.energy`"),
    (["callbacks.lowrank.energy=null"], r"set exactly one of"),
    (["callbacks.lowrank.energy=1.5"], r"`callbacks\.lowrank\.energy` must be in \(0, 1\].*got 1\.5"),
    (["callbacks.lowrank.energy=null", "callbacks.lowrank.rank=0"], r"`callbacks\.lowrank\.rank` must be an int >= 1"),
    (["callbacks.lowrank.lr=0.01"], r"`callbacks\.lowrank\.lr` only applies .* at_epoch > 0"),
    (["callbacks.lowrank.at_epoch=-1"], r"`callbacks\.lowrank\.at_epoch` must be an int >= 0; got -1"),
])
def test_bad_arguments_are_rejected(tiny_config, overrides, message):
    with pytest.raises(ValueError, match=message):
        build(tiny_config("compression=[lowrank]", *overrides))


def test_pattern_matching_no_layer_fails_before_training(tiny_config):
    datamodule, module, trainer = build(tiny_config(*TINY_NET, "compression=[lowrank]", "callbacks.lowrank.exclude=[head.*]"))
    with pytest.raises(ValueError, match=r"callbacks\.lowrank: pattern 'head\.\*' matches no"):
        trainer.fit(module, datamodule=datamodule)
    assert trainer.global_step == 0


def test_decompose_rejects_a_rank_above_full_rank():
    with pytest.raises(ValueError, match=r"rank must be in 1\.\.8"):
        lowrank.decompose(nn.Linear(8, 20), 9)


# ----- lowrank with magnitude_pruning: refused in one fit, supported as two runs ------------------------

@pytest.mark.parametrize("entries", ["magnitude_pruning,lowrank", "lowrank,magnitude_pruning"])
def test_lowrank_with_magnitude_pruning_in_one_fit_is_refused_before_training(tiny_config, entries):
    # it used to crash at the first batch: AttributeError on LowRankConv2d.weight
    with pytest.raises(ValueError, match=r"`callbacks\.magnitude_pruning` and `callbacks\.lowrank` cannot run in one "
                                         r"fit.*masks of magnitude_pruning would point at layers that no longer exist"
                                         r".*compression=\[magnitude_pruning\] init_from="):
        build(tiny_config(*TINY_NET, f"compression=[{entries}]"))


def test_pruning_a_factorised_run_with_init_from_prunes_the_factor_layers(tmp_path):
    """The two-run path the refusal recommends: lowrank first, then magnitude_pruning on its model.pt."""
    factorised = [*TINY, *TINY_NET, "optimizer.lr=0.01", "compression=[lowrank]", "callbacks.lowrank.energy=null",
                  "callbacks.lowrank.rank=4"]
    assert run(compose_config(factorised, tmp_path / "lowrank"))["status"] == "ok"
    pruned = [*TINY, *TINY_NET, "optimizer.lr=0.01", "compression=[magnitude_pruning]",
              "callbacks.magnitude_pruning.sparsity=0.5", f"init_from={tmp_path / 'lowrank' / 'model.pt'}"]
    results = run(compose_config(pruned, tmp_path / "pruned"))
    net = load_model(tmp_path / "pruned" / "model.pt")
    factors = {name for name in results["compress/sparsity_layers"] if name.rpartition(".")[0] in
               {n for n, m in net.named_modules() if isinstance(m, (lowrank.LowRankLinear, lowrank.LowRankConv2d))}}
    assert factors, results["compress/sparsity_layers"]
    assert results["compress/sparsity"] == pytest.approx(0.5, abs=0.01)
    weights = [net.get_submodule(name).weight for name in results["compress/sparsity_layers"]]
    zeros = sum(int((w == 0).sum()) for w in weights) / sum(w.numel() for w in weights)
    assert zeros == pytest.approx(0.5, abs=0.01)

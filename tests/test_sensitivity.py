"""Per-layer sensitivity analysis, the budget cost model and allocator, and protocol=sensitivity end to end."""
from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest
import torch
from torch import nn

from netcompress import models  # noqa: F401  (registers the CIFAR nets)
from netcompress.compression.budget import CostModel, allocate, steps_of
from netcompress.compression.channel_removal import remove_channels
from netcompress.compression.sensitivity import Sensitivity, candidate_layers, sensitivity_table
from netcompress.evaluation.model_stats import count_flops, count_parameters
from netcompress.models.factory import create_model
from netcompress.protocols.retrain_init import effective_flops
from conftest import TINY, compose_config

SIZE = (3, 32, 32)
EXAMPLE = torch.zeros(1, *SIZE)


def _net(name: str, **kwargs) -> nn.Module:
    torch.manual_seed(0)
    net = create_model(name, num_classes=10, **kwargs).eval()
    for m in net.modules():  # non-trivial BN statistics, so zeroing gamma/beta matters
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.uniform_(-0.2, 0.2)
            m.running_var.uniform_(0.5, 2.0)
            m.bias.data.uniform_(-0.3, 0.3)
    return net


def _batches(net: nn.Module, n: int = 96, batch: int = 32) -> list:
    """Random images labelled by the dense net itself (dense acc1 = 1), so pruning visibly costs accuracy."""
    g = torch.Generator().manual_seed(1)
    x = torch.randn(n, *SIZE, generator=g)
    with torch.no_grad():  # centre the classifier on these images' features, so the labels use every class
        feats = net.forward_head(net.forward_features(x), pre_logits=True)
        fc = net.get_classifier()
        fc.weight.mul_(10.0 / fc.weight.norm(dim=1, keepdim=True) / feats.std(0).mean())
        fc.bias.copy_(-fc.weight @ feats.mean(0))
        y = net(x).argmax(1)
    return [(x[i:i + batch], y[i:i + batch]) for i in range(0, n, batch)]


def _acc(net: nn.Module, batches: list) -> float:
    with torch.no_grad():
        hits = sum(int((net(x).argmax(1) == y).sum()) for x, y in batches)
    return hits / sum(len(y) for _, y in batches)


def _lowest_l1(conv: nn.Conv2d, k: int) -> torch.Tensor:
    norms = conv.weight.detach().abs().sum(dim=(1, 2, 3))
    keep = torch.ones(conv.out_channels, dtype=torch.bool)
    keep[torch.argsort(norms)[:k]] = False
    return keep


# ----- the table --------------------------------------------------------------------------------

def test_table_matches_a_physically_thinned_net_and_restores_the_weights():
    net = _net("resnet20_cifar", width=0.25)
    batches = _batches(net)
    before = {k: v.clone() for k, v in net.state_dict().items()}
    layers = ["layer1.0.conv1", "layer2.1.conv1"]
    sens = sensitivity_table(net, batches, layers, [0.25, 0.5, 0.75], example_input=EXAMPLE)
    assert sens.dense_acc1 == 1.0
    # independent reference: drop the k lowest-L1 filters physically (torch-pruning), evaluate by hand
    modules = dict(net.named_modules())
    for layer, ratio in [("layer1.0.conv1", 0.5), ("layer2.1.conv1", 0.75)]:
        conv = modules[layer]
        keep = _lowest_l1(conv, round(ratio * conv.out_channels))
        thin = remove_channels(net, {layer: keep}, EXAMPLE).eval()
        assert dict(thin.named_modules())[layer].out_channels == int(keep.sum())
        assert sens.table[layer][ratio] == pytest.approx(_acc(thin, batches), abs=1e-9)
    assert any(acc < 1.0 for row in sens.table.values() for acc in row.values())
    assert all(torch.equal(before[k], v) for k, v in net.state_dict().items())
    assert sens.units == {"layer1.0.conv1": 4, "layer2.1.conv1": 8}


def test_unstructured_table_matches_hand_masking():
    net = _net("conv2_lth", width=0.125)
    batches = _batches(net)
    sens = sensitivity_table(net, batches, ["fc1"], [0.6], kind="unstructured")
    ref = create_model("conv2_lth", num_classes=10, width=0.125).eval()
    ref.load_state_dict(net.state_dict())
    w = ref.fc1.weight.data
    k = round(0.6 * w.numel())
    w.view(-1)[torch.argsort(w.abs().flatten())[:k]] = 0.0
    assert sens.table["fc1"][0.6] == pytest.approx(_acc(ref, batches), abs=1e-9)


def test_structured_selection_skips_convs_tied_to_the_residual_stream():
    net = _net("resnet20_cifar", width=0.25)
    layers, skipped = candidate_layers(net, kind="structured", example_input=EXAMPLE)
    assert list(layers) == [f"layer{s}.{b}.conv1" for s in (1, 2, 3) for b in range(3)]
    assert "layer1.0.conv2" in skipped and "shared with" in skipped["layer1.0.conv2"]


# ----- the cost model ---------------------------------------------------------------------------

@pytest.mark.parametrize("name,kwargs,skip", [("conv2_lth", {"width": 0.125}, False),  # conv->conv chain, flatten->fc
                                              ("resnet20_cifar", {"width": 0.25}, True)])  # block convs + BN
def test_cost_model_equals_count_flops_of_the_thinned_net(name, kwargs, skip):
    net = _net(name, **kwargs)
    layers, _ = candidate_layers(net, skip_first_last=skip, example_input=EXAMPLE)
    cost = CostModel(net, list(layers), SIZE)
    assert cost.dense == {"params": count_parameters(net)[0], "flops": count_flops(net, SIZE)}
    for seed in range(2):
        g = torch.Generator().manual_seed(seed)
        pruned = {n: int(torch.randint(0, m.out_channels, (1,), generator=g)) for n, m in layers.items()}
        keep = {n: _lowest_l1(m, pruned[n]) for n, m in layers.items()}
        thin = remove_channels(net, keep, EXAMPLE)
        predicted = cost.predicted(pruned)
        assert predicted["flops"] == count_flops(thin, SIZE)
        assert predicted["params"] == count_parameters(thin)[0]


def test_unstructured_cost_model_counts_nonzero_weights_and_sparse_flops():
    net = _net("conv2_lth", width=0.125)
    layers = ["features.2", "fc1"]
    cost = CostModel(net, layers, SIZE, kind="unstructured")
    pruned = {"features.2": 100, "fc1": 5000}
    masks = {}
    for name, p in pruned.items():
        w = dict(net.named_modules())[name].weight
        mask = torch.ones(w.numel(), dtype=torch.bool)
        mask[:p] = False
        masks[name] = mask.view_as(w)
    predicted = cost.predicted(pruned)
    assert predicted["params"] == count_parameters(net)[1] - 5100
    assert predicted["flops"] == pytest.approx(effective_flops(net, masks, SIZE), rel=1e-9)


# ----- the allocator ----------------------------------------------------------------------------

def _linear_sensitivity(slopes: dict[str, float], units: dict[str, int], ratios=(0.2, 0.4, 0.6, 0.8, 0.9)):
    """Hand-made curves: drop = slope * ratio (so the equal-drop ratio of a layer is t / slope)."""
    table = {layer: {r: 0.9 - s * r for r in ratios} for layer, s in slopes.items()}
    return Sensitivity(0.9, table, units, "structured", list(ratios))


@pytest.fixture(scope="module")
def resnet_budget():
    net = _net("resnet20_cifar", width=0.25)
    layers, _ = candidate_layers(net, example_input=EXAMPLE)
    slopes = {n: 0.05 * (i + 1) for i, n in enumerate(layers)}
    sens = _linear_sensitivity(slopes, {n: m.out_channels for n, m in layers.items()})
    return net, layers, sens, CostModel(net, list(layers), SIZE), slopes


@pytest.mark.parametrize("metric,target", [("flops", 0.7), ("params", 0.8), ("flops", 0.9)])
def test_allocation_meets_the_target_within_one_filter(resnet_budget, metric, target):
    net, layers, sens, cost, _ = resnet_budget
    alloc = allocate(sens, cost, metric, target)
    assert alloc.predicted[metric] <= target
    # undoing one filter of one layer misses the target: the allocation stops at the first step that meets it
    assert any(cost.fraction({**alloc.pruned, n: p - 1})[metric] > target for n, p in alloc.pruned.items() if p)
    assert all(alloc.ratios[n] * sens.units[n] == pytest.approx(alloc.pruned[n]) for n in layers)
    # the prediction is what the thinned network measures
    thin = remove_channels(net, {n: _lowest_l1(m, alloc.pruned[n]) for n, m in layers.items()}, EXAMPLE)
    measured = {"flops": count_flops(thin, SIZE), "params": count_parameters(thin)[0]}
    assert alloc.predicted[metric] == pytest.approx(measured[metric] / cost.dense[metric], abs=1e-12)


def test_equal_drop_gives_every_layer_the_same_threshold(resnet_budget):
    _, layers, sens, cost, slopes = resnet_budget
    alloc = allocate(sens, cost, "flops", 0.6)
    t = alloc.threshold
    assert t > 0
    for name, slope in slopes.items():
        n, p = sens.units[name], alloc.pruned[name]
        assert slope * p / n <= t + 1e-9                        # no layer pruned past the common threshold
        if p < steps_of(n, "structured", 0.9)[-1]:
            assert slope * (p + 1) / n >= t - 1e-9              # and each as far as it allows
    # a flatter curve gets the larger ratio (layers share a width within a stage)
    assert alloc.ratios["layer1.0.conv1"] >= alloc.ratios["layer1.2.conv1"]


def test_impossible_targets_fail_naming_the_key(resnet_budget):
    _, _, sens, cost, _ = resnet_budget
    with pytest.raises(ValueError, match=r"`protocol.budget.target`=0.05 is below the smallest flops fraction"):
        allocate(sens, cost, "flops", 0.05, key="protocol.budget")
    lowest = cost.fraction({n: u - 1 for n, u in cost.units.items()})["flops"]
    capped = cost.fraction({n: steps_of(u, "structured", 0.9)[-1] for n, u in cost.units.items()})["flops"]
    between = (lowest + capped) / 2
    with pytest.raises(ValueError, match=r"`protocol.budget.target`=.* needs more pruning than the measured curves"):
        allocate(sens, cost, "flops", between, key="protocol.budget")
    with pytest.raises(ValueError, match=r"`protocol.budget.metric`='latency_ms' is measured: pass a MeasuredLatency"):
        allocate(sens, cost, "latency_ms", 0.5, key="protocol.budget")
    unstructured = Sensitivity(0.9, sens.table, sens.units, "unstructured", sens.ratios)
    with pytest.raises(ValueError, match=r"`protocol.budget.metric`='latency_ms' needs kind=structured"):
        allocate(unstructured, cost, "latency_ms", 0.5, key="protocol.budget")
    with pytest.raises(ValueError, match=r"`protocol.budget.target` must be .* in \(0, 1\] .*; got 1.5"):
        allocate(sens, cost, "flops", 1.5, key="protocol.budget")


class _LatencyLike:
    """A deterministic stand-in for MeasuredLatency: sqrt of the predicted FLOPs fraction, queries counted."""

    def __init__(self, cost: CostModel) -> None:
        self.cost, self.layers, self.calls = cost, list(cost.layers), 0

    def fraction(self, pruned) -> float:
        self.calls += 1
        return self.cost.fraction(pruned)["flops"] ** 0.5


@pytest.mark.parametrize("target", [0.75, 0.9])
def test_measured_budget_bisects_to_the_first_allocation_of_the_equal_drop_path(resnet_budget, target):
    from netcompress.compression.budget import equal_drop_path

    _, layers, sens, cost, _ = resnet_budget
    latency = _LatencyLike(cost)
    alloc = allocate(sens, cost, "latency_ms", target, latency=latency)
    steps = {n: steps_of(sens.units[n], "structured", sens.ratios[-1]) for n in layers}
    moves = equal_drop_path(sens, steps)
    index = {n: 0 for n in layers}
    walked = None  # the forward walk: one move at a time until the budget is met
    for count in range(len(moves) + 1):
        pruned = {n: steps[n][i] for n, i in index.items()}
        if cost.fraction(pruned)["flops"] ** 0.5 <= target:
            walked = pruned
            break
        index[moves[count][0]] += 1
    assert alloc.pruned == walked
    assert alloc.predicted["latency_ms"] <= target  # the measured value of the chosen allocation
    assert any(latency.fraction({**alloc.pruned, n: steps[n][steps[n].index(p) - 1]}) > target
               for n, p in alloc.pruned.items() if p)  # one step less misses it
    assert alloc.predicted["flops"] == pytest.approx(alloc.predicted["latency_ms"] ** 2)
    # bisection: about log2(path) allocations timed, not one per filter
    assert alloc.queries <= len(moves).bit_length() + 1 < len(moves)


def test_measured_latency_thins_the_filters_magnitude_pruning_would_remove():
    from netcompress.compression.latency_model import MeasuredLatency

    net = _net("resnet20_cifar", width=0.25)
    layers, _ = candidate_layers(net, example_input=EXAMPLE)
    names = list(layers)[:3]
    latency = MeasuredLatency(net, names, SIZE, "l1", repeats=2, warmup=0)
    pruned = {names[0]: 1, names[1]: 3}
    thin = latency.thinned(pruned)
    reference = remove_channels(net, {n: _lowest_l1(layers[n], k) for n, k in pruned.items()}, EXAMPLE)
    assert {n: thin.get_submodule(n).out_channels for n in names} == {names[0]: 3, names[1]: 1, names[2]: 4}
    x = torch.randn(2, *SIZE)
    with torch.no_grad():
        torch.testing.assert_close(thin.eval()(x), reference.eval()(x))
    first = latency.fraction(pruned)
    assert first > 0 and latency.fraction(dict(pruned)) == first and latency.measurements == 1  # cached
    assert net.get_submodule(names[0]).out_channels == 4  # the caller's net is untouched


# ----- the protocol -----------------------------------------------------------------------------

NET = ["model.name=conv2_lth", "+model.width=0.125", "scheduler=none"]


@pytest.mark.parametrize("override,match", [
    ("protocol.ratios=[0.5,0.3]", "protocol.ratios` must be strictly increasing"),
    ("protocol.budget.metric=latency", "protocol.budget.metric` must be one of params, flops"),
    ("protocol.kind=channels", "protocol.kind` must be one of structured, unstructured"),
    ("protocol.allocator=knap", "protocol.allocator` must be one of equal_drop"),
])
def test_bad_protocol_settings_fail_at_construction(tmp_path, override, match):
    from netcompress.pipeline.build import instantiate

    cfg = compose_config([*TINY, *NET, "protocol=sensitivity", override], tmp_path / "job")
    with pytest.raises(ValueError, match=match):
        instantiate(cfg.protocol)


def test_protocol_without_a_dense_net_fails_before_any_work(tmp_path):
    from netcompress.protocols import run_protocol

    cfg = compose_config([*TINY, *NET, "protocol=sensitivity"], tmp_path / "job")
    with pytest.raises(ValueError, match="needs the dense net to analyse: set init_from"):
        run_protocol(cfg)


@pytest.mark.slow
def test_protocol_runs_from_config_and_reports_predicted_vs_achieved(tmp_path):
    from netcompress.run import run

    dense = run(compose_config([*TINY, *NET], tmp_path / "dense"))
    assert dense["status"] == "ok"
    ratios = [0.25, 0.5, 0.75]
    cfg = compose_config([*TINY, *NET, "protocol=sensitivity", f"init_from={tmp_path / 'dense' / 'model.pt'}",
                          "protocol.skip_first_last=false", f"protocol.ratios={ratios}",
                          "protocol.budget.target=0.6"], tmp_path / "job")
    results = run(cfg)
    folder = Path(cfg.paths.output_dir)
    saved = json.loads((folder / "results.json").read_text())
    assert saved["status"] == "ok"
    ratios_by_layer = saved["sensitivity/layer_ratios"]
    assert set(ratios_by_layer) == {"features.0", "features.2"}
    assert saved["sensitivity/predicted_flops_fraction"] <= 0.6
    # the fine-tuned, physically thinned network has exactly the predicted cost
    assert saved["sensitivity/achieved_flops_fraction"] == pytest.approx(saved["sensitivity/predicted_flops_fraction"])
    assert saved["sensitivity/achieved_params_fraction"] == pytest.approx(
        saved["sensitivity/predicted_params_fraction"])
    assert saved["flops"] == pytest.approx(saved["sensitivity/achieved_flops_fraction"] * dense["flops"])
    rows = list(csv.DictReader((folder / "sensitivity.csv").open()))
    assert len(rows) == 1 + 2 * len(ratios) and rows[0]["layer"] == "dense"
    assert float(rows[0]["acc1"]) == pytest.approx(saved["sensitivity/dense_val_acc1"])
    assert (folder / "sensitivity.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert results["sensitivity/layer_pruned"] == {n: round(r * 8) for n, r in ratios_by_layer.items()}


@pytest.mark.slow
def test_protocol_with_a_measured_latency_budget_reports_predicted_and_achieved(tmp_path):
    """resnet20 (full width): 90% of its 9 block convs' filters go at the grid's top, far below 0.9 of the
    dense latency, so the target is reachable despite timing noise; the assertions are about bookkeeping."""
    from netcompress.run import run

    net = ["model.name=resnet20_cifar", "scheduler=none", "latency_repeats=10"]
    dense = run(compose_config([*TINY, *net], tmp_path / "dense"))
    assert dense["status"] == "ok"
    cfg = compose_config([*TINY, *net, "protocol=sensitivity", f"init_from={tmp_path / 'dense' / 'model.pt'}",
                          "protocol.ratios=[0.5,0.9]", "protocol.budget.metric=latency_ms",
                          "protocol.budget.target=0.9"], tmp_path / "job")
    run(cfg)
    saved = json.loads((Path(cfg.paths.output_dir) / "results.json").read_text())
    assert saved["status"] == "ok" and saved["sensitivity/metric"] == "latency_ms"
    assert 0 < saved["sensitivity/predicted_latency_ms_fraction"] <= 0.9   # the bisection's measured choice
    assert saved["sensitivity/achieved_latency_ms_fraction"] > 0           # the fine-tuned thin net, timed again
    assert saved["sensitivity/predicted_flops_fraction"] < 1
    assert saved["sensitivity/achieved_flops_fraction"] == pytest.approx(saved["sensitivity/predicted_flops_fraction"])
    assert 2 <= saved["sensitivity/latency_measurements"] <= 16  # floor + grid top + ~log2(9 x 14 steps)


def test_rounded_top_ratio_is_reachable_and_interpolated_at_the_fraction_really_pruned():
    """0.9 of 32 filters prunes round(28.8) = 29 = 0.906 of them: the curve's last point sits there."""
    from netcompress.compression.sensitivity import drop_curve

    sens = Sensitivity(0.8, {"a": {0.5: 0.7, 0.9: 0.4}}, {"a": 32}, "structured", [0.5, 0.9])
    assert steps_of(32, "structured", 0.9)[-1] == 29
    drops = drop_curve(sens, "a", [0.0, 8 / 32, 16 / 32, 29 / 32, 22.5 / 32])
    assert drops == pytest.approx([0.0, 0.05, 0.1, 0.4, 0.25])


@pytest.mark.parametrize("criterion", ["taylor", "activation", "bn_gamma"])
def test_criteria_that_need_data_or_bn_are_refused_before_the_analysis(criterion):
    from netcompress.protocols.sensitivity import SensitivityProtocol

    with pytest.raises(ValueError, match=rf"protocol.importance`='{criterion}' is not scored from a layer's own weights"):
        SensitivityProtocol(importance=criterion, budget={"metric": "flops", "target": 0.5})

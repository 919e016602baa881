"""Data-driven importance (compression/calibration.py): activation means, APoZ counts and Taylor scores
against hand / autograd computations, agreement with torch-pruning's Taylor and L1 importance, the
calibration leaves BN statistics, modes and gradients alone and runs exactly ``batches`` passes,
``random`` is seeded, bn_mean_variance by hand, magnitude pruning with taylor / activation end to
end from config, and the clear errors (no ReLU for apoz, BN criteria without BN, bad counts)."""
from __future__ import annotations

import contextlib
import copy

import pytest
import torch
import torch.nn.functional as F
import torch_pruning as tp
from torch import nn

from netcompress.callbacks.magnitude_pruning import MagnitudePruning
from netcompress.callbacks.slimming import Slimming, slimming_masks
from netcompress.compression.calibration import calibrated
from netcompress.compression.importance import IMPORTANCE, check_applies, filter_scores, score
from netcompress.compression.masks import structured_masks, unstructured_masks
from netcompress.models.cifar_resnet import BasicBlock
from netcompress.pipeline.fit import fit_and_test

PRUNE = "callbacks.magnitude_pruning"


class ConvBNReLU(nn.Module):
    """conv(1->3, 1x1) - BN - ReLU - conv(3->2, 1x1) - ReLU - pool - fc: every statistic is checkable by hand."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(1, 3, 1, bias=False)
        self.bn = nn.BatchNorm2d(3)
        self.act = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(3, 2, 1, bias=False)
        self.act2 = nn.ReLU()
        self.fc = nn.Linear(2, 2)
        with torch.no_grad():
            self.conv.weight.copy_(torch.tensor([1.0, -2.0, 0.5]).view(3, 1, 1, 1))
            self.bn.weight.copy_(torch.tensor([1.0, 2.0, -1.0]))
            self.bn.bias.copy_(torch.tensor([0.5, 0.0, 0.25]))
            self.bn.running_mean.copy_(torch.tensor([0.1, -0.2, 0.3]))
            self.bn.running_var.copy_(torch.tensor([1.0, 4.0, 0.25]))
            self.conv2.weight.copy_(torch.tensor([[1.0, -1.0, 0.5], [0.5, 1.0, -2.0]]).view(2, 3, 1, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.act2(self.conv2(self.act(self.bn(self.conv(x)))))
        return self.fc(x.mean((2, 3)))


def batches(n: int = 3, size: int = 4) -> list[tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(0)
    return [(torch.randn(size, 1, 3, 3, generator=g), torch.randint(0, 2, (size,), generator=g)) for _ in range(n)]


def bn_by_hand(net: ConvBNReLU, x: torch.Tensor) -> torch.Tensor:
    """conv then eval-mode BN written out: gamma * (y - mean) / sqrt(var + eps) + beta."""
    y = x * net.conv.weight.view(1, 3, 1, 1)  # a 1x1 conv from one input channel
    bn = net.bn
    shape = (1, 3, 1, 1)
    return (bn.weight.view(shape) * (y - bn.running_mean.view(shape)) / (bn.running_var.view(shape) + bn.eps).sqrt()
            + bn.bias.view(shape)).detach()


def test_activation_and_apoz_equal_hand_computation():
    net, data = ConvBNReLU(), batches()
    layers = {"conv": net.conv, "conv2": net.conv2}
    z = torch.cat([bn_by_hand(net, x) for x, _ in data])  # conv -> BN: what the ReLU sees
    z2 = torch.cat([F.conv2d(F.relu(bn_by_hand(net, x)), net.conv2.weight) for x, _ in data]).detach()  # no BN
    with calibrated(net, layers, "activation", data, batches=3):
        torch.testing.assert_close(filter_scores("activation", net.conv), z.abs().mean((0, 2, 3)))
        torch.testing.assert_close(filter_scores("activation", net.conv2), z2.abs().mean((0, 2, 3)))
    with calibrated(net, layers, "apoz", data, batches=3):
        # 1 - APoZ = non-zero outputs of the following ReLU / (images x positions), Hu et al. 2016
        torch.testing.assert_close(score("apoz", net.conv), (z > 0).float().sum((0, 2, 3)) / (12 * 9))
        torch.testing.assert_close(score("apoz", net.conv2), (z2 > 0).float().sum((0, 2, 3)) / (12 * 9))


def grad_sum(net: nn.Module, data, params) -> list[torch.Tensor]:
    """G = sum over batches of each batch's gradient of the mean cross-entropy (eval mode), via .backward()."""
    net = copy.deepcopy(net).eval()
    named = dict(net.named_parameters())
    for x, y in data:
        F.cross_entropy(net(x), y).backward()
    return [named[p].grad.clone() for p in params]


def test_taylor_equals_autograd_per_weight_per_filter_and_on_bn():
    net, data = ConvBNReLU(), batches()
    g_conv, g_gamma, g_beta = grad_sum(net, data, ["conv2.weight", "bn.weight", "bn.bias"])
    with calibrated(net, {"conv2": net.conv2, "bn": net.bn}, "taylor", data, batches=3):
        w = net.conv2.weight.detach()
        torch.testing.assert_close(score("taylor", net.conv2), (w * g_conv).abs())  # |w G| per weight
        torch.testing.assert_close(filter_scores("taylor", net.conv2), (w * g_conv).sum((1, 2, 3)).abs())
        gate = net.bn.weight.detach() * g_gamma + net.bn.bias.detach() * g_beta  # Molchanov 2019: BN gate
        torch.testing.assert_close(score("taylor", net.bn), gate.abs())
        torch.testing.assert_close(filter_scores("taylor", net.bn), gate.abs())
        masks = unstructured_masks({"conv2": net.conv2}, 0.5, importance="taylor")
    assert int((~masks["conv2"]).sum()) == 3


@pytest.mark.parametrize("criterion", ["taylor", "l1"])
def test_filter_scores_agree_with_torch_pruning(criterion):
    """Our per-filter Taylor / L1 equal torch-pruning's on the conv's own weights (group_reduction='first',
    no normaliser; Taylor multivariable=True: |sum_s w_s g_s|, Molchanov et al. 2019)."""
    net, data = ConvBNReLU(), batches()
    reference = copy.deepcopy(net).eval()
    graph = tp.DependencyGraph().build_dependency(reference, example_inputs=torch.zeros(1, 1, 3, 3))
    if criterion == "taylor":
        for x, y in data:  # torch-pruning reads .grad: the summed gradient of the same batches
            F.cross_entropy(reference(x), y).backward()
        scorer = tp.importance.TaylorImportance(group_reduction="first", normalizer=None, multivariable=True)
    else:
        scorer = tp.importance.MagnitudeImportance(p=1, group_reduction="first", normalizer=None)
    for name in ("conv", "conv2"):
        group = graph.get_pruning_group(getattr(reference, name), tp.prune_conv_out_channels,
                                        idxs=list(range(getattr(net, name).out_channels)))
        with calibrated(net, {name: getattr(net, name)}, criterion, data, batches=3):
            ours = filter_scores(criterion, getattr(net, name))
        torch.testing.assert_close(ours, scorer(group).float(), rtol=1e-5, atol=1e-7)


def test_group_criteria_are_torch_pruning_dependency_groups_by_hand():
    """DepGraph (Fang et al. 2023) via torch-pruning, group_reduction='mean', no normaliser. conv's group is its
    filters, its BN channels and conv2's input slices; conv2's group is its filters and fc's input columns.
    Magnitude: mean over members of sum |w|^p (BN: |gamma|^p). Taylor (multivariable): mean over the conv
    members of |sum w * G|; torch-pruning 1.6 gives BN no Taylor term, so conv's mean is over two members."""
    net, data = ConvBNReLU(), batches()
    layers = {"conv": net.conv, "conv2": net.conv2}
    w1, w2, fc = net.conv.weight.detach().flatten(1), net.conv2.weight.detach().flatten(1), net.fc.weight.detach()
    gamma = net.bn.weight.detach()
    for p, name in ((1, "group_l1"), (2, "group_l2")):
        with calibrated(net, layers, name, data):
            torch.testing.assert_close(filter_scores(name, net.conv),
                                       (w1.abs().pow(p).sum(1) + gamma.abs().pow(p) + w2.abs().pow(p).sum(0)) / 3)
            torch.testing.assert_close(filter_scores(name, net.conv2),
                                       (w2.abs().pow(p).sum(1) + fc.abs().pow(p).sum(0)) / 2)
    g1, g2, gfc = grad_sum(net, data, ["conv.weight", "conv2.weight", "fc.weight"])
    before = [p.grad for p in net.parameters()]
    with calibrated(net, layers, "group_taylor", data, batches=3):
        own, consumer = (w1 * g1.flatten(1)).sum(1).abs(), (w2 * g2.flatten(1)).sum(0).abs()
        torch.testing.assert_close(filter_scores("group_taylor", net.conv), (own + consumer) / 2)
        torch.testing.assert_close(filter_scores("group_taylor", net.conv2),
                                   ((w2 * g2.flatten(1)).sum(1).abs() + (fc * gfc).sum(0).abs()) / 2)
    assert [p.grad for p in net.parameters()] == before  # torch-pruning read G from .grad; restored
    # the layer's own term alone (group_reduction='first') is the per-layer criterion of the same name
    with calibrated(net, layers, "l1", data):
        torch.testing.assert_close(filter_scores("l1", net.conv), w1.abs().sum(1))


def test_calibration_leaves_bn_statistics_modes_and_gradients_alone_and_counts_batches():
    net, data = ConvBNReLU(), batches(n=10)
    net.train()
    net.fc.weight.grad = torch.full_like(net.fc.weight, 7.0)  # an earlier step's gradient, to be kept
    net.conv.weight.requires_grad_(False)  # a frozen layer stays frozen
    bn_before = {k: v.clone() for k, v in net.bn.state_dict().items()}
    calls, drawn = [], []
    net.register_forward_pre_hook(lambda module, inputs: calls.append(1))

    def loader():
        for batch in data:
            drawn.append(1)
            yield batch

    for criterion in ("activation", "apoz", "taylor"):
        calls.clear(), drawn.clear()
        with calibrated(net, {"conv": net.conv, "conv2": net.conv2}, criterion, loader(), batches=3):
            pass
        assert len(calls) == 3 and len(drawn) == 3, criterion  # 3 forward passes, no batch made in vain
        for key, value in net.bn.state_dict().items():
            assert torch.equal(value, bn_before[key]), (criterion, key)  # eval mode: running stats untouched
        assert all(m.training for m in net.modules())  # modes restored
        assert torch.equal(net.fc.weight.grad, torch.full_like(net.fc.weight, 7.0))
        assert net.conv.weight.grad is None and net.conv2.weight.grad is None
        assert not net.conv.weight.requires_grad and net.conv2.weight.requires_grad
    calls.clear()
    with calibrated(net, {"conv": net.conv}, "taylor", batches(n=2), batches=8):
        pass
    assert len(calls) == 2  # a loader shorter than `batches`: all of it
    with pytest.raises(RuntimeError, match="importance 'taylor' reads statistics of a calibration pass"):
        score("taylor", net.conv)  # the statistics end with the block


def test_fused_batchnorm_act_and_linear_layers_are_followed():
    """timm's BatchNormAct2d (BN + ReLU in one module) and a Linear -> ReLU: z = pre-activation, APoZ at the act."""
    from timm.layers import BatchNormAct2d

    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(2, 4, 3), BatchNormAct2d(4, act_layer=nn.ReLU), nn.Flatten(), nn.Linear(4 * 16, 5),
                        nn.ReLU(), nn.Linear(5, 2)).eval()
    data = [(torch.randn(3, 2, 6, 6), torch.tensor([0, 1, 0]))]
    x = data[0][0]
    bn = net[1]
    z = F.batch_norm(net[0](x), bn.running_mean, bn.running_var, bn.weight, bn.bias, False, 0.0, bn.eps).detach()
    h = net[3](F.relu(z).flatten(1)).detach()
    layers = {"0": net[0], "3": net[3]}
    with calibrated(net, layers, "apoz", data, batches=1):
        torch.testing.assert_close(score("activation", net[0]), z.abs().mean((0, 2, 3)))
        torch.testing.assert_close(score("apoz", net[0]), (z > 0).float().mean((0, 2, 3)))
        torch.testing.assert_close(score("activation", net[3]), h.abs().mean(0))
        torch.testing.assert_close(score("apoz", net[3]), (h > 0).float().mean(0))


def test_random_is_seeded_and_independent_of_the_other_layers():
    torch.manual_seed(0)
    a, b = nn.Conv2d(3, 8, 3), nn.Linear(10, 6)

    def draws(layers, seed):
        with calibrated(None, layers, "random", seed=seed):
            return {n: (score("random", m).clone(), filter_scores("random", m).clone()) for n, m in layers.items()}

    first, again, other = draws({"a": a, "b": b}, 3), draws({"a": a, "b": b}, 3), draws({"a": a, "b": b}, 4)
    alone = draws({"b": b}, 3)
    for name in ("a", "b"):
        assert all(torch.equal(x, y) for x, y in zip(first[name], again[name]))  # same seed: same draws
        assert not torch.equal(first[name][0], other[name][0])  # another seed: other draws
    assert torch.equal(first["b"][0], alone["b"][0])  # a layer's draws depend on its name, not on the others
    assert first["a"][0].shape == a.weight.shape and first["a"][1].shape == (8,)
    assert 0 <= float(first["a"][0].min()) and float(first["a"][0].max()) < 1
    with calibrated(None, {"a": a, "b": b}, "random", seed=3):
        masks = structured_masks({"a": a, "b": b}, 0.5, "global", importance="random")
    order = torch.cat([first["a"][1], first["b"][1]]).argsort()[:7]  # the 7 lowest draws of 14 filters go
    pruned = torch.cat([~masks["a"], ~masks["b"]]).nonzero().flatten()
    assert sorted(order.tolist()) == pruned.tolist()


def test_bn_mean_variance_by_hand_and_in_slimming():
    bn = nn.BatchNorm2d(3)
    with torch.no_grad():
        bn.running_mean.copy_(torch.tensor([2.0, 0.0, -1.0]))
        bn.running_var.copy_(torch.tensor([0.25, 1.0, 0.5]))
    torch.testing.assert_close(score("bn_mean_variance", bn), torch.tensor([4.25, 1.0, 1.5]))  # var + mean^2
    # the low-variance channel with a large mean stays; variance alone would drop it
    assert slimming_masks({"bn": bn}, 1 / 3, "bn_mean_variance")["bn"].tolist() == [True, False, True]
    assert slimming_masks({"bn": bn}, 1 / 3, "bn_variance")["bn"].tolist() == [False, True, True]


def test_slimming_ranks_bn_channels_by_taylor_from_calibration():
    net, data = ConvBNReLU(), batches()
    _, g_gamma, g_beta = grad_sum(net, data, ["conv2.weight", "bn.weight", "bn.bias"])
    gate = (net.bn.weight.detach() * g_gamma + net.bn.bias.detach() * g_beta).abs()
    with calibrated(net, {"bn": net.bn}, "taylor", data, batches=3):
        keep = slimming_masks({"bn": net.bn}, 1 / 3, "taylor")["bn"]
    assert keep.tolist() == [bool(i != int(gate.argmin())) for i in range(3)]


@pytest.mark.parametrize("criterion,granularity", [("taylor", "structured"), ("activation", "structured"),
                                                   ("taylor", "unstructured"), ("random", "unstructured"),
                                                   ("group_l1", "structured"), ("group_taylor", "structured")])
def test_magnitude_pruning_with_data_criteria_end_to_end(tiny_config, monkeypatch, criterion, granularity):
    import netcompress.callbacks.magnitude_pruning as module_under_test

    seen = []  # the statistics each pruning event's calibration produced

    @contextlib.contextmanager
    def spy(*args, **kwargs):
        with calibrated(*args, **kwargs) as stats:
            seen.append({layer: {k: v.clone() for k, v in values.items()} for layer, values in stats.items()})
            yield stats

    monkeypatch.setattr(module_under_test, "calibrated", spy)
    cfg = tiny_config("+model.width=0.25", "data.val_size=16", "data.test_size=16", "compression=[magnitude_pruning]",
                      f"{PRUNE}.importance={criterion}", f"{PRUNE}.granularity={granularity}", f"{PRUNE}.scope=layer",
                      f"{PRUNE}.sparsity=0.5", f"{PRUNE}.calibration_batches=2")
    results, objects = fit_and_test(cfg)
    callback = next(c for c in objects["trainer"].callbacks if isinstance(c, MagnitudePruning))
    assert callback.importance == criterion and callback.calibration_batches == 2 and callback.masks
    layers = dict(objects["module"].net.named_modules())
    for name, mask in callback.masks.items():
        assert int((~mask).sum()) == round(0.5 * mask.numel()), name  # scope=layer: exact per layer
        weight = layers[name].weight
        zero = weight.flatten(1).eq(0).all(1) if granularity == "structured" else weight.eq(0)
        assert torch.equal(zero, ~mask), name  # pruned = zero after training
    assert results["compress/sparsity"] == pytest.approx(callback.global_sparsity())
    assert 0.45 < results["compress/sparsity"] < 0.55
    assert len(seen) == 1  # one oneshot event, one calibration
    for name, mask in callback.masks.items():  # the masks rank the calibration's statistics, by hand
        stats = seen[0][callback._layers[name]]
        if granularity == "unstructured":
            scores = stats[criterion].abs() if criterion == "taylor" else stats[criterion]
        elif criterion.startswith("group_"):
            scores = stats["group"]
        else:
            scores = stats["taylor"].flatten(1).sum(1).abs() if criterion == "taylor" else stats[criterion]
        lowest = scores.flatten().argsort(stable=True)[:round(0.5 * mask.numel())]
        expected = torch.ones(mask.numel(), dtype=torch.bool)
        expected[lowest] = False
        assert torch.equal(mask.flatten().cpu(), expected), name


def test_clear_errors():
    net, data = ConvBNReLU(), batches()
    # apoz needs the ReLU right after the layer: a residual block's conv2 reaches its ReLU only after the add
    block = BasicBlock(4, 4, 4, 1, "B").eval()
    with pytest.raises(ValueError, match=r"importance='apoz' counts the zeros.*1 selected layers have none: "
                                         r"'conv2' \(no activation module\); exclude them"):
        with calibrated(block, {"conv1": block.conv1, "conv2": block.conv2}, "apoz",
                        [(torch.randn(2, 4, 4, 4), torch.zeros(2, dtype=torch.long))]):
            pass
    gelu = nn.Sequential(nn.Linear(3, 4), nn.GELU(), nn.Linear(4, 2))
    with pytest.raises(ValueError, match=r"'0' \(GELU\)"):
        with calibrated(gelu, {"0": gelu[0]}, "apoz", [(torch.randn(2, 3), torch.zeros(2, dtype=torch.long))]):
            pass
    # BN criteria need BatchNorm layers
    with pytest.raises(ValueError, match=r"importance='bn_mean_variance' scores BatchNorm1d/.* layers, but layer "
                                         r"'conv' is a Conv2d"):
        check_applies("bn_mean_variance", {"conv": net.conv})
    # counts, seeds, per-channel criteria on single weights, no data, no calibration
    with pytest.raises(ValueError, match=r"`callbacks\.magnitude_pruning\.calibration_batches` must be an int >= 1; "
                                         r"got 0"):
        MagnitudePruning(granularity="structured", importance="taylor", calibration_batches=0)
    with pytest.raises(ValueError, match=r"`callbacks\.slimming\.calibration_batches` must be an int >= 1; got -1"):
        Slimming(criterion="apoz", calibration_batches=-1)
    with pytest.raises(ValueError, match=r"`callbacks\.magnitude_pruning\.seed` must be an int >= 0; got 'a'"):
        MagnitudePruning(importance="random", seed="a")
    with pytest.raises(ValueError, match=r"`calibration_batches` must be an int >= 1; got 0"):
        with calibrated(net, {"conv": net.conv}, "activation", data, batches=0):
            pass
    with pytest.raises(ValueError, match=r"`callbacks\.magnitude_pruning\.importance`='activation' scores whole "
                                         r"output channels, so it needs granularity=structured"):
        MagnitudePruning(importance="activation")
    with pytest.raises(ValueError, match="needs training batches to calibrate on; got no loader"):
        with calibrated(net, {"conv": net.conv}, "taylor"):
            pass
    with pytest.raises(RuntimeError, match=r"importance 'activation' reads statistics of a calibration pass, but "
                                           r"none ran for this Conv2d"):
        filter_scores("activation", net.conv)


def test_lottery_refuses_criteria_it_cannot_calibrate():
    from netcompress.protocols.lottery import LotteryProtocol
    from netcompress.protocols.pruning_rounds import PruningRounds

    prune = LotteryProtocol._check_prune({"importance": "taylor"})
    with pytest.raises(ValueError, match=r"`protocol\.prune\.importance`='taylor' is scored from a calibration pass.*"
                                         r"use one of l1, l2"):
        PruningRounds(prune)
    assert PruningRounds(LotteryProtocol._check_prune({"importance": "l2"})).importance == "l2"


def test_registry_flags():
    assert {n for n, c in IMPORTANCE.items() if c.needs_data} == {"activation", "apoz", "taylor", "group_taylor"}
    assert [n for n, c in IMPORTANCE.items() if c.seeded] == ["random"]
    assert {n for n, c in IMPORTANCE.items() if c.dependency_group} == {"group_l1", "group_l2", "group_taylor"}
    assert {n for n, c in IMPORTANCE.items() if c.per_channel} == {"activation", "apoz", "group_l1", "group_l2",
                                                                    "group_taylor"}


def test_slimming_with_a_data_criterion_end_to_end(tiny_config, monkeypatch):
    """criterion=taylor on a VGG's BNs: one calibration of 2 batches, channels removed by its |gate| ranking."""
    import netcompress.callbacks.slimming as module_under_test

    seen = []

    @contextlib.contextmanager
    def spy(*args, **kwargs):
        with calibrated(*args, **kwargs) as stats:
            seen.append({layer: {k: v.clone() for k, v in values.items()} for layer, values in stats.items()})
            yield stats

    monkeypatch.setattr(module_under_test, "calibrated", spy)
    cfg = tiny_config("compression=[slimming]", "model.name=vgg11_bn_cifar", "+model.width=0.125",
                      "trainer.max_epochs=2", "callbacks.slimming.at_epochs=[1]", "callbacks.slimming.prune_ratio=0.5",
                      "callbacks.slimming.criterion=taylor", "callbacks.slimming.calibration_batches=2",
                      "save_model=false")
    results, objects = fit_and_test(cfg)
    assert len(seen) == 1 and all(set(s) == {"taylor"} for s in seen[0].values())
    total = sum(s["taylor"].numel() for s in seen[0].values())
    assert results["compress/channels_pruned"] == pytest.approx(round(0.5 * total) / total)

"""evaluation/saliency.py: Grad-CAM and gradient saliency against autograd written out by hand, the
Spearman / top-k IoU helpers against scipy and hand examples, the evaluator with an identical, a
different and no parent (nets left untouched), and a run from config with init_from."""
from __future__ import annotations

import copy
import json
import logging
import math
from pathlib import Path

import pytest
import scipy.stats
import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn

from netcompress import models  # noqa: F401  (registers the CIFAR nets in timm)
from conftest import TINY, compose_config
from netcompress.datamodules.synthetic import SyntheticDataModule
from netcompress.evaluation.evaluators import build_evaluators
from netcompress.evaluation.saliency import (GRID_FILE, SaliencyRetention, _backward_safe, average_ranks, gradcam_layer,
                                             gradcam_maps, gradient_maps, spearman, top_percent_iou)
from netcompress.models.factory import create_model

LOGGER = "netcompress.evaluation.saliency"


def tiny_cnn(stride: int = 1) -> nn.Sequential:
    """conv -> relu -> global average pool -> linear: 3 input channels, 4 feature maps, 3 classes."""
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 4, 3, stride=stride, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(1),
                         nn.Flatten(), nn.Linear(4, 3)).eval()


class TimmLike(nn.Module):
    """The same net with timm's forward_features / forward_head split."""

    def __init__(self, net: nn.Sequential) -> None:
        super().__init__()
        self.conv, self.act, self.fc = net[0], net[1], net[4]

    def forward_features(self, x):
        return self.act(self.conv(x))

    def forward_head(self, x):
        return self.fc(x.mean((2, 3)))

    def forward(self, x):
        return self.forward_head(self.forward_features(x))


def hand_gradcam(net: nn.Sequential, x: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Selvaraju et al. 2017 written out: A = relu(conv(x)); alpha_k = mean_ij d y_c / d A_kij;
    map = relu(sum_k alpha_k A_k), at the feature map's own resolution."""
    features = net[1](net[0](x))
    logits = net[4](net[3](net[2](features)))
    picked = logits.gather(1, targets[:, None]).sum()
    grads, = torch.autograd.grad(picked, features)
    alpha = grads.mean((2, 3), keepdim=True)
    return F.relu((alpha * features).sum(1))


def test_gradcam_equals_the_hand_computation_on_a_tiny_conv_net():
    net = tiny_cnn()
    x, targets = torch.randn(5, 3, 6, 6), torch.tensor([0, 1, 2, 0, 2])
    forward, layer, name = gradcam_layer(net, x[:1])
    assert layer is net[1] and name == "1"  # the last 4-D output larger than 1x1: the ReLU before the pool
    got = gradcam_maps(forward, layer, x, targets)
    expected = hand_gradcam(net, x, targets)  # same 6x6 resolution: upsampling is the identity
    assert got.shape == (5, 6, 6) and (expected > 0).any()
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("upsample", ["bilinear", "nearest"])
def test_gradcam_of_a_strided_net_is_upsampled_to_the_input_and_timm_split_is_found(upsample):
    net = tiny_cnn(stride=2)  # 8x8 input -> 4x4 feature map
    timm_like = TimmLike(net)
    x, targets = torch.randn(3, 3, 8, 8), torch.tensor([2, 0, 1])
    forward, layer, name = gradcam_layer(timm_like, x[:1])
    assert name == "forward_features"
    got = gradcam_maps(forward, layer, x, targets, upsample)
    align = {"align_corners": False} if upsample == "bilinear" else {}
    expected = F.interpolate(hand_gradcam(net, x, targets)[:, None], (8, 8), mode=upsample, **align)[:, 0]
    assert got.shape == (3, 8, 8)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-6)


def test_gradient_saliency_equals_autograd_max_over_channels():
    net = create_model("resnet20_cifar", num_classes=4).eval()
    x, targets = torch.randn(3, 3, 32, 32), torch.tensor([3, 0, 1])
    leaf = x.clone().requires_grad_(True)
    grads, = torch.autograd.grad(net(leaf).gather(1, targets[:, None]).sum(), leaf)
    torch.testing.assert_close(gradient_maps(net, x, targets), grads.abs().amax(1))


def test_resnet_auto_layer_is_its_last_stage():
    """forward_features of the CIFAR ResNet ends with layer3: naming it gives the same Grad-CAM."""
    net = create_model("resnet20_cifar", num_classes=4).eval()
    x, targets = torch.randn(2, 3, 32, 32), torch.tensor([1, 2])
    auto = gradcam_layer(net, x[:1])
    named = gradcam_layer(net, x[:1], "layer3")
    assert auto[2] == "forward_features" and named[1] is net.layer3
    torch.testing.assert_close(gradcam_maps(*auto[:2], x, targets), gradcam_maps(*named[:2], x, targets))
    with pytest.raises(ValueError, match=r"`evaluators.saliency.layer`='layer9' is not a module of CifarResNet"):
        gradcam_layer(net, x[:1], "layer9")


# ----- comparing maps ------------------------------------------------------------------------------

def test_ranks_and_spearman_equal_scipy_with_ties():
    torch.manual_seed(1)
    a = torch.randint(0, 5, (4, 7, 6)).float()  # many ties
    b = a + torch.randint(0, 3, (4, 7, 6)).float()
    ranks = average_ranks(a.flatten(1))
    for i in range(4):
        assert ranks[i].tolist() == pytest.approx((scipy.stats.rankdata(a[i].flatten().numpy()) - 1).tolist())
    expected = [scipy.stats.spearmanr(a[i].flatten().numpy(), b[i].flatten().numpy()).statistic for i in range(4)]
    assert spearman(a, b).tolist() == pytest.approx(expected)


def test_identical_reversed_and_constant_maps():
    a = torch.arange(100.0).view(1, 10, 10)
    assert spearman(a, a).item() == pytest.approx(1.0) and top_percent_iou(a, a, 10).item() == 1.0
    reversed_ = a.flip(-1).flip(-2)
    assert spearman(a, reversed_).item() == pytest.approx(-1.0)
    assert top_percent_iou(a, reversed_, 10).item() == 0.0  # top 10 pixels: 90..99 vs 0..9
    assert math.isnan(spearman(a, torch.ones_like(a)).item())  # a constant map has no ranking


def test_top_percent_iou_on_a_hand_example():
    a = torch.arange(10.0)[None]                                            # top 40%: pixels 6, 7, 8, 9
    b = torch.tensor([[9.0, 8.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 7.0, 6.0]])   # top 40%: pixels 0, 1, 8, 9
    assert top_percent_iou(a, b, 40).item() == pytest.approx(2 / 6)          # {8, 9} of {0, 1, 6, 7, 8, 9}
    assert top_percent_iou(a, b, 5).item() == 0.0                            # k = ceil(0.5) = 1: {9} vs {0}


# ----- the evaluator -------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def datamodule():
    dm = SyntheticDataModule(num_classes=4, train_size=16, val_size=8, test_size=24, batch_size=8)
    dm.setup()
    return dm


def _snapshot(net: nn.Module) -> dict:
    return {"state": {k: v.clone() for k, v in net.state_dict().items()},
            "modes": [m.training for m in net.modules()],
            "requires_grad": [p.requires_grad for p in net.parameters()]}


def _assert_untouched(net: nn.Module, before: dict) -> None:
    after = _snapshot(net)
    for key, value in before["state"].items():
        torch.testing.assert_close(after["state"][key], value, rtol=0, atol=0)
    assert after["modes"] == before["modes"] and after["requires_grad"] == before["requires_grad"]
    assert all(p.grad is None for p in net.parameters())
    assert not any(m._forward_hooks or m._forward_pre_hooks or m._backward_hooks for m in net.modules())


def test_identical_parent_gives_one_and_nets_are_left_untouched(datamodule, tmp_path):
    net = create_model("resnet20_cifar", num_classes=4)
    net.train()
    net.layer1.eval()  # a mixed mode must come back as it was
    parent = copy.deepcopy(net).eval().requires_grad_(False)
    before, parent_before = _snapshot(net), _snapshot(parent)
    figures = SaliencyRetention(samples=16, grid_images=3)(net, datamodule, parent, tmp_path)
    for key in ("gradient_spearman", "gradcam_spearman", "gradient_iou", "gradcam_iou"):
        assert figures[f"saliency/{key}"] == pytest.approx(1.0), key
    assert figures["saliency/grid_file"] == GRID_FILE
    _assert_untouched(net, before)
    _assert_untouched(parent, parent_before)
    with Image.open(tmp_path / GRID_FILE) as image:  # a valid PNG: 5 columns x 3 rows of 160 px panels
        assert image.format == "PNG" and image.size == (800, 3 * 160 + 40)


def test_a_different_parent_gives_figures_in_range_independent_of_batch_size_and_inference_mode(datamodule):
    net, parent = create_model("resnet20_cifar", num_classes=4), create_model("resnet20_cifar", num_classes=4)
    figures = SaliencyRetention(samples=10, batch_size=16)(net, datamodule, parent)
    with torch.inference_mode():  # as after trainer.test: the evaluator switches autograd back on
        again = SaliencyRetention(samples=10, batch_size=3)(net, datamodule, parent)
    assert set(figures) == {f"saliency/{k}" for k in ("gradient_spearman", "gradcam_spearman", "gradient_iou",
                                                      "gradcam_iou")}  # no out_dir: no PNG, no grid_file
    assert figures == pytest.approx(again, abs=1e-5)  # batched convs round differently, nothing more
    assert -1 <= figures["saliency/gradient_spearman"] < 0.99 and 0 <= figures["saliency/gradient_iou"] < 0.99


def test_no_parent_logs_one_line_draws_the_child_only_and_reports_no_correlation(datamodule, tmp_path, caplog):
    caplog.set_level(logging.INFO, logger=LOGGER)
    figures = SaliencyRetention(samples=4, grid_images=2)(create_model("resnet20_cifar", num_classes=4),
                                                           datamodule, None, tmp_path)
    assert figures == {"saliency/grid_file": GRID_FILE}
    lines = [r for r in caplog.records if r.name == LOGGER]
    assert len(lines) == 1 and "no parent net" in lines[0].getMessage() and lines[0].levelno == logging.INFO
    with Image.open(tmp_path / GRID_FILE) as image:  # 3 columns: image, child gradient, child Grad-CAM
        assert image.size == (480, 2 * 160 + 40)


def test_an_unsafe_channels_last_cpu_net_is_attributed_on_a_contiguous_copy():
    net = nn.Sequential(nn.Conv2d(4, 8, 1, stride=2)).to(memory_format=torch.channels_last)  # models/memory_format.py
    safe = _backward_safe(net)
    assert safe is not net and safe[0].weight.stride() == (4, 1, 1, 1)  # contiguous copy
    assert net[0].weight.stride() == (4, 1, 4, 4)  # the net itself stays channels_last
    plain = nn.Sequential(nn.Conv2d(8, 8, 1, stride=2)).to(memory_format=torch.channels_last)
    assert _backward_safe(plain) is plain


@pytest.mark.parametrize("key, value, match", [
    ("samples", 0, r"`evaluators.saliency.samples` must be an int >= 1; got 0"),
    ("top_percent", 150, r"`evaluators.saliency.top_percent` must be a number in \(0, 100\]"),
    ("top_percent", 0, r"`evaluators.saliency.top_percent`"),
    ("grid_images", -1, r"`evaluators.saliency.grid_images` must be an int >= 0; got -1"),
    ("batch_size", 1.5, r"`evaluators.saliency.batch_size` must be an int >= 1"),
    ("upsample", "cubic", r"`evaluators.saliency.upsample` must be one of bilinear, nearest; got 'cubic'"),
    ("layer", "", r"`evaluators.saliency.layer` must be a module name"),
])
def test_bad_arguments_fail_at_construction(key, value, match):
    with pytest.raises(ValueError, match=match):
        build_evaluators({"saliency": {key: value}})


def test_config_composes_and_bad_values_fail_before_training(tmp_path):
    from netcompress.pipeline.build import build

    cfg = compose_config([*TINY, "evaluation=[saliency]"], tmp_path / "ok")
    evaluator, = build_evaluators(cfg.evaluators)
    assert isinstance(evaluator, SaliencyRetention) and evaluator.samples == 64 and evaluator.top_percent == 10.0
    cfg = compose_config([*TINY, "evaluation=[saliency]", "evaluators.saliency.samples=0"], tmp_path / "bad")
    with pytest.raises(ValueError, match="evaluators.saliency.samples"):
        build(cfg)


@pytest.mark.slow  # two tiny runs (dense, then init_from)
def test_a_run_from_init_from_writes_the_keys_and_the_grid(tmp_path):
    from netcompress.run import run

    dense = run(compose_config([*TINY, "evaluation=[]"], tmp_path / "dense"))
    assert dense["status"] == "ok"
    cfg = compose_config([*TINY, f"init_from={tmp_path / 'dense' / 'model.pt'}", "evaluation=[saliency]",
                          "evaluators.saliency.samples=8", "evaluators.saliency.grid_images=2"], tmp_path / "child")
    run(cfg)
    saved = json.loads((Path(cfg.paths.output_dir) / "results.json").read_text())
    for key in ("gradient_spearman", "gradcam_spearman", "gradient_iou", "gradcam_iou"):
        value = saved[f"saliency/{key}"]
        assert value is None or -1.0 <= value <= 1.0, key
    assert saved["saliency/gradient_spearman"] is not None and 0 <= saved["saliency/gradient_iou"] <= 1
    assert saved["saliency/grid_file"] == GRID_FILE
    with Image.open(Path(cfg.paths.output_dir) / GRID_FILE) as image:
        assert image.format == "PNG" and image.size == (800, 2 * 160 + 40)


def test_a_net_without_a_feature_map_gets_gradient_saliency_only(datamodule, tmp_path, caplog):
    """An MLP has no 4-D feature map: no Grad-CAM keys or columns, one log line per net, no error."""
    caplog.set_level(logging.INFO, logger=LOGGER)
    torch.manual_seed(0)
    net = nn.Sequential(nn.Flatten(), nn.Linear(3 * 32 * 32, 4))
    figures = SaliencyRetention(samples=4, grid_images=1)(net, datamodule, copy.deepcopy(net), tmp_path)
    assert figures == {"saliency/gradient_spearman": pytest.approx(1.0), "saliency/gradient_iou": 1.0,
                       "saliency/grid_file": GRID_FILE}
    assert [r.getMessage() for r in caplog.records if r.name == LOGGER] == \
        ["evaluation.saliency: Sequential has no 4-D feature map, so no Grad-CAM (gradient saliency only)"] * 2
    with Image.open(tmp_path / GRID_FILE) as image:  # image, parent gradient, child gradient
        assert image.size == (480, 160 + 40)

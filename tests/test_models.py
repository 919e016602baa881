"""Tests for models/: the timm-registered CIFAR nets and models.factory.

Parameter and FLOP counts are checked against formulas written out here from the papers'
layer tables, not against numbers read back from the code.
"""
from __future__ import annotations

import pytest
import timm
import torch
import torch.nn as nn
import torch.nn.functional as F
import torch_pruning as tp
from omegaconf import OmegaConf
from torch.utils.flop_counter import FlopCounterMode

from netcompress import models
from netcompress.models import factory
from netcompress.models.cifar_resnet import ZeroPadShortcut
from netcompress.models.cifar_vgg import VGG_CFGS

RESNETS = [f"resnet{d}_cifar" for d in (20, 32, 44, 56, 110)]
VGGS = [f"vgg{d}_bn_cifar" for d in (11, 13, 16, 19)]
LTHS = ["conv2_lth", "conv4_lth", "conv6_lth"]
ALL = RESNETS + VGGS + LTHS


def n_params(m: nn.Module) -> int:
    return sum(p.numel() for p in m.parameters())


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


@pytest.fixture(scope="module")
def x():
    return torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(0))


def test_registered_names():
    assert set(ALL) <= set(timm.list_models())
    assert sorted(timm.list_models("*_cifar")) == sorted(RESNETS + VGGS)


# --------------------------------------------------------------------------- timm API, every model


@pytest.mark.parametrize("num_classes", [10, 7])
@pytest.mark.parametrize("name", ALL)
def test_timm_api(name, num_classes, x):
    m = timm.create_model(name, num_classes=num_classes).eval()
    with torch.no_grad():
        out = m(x)
        feats = m.forward_features(x)
        assert torch.equal(m.forward_head(feats), out)
        pre = m.forward_head(feats, pre_logits=True)
    assert out.shape == (2, num_classes) and m.num_classes == num_classes
    assert feats.shape[1] == m.num_features and pre.shape == (2, m.head_hidden_size)

    cfg = m.pretrained_cfg
    assert cfg["input_size"] == (3, 32, 32) and cfg["num_classes"] == 10
    assert cfg["mean"] == (0.4914, 0.4822, 0.4465) and cfg["std"] == (0.2470, 0.2435, 0.2616)
    modules = dict(m.named_modules())
    first, clf = modules[cfg["first_conv"]], modules[cfg["classifier"]]
    assert isinstance(first, nn.Conv2d) and first is next(mm for mm in m.modules() if isinstance(mm, nn.Conv2d))
    assert isinstance(clf, nn.Linear) and clf.out_features == num_classes and m.get_classifier() is clf
    assert models.first_and_last_layer_names(m) == (cfg["first_conv"], cfg["classifier"])
    assert models.model_input_size(m) == (3, 32, 32)

    m.reset_classifier(3)
    assert m(x).shape == (2, 3) and m.get_classifier().in_features == m.head_hidden_size
    m.reset_classifier(0)
    with torch.no_grad():
        assert torch.equal(m(x), pre)


# --------------------------------------------------------------------------- exact parameter counts


def resnet_cifar_params(depth: int, shortcut: str, classes: int = 10, chs=(16, 32, 64)) -> int:
    """He et al. 2016 CIFAR ResNet written out: conv3x3 weights, BN (gamma, beta), Linear."""
    n = (depth - 2) // 6
    conv_bn = lambda cin, cout, k=3: cin * cout * k * k + 2 * cout  # noqa: E731
    total = conv_bn(3, chs[0])
    prev = chs[0]
    for c in chs:
        for i in range(n):
            total += conv_bn(prev, c) + conv_bn(c, c)
            if shortcut == "B" and prev != c:
                total += conv_bn(prev, c, k=1)  # 1x1 projection + BN
            prev = c
    return total + chs[-1] * classes + classes


def test_resnet20_param_counts():
    # Option A, by hand: stem 3*16*9 + 2*16 = 464; stage 1: 6 convs * (16*16*9 + 32) = 14,016;
    # stage 2: (16*32*9 + 64) + 5 * (32*32*9 + 64) = 4,672 + 46,400 = 51,072;
    # stage 3: (32*64*9 + 128) + 5 * (64*64*9 + 128) = 18,560 + 184,960 = 203,520;
    # fc 64*10 + 10 = 650.  Sum = 269,722 (He et al. table 6: 0.27M).
    assert n_params(timm.create_model("resnet20_cifar", shortcut="A")) == 269_722
    # Option B adds two 1x1 projections + BN: 16*32 + 64 = 576 and 32*64 + 128 = 2,176.
    assert n_params(timm.create_model("resnet20_cifar")) == 269_722 + 576 + 2_176 == 272_474


@pytest.mark.parametrize("shortcut", ["A", "B"])
@pytest.mark.parametrize("name", RESNETS)
def test_resnet_param_formula(name, shortcut):
    depth = int(name[len("resnet"):].split("_")[0])
    assert n_params(timm.create_model(name, shortcut=shortcut)) == resnet_cifar_params(depth, shortcut)
    # Li et al. 2017 table 2 lists ResNet-56 (option A) at 8.5e5 params.
    assert resnet_cifar_params(56, "A") == 853_018


def vgg_cifar_params(cfg, classes: int = 10) -> int:
    convs = [v for v in cfg if v != "M"]
    total, prev = 0, 3
    for c in convs:
        total += prev * c * 9 + 2 * c  # bias-free conv3x3 + BN
        prev = c
    return total + prev * classes + classes


def test_vgg_param_counts():
    # The slimming repo reports 20.04M for VGG-19 on CIFAR-10.
    assert n_params(timm.create_model("vgg19_bn_cifar")) == vgg_cifar_params(VGG_CFGS[19]) == 20_035_018
    for d in (11, 13, 16):
        assert n_params(timm.create_model(f"vgg{d}_bn_cifar", num_classes=100)) == vgg_cifar_params(VGG_CFGS[d], 100)


def lth_params(pairs: int, classes: int = 10) -> int:
    """Frankle & Carbin table 1: conv pairs (with biases), then FC 256, 256, classes on 32x32 inputs."""
    total, prev, side = 0, 3, 32
    for c in (64, 128, 256)[:pairs]:
        total += (prev * c * 9 + c) + (c * c * 9 + c)
        prev, side = c, side // 2
    fc_in = prev * side * side
    return total + (fc_in * 256 + 256) + (256 * 256 + 256) + (256 * classes + classes)


@pytest.mark.parametrize("name,pairs,exact,paper", [
    ("conv2_lth", 1, 4_301_642, 4.3e6),
    ("conv4_lth", 2, 2_425_930, 2.4e6),
    # Table 1 prints 1.7M for Conv-6, but the layers it lists give 2.26M (fc1 alone is 4096*256).
    ("conv6_lth", 3, 2_262_602, None),
])
def test_lth_param_counts(name, pairs, exact, paper):
    assert n_params(timm.create_model(name)) == lth_params(pairs) == exact
    if paper is not None:
        assert abs(exact - paper) / paper < 0.02


def test_resnet56_flops_match_li_et_al():
    # Li et al. 2017 table 2: ResNet-56 1.25e8 FLOPs (multiply-adds). Written out per conv:
    # stem 32*32*16*27; stage 1: 18 convs of 32*32*16*16*9; stages 2/3: first conv at half the
    # input width, then 17 full convs (each 2,359,296 MACs); fc 64*10.
    full = 32 * 32 * 16 * 16 * 9
    macs = 32 * 32 * 16 * 27 + 18 * full + 2 * (full // 2 + 17 * full) + 640
    assert macs == 125_485_696
    m = timm.create_model("resnet56_cifar", shortcut="A")
    with FlopCounterMode(display=False) as counter:
        m(torch.randn(1, 3, 32, 32))
    assert counter.get_total_flops() == 2 * macs  # FlopCounterMode counts a multiply-add as 2


# --------------------------------------------------------------------------- architecture overrides


def test_zero_pad_shortcut_matches_strided_pad():
    x = torch.randn(2, 16, 8, 8)
    ref = F.pad(x[:, :, ::2, ::2], (0, 0, 0, 0, 0, 16))  # He et al. option A: subsample, zero-pad channels
    assert torch.equal(ZeroPadShortcut(stride=2, ratio=2)(x), ref)


def test_resnet_overrides(x):
    m = timm.create_model("resnet20_cifar", width=0.5)
    assert m.conv1.out_channels == 8 and m.fc.in_features == 32 and m(x).shape == (2, 10)
    m = timm.create_model("resnet20_cifar", stage_channels=OmegaConf.create([8, 24, 40]))
    assert [m.layer1[0].conv2.out_channels, m.layer2[0].conv2.out_channels, m.fc.in_features] == [8, 24, 40]
    assert m(x).shape == (2, 10)
    # Caller kwargs override the variant's fixed args (timm's dict(default_args, **kwargs)).
    assert n_params(timm.create_model("resnet20_cifar", depth=32)) == resnet_cifar_params(32, "B")

    inner = [4 + i for i in range(27)]  # ResNet-56 L1-norm style: only each block's first conv thinned
    m = timm.create_model("resnet56_cifar", shortcut="A", inner_channels=inner)
    blocks = [b for stage in (m.layer1, m.layer2, m.layer3) for b in stage]
    assert [b.conv1.out_channels for b in blocks] == inner == [b.conv2.in_channels for b in blocks]
    assert [b.conv2.out_channels for b in blocks] == [16] * 9 + [32] * 9 + [64] * 9
    assert m(x).shape == (2, 10)


@pytest.mark.parametrize("kwargs,match", [
    (dict(shortcut="C"), r"model.shortcut must be one of A, B; got 'C'"),
    (dict(shortcut="A", stage_channels=[8, 24, 40]), r"model.shortcut='A'.*\[8, 24, 40\]"),
    (dict(inner_channels=[8] * 8), r"model.inner_channels must be 9 positive ints"),
    (dict(stage_channels=[16, 32]), r"model.stage_channels must be 3 positive ints"),
    (dict(width=0), r"model.width must be a positive"),
    (dict(depth=21), r"model.depth must be 6n \+ 2"),
])
def test_resnet_bad_args(kwargs, match):
    with pytest.raises(ValueError, match=match):
        timm.create_model("resnet20_cifar", **kwargs)


def test_vgg_overrides(x):
    m = timm.create_model("vgg11_bn_cifar", cfg=OmegaConf.create([32, "M", 48, 48, "M", 64]))
    convs = [mm for mm in m.features if isinstance(mm, nn.Conv2d)]
    assert [c.out_channels for c in convs] == [32, 48, 48, 64]
    assert m.forward_features(x).shape == (2, 64, 8, 8) and m(x).shape == (2, 10)
    m = timm.create_model("vgg19_bn_cifar", width=0.5)
    assert m.features[0].out_channels == 32 and m.fc.in_features == 256
    with pytest.raises(ValueError, match=r"model.cfg must be a list .*got \['M'\]"):
        timm.create_model("vgg19_bn_cifar", cfg=["M"])
    bn = m.features[1]
    assert torch.all(bn.weight == 0.5) and torch.all(m.fc.bias == 0)  # slimming-repo init


def test_lth_overrides():
    m = timm.create_model("conv6_lth", width=0.5)
    assert m.features[0].out_channels == 32 and m.fc1.in_features == 128 * 4 * 4 and m.fc1.out_features == 128
    m = timm.create_model("conv2_lth", img_size=64)
    assert m.fc1.in_features == 64 * 32 * 32 and m(torch.randn(1, 3, 64, 64)).shape == (1, 10)


# --------------------------------------------------------------------------- factory


def test_create_model_unknown_name():
    with pytest.raises(ValueError, match=r"model.name='resnet21_cifar' is not a timm model; did you mean:") as e:
        models.create_model("resnet21_cifar", num_classes=10)
    suggestions = str(e.value).split("did you mean: ")[1].split("?")[0].split(", ")
    assert "resnet20_cifar" in suggestions and 1 <= len(suggestions) <= 5
    assert "timm.list_models" in str(e.value)


def test_create_model_args(x):
    m = models.create_model("resnet20_cifar", num_classes=7, shortcut="A")
    assert isinstance(m, nn.Module) and m(x).shape == (2, 7) and n_params(m) == resnet_cifar_params(20, "A", 7)
    with pytest.raises(ValueError, match=r"model.num_classes must be an int >= 0.*got -1"):
        models.create_model("resnet20_cifar", num_classes=-1)
    with pytest.raises(TypeError, match=r"model.name='resnet20_cifar' does not accept .*\['widht'\]"):
        models.create_model("resnet20_cifar", num_classes=10, widht=2)


def test_pretrained_errors(monkeypatch):
    msg = r"no pretrained weights are available for 'resnet20_cifar'.*model.pretrained=false"
    with pytest.raises(ValueError, match=msg):
        timm.create_model("resnet20_cifar", pretrained=True)
    with pytest.raises(ValueError, match=msg):
        models.create_model("resnet20_cifar", num_classes=10, pretrained=True)
    with pytest.raises(FileNotFoundError, match=r"pretrained_cfg_overlay.file='/nonexistent.pth'"):
        models.create_model("resnet20_cifar", 10, pretrained=True, pretrained_cfg_overlay=dict(file="/nonexistent.pth"))
    # A timm model whose weights live on the HF hub: fail before any download when not cached.
    monkeypatch.setattr(factory, "_cached_offline", lambda cfg: False)
    with pytest.raises(RuntimeError, match=r"'resnet18'.*not in the local cache.*model.pretrained=false"):
        models.create_model("resnet18", num_classes=10, pretrained=True)


def test_pretrained_from_local_file(tmp_path, x):
    src = models.create_model("resnet20_cifar", num_classes=10).eval()
    path = tmp_path / "r20.pth"
    torch.save(src.state_dict(), path)
    m = models.create_model("resnet20_cifar", 10, pretrained=True, pretrained_cfg_overlay=dict(file=str(path)))
    with torch.no_grad():
        assert torch.equal(m.eval()(x), src(x))


def test_layer_name_helpers():
    plain = nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(), nn.Conv2d(4, 4, 3), nn.Flatten(),
                          nn.Linear(4, 2), nn.Linear(2, 2))
    assert models.first_and_last_layer_names(plain) == ("0", "5")
    assert models.model_input_size(plain) == (3, 224, 224)
    assert models.model_input_size(timm.create_model("resnet18")) == (3, 224, 224)
    headless = timm.create_model("conv4_lth", num_classes=0)  # classifier gone: nothing to skip
    assert models.first_and_last_layer_names(headless) == ("features.0", None)


# --------------------------------------------------------------------------- torch-pruning


@pytest.mark.parametrize("name,kwargs", [
    ("resnet20_cifar", dict(shortcut="B")),
    ("resnet20_cifar", dict(shortcut="A")),
    ("vgg19_bn_cifar", dict(width=0.25)),  # a quarter-width VGG-19 keeps the test fast
])
def test_torch_pruning_halves_channels(name, kwargs):
    m = timm.create_model(name, **kwargs).eval()
    example = torch.randn(1, 3, 32, 32)
    dg = tp.DependencyGraph().build_dependency(m, example_inputs=example)
    _, clf = models.first_and_last_layer_names(m)
    clf = dict(m.named_modules())[clf]
    assert len(list(dg.get_all_groups(ignored_layers=[clf]))) > 0
    widths = {n: c.out_channels for n, c in m.named_modules() if isinstance(c, nn.Conv2d)}

    pruner = tp.pruner.BasePruner(m, example, importance=tp.importance.MagnitudeImportance(p=1),
                                  pruning_ratio=0.5, ignored_layers=[clf])
    pruner.step()
    assert {n: c.out_channels for n, c in m.named_modules() if isinstance(c, nn.Conv2d)} == \
        {n: w // 2 for n, w in widths.items()}
    assert m(torch.randn(2, 3, 32, 32)).shape == (2, 10)
    assert m.fc.in_features == m.num_features  # num_features follows the pruned width
    m.reset_classifier(5)
    assert m(example).shape == (1, 5)


# ----- ResNet-56-A as the Rethinking authors build it ---------------------------------------------
class _AuthorsBlock(nn.Module):
    """A rewrite of BasicBlock in Eric-mingjie/rethinking-network-pruning, cifar/l1-norm-pruning/models/resnet.py."""

    def __init__(self, inplanes, planes, cfg, stride=1, downsample=False):
        super().__init__()
        self.conv1 = nn.Conv2d(inplanes, cfg, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cfg)
        self.conv2 = nn.Conv2d(cfg, planes, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.planes, self.downsample = planes, downsample

    def forward(self, x):
        out = torch.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        if self.downsample:  # downsample_basic_block: AvgPool2d(2, 2), then zero channels appended
            x = nn.functional.avg_pool2d(x, 2, 2)
            x = torch.cat([x, x.new_zeros(x.size(0), self.planes - x.size(1), x.size(2), x.size(3))], 1)
        return torch.relu(out + x)


class _AuthorsResNet(nn.Module):
    """The authors' ResNet(depth, cfg): stem 16, stages 16/32/64, cfg = the inner width of every block."""

    def __init__(self, depth=56, cfg=None, num_classes=10):
        super().__init__()
        n = (depth - 2) // 6
        cfg = cfg or [16] * n + [32] * n + [64] * n
        self.conv1, self.bn1 = nn.Conv2d(3, 16, 3, padding=1, bias=False), nn.BatchNorm2d(16)
        blocks, inplanes = [], 16
        for stage, planes in enumerate((16, 32, 64)):
            for i in range(n):
                stride = 2 if stage and i == 0 else 1
                blocks.append(_AuthorsBlock(inplanes, planes, cfg[stage * n + i], stride, stride != 1 or inplanes != planes))
                inplanes = planes
        self.blocks = nn.Sequential(*blocks)
        self.fc = nn.Linear(64, num_classes)

    def forward(self, x):
        x = torch.relu(self.bn1(self.conv1(x)))
        x = nn.functional.avg_pool2d(self.blocks(x), 8)
        return self.fc(x.flatten(1))


def _authors_cfg(version: str) -> list[int]:
    """res56prune.py: the inner widths after pruning (keeps int(n * (1 - p)) filters, skips some layers)."""
    skip = {"A": [16, 20, 38, 54], "B": [16, 18, 20, 34, 38, 54]}[version]
    prob = {"A": [0.1, 0.1, 0.1], "B": [0.6, 0.3, 0.1]}[version]
    cfg = []
    for layer_id in range(2, 56, 2):  # the first conv of block b is conv layer 2b (the stem is layer 1)
        out = 16 if layer_id <= 18 else 32 if layer_id <= 36 else 64
        stage = 0 if layer_id <= 18 else 1 if layer_id <= 36 else 2
        cfg.append(out if layer_id in skip else int(out * (1 - prob[stage])))
    return cfg


@pytest.mark.parametrize("version", [None, "A", "B"])
def test_resnet56_a_matches_the_rethinking_authors_model(version):
    """Same parameter count as their ResNet-56 (dense, and pruned as res56prune.py -v A / -v B prunes it),
    and the same outputs once their weights are copied in (shortcut A with 2x2 average pooling)."""
    cfg = _authors_cfg(version) if version else None
    theirs = _AuthorsResNet(56, cfg).eval()
    ours = timm.create_model("resnet56_cifar", shortcut="A", shortcut_pool="avg", inner_channels=cfg).eval()
    assert n_params(ours) == n_params(theirs)
    if version is None:
        assert n_params(ours) == 853_018  # the well-known ResNet-56 (0.85M) count
    ours_params = [p for _, p in ours.named_parameters()]
    theirs_params = [p for _, p in theirs.named_parameters()]
    with torch.no_grad():
        for a, b in zip(ours_params, theirs_params):
            assert a.shape == b.shape
            if b.ndim == 1:  # BN scale / shift and fc bias: away from their 1 / 0 init
                b.add_(0.1 * torch.randn_like(b))
            a.copy_(b)
    x = torch.randn(2, 3, 32, 32)
    torch.testing.assert_close(ours(x), theirs(x))
    default = timm.create_model("resnet56_cifar", shortcut="A", inner_channels=cfg).eval()
    default.load_state_dict(ours.state_dict())
    assert not torch.allclose(default(x), theirs(x))  # the strided subsample is a different net


def test_shortcut_pool_needs_shortcut_a():
    with pytest.raises(ValueError, match="model.shortcut_pool='avg' shapes the parameter-free shortcut A"):
        timm.create_model("resnet20_cifar", shortcut="B", shortcut_pool="avg")
    with pytest.raises(ValueError, match="model.shortcut_pool must be one of subsample, avg"):
        timm.create_model("resnet20_cifar", shortcut="A", shortcut_pool="max")

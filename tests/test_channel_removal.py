"""Physical channel removal: the thinned net computes what the channel-zeroed net computes, on CIFAR and timm models."""
from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from netcompress import models  # noqa: F401
from netcompress.compression.channel_removal import channel_counts, check_removable, remove_channels
from netcompress.models.factory import create_model


def random_keep(net: nn.Module, names: list[str], fraction: float = 0.5, seed: int = 0) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    modules = dict(net.named_modules())
    keep = {}
    for name in names:
        n = modules[name].num_features
        mask = torch.rand(n, generator=gen) >= fraction
        mask[0] = True
        keep[name] = mask
    return keep


def zero_removed_channels(net: nn.Module, keep: dict[str, torch.Tensor]) -> nn.Module:
    """The reference: the same net with the removed channels' BN gamma and beta set to 0."""
    masked = copy.deepcopy(net)
    modules = dict(masked.named_modules())
    with torch.no_grad():
        for name, mask in keep.items():
            modules[name].weight[~mask] = 0
            modules[name].bias[~mask] = 0
    return masked


def randomise_bn(net: nn.Module, seed: int = 0) -> nn.Module:
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in net.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.weight.copy_(torch.rand(m.num_features, generator=gen) + 0.5)
                m.bias.copy_(torch.randn(m.num_features, generator=gen) * 0.1)
                m.running_mean.copy_(torch.randn(m.num_features, generator=gen) * 0.1)
                m.running_var.copy_(torch.rand(m.num_features, generator=gen) + 0.5)
    return net.eval()


def bn_names(net: nn.Module) -> list[str]:
    return [n for n, m in net.named_modules() if isinstance(m, nn.BatchNorm2d)]


@pytest.mark.parametrize("name,kwargs,size", [
    ("vgg11_bn_cifar", {"width": 0.25}, 32),
    ("resnet20_cifar", {"shortcut": "B", "width": 0.5}, 32),
    ("resnet20_cifar", {"shortcut": "A", "width": 0.5}, 32),
    ("resnet18", {}, 32),
    ("mobilenetv3_small_100", {}, 64),
    ("efficientnet_b0", {}, 64),
])
def test_thinned_net_equals_channel_zeroed_net(name, kwargs, size):
    torch.manual_seed(0)
    net = randomise_bn(create_model(name, num_classes=10, **kwargs))
    x = torch.randn(2, 3, size, size)
    names = bn_names(net)
    keep = random_keep(net, names)
    masked = zero_removed_channels(net, keep)
    thin = remove_channels(masked, keep, x[:1]).eval()
    dense_params = sum(p.numel() for p in net.parameters())
    thin_params = sum(p.numel() for p in thin.parameters())
    assert thin_params < dense_params
    with torch.no_grad():
        torch.testing.assert_close(thin(x), masked(x), rtol=1e-5, atol=1e-5)
    # the input network is untouched (remove_channels works on a copy)
    assert sum(p.numel() for p in masked.parameters()) == dense_params


def test_plain_chain_loses_exactly_the_removed_channels():
    net = randomise_bn(create_model("vgg11_bn_cifar", num_classes=10, width=0.25))
    names = bn_names(net)
    keep = random_keep(net, names, seed=3)
    thin = remove_channels(net, keep, torch.zeros(1, 3, 32, 32))
    counts = channel_counts(thin)
    for name in names:  # VGG has no coupling: each layer keeps exactly its True channels
        assert counts[name] == int(keep[name].sum())


def test_coupled_residual_channel_survives_if_any_named_partner_keeps_it():
    net = randomise_bn(create_model("resnet20_cifar", num_classes=10, shortcut="B", width=0.5))
    n = net.layer1[0].bn2.num_features
    keep = {"layer1.0.bn2": torch.ones(n, dtype=torch.bool), "layer1.1.bn2": torch.ones(n, dtype=torch.bool)}
    keep["layer1.0.bn2"][[1, 2]] = False
    keep["layer1.1.bn2"][[2]] = False  # channel 1 is kept by layer1.1.bn2, channel 2 by nobody
    thin = remove_channels(net, keep, torch.zeros(1, 3, 32, 32))
    assert thin.bn1.num_features == n - 1  # the whole residual stream lost channel 2 only
    assert thin.layer1[2].bn2.num_features == n - 1


def test_convnext_atto_thins_and_runs():
    net = create_model("convnext_atto", num_classes=10).eval()
    names = [n for n, m in net.named_modules() if isinstance(m, nn.Conv2d) and n.endswith("conv_dw")][:2]
    check_removable(net, names, torch.zeros(1, 3, 64, 64))
    modules = dict(net.named_modules())
    keep = {n: torch.arange(modules[n].out_channels) % 2 == 0 for n in names}
    thin = remove_channels(net, keep, torch.zeros(1, 3, 64, 64))
    assert thin(torch.randn(1, 3, 64, 64)).shape == (1, 10)
    assert sum(p.numel() for p in thin.parameters()) < sum(p.numel() for p in net.parameters())


def test_vit_attention_is_rejected_naming_the_layer():
    net = create_model("vit_tiny_patch16_224", num_classes=10, img_size=32, depth=2)
    names = [n for n, m in net.named_modules() if isinstance(m, nn.Linear)]
    with pytest.raises(ValueError, match=r"blocks\.0\.attn\.qkv.*attention"):
        check_removable(net, names, torch.zeros(1, 3, 32, 32))


def test_bad_keep_masks_are_rejected():
    net = create_model("vgg11_bn_cifar", num_classes=10, width=0.25)
    with pytest.raises(ValueError, match=r"keep\['features.1'\] must be a bool tensor of shape \(16,\)"):
        remove_channels(net, {"features.1": torch.ones(5, dtype=torch.bool)}, torch.zeros(1, 3, 32, 32))
    with pytest.raises(ValueError, match="not a Conv2d/BatchNorm2d/Linear"):
        remove_channels(net, {"features.2": torch.ones(16, dtype=torch.bool)}, torch.zeros(1, 3, 32, 32))
    with pytest.raises(ValueError, match="classifier 'fc'"):
        check_removable(net, ["fc"], torch.zeros(1, 3, 32, 32))


# ----- grouped convolutions and GroupNorm: the same within-group positions go in every group ---------

class GroupedNet(nn.Module):
    """conv0 -> bn0 -> Conv2d(12, 12, groups=3) -> bn1 -> 1x1 conv -> bn2 -> GroupNorm(2, 8) -> fc."""

    def __init__(self) -> None:
        super().__init__()
        self.conv0, self.bn0 = nn.Conv2d(3, 12, 3, padding=1), nn.BatchNorm2d(12)
        self.conv1, self.bn1 = nn.Conv2d(12, 12, 3, padding=1, groups=3), nn.BatchNorm2d(12)
        self.conv2, self.bn2 = nn.Conv2d(12, 8, 1), nn.BatchNorm2d(8)
        self.conv3, self.gn = nn.Conv2d(8, 8, 1), nn.GroupNorm(2, 8)
        self.fc = nn.Linear(8, 10)

    def forward(self, x):
        x = torch.relu(self.bn0(self.conv0(x)))
        x = torch.relu(self.bn1(self.conv1(x)))
        x = torch.relu(self.bn2(self.conv2(x)))
        x = torch.relu(self.gn(self.conv3(x)))
        return self.fc(x.mean((2, 3)))


def keep_all_but(n: int, dropped: list[int]) -> torch.Tensor:
    keep = torch.ones(n, dtype=torch.bool)
    keep[dropped] = False
    return keep


@pytest.mark.parametrize("layer,dropped,conv1_shape", [
    ("bn0", [1, 5, 9], (12, 3)),   # position 1 of every input group of conv1: 12 -> 9 input channels
    ("bn1", [0, 4, 8], (9, 4)),    # position 0 of every output group of conv1: 12 -> 9 filters
])
def test_group_uniform_removal_thins_the_grouped_conv_exactly(layer, dropped, conv1_shape):
    torch.manual_seed(0)
    net = randomise_bn(GroupedNet())
    keep = {layer: keep_all_but(12, dropped)}
    masked = zero_removed_channels(net, keep)
    thin = remove_channels(masked, keep, torch.zeros(1, 3, 8, 8)).eval()
    assert (thin.conv1.groups, tuple(thin.conv1.weight.shape[:2])) == (3, conv1_shape)
    x = torch.randn(2, 3, 8, 8)
    with torch.no_grad():
        torch.testing.assert_close(thin(x), masked(x), rtol=1e-5, atol=1e-5)


def test_channel_dropped_in_one_group_only_is_kept_in_every_group():
    net = randomise_bn(GroupedNet())
    # one channel before Conv2d(12, 12, groups=3) used to give Conv2d(11, 12, groups=3), which cannot run
    thin = remove_channels(net, {"bn0": keep_all_but(12, [5])}, torch.zeros(1, 3, 8, 8))
    assert (thin.conv1.in_channels, thin.bn0.num_features) == (12, 12)
    # groups {0..3}, {4..7}, {8..11}: position 1 is dropped by all three (1, 5, 9) and goes; position 2
    # is dropped by groups 0 and 2 only (2, 10), so channel 6 keeps it in every group
    thin = remove_channels(net, {"bn0": keep_all_but(12, [1, 5, 10, 9, 2])}, torch.zeros(1, 3, 8, 8))
    assert thin.bn0.num_features == 9 and thin.conv1.weight.shape[1] == 3
    assert thin(torch.randn(2, 3, 8, 8)).shape == (2, 10)


def test_groupnorm_channels_go_evenly_from_its_groups():
    net = randomise_bn(GroupedNet())
    thin = remove_channels(net, {"conv3": keep_all_but(8, [0, 1, 4])}, torch.zeros(1, 3, 8, 8))
    assert (thin.gn.num_groups, thin.gn.num_channels) == (2, 6)  # position 0 (0 and 4) goes; 1 is kept by 5
    assert thin(torch.randn(2, 3, 8, 8)).shape == (2, 10)


def test_grouped_conv_fed_by_a_concatenation_is_refused_naming_it():
    class Concat(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.a, self.bn_a = nn.Conv2d(3, 6, 1), nn.BatchNorm2d(6)
            self.b = nn.Conv2d(3, 6, 1)
            self.grouped = nn.Conv2d(12, 6, 3, padding=1, groups=3)
            self.fc = nn.Linear(6, 10)

        def forward(self, x):
            x = torch.cat([self.bn_a(self.a(x)), self.b(x)], 1)
            return self.fc(self.grouped(x).mean((2, 3)))

    with pytest.raises(ValueError, match=r"layer 'bn_a'.*3-group layer 'grouped'.*concatenation"):
        check_removable(Concat(), ["bn_a"], torch.zeros(1, 3, 8, 8))


def test_timm_regnetx_002_thins_exactly_and_slims_with_random_gammas():
    """RegNetX: every 3x3 conv is grouped (group width 8); slimming it died inside torch-pruning."""
    torch.manual_seed(0)
    net = randomise_bn(create_model("regnetx_002", num_classes=10))
    x = torch.randn(2, 3, 32, 32)
    names = bn_names(net)
    check_removable(net, names, x[:1])
    # position 0 of every group of width 8 around each grouped conv: an exact, group-uniform removal
    keep = {n: torch.arange(net.get_submodule(n).num_features) % 8 != 0 for n in names
            if n.endswith(("conv1.bn", "conv2.bn"))}
    masked = zero_removed_channels(net, keep)
    thin = remove_channels(masked, keep, x[:1]).eval()
    assert thin.s1.b1.conv2.conv.weight.shape[:2] == (21, 7) and thin.s1.b1.conv2.conv.groups == 3
    with torch.no_grad():
        torch.testing.assert_close(thin(x), masked(x), rtol=1e-5, atol=1e-5)
    slim = remove_channels(net, random_keep(net, names), x[:1]).eval()  # arbitrary masks: aligned, then removed
    for m in slim.modules():
        if isinstance(m, nn.Conv2d):
            assert m.in_channels % m.groups == 0 and m.out_channels % m.groups == 0
    assert slim(x).shape == (2, 10)
    assert sum(p.numel() for p in slim.parameters()) < sum(p.numel() for p in net.parameters())

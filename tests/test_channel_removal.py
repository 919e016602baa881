"""Physical channel removal: the thinned net computes what the channel-zeroed net computes, on CIFAR and timm models."""
from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

import models  # noqa: F401
from compression.channel_removal import channel_counts, check_removable, remove_channels
from models.factory import create_model


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

"""Network slimming: one global threshold, exact equivalence of the slimmed net, params/FLOPs shrink
as counted by hand, pickle-free reload, fine-tune phase, resume, clear errors (the BN L1 training
half, ``bn_sparsity``, is tested in test_bn_sparsity.py)."""
from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest
import torch
from torch import nn

from netcompress import models  # noqa: F401
from netcompress.callbacks.slimming import Slimming, slimming_masks
from netcompress.compression.channel_removal import remove_channels
from conftest import TINY, compose_config, fit_interrupted
from netcompress.evaluation.model_stats import count_flops
from netcompress.models.factory import create_model
from netcompress.models.serialization import load_model, save_model
from netcompress.pipeline.build import build
from netcompress.run import run

SLIM = ["compression=[bn_sparsity,slimming]", "model.name=vgg11_bn_cifar", "+model.width=0.125",
        "data.val_size=16", "data.test_size=16", "callbacks.slimming.at_epochs=[1]",
        "callbacks.slimming.prune_ratio=0.5", "callbacks.slimming.finetune_lr=0.01",
        "callbacks.bn_sparsity.until_epoch=1", "callbacks.bn_sparsity.lam=1e-3"]


def vgg_with_spread_gammas(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    net = create_model("vgg11_bn_cifar", num_classes=10, width=0.25)
    with torch.no_grad():
        for m in net.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.weight.uniform_(0.0, 1.0)
                m.bias.normal_(0, 0.1)
                m.running_mean.normal_(0, 0.1)
                m.running_var.uniform_(0.5, 1.5)
    return net.eval()


def bns_of(net):
    return {n: m for n, m in net.named_modules() if isinstance(m, nn.BatchNorm2d)}


def test_one_global_threshold_with_a_floor_per_layer():
    net = vgg_with_spread_gammas()
    bns = bns_of(net)
    keep = slimming_masks(bns, 0.7, min_channels=2)
    gammas = torch.cat([m.weight.detach().abs() for m in bns.values()])
    threshold = gammas.sort().values[round(0.7 * gammas.numel())]  # the paper's percentile threshold
    for name, bn in bns.items():
        above = bn.weight.detach().abs() >= threshold
        if int(above.sum()) >= 2:
            assert torch.equal(keep[name], above), name
        else:  # the floor: the 2 largest survive
            assert int(keep[name].sum()) == 2 and keep[name][bn.weight.detach().abs().argmax()]


def expected_vgg_params(net: nn.Module, keep: dict) -> tuple[int, int]:
    """Params and FLOPs of the slimmed VGG, counted by hand from the kept channel counts."""
    params = flops = 0
    cin, size = 3, 32
    for layer in net.features:
        if isinstance(layer, nn.MaxPool2d):
            size //= 2
        elif isinstance(layer, nn.Conv2d):
            conv_name = next(n for n, m in net.named_modules() if m is layer)
            bn_name = conv_name.rsplit(".", 1)[0] + f".{int(conv_name.rsplit('.', 1)[1]) + 1}"
            cout = int(keep[bn_name].sum())
            params += 9 * cin * cout + 2 * cout
            flops += 2 * size * size * 9 * cin * cout
            cin = cout
    params += cin * 10 + 10
    flops += 2 * cin * 10
    return params, flops


def test_slimmed_vgg_equals_masked_vgg_and_shrinks_as_counted(tmp_path):
    net = vgg_with_spread_gammas()
    keep = slimming_masks(bns_of(net), 0.6)
    masked = copy.deepcopy(net)
    with torch.no_grad():
        for name, bn in bns_of(masked).items():
            bn.weight[~keep[name]] = 0
            bn.bias[~keep[name]] = 0
    thin = remove_channels(masked, keep, torch.zeros(1, 3, 32, 32)).eval()
    x = torch.randn(8, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(thin(x), masked(x), rtol=1e-5, atol=1e-5)
    params, flops = expected_vgg_params(net, keep)
    assert sum(p.numel() for p in thin.parameters()) == params
    assert count_flops(thin, (3, 32, 32)) == flops  # torch's counter: convs + linear only
    # pickle-free reload (timm name + layer widths + state_dict) gives the same outputs
    save_model(thin, tmp_path / "model.pt", "vgg11_bn_cifar", 10, {"width": 0.25})
    reloaded = load_model(tmp_path / "model.pt")
    with torch.no_grad():
        torch.testing.assert_close(reloaded(x), thin(x), rtol=0, atol=0)


def test_slimming_run_fine_tunes_the_thin_net_and_writes_a_reloadable_model(tiny_config):
    cfg = tiny_config(*SLIM, "trainer.max_epochs=2", "callbacks.slimming.min_channels=2")
    results = run(cfg)
    out = Path(cfg.paths.output_dir)
    saved = json.loads((out / "results.json").read_text())
    record = saved["compress/slimming"][0]
    assert record["epoch"] == 1 and record["params_after"] < record["params_before"]
    assert saved["params_total"] == record["params_after"]
    assert saved["compress/channels_pruned"] == pytest.approx(0.5, abs=0.02)
    net = load_model(out / "model.pt")
    assert all(m.num_features >= 2 for m in bns_of(net).values())
    assert results["status"] == "ok"


def test_multi_pass_and_finetune_lr(tiny_config):
    cfg = tiny_config(*SLIM, "trainer.max_epochs=3", "callbacks.slimming.at_epochs=[1,2]",
                      "callbacks.slimming.prune_ratio=[0.3,0.3]", "save_model=false", "scheduler=none")
    datamodule, module, trainer = build(cfg)
    trainer.fit(module, datamodule=datamodule)
    slim = next(c for c in trainer.callbacks if isinstance(c, Slimming))
    assert [r["epoch"] for r in slim.history] == [1, 2]
    assert slim.history[1]["params_before"] == slim.history[0]["params_after"] > slim.history[1]["params_after"]
    assert trainer.optimizers[0].param_groups[0]["lr"] == pytest.approx(0.01)  # the rebuilt optimizer's lr
    assert sum(p.numel() for p in module.net.parameters()) == slim.history[1]["params_after"]


def test_resume_during_fine_tuning_equals_uninterrupted(tmp_path):
    base = [*TINY, *SLIM, "callbacks=model_checkpoint", "trainer.max_epochs=3", "save_model=false"]
    datamodule, straight, trainer = build(compose_config(base, tmp_path / "straight"))
    trainer.fit(straight, datamodule=datamodule)
    checkpoint = fit_interrupted(compose_config(base, tmp_path / "first"), epochs=2)  # thin net in the ckpt
    datamodule, resumed, trainer = build(compose_config([*base, f"ckpt_path={checkpoint}"], tmp_path / "resumed"))
    trainer.fit(resumed, datamodule=datamodule, ckpt_path=str(checkpoint))
    a, b = straight.net.state_dict(), resumed.net.state_dict()
    assert a.keys() == b.keys()
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=0, atol=0, msg=key)


# ----- bad input: clear errors before training ----------------------------------------------------

def test_slimming_a_model_without_batchnorm_fails_before_training(tiny_config):
    cfg = tiny_config(*SLIM, "model.name=conv2_lth", "~model.width")
    datamodule, module, trainer = build(cfg)
    with pytest.raises(ValueError, match=r"bn_sparsity.*has no BatchNorm layer"):
        trainer.fit(module, datamodule=datamodule)
    assert trainer.global_step == 0


@pytest.mark.parametrize("kwargs,match", [
    ({"prune_ratio": 1.5}, r"slimming\.prune_ratio`? must be a fraction in \[0, 1\).*1\.5"),
    ({"at_epochs": []}, "at_epochs.*non-empty list"),
    ({"prune_ratio": [0.5, 0.5]}, "one per entry of at_epochs"),
    ({"criterion": "fisher"}, "criterion.*gamma, running_var.*'fisher'"),
    ({"min_channels": 0}, "min_channels.*>= 1"),
])
def test_bad_slimming_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        Slimming(**kwargs)


def test_slimming_epochs_past_the_end(tiny_config):
    cfg = tiny_config(*SLIM, "callbacks.slimming.at_epochs=[5]")
    datamodule, module, trainer = build(cfg)
    with pytest.raises(ValueError, match=r"at_epochs.*\[5\] goes past trainer.max_epochs=1"):
        trainer.fit(module, datamodule=datamodule)


# ----- every pruning preset composes and runs one step (fast_dev_run) -------------------------------

PRESETS = {"slimming_vgg19_cifar10": None, "slimming_mini": None, "agp_resnet20_cifar10": None,
           "l1norm_resnet56_a": ("resnet56_cifar", {"shortcut": "A"}),
           "l1norm_resnet56_b": ("resnet56_cifar", {"shortcut": "A"}),
           "l1norm_vgg16_a": ("vgg16_bn_cifar", {})}


@pytest.mark.slow
@pytest.mark.parametrize("preset", sorted(PRESETS))
def test_pruning_preset_runs_one_step(tmp_path, preset):
    tiny = [o for o in TINY if not o.startswith("trainer.max_epochs")]  # keep the preset's epochs
    overrides = [f"experiment={preset}", *tiny, "++trainer.fast_dev_run=1", "latency_repeats=1", "save_model=false"]
    if PRESETS[preset]:  # a trained dense parent is required: any saved model of the right architecture
        name, kwargs = PRESETS[preset]
        save_model(create_model(name, num_classes=10, **kwargs), tmp_path / "parent.pt", name, 10, kwargs)
        overrides.append(f"init_from={tmp_path / 'parent.pt'}")
    results = run(compose_config(overrides, tmp_path / "run"))
    assert results["status"] == "ok"
    if preset.startswith("l1norm"):  # pruned one-shot at step 0, filters removed at the end
        dense = create_model(*PRESETS[preset][:1], num_classes=10, **PRESETS[preset][1])
        assert results["params_total"] < sum(p.numel() for p in dense.parameters())
    if preset == "l1norm_resnet56_b":  # the Rethinking repo's filter counts: keep int(n * (1 - p))
        layers = results["compress/sparsity_layers"]
        assert layers["layer1.0.conv1"] == 10 / 16 and layers["layer2.1.conv1"] == 10 / 32
        assert layers["layer3.1.conv1"] == 7 / 64 and "layer1.7.conv1" not in layers


@pytest.mark.slow
def test_slimming_a_grouped_conv_net_runs_to_the_end(tiny_config):
    """timm regnetx_002 (every 3x3 conv grouped): slimming used to die inside torch-pruning after training."""
    cfg = tiny_config(*SLIM, "model.name=regnetx_002", "~model.width", "trainer.max_epochs=2", "save_model=false",
                      "data.train_size=32", "data.batch_size=16")
    datamodule, module, trainer = build(cfg)
    before = sum(p.numel() for p in module.net.parameters())
    trainer.fit(module, datamodule=datamodule)
    slim = next(c for c in trainer.callbacks if isinstance(c, Slimming))
    assert [r["epoch"] for r in slim.history] == [1] and trainer.current_epoch == 2
    assert sum(p.numel() for p in module.net.parameters()) == slim.history[0]["params_after"] < before
    for m in module.net.modules():
        if isinstance(m, nn.Conv2d):
            assert m.in_channels % m.groups == 0 and m.out_channels % m.groups == 0
            assert m.weight.shape[1] * m.groups == m.in_channels


def test_round_to_keeps_multiples_of_it_in_every_layer():
    """round_to=4: every layer keeps a multiple of 4 channels (at least 4), the best-scored ones."""
    import torch
    from torch import nn

    from netcompress.callbacks.slimming import Slimming, slimming_masks

    torch.manual_seed(0)
    bns = {f"bn{i}": nn.BatchNorm2d(c) for i, c in enumerate((16, 24, 10))}
    for bn in bns.values():
        bn.weight.data = torch.rand_like(bn.weight)
    plain = slimming_masks(bns, 0.5)
    rounded = slimming_masks(bns, 0.5, round_to=4)
    for name, keep in rounded.items():
        kept, before = int(keep.sum()), int(plain[name].sum())
        assert kept % 4 == 0 and kept >= 4 and kept == max(4, before - before % 4)
        gamma = bns[name].weight.abs()
        assert gamma[keep].min() >= gamma[~keep].max() if (~keep).any() else True  # the strongest are kept
    with pytest.raises(ValueError, match="callbacks.slimming.round_to` must be null"):
        Slimming(round_to=0)

"""The callback contract of ClassificationModule: loss terms, aux modules, net replacement; schedules."""
from __future__ import annotations

import copy
import math
from functools import partial
from pathlib import Path

import pytest
import pytorch_lightning as pl
import torch
import torch.nn.functional as F
from torch import nn

from netcompress import models  # noqa: F401
from conftest import TINY, compose_config
from netcompress.lightning_modules import schedules
from netcompress.models.serialization import load_net
from netcompress.lightning_modules.classification import ClassificationModule
from netcompress.pipeline.build import build
from netcompress.run import run


def test_loss_term_is_added_and_task_weight_scales_ce(tiny_config):
    cfg = tiny_config("trainer.limit_train_batches=1")
    datamodule, module, trainer = build(cfg)
    seen = {}

    def constant_term(ctx):
        seen["logits"], seen["targets"] = ctx.logits.detach(), ctx.targets
        return torch.tensor(3.0) + 0 * ctx.logits.sum()

    class ConstantTerm(pl.Callback):
        def setup(self, trainer, pl_module, stage):
            pl_module.set_task_loss_weight(0.25)
            pl_module.add_loss_term("const", constant_term, weight=2.0)

        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            seen["loss"] = outputs["loss"].detach()

    trainer.callbacks.append(ConstantTerm())
    trainer.fit(module, datamodule=datamodule)
    expected = 0.25 * F.cross_entropy(seen["logits"], seen["targets"]) + 2.0 * 3.0
    torch.testing.assert_close(seen["loss"], expected)
    assert "train/const" in trainer.callback_metrics and "train/ce" in trainer.callback_metrics


def test_duplicate_loss_term_name_is_an_error():
    module = ClassificationModule(models.create_model("conv2_lth", num_classes=10), optimizer=torch.optim.SGD)
    module.add_loss_term("kd", lambda ctx: 0)
    with pytest.raises(ValueError, match="already registered"):
        module.add_loss_term("kd", lambda ctx: 0)


def test_aux_module_is_optimised_and_checkpointed_but_not_exported(tiny_config):
    cfg = tiny_config("trainer.limit_train_batches=2")
    datamodule, module, trainer = build(cfg)
    adapter = nn.Linear(10, 10)

    class Adapter(pl.Callback):
        def setup(self, trainer, pl_module, stage):
            pl_module.register_aux_module("adapter", adapter)
            pl_module.add_loss_term("adapter", lambda ctx: ctx.module.aux["adapter"](ctx.logits).pow(2).mean())

    trainer.callbacks.append(Adapter())
    before = adapter.weight.detach().clone()
    trainer.fit(module, datamodule=datamodule)
    assert not torch.equal(before, module.aux["adapter"].weight)
    optimised = {id(p) for group in trainer.optimizers[0].param_groups for p in group["params"]}
    assert id(module.aux["adapter"].weight) in optimised
    assert any(k.startswith("aux.adapter.") for k in module.state_dict())
    assert not any("adapter" in k for k in module.net.state_dict())


def thinner_copy(net: nn.Module) -> nn.Module:
    """conv2_lth with the classifier's hidden width halved, weights copied where they overlap."""
    thin = models.create_model("conv2_lth", num_classes=10)
    thin.load_state_dict(net.state_dict())
    fc_in, fc_out = _hidden_pair(thin)
    keep = fc_in.out_features // 2
    fc_in.weight = nn.Parameter(fc_in.weight.detach()[:keep].clone())
    fc_in.bias = nn.Parameter(fc_in.bias.detach()[:keep].clone())
    fc_in.out_features = keep
    fc_out.weight = nn.Parameter(fc_out.weight.detach()[:, :keep].clone())
    fc_out.in_features = keep
    return thin


def _hidden_pair(net: nn.Module):
    linears = [m for m in net.modules() if isinstance(m, nn.Linear)]
    return linears[-3], linears[-2]


class ReplaceAfterFirstEpoch(pl.Callback):
    def on_train_epoch_end(self, trainer, pl_module):
        if trainer.current_epoch == 0:
            pl_module.replace_net(thinner_copy(pl_module.net), optimizer_overrides={"lr": 0.001})


def test_replace_net_rebuilds_optimizer_and_resume_restores_thin_net(tmp_path):
    overrides = [*TINY, "model.name=conv2_lth", "callbacks=model_checkpoint",
                 "callbacks.model_checkpoint.save_top_k=-1", "trainer.max_epochs=3"]
    cfg = compose_config(overrides, tmp_path / "a")
    datamodule, module, trainer = build(cfg)
    trainer.callbacks.append(ReplaceAfterFirstEpoch())
    trainer.fit(module, datamodule=datamodule)
    thin_width = _hidden_pair(module.net)[0].out_features
    assert thin_width == _hidden_pair(models.create_model("conv2_lth", num_classes=10))[0].out_features // 2
    optimizer = trainer.optimizers[0]
    assert {id(p) for p in optimizer.param_groups[0]["params"]} == {id(p) for p in module.net.parameters()}
    assert optimizer.param_groups[0]["initial_lr"] == pytest.approx(0.001)

    # Resume from the epoch-2 checkpoint (after the swap) into a fresh dense module.
    checkpoint = next((tmp_path / "a" / "checkpoints").glob("epoch_001*.ckpt"))
    cfg_b = compose_config([*overrides, f"ckpt_path={checkpoint}"], tmp_path / "b")
    datamodule_b, module_b, trainer_b = build(cfg_b)
    trainer_b.fit(module_b, datamodule=datamodule_b, ckpt_path=str(checkpoint))
    assert _hidden_pair(module_b.net)[0].out_features == thin_width
    assert trainer_b.optimizers[0].param_groups[0]["initial_lr"] == pytest.approx(0.001)
    for key, value in module.net.state_dict().items():
        torch.testing.assert_close(value, module_b.net.state_dict()[key], rtol=0, atol=0, msg=key)
    # A checkpoint of a thinned run turns back into the thin network.
    reloaded = load_net(checkpoint)
    assert _hidden_pair(reloaded)[0].out_features == thin_width


def test_multistep_schedule_matches_paper_recipe():
    opt = torch.optim.SGD([nn.Parameter(torch.zeros(1))], lr=0.1)
    sched = schedules.multistep(opt, total_steps=100, steps_per_epoch=10, milestones=(0.5, 0.75), gamma=0.1)
    lrs = []
    for _ in range(100):
        lrs.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    assert lrs[0] == pytest.approx(0.1) and lrs[49] == pytest.approx(0.1)
    assert lrs[50] == pytest.approx(0.01) and lrs[74] == pytest.approx(0.01)
    assert lrs[75] == pytest.approx(0.001) and lrs[99] == pytest.approx(0.001)


def test_cosine_schedule_with_warmup_matches_formula():
    opt = torch.optim.SGD([nn.Parameter(torch.zeros(1))], lr=1.0)
    sched = schedules.cosine(opt, total_steps=110, steps_per_epoch=10, warmup_epochs=1.0)
    lrs = []
    for _ in range(110):
        lrs.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    assert lrs[0] == pytest.approx(0.1) and lrs[9] == pytest.approx(1.0)
    for step in (10, 40, 77, 109):
        assert lrs[step] == pytest.approx(0.5 * (1 + math.cos(math.pi * (step - 10) / 100)))


def test_bad_milestones_are_rejected():
    opt = torch.optim.SGD([nn.Parameter(torch.zeros(1))], lr=0.1)
    with pytest.raises(ValueError, match="milestones"):
        schedules.multistep(opt, total_steps=10, steps_per_epoch=1, milestones=(0.75, 0.5))


# ----- metrics: top-1 means top-1 (sample-averaged); macro and per-class are named apart ----------

def test_acc1_is_sample_averaged_and_macro_is_reported_apart():
    """The issue's example: predictions [0,0,0,0,1,2] vs labels [0,0,0,0,0,2] are 5/6 top-1; the
    macro top-1 averages the classes that have samples (0.8 and 1.0: 0.9); class 1 has none (NaN).
    (torchmetrics' macro average counted class 1 as 0 and gave 0.6, once reported as acc1.)"""
    module = ClassificationModule(models.create_model("conv2_lth", num_classes=3), optimizer=torch.optim.SGD)
    logits = F.one_hot(torch.tensor([0, 0, 0, 0, 1, 2]), 3).float()
    labels = torch.tensor([0, 0, 0, 0, 0, 2])
    for stage in ("val", "test"):
        module.eval_metrics[stage].update(logits, labels)
        figures = module.eval_metrics[stage].compute()
        assert figures["acc1"] == pytest.approx(5 / 6)
        assert figures["acc1_macro"] == pytest.approx(0.9)
        assert figures["class_counts"] == [5, 0, 1]
        per_class = figures["per_class_acc1"]
        assert per_class[0] == pytest.approx(0.8) and math.isnan(per_class[1]) and per_class[2] == 1.0


def test_acc5_is_the_share_of_samples_with_the_label_in_the_top_5():
    torch.manual_seed(0)
    module = ClassificationModule(models.create_model("conv2_lth", num_classes=10), optimizer=torch.optim.SGD)
    logits = torch.randn(200, 10)
    labels = torch.cat([torch.zeros(150, dtype=torch.long), torch.randint(0, 10, (50,))])  # imbalanced
    module.eval_metrics["test"].update(logits, labels)
    expected = (logits.topk(5, dim=1).indices == labels[:, None]).any(1).float().mean()
    assert module.eval_metrics["test"].compute()["acc5"] == pytest.approx(float(expected))


def test_parent_is_no_submodule_and_the_first_one_wins():
    """set_parent: module.parent is not trained or saved (no parameters, no state_dict keys); a later
    parent (a KD teacher) does not replace init_from's unless replace=True (a protocol's dense stage)."""
    module = ClassificationModule(models.create_model("conv2_lth", num_classes=3), optimizer=torch.optim.SGD)
    assert module.parent is None and module.parent_source is None
    keys, params = set(module.state_dict()), len(list(module.parameters()))
    first, second = copy.deepcopy(module.net), copy.deepcopy(module.net)
    module.set_parent(first, source="init_from:a.pt")
    module.set_parent(second, source="kd:b.pt")
    assert module.parent is first and module.parent_source == "init_from:a.pt"
    assert set(module.state_dict()) == keys and len(list(module.parameters())) == params
    module.set_parent(second, source="lottery:dense", replace=True)
    assert module.parent is second and module.parent_source == "lottery:dense"
    with pytest.raises(TypeError, match="set_parent takes a torch net"):
        module.set_parent("a.pt")


def _imbalanced_test_split(monkeypatch):
    """Synthetic data whose test split keeps every class-0 image but one image of each other class."""
    from netcompress.datamodules.synthetic import SyntheticDataModule

    original = SyntheticDataModule.load_splits

    def load_splits(self):
        splits = original(self)
        images, labels = splits["test"]
        first = {int(c): int((labels == c).nonzero()[0]) for c in labels.unique()}
        keep = (labels == 0) | torch.isin(torch.arange(len(labels)), torch.tensor(list(first.values())))
        splits["test"] = (images[keep], labels[keep])
        return splits

    monkeypatch.setattr(SyntheticDataModule, "load_splits", load_splits)


def test_results_json_top1_is_the_support_weighted_mean_of_per_class(tiny_config, monkeypatch):
    """End to end, on an imbalanced test set: results.json's test/acc1 is sum(acc_c * n_c) / sum(n_c)
    of its own per-class figures, test/acc1_macro their plain mean, and the two differ."""
    import json

    _imbalanced_test_split(monkeypatch)
    cfg = tiny_config("data.test_size=100", "data.num_classes=4", "trainer.max_epochs=2")
    run(cfg)
    saved = json.loads((Path(cfg.paths.output_dir) / "results.json").read_text())
    per_class, counts = saved["test/per_class_acc1"], saved["test/class_counts"]
    assert counts == [25, 1, 1, 1]
    weighted = sum(a * n for a, n in zip(per_class, counts)) / sum(counts)
    assert saved["test/acc1"] == pytest.approx(weighted, abs=1e-6)
    assert saved["test/acc1_macro"] == pytest.approx(sum(per_class) / len(per_class), abs=1e-6)
    assert saved["test/acc1"] != pytest.approx(saved["test/acc1_macro"], abs=1e-3)


# ----- a diverging run stops at once ---------------------------------------------------------------

def test_non_finite_loss_stops_fit_at_that_step_naming_terms_and_lr(tiny_config):
    cfg = tiny_config("trainer.max_epochs=3", "optimizer.lr=0.05")
    datamodule, module, trainer = build(cfg)

    def diverges_at_step_5(ctx):
        bad = ctx.module.trainer.global_step == 5
        return ctx.logits.sum() * 0 + (float("nan") if bad else 0.0)

    class AddTerm(pl.Callback):
        def setup(self, trainer, pl_module, stage):
            pl_module.add_loss_term("boom", diverges_at_step_5, weight=0.5)

    trainer.callbacks.append(AddTerm())
    with pytest.raises(FloatingPointError,
                       match=r"non-finite training loss nan at step 5 \(epoch 1\): ce=[0-9.]+ \(weight 1\), "
                             r"boom=nan \(weight 0\.5\); last lr 0\.05"):
        trainer.fit(module, datamodule=datamodule)
    assert trainer.global_step == 5  # stopped before the optimizer step of the NaN loss
    assert all(torch.isfinite(p).all() for p in module.net.parameters())


def test_diverging_run_writes_failed_results_naming_the_step(tiny_config):
    import json

    cfg = tiny_config("optimizer.lr=1e12", "trainer.max_epochs=3")
    with pytest.raises(FloatingPointError, match="non-finite training loss"):
        run(cfg)
    saved = json.loads((Path(cfg.paths.output_dir) / "results.json").read_text())
    assert saved["status"] == "failed"
    assert saved["error"].startswith("FloatingPointError: non-finite training loss") and "at step" in saved["error"]


@pytest.mark.parametrize("width, expected", [(0.25, torch.contiguous_format), (0.5, torch.channels_last)])
def test_cpu_channels_last_is_skipped_where_onednn_backward_crashes(width, expected):
    """Width 0.25 ResNet-20 has 1x1 stride-2 shortcuts with 4 input channels, whose channels_last
    backward corrupts the heap on this machine's CPUs (models/memory_format.py): train contiguous."""
    import timm

    from netcompress.models.memory_format import cpu_channels_last_unsafe

    net = timm.create_model("resnet20_cifar", num_classes=10, width=width)
    module = ClassificationModule(net, optimizer=partial(torch.optim.SGD, lr=0.1))
    assert bool(cpu_channels_last_unsafe(net)) == (width == 0.25)
    if width == 0.25:
        with pytest.warns(UserWarning, match="channels_last is ignored on the CPU"):
            module.setup("fit")
        assert cpu_channels_last_unsafe(net) == ["layer2.0.downsample.0"]  # 4 -> 8 channels; layer3's has 8
    else:
        module.setup("fit")
    assert module.memory_format == expected
    conv = net.layer2[0].conv1.weight
    assert conv.is_contiguous(memory_format=expected)
    x = torch.randn(4, 3, 32, 32).contiguous(memory_format=torch.channels_last)
    loss = module.training_step((x, torch.tensor([0, 1, 2, 3])), 0)
    loss.backward()  # would abort or hang in channels_last
    assert all(torch.isfinite(p.grad).all() for p in net.parameters() if p.grad is not None)

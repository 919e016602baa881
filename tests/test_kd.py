"""Knowledge distillation: the loss against Hinton's formula, frozen teachers, early errors, resume, combinations."""
from __future__ import annotations

import math
from pathlib import Path

import pytest
import pytorch_lightning as pl
import torch
import torch.nn.functional as F

from netcompress import models  # noqa: F401
from netcompress.callbacks.kd import KD
from netcompress.compression.distillation_losses import (attention_loss, fitnets_loss, kd_loss, make_adapter,
                                             teacher_probabilities)
from conftest import CONF, TINY, compose_config, fit_interrupted
from netcompress.models.serialization import load_model, save_model
from netcompress.pipeline.build import build

# A quarter-width ResNet-20 on 16x16 synthetic images: every fit below takes a few seconds.
STUDENT = ["model.name=resnet20_cifar", "+model.width=0.25", "data.image_size=16"]


def save_teacher(path: Path, name: str = "resnet20_cifar", num_classes: int = 10, seed: int = 0, **kwargs) -> Path:
    """A randomly initialised network exported as a run's model.pt (a teacher need not be trained here)."""
    torch.manual_seed(seed)
    net = models.create_model(name, num_classes=num_classes, **kwargs)
    save_model(net, path, name, num_classes, kwargs)
    return path


@pytest.fixture(scope="module")
def teacher_files(tmp_path_factory):
    folder = tmp_path_factory.mktemp("teachers")
    return [save_teacher(folder / f"teacher{i}.pt", seed=i, width=0.5) for i in range(2)]


def kd_overrides(teachers, *extra: str) -> list[str]:
    listed = ",".join(str(t) for t in teachers)
    return [*TINY, *STUDENT, "compression=[kd]", f"callbacks.kd.teachers=[{listed}]", *extra]


# ----- the loss against the formula written out ------------------------------------------------

def reference_kd(student: torch.Tensor, teachers: list[torch.Tensor], targets: torch.Tensor, T: float,
                 ce_weight: float, kd_weight: float) -> torch.Tensor:
    """ce_weight * CE + kd_weight * T^2 * KL(p || q), in float64 with explicit exp / log / sums."""
    s, ts = student.double(), [t.double() for t in teachers]
    p = sum(torch.exp(t / T) / torch.exp(t / T).sum(1, keepdim=True) for t in ts) / len(ts)
    log_q = s / T - torch.log(torch.exp(s / T).sum(1, keepdim=True))
    kl = (p * (torch.log(p) - log_q)).sum(1).mean()
    ce = -(s - torch.log(torch.exp(s).sum(1, keepdim=True))).gather(1, targets[:, None]).mean()
    return ce_weight * ce + kd_weight * T * T * kl


@pytest.mark.parametrize("T,ce_weight,kd_weight", [(1.0, 0.0, 1.0), (2.0, 0.5, 0.5), (4.0, 0.1, 0.9), (8.0, 1.0, 2.0)])
def test_kd_loss_equals_hinton_formula(T, ce_weight, kd_weight):
    g = torch.Generator().manual_seed(int(T * 10))
    student, teacher = torch.randn(32, 10, generator=g) * 3, torch.randn(32, 10, generator=g) * 3
    targets = torch.randint(0, 10, (32,), generator=g)
    got = (ce_weight * F.cross_entropy(student, targets)
           + kd_weight * kd_loss(student, teacher_probabilities([teacher], T), T))
    torch.testing.assert_close(got.double(), reference_kd(student, [teacher], targets, T, ce_weight, kd_weight),
                               rtol=1e-5, atol=1e-6)


def test_ensemble_averages_probabilities_not_logits():
    g = torch.Generator().manual_seed(0)
    a, b, student = (torch.randn(16, 10, generator=g) * 4 for _ in range(3))
    T = 4.0
    probs = teacher_probabilities([a, b], T)
    torch.testing.assert_close(probs, (F.softmax(a / T, 1) + F.softmax(b / T, 1)) / 2)
    assert not torch.allclose(probs, F.softmax((a + b) / 2 / T, 1), atol=1e-3)
    targets = torch.zeros(16, dtype=torch.long)
    torch.testing.assert_close(kd_loss(student, probs, T).double(),
                               reference_kd(student, [a, b], targets, T, 0.0, 1.0), rtol=1e-5, atol=1e-6)


def test_attention_and_fitnets_losses_match_the_papers():
    g = torch.Generator().manual_seed(0)
    fs, ft = torch.randn(4, 8, 6, 6, generator=g), torch.randn(4, 16, 6, 6, generator=g)
    # Zagoruyko & Komodakis: Q = vec(sum_c |A_c|^2) / ||.||_2, loss = mean of (Q_s - Q_t)^2.
    def q(f):
        a = (f.double() ** 2).sum(1).reshape(f.shape[0], -1)
        return a / a.norm(dim=1, keepdim=True)
    torch.testing.assert_close(attention_loss(fs, ft).double(), ((q(fs) - q(ft)) ** 2).mean())
    # FitNets: || W_r * f_s - f_t ||^2 averaged, with a 1x1 convolutional regressor W_r.
    adapter = make_adapter(8, 16)
    regressed = torch.einsum("oc,bchw->bohw", adapter.weight[:, :, 0, 0], fs) + adapter.bias[None, :, None, None]
    torch.testing.assert_close(fitnets_loss(adapter(fs), ft), ((regressed - ft) ** 2).mean())


class Capture(pl.Callback):
    """Batch 0's inputs, targets, student logits and training loss; the teachers as seen at train end."""

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if batch_idx == 0 and trainer.current_epoch == 0:
            self.inputs, self.targets = batch[0].clone(), batch[1].clone()
            self.handle = pl_module.net.register_forward_hook(
                lambda m, a, out: setattr(self, "logits", out.detach().clone()))

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if batch_idx == 0 and trainer.current_epoch == 0:
            self.loss = outputs["loss"].detach()
            self.handle.remove()

    def on_train_end(self, trainer, pl_module):
        kd = next(c for c in trainer.callbacks if isinstance(c, KD))
        self.teachers = list(kd.teachers)


@pytest.mark.parametrize("ce_weight,kd_weight", [(0.3, 0.7), (0.1, 2.5)])
def test_training_loss_is_the_formula_with_an_ensemble(tmp_path, teacher_files, ce_weight, kd_weight):
    T = 3.0
    cfg = compose_config(kd_overrides(teacher_files, f"callbacks.kd.temperature={T}",
                                      f"callbacks.kd.ce_weight={ce_weight}", f"callbacks.kd.kd_weight={kd_weight}",
                                      "trainer.limit_train_batches=1"), tmp_path)
    datamodule, module, trainer = build(cfg)
    capture = Capture()
    trainer.callbacks.append(capture)
    trainer.fit(module, datamodule=datamodule)
    with torch.no_grad():
        teacher_logits = [load_model(path)(capture.inputs) for path in teacher_files]
    expected = reference_kd(capture.logits, teacher_logits, capture.targets, T, ce_weight, kd_weight)
    torch.testing.assert_close(capture.loss.double(), expected, rtol=1e-4, atol=1e-5)
    assert module.extra_results["kd/teachers"] == [str(p.resolve()) for p in teacher_files]


def test_teachers_get_no_gradient_and_are_not_trained_or_saved(tmp_path, teacher_files):
    cfg = compose_config(kd_overrides(teacher_files[:1], "callbacks=model_checkpoint", "trainer.limit_train_batches=3",
                                      "callbacks.kd.feature_loss=fitnets", "callbacks.kd.student_layers=[layer3]",
                                      "callbacks.kd.feature_weight=1.0"), tmp_path)
    datamodule, module, trainer = build(cfg)
    capture = Capture()
    trainer.callbacks.append(capture)
    trainer.fit(module, datamodule=datamodule)
    (teacher,) = capture.teachers
    reference = load_model(teacher_files[0])
    for key, value in reference.state_dict().items():  # weights and BN statistics (eval mode) unchanged
        torch.testing.assert_close(teacher.state_dict()[key], value, rtol=0, atol=0, msg=key)
    assert all(p.grad is None and not p.requires_grad for p in teacher.parameters())
    assert not teacher.training
    optimised = {id(p) for group in trainer.optimizers[0].param_groups for p in group["params"]}
    assert not optimised & {id(p) for p in teacher.parameters()}
    assert optimised >= {id(p) for p in module.aux["kd_adapters"].parameters()}  # the adapter trains
    checkpoint = torch.load(tmp_path / "checkpoints" / "last.ckpt", weights_only=True)
    assert all(k.startswith(("net.", "aux.kd_adapters.")) for k in checkpoint["state_dict"])
    state = next(v for k, v in checkpoint["callbacks"].items() if "KD" in k)
    assert state["teachers"] == [str(teacher_files[0].resolve())]  # the source, not the weights
    assert "kd_adapters" not in str(list(module.net.state_dict()))


# ----- clear errors before training -----------------------------------------------------------

def test_class_count_mismatch_is_rejected_before_training(tmp_path):
    five = save_teacher(tmp_path / "five.pt", num_classes=5, width=0.25)
    datamodule, module, trainer = build(compose_config(kd_overrides([five]), tmp_path / "run"))
    with pytest.raises(ValueError, match=r"callbacks\.kd\.teachers.*predicts 5 classes.*student predicts 10"):
        trainer.fit(module, datamodule=datamodule)
    assert trainer.global_step == 0


def test_missing_corrupt_or_unknown_teacher_is_a_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"callbacks\.kd\.teachers.*missing\.pt.*does not exist"):
        build(compose_config(kd_overrides([tmp_path / "missing.pt"]), tmp_path / "a"))
    with pytest.raises(ValueError, match=r"callbacks\.kd\.teachers.*resnet57_cifar.*did you mean.*resnet56_cifar"):
        build(compose_config(kd_overrides(["resnet57_cifar"]), tmp_path / "b"))
    corrupt = tmp_path / "corrupt.ckpt"
    corrupt.write_bytes(b"\x00 truncated")
    datamodule, module, trainer = build(compose_config(kd_overrides([corrupt]), tmp_path / "c"))
    with pytest.raises(ValueError, match=r"callbacks\.kd\.teachers.*not a readable checkpoint"):
        trainer.fit(module, datamodule=datamodule)
    assert trainer.global_step == 0


@pytest.mark.parametrize("kwargs,match", [
    ({"temperature": 0}, r"callbacks\.kd\.temperature.*> 0.*got 0"),
    ({"ce_weight": 1.5}, r"callbacks\.kd\.ce_weight.*\[0, 1\].*got 1\.5"),
    ({"kd_weight": -0.1}, r"callbacks\.kd\.kd_weight.*>= 0.*got -0\.1"),
    ({"ce_weight": 0, "kd_weight": 0}, r"callbacks\.kd\.ce_weight.*kd_weight.*both 0"),
    ({"feature_loss": "hint"}, r"callbacks\.kd\.feature_loss.*fitnets, attention.*got 'hint'"),
    ({"feature_loss": "fitnets"}, r"callbacks\.kd\.student_layers.*at least one"),
    ({"student_layers": ["layer3"]}, r"feature_loss.*is null"),
    ({"teachers": []}, r"callbacks\.kd\.teachers.*non-empty list"),
    ({"teachers": ["initial", "initial"], "feature_loss": "attention", "student_layers": ["layer3"]},
     r"exactly one teacher"),
])
def test_bad_arguments_are_rejected_at_construction(kwargs, match):
    with pytest.raises(ValueError, match=match):
        KD(**{"teachers": "initial", **kwargs})


@pytest.mark.parametrize("alpha", [0.1, 0.5, "0.1"])
def test_the_removed_alpha_key_is_a_clear_error(alpha):
    with pytest.raises(ValueError, match=r"`callbacks\.kd\.alpha` was removed.*weighed the cross-entropy.*"
                                         r"callbacks\.kd\.ce_weight.*callbacks\.kd\.kd_weight"):
        KD("initial", alpha=alpha)


def test_old_alpha_override_gets_the_mapping_to_the_new_keys(tmp_path):
    with pytest.raises(ValueError, match=r"alpha` was removed.*old alpha=0\.1: callbacks\.kd\.ce_weight=0\.1 "
                                         r"callbacks\.kd\.kd_weight=0\.9"):
        build(compose_config([*TINY, *STUDENT, "compression=[kd]", "callbacks.kd.teachers=initial",
                              "+callbacks.kd.alpha=0.1"], tmp_path))


def test_presets_and_default_use_the_two_weights(tmp_path):
    import hydra

    for overrides in (["compression=[kd]", "callbacks.kd.teachers=initial"],
                      ["experiment=kd_resnet56_to_resnet20", "callbacks.kd.teachers=initial"],
                      ["experiment=kd_slimmed_vgg19", "init_from=x.pt"]):
        cfg = compose_config([*overrides, "data.root=/nonexistent"], tmp_path)
        assert "alpha" not in cfg.callbacks.kd, overrides
        callback = hydra.utils.instantiate(cfg.callbacks.kd)
        assert (callback.ce_weight, callback.kd_weight) == (0.1, 0.9), overrides


def test_two_kd_callbacks_are_rejected_before_training():
    from netcompress.pipeline.combinations import check_combinations

    with pytest.raises(ValueError, match="only one KD"):
        check_combinations([KD("initial"), KD("initial")])


def test_unmatched_hint_layer_lists_the_layer_names(tmp_path, teacher_files):
    overrides = kd_overrides(teacher_files[:1], "callbacks.kd.feature_loss=fitnets", "callbacks.kd.student_layers=[block9]")
    datamodule, module, trainer = build(compose_config(overrides, tmp_path))
    with pytest.raises(ValueError, match=r"callbacks\.kd\.student_layers.*block9.*layer names are"):
        trainer.fit(module, datamodule=datamodule)


# ----- resume ----------------------------------------------------------------------------------

@pytest.mark.slow
def test_resume_restores_adapters_and_equals_uninterrupted(tmp_path, teacher_files):
    overrides = kd_overrides(teacher_files[:1], "callbacks=model_checkpoint", "scheduler=cosine", "trainer.max_epochs=2",
                             "trainer.limit_val_batches=1", "callbacks.kd.feature_loss=fitnets",
                             "callbacks.kd.student_layers=['layer?']", "callbacks.kd.feature_weight=1.0")
    datamodule, straight, trainer = build(compose_config(overrides, tmp_path / "straight"))
    trainer.fit(straight, datamodule=datamodule)
    checkpoint = fit_interrupted(compose_config(overrides, tmp_path / "first"), epochs=1)
    saved = torch.load(checkpoint, weights_only=True)["state_dict"]
    assert {k for k in saved if k.startswith("aux.kd_adapters.")} == {f"aux.kd_adapters.{i}.{p}" for i in range(3)
                                                                      for p in ("weight", "bias")}
    cfg = compose_config([*overrides, f"ckpt_path={checkpoint}"], tmp_path / "resumed")
    datamodule, resumed, trainer = build(cfg)
    trainer.fit(resumed, datamodule=datamodule, ckpt_path=str(checkpoint))
    a, b = straight.state_dict(), resumed.state_dict()
    assert any(k.startswith("aux.kd_adapters.") for k in a)
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=0, atol=0, msg=key)


# ----- combinations: prune/slim-then-distill from the dense parent, precision -----------------

def slimmed_from_parent(parent, *extra: str) -> list[str]:
    """Prune-then-distill: start from the dense parent, slim 50% after epoch 1, the parent teaches."""
    return [*TINY, *STUDENT, f"init_from={parent}", "compression=[slimming,kd]", "callbacks.slimming.at_epochs=[1]",
            "callbacks.slimming.prune_ratio=0.5", "trainer.max_epochs=2", "trainer.limit_val_batches=1",
            "callbacks.kd.teachers=initial", *extra]


class SnapshotTeacher(pl.Callback):
    def on_train_end(self, trainer, pl_module):
        self.teacher = next(c for c in trainer.callbacks if isinstance(c, KD)).teachers[0]


@pytest.mark.slow
def test_slimmed_student_is_distilled_from_its_dense_parent_with_attention(tmp_path):
    parent = save_teacher(tmp_path / "dense.pt", width=0.25)
    overrides = slimmed_from_parent(parent, "callbacks.kd.feature_loss=attention", "callbacks.kd.student_layers=['layer?']")
    datamodule, module, trainer = build(compose_config(overrides, tmp_path / "run"))
    snapshot = SnapshotTeacher()
    trainer.callbacks.append(snapshot)
    trainer.fit(module, datamodule=datamodule)
    dense = load_model(parent)
    for key, value in dense.state_dict().items():  # the teacher is the dense parent, untouched
        torch.testing.assert_close(snapshot.teacher.state_dict()[key], value, rtol=0, atol=0, msg=key)
    assert sum(p.numel() for p in module.net.parameters()) < sum(p.numel() for p in dense.parameters())
    assert math.isfinite(float(trainer.callback_metrics["train/kd_hint"]))
    assert math.isfinite(float(trainer.callback_metrics["train/kd"]))


@pytest.mark.slow
def test_fitnets_adapter_on_a_layer_that_slimming_thins_is_a_clear_error(tmp_path):
    parent = save_teacher(tmp_path / "dense.pt", width=0.25)
    # feature_weight 1: the default 100 with lr 0.1 and a random teacher diverges (now a non-finite-loss error)
    overrides = slimmed_from_parent(parent, "callbacks.kd.feature_loss=fitnets", "callbacks.kd.student_layers=[layer3]",
                                    "callbacks.kd.feature_weight=1.0")
    datamodule, module, trainer = build(compose_config(overrides, tmp_path / "run"))
    with pytest.raises(ValueError, match=r"callbacks\.kd\.student_layers.*'layer3' now has \d+ channels.*attention"):
        trainer.fit(module, datamodule=datamodule)


def test_pruned_student_keeps_a_dense_teacher(tmp_path):
    parent = save_teacher(tmp_path / "dense.pt", width=0.25)
    overrides = [*TINY, *STUDENT, f"init_from={parent}", "compression=[magnitude_pruning,kd]",
                 "callbacks.magnitude_pruning.sparsity=0.8", "callbacks.kd.teachers=initial",
                 "trainer.limit_train_batches=2", "trainer.limit_val_batches=1"]
    datamodule, module, trainer = build(compose_config(overrides, tmp_path / "run"))
    snapshot = SnapshotTeacher()
    trainer.callbacks.append(snapshot)
    trainer.fit(module, datamodule=datamodule)
    def zero_fraction(net):
        weights = [m.weight.detach() for m in net.modules() if isinstance(m, torch.nn.Conv2d)]
        return sum(int((w == 0).sum()) for w in weights) / sum(w.numel() for w in weights)

    assert zero_fraction(module.net) > 0.5 and zero_fraction(snapshot.teacher) == 0.0
    for key, value in load_model(parent).state_dict().items():
        torch.testing.assert_close(snapshot.teacher.state_dict()[key], value, rtol=0, atol=0, msg=key)


@pytest.mark.skipif(not (CONF / "compression" / "qat.yaml").exists(), reason="conf/compression/qat.yaml not written yet")
@pytest.mark.slow
def test_distill_with_qat_from_one_config(tmp_path):
    """QAT's setup wraps the student's layers first; the 'initial' teacher must still compute the float parent."""
    from netcompress.compression.fake_quant import QuantMixin

    parent = save_teacher(tmp_path / "dense.pt", width=0.25)
    overrides = [*TINY, *STUDENT, f"init_from={parent}", "compression=[qat,kd]", "callbacks.kd.teachers=initial",
                 "trainer.limit_train_batches=2", "trainer.limit_val_batches=1"]
    datamodule, module, trainer = build(compose_config(overrides, tmp_path / "run"))
    snapshot = SnapshotTeacher()
    trainer.callbacks.append(snapshot)
    trainer.fit(module, datamodule=datamodule)
    assert any(isinstance(m, QuantMixin) and m.quant_enabled for m in module.net.modules())
    assert not any(isinstance(m, QuantMixin) and m.quant_enabled for m in snapshot.teacher.modules())
    x = torch.randn(4, 3, 16, 16)
    with torch.no_grad():
        torch.testing.assert_close(snapshot.teacher(x), load_model(parent)(x))
    assert math.isfinite(float(trainer.callback_metrics["train/kd"]))


def test_teachers_follow_the_student_precision(tmp_path, teacher_files):
    overrides = kd_overrides(teacher_files[:1], "trainer.precision=bf16-true", "trainer.limit_train_batches=1",
                             "trainer.limit_val_batches=1")
    datamodule, module, trainer = build(compose_config(overrides, tmp_path))
    snapshot = SnapshotTeacher()
    trainer.callbacks.append(snapshot)
    trainer.fit(module, datamodule=datamodule)
    assert {p.dtype for p in snapshot.teacher.parameters()} == {torch.bfloat16} == {p.dtype for p in module.net.parameters()}
    assert math.isfinite(float(trainer.callback_metrics["train/kd"]))


# ----- presets ---------------------------------------------------------------------------------

@pytest.mark.slow
@pytest.mark.parametrize("preset,student,teacher", [
    ("kd_resnet56_to_resnet20", "resnet20_cifar", "resnet56_cifar"),
    ("kd_slimmed_vgg19", "vgg19_bn_cifar", "vgg19_bn_cifar"),
    ("kd_mini", "resnet20_cifar", "resnet56_cifar"),
])
def test_experiment_presets_run_one_step(tmp_path, preset, student, teacher):
    teacher_file = save_teacher(tmp_path / "teacher.pt", name=teacher, width=0.25)
    overrides = [f"experiment={preset}", *TINY, "trainer.fast_dev_run=1", "+model.width=0.25", "save_model=false"]
    if preset == "kd_slimmed_vgg19":  # teachers: initial, the dense parent given as init_from
        overrides.append(f"init_from={teacher_file}")
    else:
        overrides.append(f"callbacks.kd.teachers={teacher_file}")
    if preset == "kd_mini":
        overrides.append("~data.train_subset")  # a CIFAR-10 option; the test runs on synthetic data
    cfg = compose_config(overrides, tmp_path / "run")
    assert cfg.model.name == student
    datamodule, module, trainer = build(cfg)
    trainer.fit(module, datamodule=datamodule)
    assert trainer.global_step == 1 and math.isfinite(float(trainer.callback_metrics["train/kd"]))


# ----- timm-name teachers ------------------------------------------------------------------------

def test_timm_name_teacher_loads_local_pretrained_weights(tmp_path):
    torch.manual_seed(3)
    reference = models.create_model("resnet20_cifar", num_classes=10, width=0.25)
    weights = tmp_path / "weights.pth"
    torch.save(reference.state_dict(), weights)
    overrides = kd_overrides(["resnet20_cifar"], "+callbacks.kd.teacher_kwargs.width=0.25",
                             f"+callbacks.kd.teacher_kwargs.pretrained_cfg_overlay.file={weights}",
                             "trainer.limit_train_batches=1", "trainer.limit_val_batches=1")
    datamodule, module, trainer = build(compose_config(overrides, tmp_path / "run"))
    snapshot = SnapshotTeacher()
    trainer.callbacks.append(snapshot)
    trainer.fit(module, datamodule=datamodule)
    for key, value in reference.state_dict().items():
        torch.testing.assert_close(snapshot.teacher.state_dict()[key], value, rtol=0, atol=0, msg=key)
    assert module.extra_results["kd/teachers"] == ["timm:resnet20_cifar"]


def test_timm_teacher_without_local_weights_fails_before_training(tmp_path):
    datamodule, module, trainer = build(compose_config(kd_overrides(["resnet18"]), tmp_path))
    with pytest.raises((RuntimeError, ValueError), match=r"callbacks\.kd\.teachers.*resnet18"):
        trainer.fit(module, datamodule=datamodule)
    assert trainer.global_step == 0

"""The evaluation layer: metrics against hand computations, one evaluate() loop equal to the module's
test figures, evaluators picked from config (evaluation=[...]) with and without a parent, and one
per-layer FLOP counter."""
from __future__ import annotations

import copy
import json
import logging
import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from netcompress import models  # noqa: F401  (registers the CIFAR nets in timm)
from conftest import CONF, TINY, compose_config
from netcompress.evaluation import model_stats
from netcompress.evaluation.evaluate import evaluate
from netcompress.evaluation.evaluators import EVALUATORS, build_evaluators, run_evaluators
from netcompress.evaluation.retention import Retention
from netcompress.evaluation.metrics import Agreement, ClassificationMetrics, OnReference
from netcompress.models.factory import create_model
from netcompress.pipeline.build import build
from netcompress.pipeline.fit import fit_and_test

# 10 samples, 4 classes, imbalanced: six of class 0, two of class 1, two of class 2, none of class 3.
LOGITS = torch.tensor([
    [5.0, 1.0, 0.0, 2.0],   # y0: top1 0
    [4.0, 0.0, 3.0, 1.0],   # y0: top1 0
    [0.0, 2.0, 1.0, 3.0],   # y0: top1 3, top2 {3,1}: 0 is last
    [1.0, 3.0, 0.0, 0.5],   # y0: top1 1, top2 {1,0}
    [2.0, 1.0, 0.0, 0.0],   # y0: top1 0
    [0.0, 0.5, 2.0, 1.0],   # y0: top1 2, 0 last
    [0.0, 4.0, 1.0, 0.0],   # y1: top1 1
    [3.0, 1.0, 2.0, 0.0],   # y1: top1 0, 1 third
    [0.0, 1.0, 3.0, 2.0],   # y2: top1 2
    [1.0, 0.0, 0.5, 2.0],   # y2: top1 3, top2 {3,0}
])
LABELS = torch.tensor([0, 0, 0, 0, 0, 0, 1, 1, 2, 2])


def test_classification_metrics_equal_a_hand_computation_on_imbalanced_labels():
    metric = ClassificationMetrics(4, top_k=2)
    for i in range(0, 10, 3):  # uneven batches add up to the whole
        metric.update(LOGITS[i:i + 3], LABELS[i:i + 3])
    figures = metric.compute()
    # top-1 hits: class 0 -> samples 0, 1, 4 (3 of 6); class 1 -> sample 6 (1 of 2); class 2 -> sample 8 (1 of 2)
    assert figures["acc1"] == pytest.approx(5 / 10)
    assert figures["class_counts"] == [6, 2, 2, 0]
    per_class = figures["per_class_acc1"]
    assert per_class[:3] == pytest.approx([3 / 6, 1 / 2, 1 / 2]) and math.isnan(per_class[3])
    assert figures["acc1_macro"] == pytest.approx((3 / 6 + 1 / 2 + 1 / 2) / 3)  # class 3 has no sample
    # top-2 hits: samples 0, 1, 3, 4 (class 0), 6 (class 1), 8 (class 2) = 6; 9's top-2 is {3, 0}
    assert figures["acc2"] == pytest.approx(6 / 10)
    assert figures["loss"] == pytest.approx(float(F.cross_entropy(LOGITS, LABELS)))


def test_macro_top1_weighs_classes_equally_and_differs_from_top1():
    """Sample-averaged top-1 is sum(acc_c n_c) / sum(n_c); macro is the plain mean over classes with samples."""
    metric = ClassificationMetrics(4)
    metric.update(LOGITS, LABELS)
    f = metric.compute()
    weighted = sum(a * n for a, n in zip(f["per_class_acc1"], f["class_counts"]) if n) / sum(f["class_counts"])
    assert f["acc1"] == pytest.approx(weighted)
    assert f["acc5"] == 1.0  # top_k capped at the 4 classes


def test_reduce_sums_the_counts_of_several_processes():
    """The module passes trainer.strategy.reduce(sum): two halves reduced equal the whole."""
    whole, half = ClassificationMetrics(4), ClassificationMetrics(4)
    whole.update(LOGITS, LABELS)
    half.update(LOGITS[:5], LABELS[:5])
    other = ClassificationMetrics(4)
    other.update(LOGITS[5:], LABELS[5:])
    reduced = half.compute(reduce=lambda counts: counts + other._counts)
    expected = whole.compute()
    assert reduced["per_class_acc1"][:3] == pytest.approx(expected["per_class_acc1"][:3])
    assert reduced["class_counts"] == expected["class_counts"]
    assert {k: reduced[k] for k in ("acc1", "acc5", "acc1_macro", "loss")} == \
        pytest.approx({k: expected[k] for k in ("acc1", "acc5", "acc1_macro", "loss")})


def test_bad_labels_and_empty_metrics_are_clear():
    metric = ClassificationMetrics(4)
    with pytest.raises(ValueError, match=r"class labels must lie in \[0, 4\)"):
        metric.update(LOGITS, LABELS + 2)
    assert math.isnan(ClassificationMetrics(4).compute()["acc1"])  # no sample: undefined (null), not 0
    with pytest.raises(ValueError, match="num_classes must be an int >= 1"):
        ClassificationMetrics(0)


def test_agreement_and_reference_metrics_against_a_hand_computation():
    reference = LOGITS.roll(1, dims=1)  # top-1 of the reference: (ours + 1) % 4
    reference[:4] = LOGITS[:4]          # ... except on the first four samples, where both agree
    ours, theirs = LOGITS.argmax(1), reference.argmax(1)
    right = theirs == LABELS
    figures = evaluate(lambda x: x[:, :4], [(torch.cat([LOGITS, reference], 1), LABELS)],
                       [Agreement(), OnReference(ClassificationMetrics(4), "parent_")],
                       reference=lambda x: x[:, 4:])
    assert figures["agreement"] == pytest.approx(float((ours == theirs).float().mean()))
    assert figures["agreement"] == pytest.approx(0.4)
    assert figures["agreement_on_correct"] == pytest.approx(float((ours == theirs)[right].float().mean()))
    assert figures["parent_acc1"] == pytest.approx(float(right.float().mean()))


def test_evaluate_refuses_paired_metrics_without_a_reference_and_clashing_keys():
    with pytest.raises(ValueError, match="pass reference="):
        evaluate(lambda x: x, [(LOGITS, LABELS)], [Agreement()])
    with pytest.raises(ValueError, match="two metrics report"):
        evaluate(lambda x: x, [(LOGITS, LABELS)], [ClassificationMetrics(4), ClassificationMetrics(4)])


def test_evaluate_restores_the_training_mode_of_a_net():
    net = nn.Sequential(nn.Flatten(), nn.Linear(4, 4), nn.Dropout(0.5)).train()
    evaluate(net, [(LOGITS, LABELS)], ClassificationMetrics(4))
    assert net.training


def test_evaluate_with_a_plain_callable_equals_the_module_test_figures(tiny_config):
    """One evaluate() loop over the test loader gives the figures trainer.test logs (same metrics code)."""
    cfg = tiny_config("data.test_size=50", "data.num_classes=4")
    datamodule, module, trainer = build(cfg)
    tested = trainer.test(module, datamodule=datamodule, verbose=False)[0]
    net = module.net.eval()  # a plain callable has no mode for evaluate() to set

    def predict(inputs: torch.Tensor) -> torch.Tensor:  # a plain callable, as an ONNX session wrapper is
        return net(inputs.contiguous(memory_format=module.memory_format))

    figures = evaluate(predict, datamodule.test_dataloader(), ClassificationMetrics(4))
    for key in ("acc1", "acc5", "acc1_macro", "loss"):
        assert figures[key] == pytest.approx(tested[f"test/{key}"], abs=1e-6), key
    assert figures["per_class_acc1"] == pytest.approx(module.extra_results["test/per_class_acc1"])
    assert figures["class_counts"] == module.extra_results["test/class_counts"]
    assert sum(figures["class_counts"]) == 50


# ----- evaluators picked from config ---------------------------------------------------------------

def test_every_evaluator_config_is_a_registered_evaluator_and_back():
    files = sorted(p.stem for p in (CONF / "evaluation").glob("*.yaml"))
    assert files == sorted(EVALUATORS)
    for name in files:
        assert (CONF / "evaluation" / f"{name}.yaml").read_text().startswith("# @package evaluators")


def test_evaluation_list_composes_into_evaluators(tmp_path):
    cfg = compose_config([*TINY, "evaluation=[retention]"], tmp_path)
    assert list(cfg.evaluators) == ["retention"]
    evaluators = build_evaluators(cfg.evaluators)
    assert [type(e) for e in evaluators] == [Retention] and evaluators[0].name == "retention"
    assert list(compose_config(TINY, tmp_path).evaluators) == ["retention", "cost"]  # default evaluation: [retention, cost]
    assert compose_config([*TINY, "evaluation=[]"], tmp_path).get("evaluators") is None


def test_bad_evaluator_entries_fail_clearly(tmp_path):
    with pytest.raises(ValueError, match=r"`evaluators.nope` is not an evaluator; registered: .*retention"):
        build_evaluators({"nope": {}})
    with pytest.raises(ValueError, match="not the evaluator registered as 'retention'"):
        build_evaluators({"retention": {"_target_": "netcompress.evaluation.metrics.Agreement"}})
    cfg = compose_config([*TINY, "evaluation=[retention]", "+evaluators.retention.split=val"], tmp_path)
    with pytest.raises(ValueError, match="evaluators.retention"):  # the config checks, before training
        build(cfg)


def test_retention_with_an_identical_parent_agrees_everywhere_and_reports_the_parent_accuracy(tiny_config):
    """A parent equal to the net agrees on every image and has the net's own test/acc1."""
    cfg = tiny_config("evaluation=[retention]")
    results, objects = fit_and_test(cfg)
    parent = copy.deepcopy(objects["module"].net)
    figures = run_evaluators(cfg, objects, parent)
    assert figures["retention/agreement"] == 1.0 and figures["retention/agreement_on_correct"] == 1.0
    assert figures["retention/parent_test_acc1"] == pytest.approx(results["test/acc1"], abs=1e-6)


def test_a_kd_teacher_becomes_the_parent_and_is_not_saved(tiny_config):
    """callbacks/kd.py hands its (first) teacher to module.set_parent: evaluators see it, checkpoints do not."""
    cfg = tiny_config("compression=[kd]", "callbacks.kd.teachers=initial", "evaluation=[retention]")
    results, objects = fit_and_test(cfg)
    module = objects["module"]
    assert module.parent is not None and module.parent_source == "kd:initial"
    assert not [k for k in module.state_dict() if "parent" in k]
    figures = run_evaluators(cfg, objects, module.parent)
    assert 0.0 <= figures["retention/agreement"] <= 1.0
    assert figures["retention/parent_test_acc1"] is not None


def test_retention_without_a_parent_logs_one_line_and_reports_no_parent_figures(tiny_config, caplog):
    from netcompress.datamodules.synthetic import SyntheticDataModule

    cfg = tiny_config("evaluation=[retention]")
    net = create_model("resnet20_cifar", num_classes=10)
    datamodule = SyntheticDataModule(num_classes=10, image_size=32, train_size=16, val_size=8, test_size=20,
                                     batch_size=8, seed=0)
    datamodule.setup("test")
    caplog.set_level(logging.INFO, logger="netcompress.evaluation.retention")
    figures = run_evaluators(cfg, {"module": type("M", (), {"net": net})(), "datamodule": datamodule}, None)
    assert set(figures) == {"retention/per_class_acc1", "retention/ece", "retention/nll"}  # the net's own only
    lines = [r for r in caplog.records if r.name == "netcompress.evaluation.retention"]
    assert len(lines) == 1 and "no parent net" in lines[0].getMessage() and lines[0].levelno == logging.INFO


def test_a_run_without_a_parent_succeeds_and_has_no_parent_retention_keys(tiny_config):
    from netcompress.run import run

    cfg = tiny_config("evaluation=[retention]")
    results = run(cfg)
    assert results["status"] == "ok"
    assert sorted(k for k in results if k.startswith("retention/")) == \
        ["retention/ece", "retention/nll", "retention/per_class_acc1"]


def test_a_run_from_init_from_reports_agreement_with_its_parent(tiny_config, tmp_path):
    """Needs the pipeline wiring (pipeline/build.py sets module.parent for init_from; pipeline/fit.py
    calls run_evaluators after test)."""
    from netcompress.run import run

    dense = run(compose_config(TINY, tmp_path / "dense"))
    assert dense["status"] == "ok"
    cfg = tiny_config(f"init_from={tmp_path / 'dense' / 'model.pt'}", "evaluation=[retention]")
    run(cfg)
    saved = json.loads((Path(cfg.paths.output_dir) / "results.json").read_text())
    assert 0.0 <= saved["retention/agreement"] <= 1.0
    assert saved["retention/parent_test_acc1"] == pytest.approx(dense["test/acc1"], abs=1e-6)


# ----- one FLOP counter --------------------------------------------------------------------------

def _hook_flops(net: nn.Module, input_size: tuple[int, int, int]) -> dict[str, int]:
    """The formula written out: 2 x output elements x (k_h k_w C_in / groups) per conv, 2 x out x in per linear."""
    flops, handles = {}, []
    for name, module in net.named_modules():
        if isinstance(module, nn.Conv2d):
            def hook(m, inputs, output, name=name):
                flops[name] = 2 * output[0].numel() * m.kernel_size[0] * m.kernel_size[1] * m.in_channels // m.groups
            handles.append(module.register_forward_hook(hook))
        elif isinstance(module, nn.Linear):
            def hook(m, inputs, output, name=name):
                flops[name] = 2 * output[0].numel() * m.in_features
            handles.append(module.register_forward_hook(hook))
    with torch.no_grad():
        net.eval()(torch.zeros(1, *input_size))
    for handle in handles:
        handle.remove()
    return flops


@pytest.mark.parametrize("model_name", ["resnet20_cifar", "vgg11_bn_cifar", "conv2_lth"])
def test_layer_flops_equal_the_formula_and_add_up_to_the_total(model_name):
    from netcompress.protocols import retrain_init

    net = create_model(model_name, num_classes=10)
    per_layer = model_stats.layer_flops(net, (3, 32, 32))
    expected = _hook_flops(net, (3, 32, 32))
    assert {name: per_layer[name] for name in expected} == expected
    assert sum(expected.values()) == model_stats.count_flops(net, (3, 32, 32))  # convs + fc are all the FLOPs
    assert retrain_init.layer_flops is model_stats.layer_flops  # the protocol counts with model_stats


def test_effective_flops_subtract_the_pruned_share_of_each_masked_layer():
    from netcompress.protocols.retrain_init import effective_flops

    net = create_model("resnet20_cifar", num_classes=10)
    per_layer = _hook_flops(net, (3, 32, 32))
    mask = torch.zeros_like(net.get_submodule("layer1.0.conv1").weight, dtype=torch.bool)
    mask.view(-1)[: mask.numel() // 4] = True  # keep a quarter
    total = model_stats.count_flops(net, (3, 32, 32))
    got = effective_flops(net, {"layer1.0.conv1": mask}, (3, 32, 32))
    assert got == round(total - 0.75 * per_layer["layer1.0.conv1"])

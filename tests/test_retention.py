"""evaluation=[retention] (Hooker et al. 2019): KL/JS, forgetting and calibration metrics against
independent references on fixed tensors, the evaluator on a hand-made data set (imbalanced classes,
served in a permuted order), and end to end with a parent from an identical copy, init_from and a KD
teacher, and without a parent; the forgotten-examples CSV points at the right test images."""
from __future__ import annotations

import copy
import csv
import json
import logging
import math
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from scipy.spatial.distance import jensenshannon
from torch import nn
from torch.utils.data import Subset

from conftest import TINY, compose_config
from netcompress.evaluation.evaluate import evaluate
from netcompress.evaluation.evaluators import build_evaluators, run_evaluators
from netcompress.evaluation.metrics import Calibration, Divergence, Forgetting, OnReference
from netcompress.evaluation.retention import (CSV_COLUMNS, FORGOTTEN_FILE, Retention, served_to_dataset_index,
                                              worst_classes)
from netcompress.pipeline.fit import fit_and_test

PARENT_KEYS = {f"retention/{k}" for k in (
    "agreement", "agreement_on_correct", "kl", "js", "forgetting", "new_learning", "per_class_forgetting",
    "per_class_acc1", "parent_per_class_acc1", "per_class_acc1_change", "worst_classes", "ece", "nll",
    "parent_ece", "parent_nll", "parent_test_acc1", "forgotten_file")}
NO_PARENT_KEYS = {"retention/per_class_acc1", "retention/ece", "retention/nll"}


def _logits(seed: int, n: int = 12, c: int = 5) -> torch.Tensor:
    return torch.randn(n, c, generator=torch.Generator().manual_seed(seed)) * 2


# ----- metrics against independent references ----------------------------------------------------

def test_kl_and_js_equal_torch_kl_div_and_scipy_jensenshannon_squared():
    child, parent = _logits(0), _logits(1)
    targets = torch.zeros(12, dtype=torch.long)
    metric = Divergence()
    for i in range(0, 12, 5):  # uneven batches add up to the whole
        metric.update(child[i:i + 5], targets[i:i + 5], parent[i:i + 5])
    got = metric.compute()
    # KL(parent || child): kl_div(input=log q, target=p) = sum p (log p - log q), batchmean = mean over samples
    kl = F.kl_div(F.log_softmax(child.double(), 1), F.softmax(parent.double(), 1), reduction="batchmean")
    assert got["kl"] == pytest.approx(float(kl), rel=1e-12)
    # scipy's jensenshannon is the JS *distance* (sqrt of the divergence), natural log by default
    p, q = F.softmax(parent.double(), 1).numpy(), F.softmax(child.double(), 1).numpy()
    assert got["js"] == pytest.approx(float(np.mean(jensenshannon(p, q, axis=1) ** 2)), rel=1e-9)
    assert 0 < got["js"] <= math.log(2)
    # reduce sums the counts of several processes: two halves equal the whole
    half, other = Divergence(), Divergence()
    half.update(child[:6], targets[:6], parent[:6])
    other.update(child[6:], targets[6:], parent[6:])
    assert half.compute(reduce=lambda t: t + other._counts) == pytest.approx(got)


def test_kl_is_zero_and_js_vanishes_for_an_identical_net():
    logits = _logits(2)
    metric = Divergence()
    metric.update(logits, torch.zeros(12, dtype=torch.long), logits.clone())
    got = metric.compute()
    assert got["kl"] == 0.0 and got["js"] == pytest.approx(0.0, abs=1e-15)


def test_forgetting_and_new_learning_equal_a_hand_count():
    labels = torch.tensor([0, 0, 0, 1, 1, 2, 2, 2, 2])
    parent_pred = torch.tensor([0, 0, 1, 1, 0, 2, 2, 0, 1])  # right on 0, 1, 3, 5, 6
    child_pred = torch.tensor([0, 2, 1, 0, 1, 2, 1, 2, 0])   # right on 0, 4, 5, 7
    one_hot = lambda pred: F.one_hot(pred, 3).float() * 5  # noqa: E731
    metric = Forgetting(3)
    metric.update(one_hot(child_pred), labels, one_hot(parent_pred))
    got = metric.compute()
    # parent right on {0, 1, 3, 5, 6}; the child misses 1 (class 0), 3 (class 1), 6 (class 2): 3 of 5 forgotten
    assert got["forgotten"] == 3 and got["forgetting"] == pytest.approx(3 / 5)
    # parent wrong on {2, 4, 7, 8}; the child gets 4 (class 1) and 7 (class 2) right: 2 of 4 newly learned
    assert got["newly_learned"] == 2 and got["new_learning"] == pytest.approx(2 / 4)
    # per class: class 0 parent right {0, 1}, forgot 1 -> 1/2; class 1 {3} -> 1/1; class 2 {5, 6} -> 1/2
    assert got["per_class_forgetting"] == pytest.approx([1 / 2, 1.0, 1 / 2])
    # parent wrong: class 0 {2} none learned; class 1 {4} learned -> 1; class 2 {7, 8}: 7 learned -> 1/2
    assert got["per_class_new_learning"] == pytest.approx([0.0, 1.0, 1 / 2])


def test_forgetting_of_a_class_the_parent_never_gets_right_is_undefined():
    metric = Forgetting(3)
    logits = F.one_hot(torch.tensor([0, 0]), 3).float()
    metric.update(logits, torch.tensor([0, 2]), logits)
    got = metric.compute()
    assert got["per_class_forgetting"][0] == 0.0
    assert math.isnan(got["per_class_forgetting"][1]) and math.isnan(got["per_class_forgetting"][2])
    with pytest.raises(ValueError, match="num_classes must be an int >= 1"):
        Forgetting(0)


def test_ece_and_nll_equal_a_hand_computation():
    """Five samples, three classes; bins of width 1/15, (lower, upper]."""
    probs = torch.tensor([
        [0.90, 0.05, 0.05],  # y0: conf .90, right  -> bin 13 (0.867, 0.933]
        [0.95, 0.03, 0.02],  # y1: conf .95, wrong  -> bin 14 (0.933, 1]
        [0.50, 0.30, 0.20],  # y0: conf .50, right  -> bin 7 (0.467, 0.533]
        [0.20, 0.45, 0.35],  # y2: conf .45, wrong  -> bin 6 (0.400, 0.467]
        [0.48, 0.42, 0.10],  # y0: conf .48, right  -> bin 7
    ], dtype=torch.float64)
    labels = torch.tensor([0, 1, 0, 2, 0])
    metric = Calibration()
    metric.update(probs.log(), labels)
    got = metric.compute()
    # sum_b |correct_b - summed confidence_b| / N: bin 13 |1 - .9|, 14 |0 - .95|, 7 |2 - .98|, 6 |0 - .45|
    assert got["ece"] == pytest.approx((0.1 + 0.95 + 1.02 + 0.45) / 5)
    assert got["nll"] == pytest.approx(-(math.log(0.9) + math.log(0.03) + math.log(0.5) + math.log(0.35)
                                         + math.log(0.48)) / 5)
    assert got["confidence"] == pytest.approx((0.9 + 0.95 + 0.5 + 0.45 + 0.48) / 5)


def _guo_ece(logits: torch.Tensor, labels: torch.Tensor, n_bins: int = 15) -> float:
    """Guo et al.'s _ECELoss (gpleiss/temperature_scaling), written out."""
    confidences, predictions = F.softmax(logits, 1).max(1)
    accuracies = predictions.eq(labels)
    ece = torch.zeros(1, dtype=logits.dtype)
    boundaries = torch.linspace(0, 1, n_bins + 1, dtype=logits.dtype)
    for lower, upper in zip(boundaries[:-1], boundaries[1:]):
        in_bin = confidences.gt(lower.item()) * confidences.le(upper.item())
        prop = in_bin.double().mean()  # (float() in their code; float64 here to compare at 1e-12)
        if prop.item() > 0:
            ece += torch.abs(confidences[in_bin].mean() - accuracies[in_bin].double().mean()) * prop
    return float(ece)


def test_ece_equals_guo_et_al_reference_code_on_random_logits_and_batches_add_up():
    logits = torch.randn(200, 10, generator=torch.Generator().manual_seed(3)).double() * 3
    labels = torch.randint(0, 10, (200,), generator=torch.Generator().manual_seed(4))
    metric = Calibration()
    for i in range(0, 200, 64):
        metric.update(logits[i:i + 64], labels[i:i + 64])
    got = metric.compute()
    assert got["ece"] == pytest.approx(_guo_ece(logits, labels), abs=1e-12)
    assert got["nll"] == pytest.approx(float(F.cross_entropy(logits, labels)), rel=1e-12)
    with pytest.raises(ValueError, match="num_bins must be an int >= 1"):
        Calibration(0)


def test_parent_calibration_through_on_reference():
    child, parent, labels = _logits(5).double(), _logits(6).double(), torch.arange(12) % 5
    figures = evaluate(lambda x: x[:, :5], [(torch.cat([child, parent], 1), labels)],
                       [Calibration(), OnReference(Calibration(), "parent_")], reference=lambda x: x[:, 5:])
    assert figures["ece"] == pytest.approx(_guo_ece(child, labels), abs=1e-12)
    assert figures["parent_ece"] == pytest.approx(_guo_ece(parent, labels), abs=1e-12)
    assert figures["parent_nll"] == pytest.approx(float(F.cross_entropy(parent, labels)), rel=1e-12)


# ----- the evaluator on a hand-made data set ------------------------------------------------------

class Columns(nn.Module):
    """A 'net' whose logits are columns of its input: the test can choose every prediction."""

    def __init__(self, start: int, stop: int) -> None:
        super().__init__()
        self.start, self.stop = start, stop
        self.anchor = nn.Parameter(torch.zeros(()))  # gives the net a device

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x[:, self.start:self.stop]


class HandData:
    """A datamodule stand-in: ``served`` = the dataset in the order ``eval_order`` (position -> index)."""

    def __init__(self, child: torch.Tensor, parent: torch.Tensor, labels: torch.Tensor, order: torch.Tensor,
                 batch: int = 4) -> None:
        self.num_classes = child.shape[1]
        self.eval_order = {"test": order}
        inputs, targets = torch.cat([child, parent], 1)[order], labels[order]
        self.batches = [(inputs[i:i + batch], targets[i:i + batch]) for i in range(0, len(order), batch)]

    def test_dataloader(self):
        return self.batches


# dataset (not served) order: 7 of class 0, 2 of class 1, 1 of class 2, none of class 3
LABELS = torch.tensor([0, 0, 0, 0, 0, 0, 0, 1, 1, 2])
PARENT_PRED = torch.tensor([0, 0, 0, 0, 0, 0, 1, 1, 1, 2])  # wrong only on 6
CHILD_PRED = torch.tensor([0, 0, 0, 0, 0, 1, 0, 1, 0, 0])   # wrong on 5, 6, 8, 9
ORDER = torch.tensor([3, 7, 9, 0, 8, 1, 2, 4, 5, 6])       # served position -> dataset index


def _hand_data() -> HandData:
    # true-class probabilities differ per example so that the CSV order is by drop, not by position
    scale = torch.linspace(1.0, 3.0, 10)[:, None]
    return HandData(F.one_hot(CHILD_PRED, 4).float() * scale, F.one_hot(PARENT_PRED, 4).float() * 3, LABELS, ORDER)


def test_retention_on_imbalanced_classes_equals_a_hand_count(tmp_path):
    figures = Retention(top_k_file=None)(Columns(0, 4), _hand_data(), Columns(4, 8), tmp_path)
    assert set(figures) == PARENT_KEYS
    child, parent = figures["retention/per_class_acc1"], figures["retention/parent_per_class_acc1"]
    # class 0: child right on 0-4 and 6 (6 of 7), parent on 0-5 (6 of 7); class 1: child 7 (1/2), parent 7, 8 (2/2);
    # class 2: child 0/1, parent 1/1; class 3: no sample (NaN, not 0)
    assert child[:3] == pytest.approx([6 / 7, 1 / 2, 0.0]) and parent[:3] == pytest.approx([6 / 7, 1.0, 1.0])
    assert math.isnan(child[3]) and math.isnan(parent[3])
    change = figures["retention/per_class_acc1_change"]
    assert change[:3] == pytest.approx([0.0, -1 / 2, -1.0]) and math.isnan(change[3])
    assert figures["retention/worst_classes"] == [2, 1]  # only classes that lost accuracy, largest drop first
    # parent right on 9 samples; the child misses 5 (class 0), 8 (class 1), 9 (class 2)
    assert figures["retention/forgetting"] == pytest.approx(3 / 9)
    assert figures["retention/new_learning"] == pytest.approx(1.0)  # parent wrong only on 6, the child gets it
    forgetting = figures["retention/per_class_forgetting"]
    assert forgetting[:3] == pytest.approx([1 / 6, 1 / 2, 1.0]) and math.isnan(forgetting[3])
    assert figures["retention/agreement"] == pytest.approx(6 / 10)  # same top-1 on 0-4 and 7
    assert figures["retention/agreement_on_correct"] == pytest.approx(6 / 9)  # of the parent's right 0-5, 7-9
    assert figures["retention/parent_test_acc1"] == pytest.approx(9 / 10)
    assert figures["retention/forgotten_file"] == FORGOTTEN_FILE
    rows = list(csv.DictReader(open(tmp_path / FORGOTTEN_FILE)))
    assert list(rows[0]) == list(CSV_COLUMNS)
    # forgotten: 5, 8, 9, with dataset indices (not served positions); child's true-class prob is
    # softmax of a one-hot on the wrong class: 1 / (e^s + 3) for scale s of that dataset index
    scale = torch.linspace(1.0, 3.0, 10)
    drop = {i: float(F.softmax(F.one_hot(PARENT_PRED[i], 4).float() * 3, 0)[LABELS[i]])
            - float(1 / (torch.exp(scale[i]) + 3)) for i in (5, 8, 9)}
    expected = sorted(drop, key=lambda i: -drop[i])
    assert [int(r["index"]) for r in rows] == expected
    for r in rows:
        i = int(r["index"])
        assert int(r["label"]) == LABELS[i] and int(r["parent_pred"]) == PARENT_PRED[i]
        assert int(r["child_pred"]) == CHILD_PRED[i] and float(r["drop"]) == pytest.approx(drop[i], abs=1e-6)
    assert [int(r["rank"]) for r in rows] == [1, 2, 3]


def test_top_k_file_caps_the_rows_and_zero_or_no_folder_writes_none(tmp_path):
    all_rows = Retention(top_k_file=None)(Columns(0, 4), _hand_data(), Columns(4, 8), tmp_path / "all")
    Retention(top_k_file=2)(Columns(0, 4), _hand_data(), Columns(4, 8), tmp_path / "two")
    read = lambda d: [r["index"] for r in csv.DictReader(open(d / FORGOTTEN_FILE))]  # noqa: E731
    assert read(tmp_path / "two") == read(tmp_path / "all")[:2]
    none = Retention(top_k_file=0)(Columns(0, 4), _hand_data(), Columns(4, 8), tmp_path / "zero")
    assert none["retention/forgotten_file"] is None and not (tmp_path / "zero").exists()
    assert Retention()(Columns(0, 4), _hand_data(), Columns(4, 8), None)["retention/forgotten_file"] is None
    assert all_rows["retention/kl"] > 0


def test_worst_classes_skips_gains_and_undefined_classes():
    assert worst_classes([0.1, -0.2, float("nan"), -0.5, -0.2, -0.1]) == [3, 1, 4]
    assert worst_classes([0.0, 0.3]) == []


def test_served_positions_map_to_dataset_indices():
    order = torch.tensor([4, 0, 3, 1, 2])
    with_order = type("D", (), {"eval_order": {"test": order}})()
    assert served_to_dataset_index(with_order, None, torch.tensor([0, 2, 4])).tolist() == [4, 3, 2]
    # a loader sharded over 2 processes, rank 1, serves positions 1, 3 of the interleaved order
    shard = type("L", (), {"rank": 1, "world_size": 2})()
    assert served_to_dataset_index(with_order, shard, torch.tensor([0, 1])).tolist() == [0, 1]
    # ImageFolder: the loader serves Subset(ImageFolder, order); nested subsets compose
    loader = type("L", (), {"dataset": Subset(Subset(list(range(10)), [9, 8, 7, 6, 5]), order.tolist())})()
    assert served_to_dataset_index(object(), loader, torch.tensor([0, 1])).tolist() == [5, 9]


def test_bad_top_k_file_fails_before_training(tmp_path):
    with pytest.raises(ValueError, match=r"`evaluators.retention.top_k_file` must be an int >= 0 .* got -1"):
        Retention(top_k_file=-1)
    with pytest.raises(ValueError, match="evaluators.retention.top_k_file"):
        build_evaluators({"retention": {"_target_": "netcompress.evaluation.retention.Retention", "top_k_file": 1.5}})
    from netcompress.pipeline.build import build

    cfg = compose_config([*TINY, "evaluators.retention.top_k_file=-3"], tmp_path)
    with pytest.raises(ValueError, match="got -3"):
        build(cfg)


# ----- the CSV's indices on a real datamodule ------------------------------------------------------

class NearestColour(nn.Module):
    """Classifies by the distance of an image's mean colour to each class's mean colour (no training)."""

    def __init__(self, centres: torch.Tensor) -> None:
        super().__init__()
        self.centres = nn.Parameter(centres.clone(), requires_grad=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return -torch.cdist(x.float().mean((2, 3)), self.centres) ** 2


def test_forgotten_csv_points_at_the_right_test_images(tmp_path):
    from netcompress.datamodules.synthetic import SyntheticDataModule

    dm = SyntheticDataModule(num_classes=4, image_size=8, train_size=64, val_size=8, test_size=40, batch_size=8,
                             seed=0, pad=0)
    dm.setup("test")
    splits = dm.load_splits()  # the test split as loaded: the dataset order the CSV's indices refer to
    mean, std = torch.tensor(dm.mean)[:, None, None], torch.tensor(dm.std)[:, None, None]
    normalise = lambda images: (images.float() / 255 - mean) / std  # noqa: E731
    train_x, train_y = normalise(splits["train"][0]), splits["train"][1]
    centres = torch.stack([train_x[train_y == c].mean((0, 2, 3)) for c in range(4)])
    parent = NearestColour(centres)
    child = NearestColour(centres[[1, 0, 2, 3]] * 0.9)  # swaps classes 0 and 1: forgets them
    figures = Retention(top_k_file=None)(child, dm, parent, tmp_path)
    rows = list(csv.DictReader(open(tmp_path / figures["retention/forgotten_file"])))
    # the reference: both nets on the test split in dataset order, no loader, no eval_order
    x, y = normalise(splits["test"][0]), splits["test"][1]
    with torch.no_grad():
        p, q = F.softmax(parent(x).double(), 1), F.softmax(child(x).double(), 1)
    forgotten = ((p.argmax(1) == y) & (q.argmax(1) != y)).nonzero()[:, 0].tolist()
    assert len(forgotten) >= 10 and sorted(int(r["index"]) for r in rows) == forgotten
    assert figures["retention/forgetting"] == pytest.approx(len(forgotten) / int((p.argmax(1) == y).sum()))
    assert not torch.equal(dm.eval_order["test"], torch.arange(40))  # the served order is not the dataset's
    drops = [float(r["drop"]) for r in rows]
    assert drops == sorted(drops, reverse=True)  # most forgotten first
    for r in rows:
        i = int(r["index"])
        assert int(r["label"]) == int(y[i]) and int(r["child_pred"]) == int(q[i].argmax())
        assert float(r["child_true_prob"]) == pytest.approx(float(q[i, y[i]]), abs=1e-5)
        assert float(r["parent_prob"]) == pytest.approx(float(p[i].max()), abs=1e-5)
        assert float(r["drop"]) == pytest.approx(float(p[i, y[i]] - q[i, y[i]]), abs=1e-5)


# ----- end to end from config ----------------------------------------------------------------------

def test_retention_is_on_by_default_and_off_with_an_empty_list(tmp_path):
    assert list(compose_config(TINY, tmp_path).evaluators) == ["retention", "cost"]
    assert compose_config([*TINY, "evaluation=[]"], tmp_path).get("evaluators") is None
    assert [e.name for e in build_evaluators(compose_config(TINY, tmp_path).evaluators)] == ["retention", "cost"]


def test_an_identical_parent_agrees_everywhere_and_forgets_nothing(tiny_config, tmp_path):
    cfg = tiny_config("evaluation=[retention]")
    results, objects = fit_and_test(cfg)
    net = objects["module"].net
    before = copy.deepcopy(net.state_dict())
    figures = run_evaluators(cfg, objects, copy.deepcopy(net), tmp_path / "out")
    assert set(figures) == PARENT_KEYS
    assert figures["retention/agreement"] == 1.0 and figures["retention/agreement_on_correct"] == 1.0
    assert figures["retention/kl"] == 0.0 and figures["retention/js"] == pytest.approx(0.0, abs=1e-12)
    assert 0 < results["test/acc1"] < 1  # so that forgetting and new learning are defined
    assert figures["retention/forgetting"] == 0.0 and figures["retention/new_learning"] == 0.0
    assert all(d == 0.0 for d in figures["retention/per_class_acc1_change"] if not math.isnan(d))
    assert figures["retention/worst_classes"] == []
    assert figures["retention/ece"] == figures["retention/parent_ece"]
    assert figures["retention/parent_test_acc1"] == pytest.approx(results["test/acc1"], abs=1e-6)
    # the net's own figures equal the module's test figures (same test set, same metric code)
    assert figures["retention/per_class_acc1"] == pytest.approx(results["test/per_class_acc1"], nan_ok=True)
    assert figures["retention/nll"] == pytest.approx(results["test/loss"], abs=1e-5)
    assert len(list(csv.reader(open(tmp_path / "out" / FORGOTTEN_FILE)))) == 1  # the header only
    assert all(torch.equal(before[k], v) for k, v in net.state_dict().items())  # the net is left unchanged


def test_a_run_from_init_from_reports_every_retention_key(tmp_path):
    from netcompress.run import run

    dense = run(compose_config([*TINY, "evaluation=[]"], tmp_path / "dense"))
    assert not [k for k in dense if k.startswith("retention/")]  # evaluation=[] disables it
    run(compose_config([*TINY, f"init_from={tmp_path / 'dense' / 'model.pt'}", "optimizer.lr=0.5"], tmp_path / "ft"))
    saved = json.loads((tmp_path / "ft" / "results.json").read_text())
    assert PARENT_KEYS <= set(saved)
    assert saved["retention/parent_test_acc1"] == pytest.approx(dense["test/acc1"], abs=1e-6)
    assert saved["retention/kl"] >= 0 and 0 <= saved["retention/agreement"] <= 1
    rows = list(csv.DictReader(open(tmp_path / "ft" / saved["retention/forgotten_file"])))
    assert len(rows) == round(saved["retention/forgetting"] * saved["retention/parent_test_acc1"] * 32)


def test_a_kd_teacher_is_the_parent(tiny_config):
    cfg = tiny_config("compression=[kd]", "callbacks.kd.teachers=initial")
    results, objects = fit_and_test(cfg)
    assert objects["module"].parent_source == "kd:initial"
    assert PARENT_KEYS <= set(results)
    assert len(results["retention/per_class_forgetting"]) == 10 and 0 <= results["retention/agreement"] <= 1
    assert (Path(cfg.paths.output_dir) / results["retention/forgotten_file"]).is_file()


def test_a_run_without_a_parent_logs_one_line_and_reports_the_net_only(tiny_config, caplog):
    caplog.set_level(logging.INFO, logger="netcompress.evaluation.retention")
    results, _ = fit_and_test(tiny_config())
    assert {k for k in results if k.startswith("retention/")} == NO_PARENT_KEYS
    assert results["retention/per_class_acc1"] == pytest.approx(results["test/per_class_acc1"], nan_ok=True)
    lines = [r for r in caplog.records if r.name == "netcompress.evaluation.retention"]
    assert len(lines) == 1 and lines[0].levelno == logging.INFO and "parent metrics skipped" in lines[0].getMessage()

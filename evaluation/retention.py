"""What a compressed net kept of its dense parent, and how well calibrated it is (``evaluation=[retention]``).

Seed idea: Hooker et al. 2019, "What do compressed deep neural networks forget?": top-1 accuracy
hides that compression costs a few classes and examples far more than the rest, so compare the
net with its parent class by class and example by example. One pass over the test set runs both
nets (``evaluation.evaluate.evaluate`` with ``reference=parent``) and feeds the metrics of
``evaluation/metrics.py``: top-1 agreement, KL / Jensen-Shannon divergence of the softmax outputs,
forgetting and new learning (overall and per class), per-class accuracy of both, and calibration
(ECE with 15 bins, Guo et al. 2017; NLL) of both. The examples the parent gets right and the net
gets wrong go to ``retention_forgotten.csv`` in the run folder, most forgotten first. See
docs/retention.md for every key.
"""
from __future__ import annotations

import csv
import logging
import math
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import Subset

from netcompress.evaluation.evaluate import evaluate
from netcompress.evaluation.evaluators import register_evaluator
from netcompress.evaluation.metrics import (Agreement, Calibration, ClassificationMetrics, Divergence, Forgetting,
                                            OnReference)

log = logging.getLogger(__name__)

FORGOTTEN_FILE = "retention_forgotten.csv"
WORST_CLASSES = 3  # retention/worst_classes lists at most this many classes
CSV_COLUMNS = ("rank", "index", "label", "parent_pred", "parent_prob", "child_pred", "child_prob",
               "child_true_prob", "drop")


class ForgottenExamples:
    """Paired metric that collects the samples the reference (parent) gets right and the net gets wrong.

    For each it keeps the served position (its place in the loader's order), the label, both
    predictions, both top-1 probabilities, the net's probability of the true class and the drop
    ``p_parent(y) - p_child(y)``. Not a summable count: it lists samples of this process only.
    """

    paired = True

    def __init__(self) -> None:
        self.reset()

    def reset(self) -> None:
        self._seen = 0
        self._rows: list[torch.Tensor] = []

    def update(self, logits: torch.Tensor, targets: torch.Tensor, reference_logits: torch.Tensor) -> None:
        q = F.softmax(logits.detach().double(), dim=1)
        p = F.softmax(reference_logits.detach().double().to(q.device), dim=1)
        targets = targets.detach().to(q.device).long()
        q_prob, q_pred = q.max(1)
        p_prob, p_pred = p.max(1)
        picked = (p_pred == targets) & (q_pred != targets)
        position = torch.arange(self._seen, self._seen + len(targets), device=q.device, dtype=torch.float64)
        self._seen += len(targets)
        q_true = q.gather(1, targets[:, None])[:, 0]
        rows = torch.stack([position, targets.double(), p_pred.double(), p_prob, q_pred.double(), q_prob, q_true,
                            p_prob - q_true], 1)
        self._rows.append(rows[picked].cpu())

    def compute(self, reduce: Any = None) -> dict[str, Any]:
        rows = torch.cat(self._rows) if self._rows else torch.zeros(0, 8, dtype=torch.float64)
        # most forgotten first: the largest drop of the true class's probability, ties by position
        order = sorted(range(len(rows)), key=lambda i: (-float(rows[i, 7]), float(rows[i, 0])))
        return {"forgotten_examples": rows[order] if order else rows}


def served_to_dataset_index(datamodule: Any, loader: Any, positions: torch.Tensor) -> torch.Tensor:
    """The test-set index of the samples served at ``positions`` of ``loader`` (``datamodule.test_dataloader()``).

    Val/test are served classes interleaved (``datamodules/eval_order.py``): an in-memory datamodule
    keeps the permutation in ``eval_order["test"]`` (served position -> index in the split as
    loaded), an ImageFolder one serves a ``Subset`` whose ``indices`` are that permutation. A loader
    sharded over ``world_size`` processes serves positions ``rank, rank + world_size, ...`` of it.
    """
    served = positions.long() * int(getattr(loader, "world_size", 1) or 1) + int(getattr(loader, "rank", 0) or 0)
    order = getattr(datamodule, "eval_order", None)
    if isinstance(order, dict) and order.get("test") is not None:
        return torch.as_tensor(order["test"]).cpu().long()[served]
    dataset = getattr(loader, "dataset", None)
    while isinstance(dataset, Subset):
        served = torch.as_tensor(dataset.indices).long()[served]
        dataset = dataset.dataset
    return served


def _change(child: list[float], parent: list[float]) -> list[float]:
    return [c - p for c, p in zip(child, parent)]  # NaN (a class without samples) stays NaN


def worst_classes(change: list[float], limit: int = WORST_CLASSES) -> list[int]:
    """The classes whose top-1 dropped (change < 0), largest drop first (ties: lower class first), at most ``limit``."""
    lost = [c for c, d in enumerate(change) if not math.isnan(d) and d < 0]
    return sorted(lost, key=lambda c: (change[c], c))[:limit]


def write_forgotten(path: Path, rows: torch.Tensor, indices: torch.Tensor) -> None:
    """One CSV row per forgotten example (``CSV_COLUMNS``), in the order of ``rows``."""
    with open(path, "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(CSV_COLUMNS)
        for rank, (row, index) in enumerate(zip(rows.tolist(), indices.tolist()), start=1):
            _, label, p_pred, p_prob, q_pred, q_prob, q_true, drop = row
            writer.writerow([rank, int(index), int(label), int(p_pred), f"{p_prob:.6f}", int(q_pred), f"{q_prob:.6f}",
                             f"{q_true:.6f}", f"{drop:.6f}"])


def _device(net: nn.Module) -> torch.device:
    tensor = next(net.parameters(), None)
    if tensor is None:
        tensor = next(net.buffers(), None)
    return tensor.device if tensor is not None else torch.device("cpu")


@register_evaluator("retention")
class Retention:
    """The net against its dense parent on the test set, in one pass over it (see the module docstring).

    With a parent it reports every ``retention/*`` key (docs/retention.md) and writes the
    ``top_k_file`` most forgotten examples to ``retention_forgotten.csv`` in ``out_dir``. Without a
    parent it reports the net's own ``retention/per_class_acc1``, ``retention/ece`` and
    ``retention/nll`` and logs one info line. Nets are evaluated in eval mode and left unchanged;
    the parent is moved to the net's device.

    Args:
        top_k_file: rows of retention_forgotten.csv (the most forgotten examples); null = all of
            them, 0 = write no file.
    """

    def __init__(self, top_k_file: int | None = 100) -> None:
        if top_k_file is not None and (isinstance(top_k_file, bool) or not isinstance(top_k_file, int)
                                       or top_k_file < 0):
            raise ValueError(f"`evaluators.retention.top_k_file` must be an int >= 0 (rows of {FORGOTTEN_FILE}; 0 "
                             f"writes no file) or null (all rows); got {top_k_file!r}")
        self.top_k_file = top_k_file

    def __call__(self, net: nn.Module, datamodule: Any, parent: nn.Module | None,
                 out_dir: Path | None = None) -> dict[str, Any]:
        num_classes = int(datamodule.num_classes)
        loader = datamodule.test_dataloader()
        if parent is None:
            log.info("evaluation.%s: parent metrics skipped, this run has no parent net (init_from, a KD teacher or "
                     "a protocol's dense stage); reporting the net's per-class top-1 and calibration only", self.name)
            figures = evaluate(net, loader, [ClassificationMetrics(num_classes), Calibration()])
            return {"retention/per_class_acc1": figures["per_class_acc1"],
                    "retention/ece": figures["ece"], "retention/nll": figures["nll"]}
        forgotten = ForgottenExamples()
        figures = evaluate(net, loader,
                           [ClassificationMetrics(num_classes), Calibration(), Agreement(), Divergence(),
                            Forgetting(num_classes), OnReference(ClassificationMetrics(num_classes), "parent_"),
                            OnReference(Calibration(), "parent_"), forgotten],
                           reference=parent.to(_device(net)))
        change = _change(figures["per_class_acc1"], figures["parent_per_class_acc1"])
        results = {
            "retention/agreement": figures["agreement"],
            "retention/agreement_on_correct": figures["agreement_on_correct"],
            "retention/kl": figures["kl"],
            "retention/js": figures["js"],
            "retention/forgetting": figures["forgetting"],
            "retention/new_learning": figures["new_learning"],
            "retention/per_class_forgetting": figures["per_class_forgetting"],
            "retention/per_class_acc1": figures["per_class_acc1"],
            "retention/parent_per_class_acc1": figures["parent_per_class_acc1"],
            "retention/per_class_acc1_change": change,
            "retention/worst_classes": worst_classes(change),
            "retention/ece": figures["ece"],
            "retention/nll": figures["nll"],
            "retention/parent_ece": figures["parent_ece"],
            "retention/parent_nll": figures["parent_nll"],
            "retention/parent_test_acc1": figures["parent_acc1"],
            "retention/forgotten_file": None,
        }
        if out_dir is not None and self.top_k_file != 0:
            rows = figures["forgotten_examples"]
            rows = rows if self.top_k_file is None else rows[:self.top_k_file]
            Path(out_dir).mkdir(parents=True, exist_ok=True)
            write_forgotten(Path(out_dir) / FORGOTTEN_FILE, rows, served_to_dataset_index(datamodule, loader, rows[:, 0]))
            results["retention/forgotten_file"] = FORGOTTEN_FILE
        return results


__all__ = ["Retention", "ForgottenExamples", "served_to_dataset_index", "worst_classes", "FORGOTTEN_FILE",
           "CSV_COLUMNS"]

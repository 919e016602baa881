"""Classification metrics in one place: what the module's val/test and every evaluation report.

Each metric keeps summable counts, so any number of batches (and processes) add up exactly:

* :class:`ClassificationMetrics`: ``loss`` (mean cross-entropy), ``acc1`` / ``acc5`` (top-k
  accuracy averaged over samples, what papers call top-1 / top-5), ``acc1_macro`` (mean top-1
  recall over the classes that have samples; sklearn's ``balanced_accuracy_score``),
  ``per_class_acc1`` (NaN for a class with no sample: undefined, not 0) and ``class_counts``;
* :class:`Agreement`: the share of samples where a net's top-1 equals a reference net's (the
  int8 model vs its fake-quant net, a compressed net vs its dense parent);
* :class:`OnReference`: any metric applied to the reference net's logits (the parent's accuracy).

The protocol (``reset``, ``update``, ``compute(reduce)``) is small on purpose; ``paired`` metrics
also receive the reference net's logits. Knowledge-retention metrics (issue 12: KL/JS to the
parent, forgetting, calibration) are further paired metrics of this kind, fed by
``evaluation.evaluate.evaluate`` in the same single pass.
"""
from __future__ import annotations

import math
from typing import Any, Callable, Protocol, runtime_checkable

import torch
import torch.nn.functional as F

Reduce = Callable[[torch.Tensor], torch.Tensor]  # sums a count tensor over processes (identity on one)


@runtime_checkable
class Metric(Protocol):
    """What :func:`evaluation.evaluate.evaluate` and the LightningModule feed.

    ``update(logits, targets)`` (paired metrics: ``update(logits, targets, reference_logits)``)
    accumulates counts; ``compute(reduce)`` returns ``{name: value}`` (``reduce`` sums the counts
    over processes first, e.g. ``trainer.strategy.reduce(t, reduce_op="sum")``).
    """

    paired: bool

    def reset(self) -> None: ...

    def update(self, logits: torch.Tensor, targets: torch.Tensor, *reference: torch.Tensor) -> None: ...

    def compute(self, reduce: Reduce | None = None) -> dict[str, Any]: ...


def _check_targets(targets: torch.Tensor, num_classes: int) -> None:
    """Labels in range (one host sync per batch; the message's min/max only on failure)."""
    if targets.numel() and bool(((targets < 0) | (targets >= num_classes)).any()):
        raise ValueError(f"class labels must lie in [0, {num_classes}) for {num_classes} classes; "
                         f"got labels from {int(targets.min())} to {int(targets.max())}")


def _ratio(num: float, den: float) -> float:
    return num / den if den else math.nan  # no sample: undefined (null in results.json), not 0


class ClassificationMetrics:
    """Loss, sample-averaged top-1/top-5, macro top-1, per-class top-1 and class counts.

    Args:
        num_classes: number of classes (logit columns).
        top_k: the k of ``acc<k>`` besides top-1 (capped at num_classes, as a 3-class acc5 is acc3).
    """

    paired = False

    def __init__(self, num_classes: int, top_k: int = 5) -> None:
        if isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < 1:
            raise ValueError(f"num_classes must be an int >= 1; got {num_classes!r}")
        self.num_classes = num_classes
        self.top_k = top_k
        self._k = min(top_k, num_classes)
        self.reset()

    def reset(self) -> None:
        # [correct per class (C), samples per class (C), top-k correct, summed loss]: one tensor, one all-reduce
        self._counts: torch.Tensor | None = None

    def update(self, logits: torch.Tensor, targets: torch.Tensor) -> None:
        logits, targets = logits.detach(), targets.detach().to(logits.device).long()
        if logits.ndim != 2 or logits.shape[1] != self.num_classes or logits.shape[0] != targets.shape[0]:
            raise ValueError(f"expected logits of shape (N, {self.num_classes}) and N targets; got "
                             f"{tuple(logits.shape)} and {tuple(targets.shape)}")
        _check_targets(targets, self.num_classes)
        c = self.num_classes
        hit = logits.argmax(1) == targets
        counts = torch.zeros(2 * c + 2, dtype=torch.float64, device=logits.device)
        counts[:c] = torch.bincount(targets[hit], minlength=c)
        counts[c:2 * c] = torch.bincount(targets, minlength=c)
        counts[2 * c] = (logits.topk(self._k, dim=1).indices == targets[:, None]).any(1).sum()
        counts[2 * c + 1] = F.cross_entropy(logits.float(), targets, reduction="sum").double()
        self._counts = counts if self._counts is None else self._counts + counts.to(self._counts.device)

    def compute(self, reduce: Reduce | None = None) -> dict[str, Any]:
        c = self.num_classes
        counts = self._counts if self._counts is not None else torch.zeros(2 * c + 2, dtype=torch.float64)
        if reduce is not None:
            counts = reduce(counts.clone())  # all_reduce works in place: keep our own counts
        counts = counts.cpu()
        correct, support = counts[:c], counts[c:2 * c]
        total = float(support.sum())
        per_class = [_ratio(float(t), float(n)) for t, n in zip(correct, support)]
        present = [a for a in per_class if not math.isnan(a)]
        return {"loss": _ratio(float(counts[2 * c + 1]), total),
                "acc1": _ratio(float(correct.sum()), total),
                f"acc{self.top_k}": _ratio(float(counts[2 * c]), total),
                "acc1_macro": sum(present) / len(present) if present else math.nan,
                "per_class_acc1": per_class,
                "class_counts": [int(n) for n in support]}


class Agreement:
    """Top-1 agreement of a net with a reference net: share of samples with the same predicted class.

    Also ``agreement_on_correct``: the same share over the samples the reference classifies correctly."""

    paired = True

    def __init__(self) -> None:
        self.reset()

    def reset(self) -> None:
        self._counts = torch.zeros(4, dtype=torch.float64)  # [agree, total, agree & reference right, reference right]

    def update(self, logits: torch.Tensor, targets: torch.Tensor, reference_logits: torch.Tensor) -> None:
        ours = logits.detach().argmax(1).cpu()
        theirs = reference_logits.detach().argmax(1).cpu()
        right = theirs == targets.detach().cpu()
        same = ours == theirs
        self._counts += torch.tensor([int(same.sum()), same.numel(), int((same & right).sum()), int(right.sum())],
                                     dtype=torch.float64)

    def compute(self, reduce: Reduce | None = None) -> dict[str, Any]:
        counts = reduce(self._counts.clone()) if reduce is not None else self._counts
        agree, total, agree_right, right = (float(x) for x in counts.cpu())
        return {"agreement": _ratio(agree, total), "agreement_on_correct": _ratio(agree_right, right)}


class OnReference:
    """``metric`` applied to the reference net's logits; its keys prefixed (``parent_acc1``)."""

    paired = True

    def __init__(self, metric: Metric, prefix: str) -> None:
        if getattr(metric, "paired", False):
            raise TypeError(f"OnReference takes an unpaired metric; got {type(metric).__name__}")
        self.metric, self.prefix = metric, prefix

    def reset(self) -> None:
        self.metric.reset()

    def update(self, logits: torch.Tensor, targets: torch.Tensor, reference_logits: torch.Tensor) -> None:
        self.metric.update(reference_logits, targets)

    def compute(self, reduce: Reduce | None = None) -> dict[str, Any]:
        return {f"{self.prefix}{k}": v for k, v in self.metric.compute(reduce).items()}


__all__ = ["Metric", "ClassificationMetrics", "Agreement", "OnReference"]

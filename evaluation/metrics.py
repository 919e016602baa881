"""Classification metrics in one place: what the module's val/test and every evaluation report.

Each metric keeps summable counts, so any number of batches (and processes) add up exactly:

* :class:`ClassificationMetrics`: ``loss`` (mean cross-entropy), ``acc1`` / ``acc5`` (top-k
  accuracy averaged over samples, what papers call top-1 / top-5), ``acc1_macro`` (mean top-1
  recall over the classes that have samples; sklearn's ``balanced_accuracy_score``),
  ``per_class_acc1`` (NaN for a class with no sample: undefined, not 0) and ``class_counts``;
* :class:`Agreement`: the share of samples where a net's top-1 equals a reference net's (the
  int8 model vs its fake-quant net, a compressed net vs its dense parent);
* :class:`OnReference`: any metric applied to the reference net's logits (the parent's accuracy);
* :class:`Divergence`: mean KL(reference || net) and Jensen-Shannon divergence of the softmax
  outputs, in nats (what a compressed net keeps of its parent's function, not only its top-1);
* :class:`Forgetting`: the share of the reference's correct samples the net gets wrong and of its
  wrong samples the net gets right, overall and per class (Hooker et al. 2019, "What do compressed
  deep neural networks forget?": compression costs some classes and examples far more than others);
* :class:`Calibration`: expected calibration error (15 equal-width bins of top-1 confidence, Guo et
  al. 2017, "On Calibration of Modern Neural Networks"), negative log-likelihood, mean confidence.

The protocol (``reset``, ``update``, ``compute(reduce)``) is small on purpose; ``paired`` metrics
also receive the reference net's logits. All of them are fed by ``evaluation.evaluate.evaluate``
in one single pass (``evaluation/retention.py`` runs them together).
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




def _reduced(counts: torch.Tensor, reduce: Reduce | None) -> torch.Tensor:
    """The counts summed over processes (a copy: all_reduce works in place), on the CPU."""
    return (reduce(counts.clone()) if reduce is not None else counts).cpu()


def _paired_shapes(logits: torch.Tensor, targets: torch.Tensor, reference_logits: torch.Tensor) -> None:
    if logits.ndim != 2 or logits.shape != reference_logits.shape or logits.shape[0] != targets.shape[0]:
        raise ValueError(f"expected logits and reference logits of one shape (N, C) and N targets; got "
                         f"{tuple(logits.shape)}, {tuple(reference_logits.shape)} and {tuple(targets.shape)}")


def _kl_rows(log_p: torch.Tensor, log_q: torch.Tensor) -> torch.Tensor:
    """Per-row KL(p || q) = sum_c p_c (log p_c - log q_c) from log-probabilities (0 log 0 = 0)."""
    p = log_p.exp()
    return torch.where(p > 0, p * (log_p - log_q), torch.zeros_like(p)).sum(1)


class Divergence:
    """Mean KL(reference || net) and Jensen-Shannon divergence of the softmax outputs, in nats.

    ``kl``: mean over samples of ``sum_c p_c log(p_c / q_c)`` with ``p`` the reference's (parent's)
    softmax and ``q`` the net's: how much of the parent's output distribution the net loses (the
    direction distillation minimises). ``js``: mean over samples of the Jensen-Shannon
    **divergence** ``(KL(p || m) + KL(q || m)) / 2`` with ``m = (p + q) / 2``, symmetric and in
    ``[0, log 2]``; it is the square of ``scipy.spatial.distance.jensenshannon`` (a distance).
    Both are computed in float64.
    """

    paired = True

    def __init__(self) -> None:
        self.reset()

    def reset(self) -> None:
        self._counts: torch.Tensor | None = None  # [summed KL, summed JS, samples]

    def update(self, logits: torch.Tensor, targets: torch.Tensor, reference_logits: torch.Tensor) -> None:
        _paired_shapes(logits, targets, reference_logits)
        log_q = F.log_softmax(logits.detach().double(), dim=1)
        log_p = F.log_softmax(reference_logits.detach().double().to(log_q.device), dim=1)
        log_m = torch.logaddexp(log_p, log_q) - math.log(2.0)
        kl = _kl_rows(log_p, log_q)
        js = (0.5 * (_kl_rows(log_p, log_m) + _kl_rows(log_q, log_m))).clamp_min(0.0)  # >= 0 up to rounding
        counts = torch.stack([kl.sum(), js.sum(), torch.tensor(float(len(kl)), dtype=torch.float64,
                                                               device=kl.device)])
        self._counts = counts if self._counts is None else self._counts + counts.to(self._counts.device)

    def compute(self, reduce: Reduce | None = None) -> dict[str, Any]:
        counts = _reduced(self._counts if self._counts is not None else torch.zeros(3, dtype=torch.float64), reduce)
        kl, js, n = (float(x) for x in counts)
        return {"kl": _ratio(kl, n), "js": _ratio(js, n)}


class Forgetting:
    """What the net forgot and newly learned relative to a reference net (its dense parent).

    ``forgetting``: share of the samples the reference classifies correctly (top-1) that the net gets
    wrong; ``new_learning``: share of the samples the reference gets wrong that the net gets right;
    ``forgotten`` / ``newly_learned``: those sample counts; ``per_class_forgetting`` and
    ``per_class_new_learning``: the same shares within each true class (NaN where the class has no
    such sample). Per-class and per-example views follow Hooker et al. 2019.

    Args:
        num_classes: number of classes (logit columns).
    """

    paired = True

    def __init__(self, num_classes: int) -> None:
        if isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < 1:
            raise ValueError(f"num_classes must be an int >= 1; got {num_classes!r}")
        self.num_classes = num_classes
        self.reset()

    def reset(self) -> None:
        # per class: [reference right, ... & net wrong, reference wrong, ... & net right] (4 C)
        self._counts: torch.Tensor | None = None

    def update(self, logits: torch.Tensor, targets: torch.Tensor, reference_logits: torch.Tensor) -> None:
        _paired_shapes(logits, targets, reference_logits)
        targets = targets.detach().to(logits.device).long()
        _check_targets(targets, self.num_classes)
        ours = logits.detach().argmax(1) == targets
        theirs = reference_logits.detach().to(logits.device).argmax(1) == targets
        c = self.num_classes
        counts = torch.cat([torch.bincount(targets[mask], minlength=c)
                            for mask in (theirs, theirs & ~ours, ~theirs, ~theirs & ours)]).double()
        self._counts = counts if self._counts is None else self._counts + counts.to(self._counts.device)

    def compute(self, reduce: Reduce | None = None) -> dict[str, Any]:
        c = self.num_classes
        counts = _reduced(self._counts if self._counts is not None else torch.zeros(4 * c, dtype=torch.float64),
                          reduce)
        right, forgot, wrong, learned = counts.view(4, c)
        return {"forgetting": _ratio(float(forgot.sum()), float(right.sum())),
                "new_learning": _ratio(float(learned.sum()), float(wrong.sum())),
                "forgotten": int(forgot.sum()),
                "newly_learned": int(learned.sum()),
                "per_class_forgetting": [_ratio(float(f), float(r)) for f, r in zip(forgot, right)],
                "per_class_new_learning": [_ratio(float(l), float(w)) for l, w in zip(learned, wrong)]}


class Calibration:
    """Expected calibration error, negative log-likelihood and mean top-1 confidence of one net.

    ECE (Guo et al. 2017, "On Calibration of Modern Neural Networks", eq. 3): the samples are binned
    by top-1 confidence ``max_c softmax_c`` into ``num_bins`` equal-width bins ``(b/B, (b+1)/B]``;
    ``ece = sum_b (n_b / N) |acc_b - conf_b|`` with ``acc_b`` the top-1 accuracy and ``conf_b`` the
    mean confidence in bin b (their code's binning: lower edge open, upper closed). ``nll``: mean
    cross-entropy of the true class; ``confidence``: mean top-1 confidence. Apply it to a parent with
    ``OnReference(Calibration(), "parent_")``.

    Args:
        num_bins: number of equal-width confidence bins (15 as in Guo et al.).
    """

    paired = False

    def __init__(self, num_bins: int = 15) -> None:
        if isinstance(num_bins, bool) or not isinstance(num_bins, int) or num_bins < 1:
            raise ValueError(f"num_bins must be an int >= 1; got {num_bins!r}")
        self.num_bins = num_bins
        self.reset()

    def reset(self) -> None:
        # per bin: [samples, summed confidence, correct] (3 B), then summed NLL
        self._counts: torch.Tensor | None = None

    def update(self, logits: torch.Tensor, targets: torch.Tensor) -> None:
        logits, targets = logits.detach().double(), targets.detach().to(logits.device).long()
        if logits.ndim != 2 or logits.shape[0] != targets.shape[0]:
            raise ValueError(f"expected logits of shape (N, C) and N targets; got {tuple(logits.shape)} and "
                             f"{tuple(targets.shape)}")
        _check_targets(targets, logits.shape[1])
        log_probs = F.log_softmax(logits, dim=1)
        confidence, predicted = log_probs.max(1)
        confidence = confidence.exp()
        edges = torch.linspace(0.0, 1.0, self.num_bins + 1, dtype=torch.float64, device=logits.device)[1:-1]
        bins = torch.bucketize(confidence, edges, right=False)  # edges[b-1] < conf <= edges[b]
        b = self.num_bins
        counts = torch.cat([torch.bincount(bins, minlength=b).double(),
                            torch.bincount(bins, weights=confidence, minlength=b),
                            torch.bincount(bins, weights=(predicted == targets).double(), minlength=b),
                            -log_probs.gather(1, targets[:, None]).sum().reshape(1)])
        self._counts = counts if self._counts is None else self._counts + counts.to(self._counts.device)

    def compute(self, reduce: Reduce | None = None) -> dict[str, Any]:
        b = self.num_bins
        counts = _reduced(self._counts if self._counts is not None else torch.zeros(3 * b + 1, dtype=torch.float64),
                          reduce)
        samples, confidence, correct = counts[:3 * b].view(3, b)
        total = float(samples.sum())
        return {"ece": _ratio(float((correct - confidence).abs().sum()), total),
                "nll": _ratio(float(counts[3 * b]), total),
                "confidence": _ratio(float(confidence.sum()), total)}


__all__ = ["Metric", "ClassificationMetrics", "Agreement", "OnReference", "Divergence", "Forgetting", "Calibration"]

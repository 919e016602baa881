"""One evaluation loop for every model a run produces: a torch net, the exported int8 ONNX model, a parent.

``evaluate(predict, loader, metrics, reference=None)`` runs ``predict(inputs) -> logits`` over a
loader once and feeds each metric (``evaluation/metrics.py``); paired metrics also get the
``reference``'s logits of the same batch (a dense parent, a fake-quant net), so comparing two
nets costs one pass over the data. Figures are those of this process's data: no cross-process
sync, so it is safe to call on rank 0 alone after a DDP run.
"""
from __future__ import annotations

from contextlib import ExitStack
from typing import Any, Callable, Iterable, Sequence

import torch
from torch import nn

from netcompress.evaluation.metrics import Metric

Predict = Callable[[torch.Tensor], torch.Tensor]


def _device(net: nn.Module) -> torch.device:
    tensor = next(net.parameters(), None)
    if tensor is None:
        tensor = next(net.buffers(), None)
    return tensor.device if tensor is not None else torch.device("cpu")


def as_predict(model: nn.Module | Predict) -> Predict:
    """``model`` as ``inputs -> logits``: a torch net gets its inputs on its own device."""
    if not isinstance(model, nn.Module):
        if not callable(model):
            raise TypeError(f"predict must be a torch net or a callable inputs -> logits; got {type(model).__name__}")
        return model
    device = _device(model)
    return lambda inputs: model(inputs.to(device, non_blocking=True))


class _EvalMode:
    """Puts the torch nets in eval mode and restores their previous mode afterwards."""

    def __init__(self, *models: Any) -> None:
        self.nets = [m for m in models if isinstance(m, nn.Module)]

    def __enter__(self) -> None:
        self.modes = [net.training for net in self.nets]
        for net in self.nets:
            net.eval()

    def __exit__(self, *exc) -> None:
        for net, mode in zip(self.nets, self.modes):
            net.train(mode)


def evaluate(predict: nn.Module | Predict, loader: Iterable, metrics: Metric | Sequence[Metric],
             reference: nn.Module | Predict | None = None) -> dict[str, Any]:
    """Figures of ``predict`` on ``loader`` (batches of ``(inputs, targets)``): the merged ``compute()``
    of every metric, reset first.

    Args:
        predict: a torch net (eval mode and no grad during the loop, its mode restored after) or any
            callable ``inputs -> logits`` (e.g. ``partial(int8_export.predict, session)``).
        loader: an iterable of ``(inputs, targets)`` batches.
        metrics: one metric or several; two metrics may not report the same key.
        reference: a second net or callable, run on the same batches for the paired metrics.
    """
    metrics = [metrics] if not isinstance(metrics, (list, tuple)) else list(metrics)
    if not metrics:
        raise ValueError("evaluate needs at least one metric (e.g. ClassificationMetrics(num_classes))")
    paired = [type(m).__name__ for m in metrics if getattr(m, "paired", False)]
    if paired and reference is None:
        raise ValueError(f"metrics {paired} compare with a reference net; pass reference=<net or callable>")
    run, run_reference = as_predict(predict), as_predict(reference) if reference is not None else None
    for metric in metrics:
        metric.reset()
    with ExitStack() as stack:
        stack.enter_context(_EvalMode(predict, reference))
        stack.enter_context(torch.no_grad())
        for inputs, targets in loader:
            logits = run(inputs)
            ref_logits = run_reference(inputs).to(logits.device) if run_reference is not None else None
            targets = targets.to(logits.device)
            for metric in metrics:
                if getattr(metric, "paired", False):
                    metric.update(logits, targets, ref_logits)
                else:
                    metric.update(logits, targets)
    figures: dict[str, Any] = {}
    for metric in metrics:
        computed = metric.compute()
        clash = sorted(set(computed) & set(figures))
        if clash:
            raise ValueError(f"two metrics report {clash}; wrap one in OnReference(..., prefix=...) or drop one")
        figures.update(computed)
    return figures


__all__ = ["evaluate", "as_predict"]

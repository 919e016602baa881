"""The evaluation layer: what a network scores and costs, computed once.

* ``metrics``: classification metrics (sample-averaged acc1/acc5, acc1_macro, per-class) and paired
  ones (agreement with a reference net), used by the LightningModule's val/test and every evaluation;
* ``evaluate``: the one loop ``evaluate(predict, loader, metrics, reference)`` (torch net or ONNX session);
* ``evaluators``: extra evaluators after test, ``evaluation=[...]`` (conf/evaluation/), each seeing the
  final net, the data and the dense parent; knowledge retention (issue 12) adds entries here;
* ``model_stats``: parameters, FLOPs (total and per layer), latency; ``results`` / ``provenance``: results.json.
"""

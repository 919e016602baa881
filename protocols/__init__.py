"""Multi-stage experiment protocols (train dense -> prune -> retrain) built on ``pipeline`` (build, fit_and_test).

``run.train`` hands a job to ``run_protocol(cfg)`` when ``cfg.protocol`` is set; the protocol
returns the same ``(results, objects)`` as a plain run, so results.json, measuring and the
loggers work unchanged. The lottery protocol: ``lottery`` (settings, the job), ``stages``
(dense / mask / train stages in ``stage_store``), ``pruning_rounds`` (masks per round),
``retraining`` (the ``protocol.method`` registry), ``retrain_init``, ``fixed_mask``, ``rewind_snapshot``.
"""
from __future__ import annotations


def run_protocol(cfg):
    """Instantiate ``cfg.protocol`` and run it on the job's config."""
    import hydra

    protocol = hydra.utils.instantiate(cfg.protocol)
    return protocol.run(cfg)

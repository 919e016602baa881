"""What runs around a job rather than inside the model: progress output and input checks.

* ``pipeline.progress``: progress lines / bar and the per-epoch summary (Trainer callbacks).
* ``pipeline.config_checks.check_config(cfg)``: every typed value, required key and
  ``_target_`` argument of a composed config, checked once at the start of ``run.build``.
* ``pipeline.preflight.preflight_or_exit(argv)``: the command line's compression entries and
  ``callbacks.<entry>.<key>`` overrides, checked before Hydra composes anything.
"""

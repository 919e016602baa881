"""The pipeline layer: config -> objects -> fit -> test, shared by run.py and protocols/.

* ``pipeline.build.build(cfg)``: datamodule, module, callbacks, loggers and trainer from a
  composed config, after ``pipeline.config_checks.check_config(cfg)`` has checked every typed
  value, required key and ``_target_`` argument.
* ``pipeline.fit.fit_and_test(cfg, start=None, callbacks=())``: the one fit -> collect val/* ->
  test -> merge sequence; returns ``(results, objects)``.
* ``pipeline.preflight.preflight_or_exit(argv)``: the command line's compression entries and
  ``callbacks.<entry>.<key>`` overrides, checked before Hydra composes anything.
* ``pipeline.progress``: progress lines / bar and the per-epoch summary (Trainer callbacks).
* ``pipeline.resolvers``: the config's own OmegaConf resolvers (``${launch_dir:}``).
"""

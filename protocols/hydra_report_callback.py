"""A Hydra callback that writes report.py's tables and plots into the sweep folder when a multirun ends.

conf/hydra/default.yaml enables it for every multirun; a preset may set its title:
    hydra:
      callbacks:
        report:
          title: "..."
"""
from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from hydra.experimental.callback import Callback
from omegaconf import DictConfig

log = logging.getLogger(__name__)


class ReportOnMultirun(Callback):
    """``on_multirun_end``: ``report.make_report(<sweep dir>)``; a report failure is logged, not raised
    (the sweep's results.json files are the record; the report can be rerun with ``python report.py``)."""

    def __init__(self, title: str | None = None) -> None:
        if title is not None and not isinstance(title, str):
            raise ValueError(f"`hydra.callbacks.report.title` must be a string or null; got {title!r}")
        self.title = title

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        sweep_dir = Path(config.hydra.sweep.dir)
        try:
            from netcompress.report import make_report

            written = make_report(sweep_dir, title=self.title)
            log.info("report written: %s", ", ".join(str(p) for p in written))
        except Exception as exc:  # noqa: BLE001 - the sweep itself succeeded
            log.error("report.py failed on %s: %s: %s (rerun: python report.py %s)", sweep_dir,
                      type(exc).__name__, exc, sweep_dir)

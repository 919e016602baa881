"""The machine-readable record of a run (results.json): metrics, model cost, provenance, config."""
from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Any

RESULTS_FILE = "results.json"
# Keys every results.json carries (None when a run failed before they were measured).
REQUIRED_KEYS = ("status", "error", "seed", "model_name", "test/acc1", "test/acc5", "val/acc1",
                 "params_total", "params_nonzero", "flops", "size_bytes", "latency_ms",
                 "train_time_s", "epochs", "config", "provenance")


def _jsonable(value: Any) -> Any:
    if hasattr(value, "item") and callable(value.item) and getattr(value, "numel", lambda: 1)() == 1:
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    return value


def new_results(seed: int, model_name: str, config: dict, provenance: dict) -> dict:
    results = {key: None for key in REQUIRED_KEYS}
    results.update(status="running", seed=seed, model_name=model_name, config=config, provenance=provenance)
    return results


def write_results(output_dir: str | os.PathLike, results: dict) -> Path:
    """Write results.json atomically so a reader never sees half a file."""
    path = Path(output_dir) / RESULTS_FILE
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(_jsonable(results), indent=2, sort_keys=False))
    os.replace(tmp, path)
    return path


def read_results(path: str | os.PathLike) -> dict:
    return json.loads(Path(path).read_text())

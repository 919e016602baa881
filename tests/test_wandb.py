"""Weights & Biases: the run config is the flattened resolved Hydra config, runs are tagged with their
compression entries, and the per-class table and saliency grid land in the run. Offline only: the
offline run is read back from its transaction log (run-<id>.wandb), never from the network."""
from __future__ import annotations

import json
import struct
import time
import zlib
from pathlib import Path

import pytest
from omegaconf import OmegaConf

from conftest import TINY_DATA, TINY_RUN, compose_config
from netcompress.pipeline.wandb_config import flat_config, flatten, per_class_rows, run_tags

C = 10  # classes of data=synthetic
CHILD = [0.1 * c for c in range(C)]
PARENT = [0.5] * C
FORGETTING = [0.01 * c for c in range(C)]


def read_wandb_log(path: Path) -> list:
    """The protobuf records of a wandb transaction log: leveldb's log format (7-byte file header
    ':W&B', 0xBEE1, 0; then records of crc32 | length | type | data in 32 KiB blocks)."""
    from wandb.proto import wandb_internal_pb2

    raw = path.read_bytes()
    assert struct.unpack("<4sHB", raw[:7]) == (b":W&B", 0xBEE1, 0)
    block, header = 32768, 7
    records, pending, i = [], b"", 7
    while i + header <= len(raw):
        if block - i % block < header:  # zero padding at the end of a block
            i += block - i % block
            continue
        checksum, length, kind = struct.unpack("<IHB", raw[i:i + header])
        if i + header + length > len(raw):  # still being written
            break
        data = raw[i + header:i + header + length]
        i += header + length
        assert zlib.crc32(data, zlib.crc32(bytes([kind]))) & 0xFFFFFFFF == checksum
        pending += data
        if kind in (1, 4):  # FULL or LAST: one whole record
            record = wandb_internal_pb2.Record()
            record.ParseFromString(pending)
            records.append(record)
            pending = b""
    return records


def finished_log(path: Path, timeout_s: float = 60.0) -> list:
    """The records of a run's log once its ``exit`` record is written (wandb's service process may
    still be flushing when ``wandb.finish()`` returns)."""
    deadline = time.monotonic() + timeout_s
    while True:
        records = read_wandb_log(path) if path.stat().st_size > 7 else []
        kinds = [r.WhichOneof("record_type") for r in records]
        if "exit" in kinds or time.monotonic() > deadline:
            assert "exit" in kinds and kinds.count("run") == 1, kinds
            return records
        time.sleep(0.2)


def items(updates) -> dict:
    """{key: value} of a record's config / summary items (a key is ``key`` or the path ``nested_key``)."""
    return {item.key or "/".join(item.nested_key): json.loads(item.value_json) for item in updates}


def test_flatten_against_omegaconf_select(tmp_path):
    assert flatten({"a": {"b": 1, "c": [1, {"d": 2}], "e": {}}, "hydra": {"x": 1}, "f": None}) == \
        {"a.b": 1, "a.c": [1, {"d": 2}], "a.e": {}, "f": None}
    cfg = compose_config([*TINY_DATA, *TINY_RUN, "compression=[magnitude_pruning,noop]",
                          "callbacks.magnitude_pruning.sparsity=0.3", "seed=7", "tags=[mine]"], tmp_path / "run")
    flat = flat_config(cfg)
    assert flat["callbacks.magnitude_pruning.sparsity"] == 0.3 and flat["seed"] == 7
    assert flat["data.seed"] == 7  # resolved (${seed}), not the interpolation text
    for key, value in flat.items():  # every leaf is the config's own value at that dotted path
        expected = OmegaConf.select(cfg, key)
        assert (OmegaConf.to_container(expected, resolve=True) if OmegaConf.is_config(expected) else expected) \
            == value, key
    leaves = [k for k in flat if not isinstance(flat[k], dict)]
    assert len(leaves) > 60 and any(k.startswith("optimizer.") for k in leaves) and \
        any(k.startswith("trainer.") for k in leaves)
    assert run_tags(cfg, cfg.tags) == ["mine", "magnitude_pruning", "noop"]
    assert run_tags(cfg, ["noop"]) == ["noop", "magnitude_pruning"]  # once each


def test_per_class_rows_pad_missing_columns():
    rows = per_class_rows({"retention/per_class_acc1": [0.5, 0.25], "retention/per_class_forgetting": [0.0, 0.5]})
    assert rows == [[0, 0.5, None, None, 0.0], [1, 0.25, None, None, 0.5]]
    assert per_class_rows({"test/acc1": 0.5}) == []


def test_offline_wandb_run_has_flat_config_tags_table_and_grid(tmp_path, monkeypatch):
    for name, value in {"WANDB_MODE": "offline", "WANDB_SILENT": "true", "WANDB_CONSOLE": "off",
                        "WANDB_DIR": str(tmp_path / "wandb_dir"), "WANDB_CONFIG_DIR": str(tmp_path / "wandb_cfg"),
                        "WANDB_CACHE_DIR": str(tmp_path / "wandb_cache"), "WANDB_DATA_DIR": str(tmp_path / "wandb_data"),
                        "WANDB_DISABLE_GIT": "true", "WANDB_API_KEY": ""}.items():
        monkeypatch.setenv(name, value)
    import wandb

    import netcompress.pipeline.fit as fit_module
    from netcompress.run import run

    def fake_evaluators(cfg, objects, parent, out_dir):  # the agreed retention / saliency keys
        from PIL import Image

        Image.new("RGB", (8, 4), (255, 0, 0)).save(Path(out_dir) / "saliency_grid.png")
        return {"retention/per_class_acc1": CHILD, "retention/parent_per_class_acc1": PARENT,
                "retention/per_class_acc1_change": [a - b for a, b in zip(CHILD, PARENT)],
                "retention/per_class_forgetting": FORGETTING, "retention/agreement": 0.75,
                "saliency/grid_file": "saliency_grid.png"}

    monkeypatch.setattr(fit_module, "run_evaluators", fake_evaluators)
    out = tmp_path / "run"
    overrides = [o for o in TINY_RUN if o != "logger=none"] + ["logger=wandb", "trainer.limit_train_batches=1",
                                                                "trainer.limit_val_batches=1"]
    cfg = compose_config([*TINY_DATA, *overrides, "compression=[magnitude_pruning]",
                          "callbacks.magnitude_pruning.sparsity=0.3", "seed=7", "tags=[mine]", "model.name=conv2_lth",
                          "+model.width=0.125", "latency_repeats=1", "save_model=false"], out)
    try:
        results = run(cfg)
    finally:
        wandb.finish()
    assert results["status"] == "ok"
    (folder,) = (out / "wandb").glob("offline-run-*")
    records = finished_log(next(folder.glob("run-*.wandb")))
    (run_record,) = [r.run for r in records if r.WhichOneof("record_type") == "run"]
    config = items(run_record.config.update)
    for r in records:  # later config updates (Lightning's own hyperparameters)
        if r.WhichOneof("record_type") == "config":
            config.update(items(r.config.update))
    assert config["callbacks.magnitude_pruning.sparsity"] == 0.3
    assert config["callbacks.magnitude_pruning._target_"] == "netcompress.callbacks.magnitude_pruning.MagnitudePruning"
    assert config["seed"] == 7 and config["model.name"] == cfg.model.name and config["optimizer.lr"] == cfg.optimizer.lr
    assert config["paths.output_dir"] == str(out)
    assert list(run_record.tags) == ["mine", "magnitude_pruning"]
    summary = {}
    for r in records:
        if r.WhichOneof("record_type") == "summary":
            summary.update(items(r.summary.update))
    assert summary["test/acc1"] == pytest.approx(results["test/acc1"]) and summary["seed"] == 7
    (table_file,) = (folder / "files" / "media" / "table").glob("retention/per_class_*.table.json")
    table = json.loads(table_file.read_text())
    assert table["columns"] == ["class", "child_acc1", "parent_acc1", "change", "forgetting"]
    assert [row[0] for row in table["data"]] == list(range(C))
    for c, row in enumerate(table["data"]):
        assert row[1:] == pytest.approx([CHILD[c], PARENT[c], CHILD[c] - PARENT[c], FORGETTING[c]])
    (image,) = (folder / "files" / "media" / "images").rglob("*.png")
    from PIL import Image

    assert Image.open(image).size == (8, 4)

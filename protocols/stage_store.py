"""A content-addressed store of shared stages (dense runs, IMP rounds), safe under concurrent jobs.

Idea from open_lth: a stage's folder is named by a hash of everything that determines its
output, and a stage whose output is already there is not recomputed. So every job of a sweep
(and of later sweeps) that needs the same dense run reuses it. "Check, then make" runs under a
file lock per stage; the output is built in a temporary folder and renamed into place with its
``done`` marker, so a reader never sees half a stage and a crashed job leaves nothing behind.

Multi-process (DDP) jobs: every rank runs the protocol and must train each stage together with
the others (the collectives pair up), so only rank 0 takes the lock and writes the stage; the
other ranks make it into a private folder that is thrown away, then wait for rank 0's ``done``
marker (``follow_timeout_s``). Without this, rank 1 would wait on the lock rank 0 holds while
rank 0's training waits for rank 1: a hang.

Layout (all on-disk names of the protocol live here)::

    <store_dir>/<kind>-<hash16>/spec.json    what determined it (the hashed parts)
                                /done         written last
                                /...          the stage's own files (model.pt, mask.pt, ...)
    <store_dir>/<kind>-<hash16>.lock
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import time
from pathlib import Path
from typing import Any, Callable, Mapping

from filelock import FileLock

DONE = "done"
SPEC = "spec.json"
MODEL = "model.pt"          # a stage's network (models.serialization format: plain tensors)
MASK = "mask.pt"            # {layer name: bool keep-mask}
METRICS = "metrics.json"    # the stage's own figures (val/acc1, train_time_s, ...)
RANK_VARIABLES = ("RANK", "LOCAL_RANK", "SLURM_PROCID", "JSM_NAMESPACE_RANK")  # Lightning's order (rank_zero)


def process_rank() -> int:
    """This process' rank in a multi-process job, read from the launcher's environment as Lightning does
    (``RANK``, then ``LOCAL_RANK``, ``SLURM_PROCID``, ``JSM_NAMESPACE_RANK``); 0 when none is set."""
    for name in RANK_VARIABLES:
        value = os.environ.get(name)
        if value not in (None, ""):
            return int(value)
    return 0


def snapshot_file(step: int) -> str:
    """The dense run's weights at optimizer step ``step`` (0 = the initialisation)."""
    return f"snapshot_step{int(step)}.pt"


def stage_key(parts: Mapping[str, Any]) -> str:
    """16 hex digits of the SHA-256 of the canonical JSON of ``parts``."""
    text = json.dumps(parts, sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


class StageStore:
    """``ensure(kind, parts, make)``: the folder of the stage, made by ``make(tmp_dir)`` only if absent."""

    def __init__(self, root: str | os.PathLike, follow_timeout_s: float = 1800.0) -> None:
        if not root:
            raise ValueError("protocol.store_dir must be a folder path (default ${paths.store_dir}); got "
                             f"{root!r}")
        self.root = Path(root)
        self.follow_timeout_s = float(follow_timeout_s)  # how long a rank > 0 waits for rank 0's marker

    def path(self, kind: str, parts: Mapping[str, Any]) -> Path:
        return self.root / f"{kind}-{stage_key(parts)}"

    def is_done(self, kind: str, parts: Mapping[str, Any]) -> bool:
        return (self.path(kind, parts) / DONE).is_file()

    def ensure(self, kind: str, parts: Mapping[str, Any], make: Callable[[Path], None]) -> Path:
        """Return the stage folder; run ``make`` into a temporary folder first if it is not done yet."""
        final = self.path(kind, parts)
        if (final / DONE).is_file():
            return final
        self.root.mkdir(parents=True, exist_ok=True)
        rank = process_rank()
        if rank != 0:
            return self._follow(final, make, rank)
        with FileLock(str(final) + ".lock"):
            if (final / DONE).is_file():  # another job made it while we waited
                return final
            tmp = final.with_name(f".{final.name}.tmp-{os.getpid()}")
            shutil.rmtree(tmp, ignore_errors=True)
            tmp.mkdir(parents=True)
            try:
                (tmp / SPEC).write_text(json.dumps(parts, indent=2, sort_keys=True, default=str))
                make(tmp)
                (tmp / DONE).write_text("ok\n")
                if final.exists():  # leftovers of a job killed between rename and marker (cannot be done)
                    shutil.rmtree(final)
                os.replace(tmp, final)
            finally:
                shutil.rmtree(tmp, ignore_errors=True)
        return final


    def _follow(self, final: Path, make: Callable[[Path], None], rank: int) -> Path:
        """Rank > 0 of a DDP job: train alongside rank 0 (into a private folder, then deleted), then wait for
        rank 0's ``done`` marker and return its folder."""
        private = final.with_name(f".{final.name}.rank{rank}-{os.getpid()}")
        shutil.rmtree(private, ignore_errors=True)
        private.mkdir(parents=True)
        try:
            make(private)
        finally:
            shutil.rmtree(private, ignore_errors=True)
        deadline = time.monotonic() + self.follow_timeout_s
        while not (final / DONE).is_file():
            if time.monotonic() > deadline:
                raise TimeoutError(f"rank {rank} finished stage {final.name} but rank 0 wrote no {final / DONE} "
                                   f"within {self.follow_timeout_s:.0f} s; look for rank 0's error in its log (a "
                                   "DDP job's ranks must share protocol.store_dir)")
            time.sleep(0.5)
        return final


def write_json_atomic(path: Path, value: Any) -> None:
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(value, indent=2, sort_keys=True, default=str))
    os.replace(tmp, path)

"""What a pretraining run writes beside its checkpoints, and how a resume is recorded.

`metrics.jsonl` (appended across requeues, lines written whole), `config.yaml` (atomic) and
`overrides.jsonl` (what changed at each resume, and the changes a resume cannot honour).
Split from the training loop so that `engines/trainer.py` holds the loop itself; every write
failure here is one line naming the file (a full disk with the bytes needed).
"""

from __future__ import annotations

import contextlib
import errno
import json
import logging
import os
import time
from pathlib import Path
from typing import Any

import yaml

from satfuse.config import PretrainConfig, dump_yaml, to_dict
from satfuse.diskspace import is_no_space, no_space_error
from satfuse.run_layout import RunLayout
from satfuse.utils import SatfuseError

log = logging.getLogger(__name__)


class MetricsLog:
    """JSONL metrics on rank 0, appended across requeues (one file per run).

    Lines are written whole: one `write` per line, and a line the disk could not take in full
    is cut off again, so a full disk never leaves a torn line for the next run to append to.
    A torn last line left by an older version or a kill is removed when the log is opened.
    """

    def __init__(self, path: Path, enabled: bool) -> None:
        self.enabled = enabled
        self.path = path
        if enabled:
            path.parent.mkdir(parents=True, exist_ok=True)
            repair_torn_tail(path)
            self.fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o666)

    def write(self, record: dict[str, Any]) -> None:
        if not self.enabled:
            return
        data = (json.dumps(record) + "\n").encode()
        size = os.fstat(self.fd).st_size
        try:
            if os.write(self.fd, data) != len(data):  # a regular file writes short only when full
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        except OSError as exc:
            with contextlib.suppress(OSError):
                os.ftruncate(self.fd, size)  # no torn line
            raise write_error(exc, self.path, len(data), "appending a metrics line") from None

    def close(self) -> None:
        if self.enabled:
            os.close(self.fd)


def repair_torn_tail(path: Path) -> None:
    """Cut a last line without its newline (a write cut short) off `path`, saying so."""
    if not path.is_file() or path.stat().st_size == 0:
        return
    with open(path, "rb+") as fh:
        fh.seek(0, os.SEEK_END)
        end = fh.tell()
        fh.seek(end - 1)
        if fh.read(1) == b"\n":
            return
        keep = end
        while keep > 0:
            step = min(4096, keep)
            fh.seek(keep - step)
            chunk = fh.read(step)
            nl = chunk.rfind(b"\n")
            if nl >= 0:
                keep = keep - step + nl + 1
                break
            keep -= step
        fh.truncate(keep)
    log.warning("%s: removed a torn last line (%d bytes, a write cut short) before appending", path, end - keep)


def write_error(exc: OSError, path: Path, needed: int, doing: str) -> SatfuseError:
    """One line for a failed run-dir write: ENOSPC with free/needed bytes, else the OS's reason."""
    if is_no_space(exc):
        return no_space_error(path, needed, doing, "free space there (or use another train.run_dir) and resume")
    return SatfuseError(f"{path}: {doing} failed ({exc.strerror or exc}); check that train.run_dir is writable")


def write_config(cfg: PretrainConfig, path: Path) -> None:
    """config.yaml of the run (atomic), a full disk said in one line."""
    try:
        dump_yaml(cfg, path)
    except OSError as exc:
            raise write_error(exc, path, len(yaml.safe_dump(to_dict(cfg), sort_keys=False).encode()),
                           "writing config.yaml") from None


# Keys whose change on resume cannot be honoured: the restored state is of the old kind.
REFUSED_ON_RESUME = {
    "optim.name": "the checkpoint's optimizer state is of another optimizer type",
    "train.engine": "the checkpoint is in the other engine's format",
}


def config_changes(saved: dict[str, Any], current: dict[str, Any], prefix: str = "") -> dict[str, list[Any]]:
    """{dotted key: [value in the checkpoint, value now]} of every leaf that differs."""
    out: dict[str, list[Any]] = {}
    for key in sorted(set(saved) | set(current)):
        a, b = saved.get(key), current.get(key)
        if isinstance(a, dict) and isinstance(b, dict):
            out.update(config_changes(a, b, f"{prefix}{key}."))
        elif a != b and key in saved:
            out[f"{prefix}{key}"] = [a, b]
    return out


def refuse_changes(changed: dict[str, list[Any]], path: Path) -> None:
    for key, why in REFUSED_ON_RESUME.items():
        if key in changed:
            old, new = changed[key]
            raise SatfuseError(
                f"{path}: {key} was {old!r} when this checkpoint was written, now {new!r}: {why}; "
                f"resume with {key}={old} or start a new train.run_dir"
            )


def record_overrides(run_dir: Path, step: int, path: Path, changed: dict[str, list[Any]]) -> None:
    """Append what changed at this resume to run_dir/overrides.jsonl (the run's history)."""
    if not changed:
        return
    record = {"time": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "step": step, "checkpoint": str(path),
              "changed": {k: {"was": a, "now": b} for k, (a, b) in changed.items()}}
    try:
        with open(RunLayout(run_dir).overrides, "a") as fh:
            fh.write(json.dumps(record) + "\n")
            fh.flush()
            os.fsync(fh.fileno())
    except OSError as exc:  # the record is part of the run: do not train on without it
        raise SatfuseError(f"{RunLayout(run_dir).overrides}: cannot record the changed settings "
                           f"({exc.strerror or exc}); free space there and resume again") from exc
    log.warning("resumed at step %d with changed settings, applied from here on: %s", step,
                ", ".join(f"{k} {a!r} -> {b!r}" for k, (a, b) in changed.items()))

"""The run-level steps both sharding tools share: arguments, the seeded plan, the worker pool, errors.

One job: what turns a list of keyed samples into written shards, independent of how a
sample is read (`shard_writer` for SEN12MS/DFC2020/pairs, `multiband` for per-band
datasets). The plan is a pure function of (sorted samples, seed, per-shard count): a seeded
global permutation cut into runs of `maxcount`, so a job-array part that writes shards
j % n == i writes exactly the single run's shards.
"""

from __future__ import annotations

import hashlib
import json
import logging
import multiprocessing as mp
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, TypeVar

import numpy as np
from tqdm import tqdm

from satfuse.utils import SatfuseError

log = logging.getLogger(__name__)

MAX_ERRORS_SHOWN = 5
T = TypeVar("T")


def plan_shards(samples: Sequence[T], seed: int, maxcount: int) -> list[list[T]]:
    """Seeded global permutation cut into shards of `maxcount` (the last may be shorter)."""
    perm = np.random.default_rng(seed).permutation(len(samples))
    return [[samples[i] for i in perm[j : j + maxcount]] for j in range(0, len(samples), maxcount)]


def plan_digest(payload: Any) -> str:
    """sha256 of a canonical JSON rendering (plans and settings compare by this)."""
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()


def check_args(maxcount: int, maxsize: int | None, workers: int, shard_index: int | None, num_shards: int | None) -> tuple[int, int] | None:
    """Validate the shared options; return (part, parts) for a job-array part, else None."""
    if maxcount < 1:
        raise SatfuseError(f"--maxcount {maxcount}: must be at least 1")
    if maxsize is not None and maxsize < 1:
        raise SatfuseError(f"--maxsize {maxsize}: must be a positive number of bytes")
    if workers < 1:
        raise SatfuseError(f"--workers {workers}: must be at least 1")
    if shard_index is None and num_shards is None:
        return None
    if shard_index is None or num_shards is None:
        raise SatfuseError("cluster mode needs both --shard-index and --num-shards (or SLURM_ARRAY_TASK_ID/COUNT)")
    if num_shards < 1 or not 0 <= shard_index < num_shards:
        raise SatfuseError(f"--shard-index {shard_index} --num-shards {num_shards}: need 0 <= index < num-shards")
    return shard_index, num_shards


def run_tasks(write: Callable[[Any], dict[str, Any]], tasks: list[Any], sizes: list[int], workers: int) -> list[dict[str, Any]]:
    """Write shards in-process (1 worker) or over a process pool, one shard per task; records
    come back sorted by shard index. `sizes` (samples per task) drive the progress bar.

    The pool forks where the platform allows (webdataset imports torch: ~2-4 s per spawned
    worker otherwise) and is created before the progress bar starts its monitor thread.
    """
    total = sum(sizes)
    if workers == 1 or len(tasks) <= 1:
        with _bar(total) as bar:
            records = []
            for task, size in zip(tasks, sizes, strict=True):
                records.append(write(task))
                bar.update(size)
        return records
    method = "fork" if "fork" in mp.get_all_start_methods() else "spawn"
    by_index = {t.index: size for t, size in zip(tasks, sizes, strict=True)}
    with mp.get_context(method).Pool(min(workers, len(tasks)), initializer=quiet_gdal) as pool, _bar(total) as bar:
        records = []
        for record in pool.imap_unordered(write, tasks):
            records.append(record)
            bar.update(by_index[record["index"]])
    return sorted(records, key=lambda r: r["index"])


def _bar(total: int) -> tqdm:
    return tqdm(total=total, desc="shard", unit="pair", disable=not sys.stderr.isatty())


def quiet_gdal() -> None:
    """GDAL reports a corrupt file as a burst of warnings; the packer reports each bad file
    once with the fix, so only GDAL's errors are worth showing (also run in pool workers)."""
    for name in ("rasterio._env", "rasterio._err", "rasterio._io"):
        logging.getLogger(name).setLevel(logging.ERROR)


def raise_on_errors(records: list[dict[str, Any]], out: Path) -> None:
    """Fail the run naming every pair whose data cannot be trusted (one log line each)."""
    errors = [e for r in records for e in r.get("errors", [])]
    if not errors:
        return
    for e in errors:
        log.error("%s", e)
    shown = " | ".join(errors[:MAX_ERRORS_SHOWN])
    more = f" (+{len(errors) - MAX_ERRORS_SHOWN} more, see the log)" if len(errors) > MAX_ERRORS_SHOWN else ""
    raise SatfuseError(
        f"{out}: {len(errors)} pair(s) with data that cannot be trusted, no manifest written: {shown}{more}; "
        "fix or remove those files, or rerun with --exclude-bad to list them as excluded (finished shards are kept and reused)"
    )

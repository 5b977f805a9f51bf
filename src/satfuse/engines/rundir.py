"""Who may write a run directory, and what a fresh start does to an old run.

Two guarantees of `satfuse pretrain`:

- One writer per run_dir. Rank 0 holds an exclusive lease, `run_dir/.lock`: a small JSON file
  (host, pid, process start time, SLURM job id, start time) created atomically with `link(2)`
  of a fully written temp file, which fails with EEXIST when the lease exists. That works on
  NFS and Lustre, where `flock`/`fcntl` locks are not trustworthy. The heartbeat is the file's
  mtime: a daemon thread touches it every `lease_timeout_s / 10` seconds (at most 60 s) while
  the run lives, after checking the lease is still its own. A second run refuses with one line naming the holder, unless the holder is provably
  gone: the same host and a dead pid (or a reused one: the process start time differs), a
  SLURM job that `squeue` no longer lists as running, or a heartbeat older than
  `train.lease_timeout_s`. Then the lease is taken over with a warning. A requeued SLURM job
  (same job id) takes over its own lease. A holder that finds its lease taken by another run
  (it was stopped longer than the timeout) stops at the next step instead of writing on.
- One kind of owner per directory (`check_run_dir_kind`): `satfuse pretrain` refuses a
  train.run_dir that holds a fine-tuning run, a shard set or a source tree (GeoTIFFs), and
  `satfuse finetune` refuses a --run-dir holding a pretraining run, a shard set or a source
  tree: either would write its config.yaml and curves over the other's files.
- No fresh start destroys an old run: `checkpoint.resume=none` in a run_dir holding
  checkpoints, `config.yaml` or `metrics.jsonl` refuses, naming the options; with
  `--force-new-run` (`checkpoint.force_new_run=true`) those are moved to
  `run_dir/previous-<time>/` first.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import socket
import subprocess
import threading
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

import yaml

from satfuse.distributed.launcher_env import slurm_job_id
from satfuse.engines.run_records import write_error
from satfuse.run_layout import LEASE, RunLayout
from satfuse.utils import SatfuseError

log = logging.getLogger(__name__)

# squeue states of a job that may still be running (or will run again in its own allocation)
LIVE_SLURM_STATES = {"RUNNING", "COMPLETING", "CONFIGURING", "SUSPENDED", "STOPPED", "SIGNALING",
                     "STAGE_OUT", "RESIZING", "REQUEUED", "REQUEUE_HOLD", "REQUEUE_FED"}


# --------------------------------------------------------------------------------------------
# whose directory it is
# --------------------------------------------------------------------------------------------

PRETRAIN_RUN = "pretraining run"
FINETUNE_RUN = "fine-tuning run"
SHARD_SET = "shard set"
SOURCE_TREE = "source tree"
RASTER_SUFFIXES = (".tif", ".tiff")
SOURCE_SCAN_DEPTH = 4  # SEN12MS ROI/s1_N/*.tif is depth 3, SSL4EO s1/ID/DATE/*.tif depth 4
SOURCE_SCAN_ENTRIES = 2000  # a bounded look (cluster filesystems), not a walk of a whole dataset


def run_dir_kind(path: Path) -> tuple[str, str] | None:
    """(kind, the evidence) of what `path` already holds, or None (absent, empty or nothing
    satfuse recognises). Kinds: PRETRAIN_RUN, FINETUNE_RUN, SHARD_SET, SOURCE_TREE.

    By the files each writer leaves (a pretraining run: checkpoints/, metrics.jsonl,
    overrides.jsonl, its lease, a config.yaml with `optim`/`checkpoint` sections; a
    fine-tuning run: result.json or a config.yaml with a top-level `run_dir`; a shard set:
    `satfuse shard`'s manifest/state dir, tars), so directories written before this check are
    recognised too."""
    from satfuse.data.format.manifest import (  # lazy: --help stays fast
        MANIFEST_NAME,
        PART_GLOB,
        STATE_DIR,
    )

    path = Path(path)
    if not path.is_dir():
        return None
    run = RunLayout(path)
    pre = [p.name for p in (run.checkpoints, run.metrics, run.overrides, run.lease) if p.exists()]
    ft = [p.name for p in (run.result,) if p.exists()]
    cfg = _config_kind(run.config)
    (pre if cfg == PRETRAIN_RUN else ft if cfg == FINETUNE_RUN else []).append(run.config.name)
    shards = [n for n in (MANIFEST_NAME, STATE_DIR) if (path / n).exists()]
    shards += sorted({g.name for pattern in (PART_GLOB, "*.tar") for g in path.glob(pattern)})[:3]
    for kind, found in ((SHARD_SET, shards), (PRETRAIN_RUN, pre), (FINETUNE_RUN, ft)):
        if found:
            return kind, ", ".join(found)
    tif = _find_raster(path)
    return (SOURCE_TREE, f"GeoTIFFs such as {tif.relative_to(path)}") if tif is not None else None


def _config_kind(path: Path) -> str | None:
    """Which kind of run wrote this config.yaml (None: none, or not a satfuse config)."""
    try:
        doc = yaml.safe_load(path.read_text())
    except (OSError, yaml.YAMLError):
        return None
    if not isinstance(doc, dict):
        return None
    if "optim" in doc or "checkpoint" in doc:  # PretrainConfig sections
        return PRETRAIN_RUN
    if "run_dir" in doc and "label" in doc:  # FinetuneConfig's top-level keys
        return FINETUNE_RUN
    return None


def _find_raster(root: Path) -> Path | None:
    """A GeoTIFF within SOURCE_SCAN_DEPTH levels, looking at SOURCE_SCAN_ENTRIES entries at most."""
    todo, seen = [(root, 0)], 0
    while todo and seen < SOURCE_SCAN_ENTRIES:
        folder, depth = todo.pop(0)
        try:
            entries = list(os.scandir(folder))
        except OSError:
            continue
        for e in entries:
            seen += 1
            if e.name.lower().endswith(RASTER_SUFFIXES) and e.is_file():
                return Path(e.path)
            if depth + 1 < SOURCE_SCAN_DEPTH and e.is_dir(follow_symlinks=False):
                todo.append((Path(e.path), depth + 1))
    return None


def check_run_dir_kind(path: Path, kind: str, fix: str) -> None:
    """Refuse, in one line, to write a `kind` run into a directory another kind owns (`fix`:
    what to pass instead, e.g. "use another train.run_dir")."""
    found = run_dir_kind(path)
    if found is not None and found[0] != kind:
        other, evidence = found
        raise SatfuseError(f"{path}: holds a {other} ({evidence}), not a {kind}; a {kind} here would "
                           f"write its config.yaml and curves among its files: {fix}")


# --------------------------------------------------------------------------------------------
# fresh start in a used run_dir
# --------------------------------------------------------------------------------------------


def previous_run_files(run_dir: Path) -> list[Path]:
    """The files of an earlier run in run_dir (an empty checkpoints/ does not count)."""
    found = []
    for p in RunLayout(run_dir).pretrain_files:
        if p.is_dir():
            if any(p.iterdir()):
                found.append(p)
        elif p.exists():
            found.append(p)
    return found


def prepare_fresh_start(run_dir: Path, force: bool) -> Path | None:
    """For `checkpoint.resume=none`: refuse a used run_dir, or (force) move the old run to
    `run_dir/previous-<time>/` and return that directory."""
    run_dir = Path(run_dir)
    old = previous_run_files(run_dir)
    if not old:
        return None
    names = ", ".join(p.name for p in old)
    if not force:
        raise SatfuseError(
            f"{run_dir}: holds an earlier run ({names}) and checkpoint.resume=none would overwrite "
            "it; use a new train.run_dir, continue it with checkpoint.resume=auto, or pass "
            f"--force-new-run (checkpoint.force_new_run=true) to move it to {run_dir}/previous-<time>/"
        )
    stamp = time.strftime("%Y%m%dT%H%M%S")
    dest = RunLayout(run_dir).previous(stamp)
    n = 1
    while dest.exists():
        n += 1
        dest = RunLayout(run_dir).previous(f"{stamp}-{n}")
    dest.mkdir()
    for p in old:
        os.replace(p, dest / p.name)
    _fsync_dir(run_dir)
    log.warning("%s: fresh start: the files of an earlier run (%s) were moved to %s", run_dir, names, dest)
    return dest


def _fsync_dir(path: Path) -> None:
    with contextlib.suppress(OSError):
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


# --------------------------------------------------------------------------------------------
# the lease
# --------------------------------------------------------------------------------------------


def process_start_time(pid: int) -> str:
    """Start time of `pid` in clock ticks since boot ('' where /proc is unreadable): tells a
    live holder from a new process that got its pid."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[-1].split()[19]
    except (OSError, IndexError):
        return ""


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def slurm_job_state(job: str) -> str | None:
    """squeue's state of `job`: '' when squeue does not list it (ended), None when squeue
    cannot be asked (no SLURM here, controller down): then nothing is proven."""
    try:
        res = subprocess.run(["squeue", "-h", "-j", job, "-o", "%T"], capture_output=True, text=True,
                             timeout=20, check=False)
    except (OSError, subprocess.TimeoutExpired):
        return None
    if res.returncode != 0:
        return "" if "invalid job id" in res.stderr.lower() else None
    lines = [ln.strip() for ln in res.stdout.splitlines() if ln.strip()]
    return lines[0] if lines else ""


def _lock_text(path: Path) -> str:
    """A lease file's text, whatever its bytes: a file that is not UTF-8 (damaged, or not ours)
    reads as an unreadable lease (refused while young, taken over once old), not a traceback.
    surrogateescape keeps the text byte-exact for the take-over's comparison."""
    return path.read_bytes().decode("utf-8", "surrogateescape")


def describe(holder: dict[str, Any]) -> str:
    if not holder.get("token"):
        return "an unreadable lease file, written under a minute ago (delete it if no run is alive)"
    job = f", SLURM job {holder['slurm_job']}" if holder.get("slurm_job") else ""
    age = time.time() - max(float(holder.get("heartbeat", 0) or 0), float(holder.get("_mtime", 0) or 0))
    return (f"pid {holder.get('pid')} on {holder.get('host')}{job}, started {holder.get('started_at', '?')}, "
            f"heartbeat {age:.0f}s ago")


def live_holder(run_dir: Path, timeout_s: float) -> str | None:
    """Who holds run_dir's lease now (`describe`), or None when nobody does or the holder is
    provably gone. Reads only: `satfuse submit` asks before it queues a job that would fail
    to take the lease at start."""
    probe = RunLease(run_dir, timeout_s)
    current = probe._read()
    if current is None or probe.gone(current[1]) is not None:
        return None
    return describe(current[1])


class RunLease:
    """The exclusive lease of one run_dir (see the module doc). Held by rank 0 only.

    Also the lock of other directories with one writer (`satfuse shard`'s output:
    `satfuse.data.packing.shard_dir.out_lease`): `name` is the lease file's path under `run_dir`, `what` how the
    refusal calls the directory, `fix` what it tells the user to do instead."""

    def __init__(self, run_dir: Path, timeout_s: float = 600.0, heartbeat_s: float | None = None,
                 name: str = LEASE, what: str = "run_dir", fix: str = "use another train.run_dir") -> None:
        self.run_dir = Path(run_dir)
        self.path = self.run_dir / name
        self.what, self.fix = what, fix
        self.timeout_s = float(timeout_s)
        self.heartbeat_s = heartbeat_s if heartbeat_s is not None else max(1.0, min(60.0, self.timeout_s / 10))
        self.token = uuid.uuid4().hex
        self.host = socket.gethostname()
        self.pid = os.getpid()
        self.slurm_job = slurm_job_id()
        self.started = time.time()
        self.lost: str | None = None  # why the lease was lost, set by the heartbeat thread
        self.completing_wait_s = 120.0  # how long to wait for a holder's SLURM job in COMPLETING
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    # ----------------------------------------------------------------- records
    def record(self) -> dict[str, Any]:
        return {
            "token": self.token, "host": self.host, "pid": self.pid,
            "pid_start": process_start_time(self.pid), "slurm_job": self.slurm_job,
            "started": self.started, "started_at": time.strftime("%Y-%m-%dT%H:%M:%S%z", time.localtime(self.started)),
            "heartbeat": time.time(), "timeout_s": self.timeout_s,
        }

    def _write_tmp(self) -> Path:
        tmp = self.path.with_name(f"{self.path.name}.{self.token}.tmp")
        try:
            with open(tmp, "w") as fh:
                fh.write(json.dumps(self.record()) + "\n")
                fh.flush()
                os.fsync(fh.fileno())
        except OSError:
            tmp.unlink(missing_ok=True)  # disk full: leave no debris
            raise
        return tmp

    def _read(self) -> tuple[str, dict[str, Any]] | None:
        """(raw text, parsed holder) of the current lease, None when there is none."""
        try:
            text = _lock_text(self.path)
        except (FileNotFoundError, NotADirectoryError):
            return None
        try:
            holder = json.loads(text)
            if not isinstance(holder, dict):
                raise ValueError
        except ValueError:
            holder = {}
        try:
            holder["_mtime"] = self.path.stat().st_mtime
        except (FileNotFoundError, NotADirectoryError):
            return None
        return text, holder

    # ----------------------------------------------------------------- acquire
    def acquire(self) -> None:
        """Create the lease, or take over one whose holder is provably gone; SatfuseError
        naming the holder otherwise."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        for _ in range(20):
            tmp = self._write_tmp()
            try:
                os.link(tmp, self.path)
                return
            except FileExistsError:
                pass
            finally:
                tmp.unlink(missing_ok=True)
            current = self._read()
            if current is None:
                continue  # released meanwhile: try again
            text, holder = current
            why = self.gone(holder)
            if why is None:
                raise SatfuseError(
                    f"{self.run_dir}: another run is writing this {self.what} ({describe(holder)}); wait for "
                    f"it to end, stop it, or {self.fix} (its lease {self.path} is taken "
                    f"over automatically once that process is gone or silent for {self.timeout_s:.0f}s)"
                )
            if self._take_over(text):
                log.warning("%s: taking over the lease of %s: %s", self.run_dir, describe(holder), why)
        raise SatfuseError(f"{self.path}: could not acquire the run_dir lease (contended); retry")

    def gone(self, holder: dict[str, Any]) -> str | None:
        """Why the holder is provably gone (or ours to take over), or None if it may be alive."""
        now = time.time()
        beat = max(float(holder.get("heartbeat", 0) or 0), float(holder.get("_mtime", 0) or 0))
        if not holder.get("token"):
            if now - float(holder.get("_mtime", now)) > 60:
                return "the lease file is unreadable and over a minute old"
            return None
        same_host = holder.get("host") == self.host
        pid = int(holder.get("pid", 0) or 0)
        alive_here = same_host and pid > 0 and pid_alive(pid) and (
            not holder.get("pid_start") or process_start_time(pid) in ("", holder["pid_start"]))
        if self.slurm_job and holder.get("slurm_job") == self.slurm_job and not alive_here:
            return f"SLURM job {self.slurm_job} was requeued and takes over its own lease"
        if same_host and not alive_here:
            return f"pid {pid} is no longer running on {self.host}"
        if not same_host and holder.get("slurm_job") and holder.get("slurm_job") != self.slurm_job:
            state = slurm_job_state(str(holder["slurm_job"]))
            deadline = time.time() + self.completing_wait_s
            while state and state.startswith("COMPLETING") and time.time() < deadline:
                time.sleep(2)  # its processes are being killed: wait for that, not for the timeout
                state = slurm_job_state(str(holder["slurm_job"]))
            if state is not None and (state.split() or [""])[0] not in LIVE_SLURM_STATES:
                return f"SLURM job {holder['slurm_job']} is no longer running ({state or 'not in squeue'})"
        if now - beat > self.timeout_s:
            return f"its heartbeat is {now - beat:.0f}s old (train.lease_timeout_s={self.timeout_s:.0f})"
        return None

    def live_holder(self) -> dict[str, Any] | None:
        """The current holder of this lease file when it may be alive (None: free or provably
        gone); for directories whose writers exclude each other through several lease files."""
        current = self._read()
        if current is None or self.gone(current[1]) is not None:
            return None
        return current[1]

    def _take_over(self, seen: str) -> bool:
        """Remove the stale lease we judged (text `seen`), never a fresh one of another run."""
        grave = self.path.with_name(f"{self.path.name}.stale-{self.token}")
        try:
            os.rename(self.path, grave)
        except FileNotFoundError:
            return False
        try:
            if _lock_text(grave) != seen:  # someone renewed or re-took it meanwhile: give it back
                with contextlib.suppress(FileExistsError):
                    os.link(grave, self.path)
                return False
            return True
        finally:
            grave.unlink(missing_ok=True)

    # ----------------------------------------------------------------- heartbeat
    def start_heartbeat(self) -> None:
        self._thread = threading.Thread(target=self._beat, name="satfuse-lease", daemon=True)
        self._thread.start()

    def _beat(self) -> None:
        while not self._stop.wait(self.heartbeat_s):
            try:
                self.refresh()
            except OSError as exc:  # a filesystem hiccup: try again next beat
                log.warning("%s: could not refresh the lease: %s", self.path, exc)
            if self.lost:
                return

    def refresh(self) -> None:
        current = self._read()
        if current is None or current[1].get("token") != self.token:
            holder = describe(current[1]) if current else "nobody (the file is gone)"
            self.lost = (f"{self.run_dir}: this run lost its lease {self.path} (now held by {holder}); "
                         "it was silent longer than train.lease_timeout_s (stopped?): stopping so that "
                         "one run writes this run_dir")
            log.error("%s", self.lost)
            return
        # The heartbeat is the file's mtime: touching it never replaces the file, so a run that
        # took the lease over meanwhile cannot be overwritten by this one (a content rewrite
        # would race between the token check and the rename).
        os.utime(self.path)

    def check(self) -> None:
        """Raise if the lease was lost (called by the training loop every step)."""
        if self.lost:
            raise SatfuseError(self.lost)

    def release(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)
        current = self._read()
        if current is not None and current[1].get("token") == self.token:
            self.path.unlink(missing_ok=True)


def claim_run_dir(run_dir: Path, rank0: bool, timeout_s: float, fresh_start: bool, force_new_run: bool,
                  share: Callable[[str | None], str | None]) -> RunLease | None:
    """What every rank of `satfuse pretrain` does before it trains: rank 0 checks the directory
    holds no other kind of run, takes its lease (`timeout_s`: train.lease_timeout_s) and, for a
    fresh start (`fresh_start`: checkpoint.resume=none), makes sure no earlier run is
    overwritten (`force_new_run` moves it aside). `share` is the broadcast from rank 0 (torch's,
    passed in so this module stays torch-free): every rank gets the outcome, one error raised
    everywhere. Returns rank 0's lease with its heartbeat started; None on the other ranks."""
    lease, error = None, None
    if rank0:
        try:
            check_run_dir_kind(run_dir, PRETRAIN_RUN, "use another train.run_dir (a new or empty directory)")
            lease = RunLease(run_dir, timeout_s=timeout_s)
            lease.acquire()
            if fresh_start:
                prepare_fresh_start(run_dir, force_new_run)
        except (SatfuseError, OSError) as exc:
            error = str(exc) if isinstance(exc, SatfuseError) else str(
                write_error(exc, run_dir, 4096, "claiming the run_dir (its lease file)"))
            if lease is not None:
                lease.release()  # deletes the lease only if it is ours
            lease = None
    error = share(error)
    if error:
        raise SatfuseError(error)
    if lease is not None:
        lease.start_heartbeat()
    return lease

"""Units of the reliability guarantees: the run_dir lease, the loader's shard sha256 check,
and what a failed checkpoint save is blamed on."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from satfuse.checkpoint.manager import CheckpointManager
from satfuse.data.reading.stream_io import ShardCache, read_shard
from satfuse.engines.rundir import RunLease, prepare_fresh_start
from satfuse.utils import SatfuseError


def _holder(run: Path, **fields) -> dict:
    lease = RunLease(run)
    rec = {**lease.record(), **fields}
    run.mkdir(parents=True, exist_ok=True)
    (run / ".lock").write_text(json.dumps(rec) + "\n")
    return rec


def test_lease_refuses_a_live_holder_naming_it(tmp_path: Path) -> None:
    sleeper = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        _holder(tmp_path, pid=sleeper.pid, pid_start="", slurm_job="")
        with pytest.raises(SatfuseError, match=f"another run is writing.*pid {sleeper.pid} on"):
            RunLease(tmp_path).acquire()
    finally:
        sleeper.kill()
        sleeper.wait()
    lease = RunLease(tmp_path)
    lease.acquire()  # now the holder is a dead pid on this host: taken over
    assert json.loads((tmp_path / ".lock").read_text())["token"] == lease.token
    lease.release()
    assert not (tmp_path / ".lock").exists()


def test_lease_of_another_host_goes_stale_only_after_the_timeout(tmp_path: Path) -> None:
    _holder(tmp_path, host="elsewhere", pid=1, slurm_job="")
    with pytest.raises(SatfuseError, match="another run is writing"):
        RunLease(tmp_path, timeout_s=600).acquire()
    old = time.time() - 700
    _holder(tmp_path, host="elsewhere", pid=1, slurm_job="", heartbeat=old)
    os.utime(tmp_path / ".lock", (old, old))
    RunLease(tmp_path, timeout_s=600).acquire()


def test_requeued_slurm_job_takes_over_its_own_lease(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SLURM_JOB_ID", "4242")
    _holder(tmp_path, host="node7", pid=12345, slurm_job="4242")  # the job's previous run, another node
    lease = RunLease(tmp_path)
    assert lease.gone(json.loads((tmp_path / ".lock").read_text())) is not None
    lease.acquire()
    monkeypatch.setenv("SLURM_JOB_ID", "9999")
    with pytest.raises(SatfuseError, match="SLURM job 4242"):  # our own lease, alive: another job refused
        RunLease(tmp_path).acquire()


@pytest.mark.parametrize("squeue_says, taken", [("", True), ("RUNNING", False)])
def test_lease_of_a_slurm_job_that_ended_is_taken_over(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                      squeue_says: str, taken: bool) -> None:
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "squeue").write_text(f"#!/bin/sh\necho '{squeue_says}'\n")
    (bin_dir / "squeue").chmod(0o755)
    monkeypatch.setenv("PATH", f"{bin_dir}:{os.environ['PATH']}")
    monkeypatch.delenv("SLURM_JOB_ID", raising=False)
    run = tmp_path / "run"
    _holder(run, host="node7", pid=12345, slurm_job="777")
    if taken:
        RunLease(run).acquire()
    else:
        with pytest.raises(SatfuseError, match="SLURM job 777"):
            RunLease(run).acquire()


def wait_until(condition: Callable[[], bool], timeout: float = 30.0) -> bool:
    """Poll `condition` every 10 ms until it holds (True) or `timeout` seconds pass (False)."""
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.01)
    return True


def test_heartbeat_keeps_the_lease_and_notices_losing_it(tmp_path: Path) -> None:
    lease = RunLease(tmp_path, timeout_s=600, heartbeat_s=0.05)
    lease.acquire()
    lease.start_heartbeat()
    old = time.time() - 100
    os.utime(tmp_path / ".lock", (old, old))
    # polled, not slept: on a loaded machine a beat (every 0.05 s) can be seconds late
    assert wait_until(lambda: (tmp_path / ".lock").stat().st_mtime > old + 50), "the heartbeat never touched it"
    _holder(tmp_path, host="elsewhere", pid=1)  # another run took it over
    assert wait_until(lambda: lease.lost is not None), "the heartbeat never noticed the takeover"
    with pytest.raises(SatfuseError, match="lost its lease"):
        lease.check()
    lease.release()
    assert json.loads((tmp_path / ".lock").read_text())["host"] == "elsewhere"  # not ours to delete


def test_fresh_start_names_what_it_would_overwrite(tmp_path: Path) -> None:
    (tmp_path / "checkpoints").mkdir()
    assert prepare_fresh_start(tmp_path, force=False) is None  # an empty checkpoints/ is no run
    (tmp_path / "metrics.jsonl").write_text("{}\n")
    with pytest.raises(SatfuseError, match="metrics.jsonl"):
        prepare_fresh_start(tmp_path, force=False)
    moved = prepare_fresh_start(tmp_path, force=True)
    assert moved is not None and (moved / "metrics.jsonl").exists() and not (tmp_path / "metrics.jsonl").exists()


def test_loader_catches_altered_shard_bytes_of_the_same_size(sen12ms_shards: Path, tmp_path: Path) -> None:
    for p in sen12ms_shards.iterdir():
        if p.is_file():
            (tmp_path / p.name).write_bytes(p.read_bytes())
    tar = sorted(tmp_path.glob("*.tar"))[0]
    data = bytearray(tar.read_bytes())
    data[len(data) // 2] ^= 0x01  # one pixel bit, inside a member's data
    tar.write_bytes(bytes(data))
    samples = list(read_shard(str(tar), 0, set(range(6)), 5, ShardCache()))
    assert len(samples) == 6 and all("sha256 differs from manifest.json" in s.error for s in samples)
    good = sorted(tmp_path.glob("*.tar"))[1]
    assert not any(s.error for s in read_shard(str(good), 1, set(range(6)), 5, ShardCache()))


@pytest.mark.parametrize("why, blamed", [
    ("RuntimeError: [gloo] Timed out waiting 30000ms for recv operation", "a rank did not answer"),
    ("OSError: [Errno 28] No space left on device", "no space left on device (ENOSPC)"),
])
def test_failed_save_is_blamed_on_what_happened(tmp_path: Path, why: str, blamed: str) -> None:
    err = CheckpointManager(tmp_path, timeout_s=30).save_error(7, why)
    assert blamed in str(err)
    # DCP's wrapper: the first line says nothing, the cause is in the per-rank traceback
    wrapped = RuntimeError(f"CheckpointException ranks:dict_keys([0])\nTraceback ...\n{why}")
    err = CheckpointManager(tmp_path, timeout_s=30).save_error(7, "CheckpointException ranks:dict_keys([0])", wrapped)
    assert blamed in str(err)
    if "answer" in blamed:
        assert "disk space" not in str(err) and "train.comm_timeout_s=30" in str(err)


def test_a_lease_file_that_is_not_utf8_is_an_unreadable_lease_not_a_traceback(tmp_path: Path) -> None:
    (tmp_path / ".lock").write_bytes(b"\xff\xfe\x00 not a satfuse lease \x80")
    with pytest.raises(SatfuseError, match="another run is writing") as raised:
        RunLease(tmp_path).acquire()  # young: it may belong to a live writer
    assert "\n" not in str(raised.value)
    old = time.time() - 120
    os.utime(tmp_path / ".lock", (old, old))
    lease = RunLease(tmp_path)
    lease.acquire()  # over a minute old: taken over
    assert json.loads((tmp_path / ".lock").read_text())["token"] == lease.token
    lease.release()

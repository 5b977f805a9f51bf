"""The workers' copy-free hand-off (data/reading/batch_ring.py): buffers reused, never overwritten
while the consumer holds a view, pinned in place on CUDA (a no-op without it), and no shared
memory or worker process left behind after a normal end, a worker error or Ctrl-C."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from satfuse.data.reading import pretrain_loader
from satfuse.data.reading.batch_ring import RingConsumer, storage_users
from satfuse.data.reading.pretrain_loader import PretrainLoader
from satfuse.data.reading.shard_sets import resolve_shards
from tests.data.loader_shards import data_cfg, make_shards, sample_ids

REPO = Path(__file__).resolve().parents[2]


def shm_inode(t: torch.Tensor) -> int:
    """The inode of the shared-memory file mapped at the tensor's data (from /proc/self/maps):
    one inode per shared-memory segment the main process has received."""
    ptr = t.data_ptr()
    for line in Path("/proc/self/maps").read_text().splitlines():
        parts = line.split()
        lo, hi = (int(x, 16) for x in parts[0].split("-"))
        if lo <= ptr < hi:
            assert len(parts) > 5 and "/dev/shm" in parts[5] or "torch_" in line, line
            return int(parts[4])
    raise AssertionError(f"no mapping holds {ptr:#x}")


def test_buffers_are_reused_not_allocated_per_batch(shard_dir: Path) -> None:
    """24 batches from 2 workers arrive in at most 2 x RING_DEPTH shared-memory segments (the
    previous hand-off made a new segment per batch and per tensor)."""
    ld = PretrainLoader(resolve_shards(str(shard_dir)), data_cfg(num_workers=2), rank=0, world_size=1, seed=0)
    it = iter(ld)
    segments, batches = set(), 0
    for _ in range(24):
        b = next(it)
        segments |= {shm_inode(b["s1"]), shm_inode(b["s2"])}
        batches += 1
        del b
    del it
    assert batches == 24 and len(segments) <= 2 * pretrain_loader.RING_DEPTH


@pytest.mark.parametrize("method", ["dual_simclr", "simclr"])
def test_ring_matches_the_fresh_handoff(shard_dir: Path, monkeypatch: pytest.MonkeyPatch, method: str) -> None:
    """Same batches, bit for bit, through the ring and through a fresh tensor per batch (SimCLR:
    normalised arrays and view tensors are written into the slot too)."""
    ss = resolve_shards(str(shard_dir))

    def take(n: int) -> list[dict]:
        it = iter(PretrainLoader(ss, data_cfg(num_workers=2), rank=0, world_size=1, seed=5, method=method))
        return [{k: (v.clone() if torch.is_tensor(v) else v) for k, v in next(it).items()} for _ in range(n)]

    ring = take(12)
    monkeypatch.setattr(pretrain_loader, "BATCH_RING", False)
    fresh = take(12)
    names = {"s1", "s2", "view1", "view2"} if method == "simclr" else {"s1", "s2"}
    for a, b in zip(ring, fresh, strict=True):
        assert a["key"] == b["key"] and names <= set(a) and set(a) == set(b)
        assert all(torch.equal(a[n], b[n]) and a[n].dtype == b[n].dtype for n in names)


def test_held_batches_are_never_overwritten(shard_dir: Path) -> None:
    """The consumer keeps batches (and a bare view of one) for as long as it likes: the ring
    grows instead of overwriting them, and a slot comes back once its last view is gone."""
    ld = PretrainLoader(resolve_shards(str(shard_dir)), data_cfg(num_workers=2), rank=0, world_size=1, seed=1)
    it = iter(ld)
    held = [next(it) for _ in range(10)]  # more than the 2 x RING_DEPTH slots the ring starts with
    copies = [(b["key"], b["s2"].clone()) for b in held]
    view = held[0]["s2"][:, :3]  # only a derived view of batch 0 survives
    expected_view = view.clone()
    del held[0]
    for _ in range(30):  # freed slots are refilled meanwhile
        next(it)
    assert torch.equal(view, expected_view)
    for b, (key, s2) in zip(held, copies[1:], strict=True):
        assert b["key"] == key and torch.equal(b["s2"], s2)
    # ids still those of the keys (rows were not shuffled between slots)
    assert all(b["s2"].shape[0] == len(sample_ids(b)) for b in held)
    del it


def test_storage_users_counts_every_view() -> None:
    """The release check relies on torch's storage use count (a private API): a view, a view
    of a view and a numpy array each hold the storage until they are gone."""
    storage = torch.empty(64, dtype=torch.uint8).share_memory_().untyped_storage()
    base = storage_users(storage)
    t = torch.empty(0, dtype=torch.float32).set_(storage, 0, (4, 4))
    v = t[1:]
    arr = v.numpy()
    del t, v
    assert storage_users(storage) > base
    del arr
    assert storage_users(storage) == base


def test_pin_is_a_no_op_without_cuda(shard_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Runs everywhere: on a CUDA machine CUDA is hidden from the loader (the pinned path is
    tests/gpu/test_batch_ring_cuda.py), and CUDA's state is what it was before."""
    cuda_was_initialized = torch.cuda.is_initialized()
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    ss = resolve_shards(str(shard_dir))
    pinned = iter(PretrainLoader(ss, data_cfg(num_workers=2), rank=0, world_size=1, seed=2, pin_memory=True))
    plain = iter(PretrainLoader(ss, data_cfg(num_workers=2), rank=0, world_size=1, seed=2))
    for _ in range(4):
        a, b = next(pinned), next(plain)
        assert a["key"] == b["key"] and torch.equal(a["s2"], b["s2"]) and not a["s2"].is_pinned()
    assert torch.cuda.is_initialized() == cuda_was_initialized
    with pytest.raises(ValueError, match="need CUDA"):
        RingConsumer([], 1, pin=True)


SCRIPT = """
import faulthandler, logging, multiprocessing, os, signal, sys
faulthandler.register(signal.SIGQUIT, all_threads=True)  # the test asks for stacks if we hang
# a terminal's foreground process: Ctrl-C raises KeyboardInterrupt. A shell that starts a job in
# the background (a CI runner, `cmd &`) ignores SIGINT for it, which Python then keeps ignoring
signal.signal(signal.SIGINT, signal.default_int_handler)
from satfuse.config import DataConfig
from satfuse.data.reading.pretrain_loader import PretrainLoader
from satfuse.data.reading.shard_sets import resolve_shards
mode, shards = sys.argv[1], sys.argv[2]
cfg = DataConfig(batch_size=4, num_workers=2, shuffle_buffer=8, crop=8, on_decode_error="fatal")
it = iter(PretrainLoader(resolve_shards(shards), cfg, rank=0, world_size=1, seed=0))
next(it)
print("PIDS", os.getpid(), *[p.pid for p in multiprocessing.active_children()], flush=True)
if mode == "normal":
    for _ in range(5):
        next(it)
    it.close()
    print("CLOSED", *[p.pid for p in multiprocessing.active_children()], flush=True)
else:
    while True:
        next(it)
"""


def run_script(mode: str, shards: Path) -> tuple[subprocess.Popen, list[int]]:
    env = {**os.environ, "PYTHONPATH": f"{REPO / 'src'}{os.pathsep}{REPO}"}
    proc = subprocess.Popen([sys.executable, "-c", SCRIPT, mode, str(shards)], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=env, start_new_session=True)
    line = proc.stdout.readline()
    assert line.startswith("PIDS"), (line, proc.stderr.read() if proc.poll() is not None else "")
    return proc, [int(p) for p in line.split()[1:]]


def alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"


def shm_used_by(pids: list[int]) -> set[str]:
    """Names of the /dev/shm entries these processes have open or mapped now (an unlinked one
    included: its name may still be left behind by a later fault)."""
    names = set()
    for pid in pids:
        try:
            links = [os.readlink(f) for f in Path(f"/proc/{pid}/fd").iterdir()]
            maps = [line.split(maxsplit=5)[-1] for line in Path(f"/proc/{pid}/maps").read_text().splitlines()]
        except OSError:  # gone already
            continue
        names |= {name.removeprefix("/dev/shm/").removesuffix(" (deleted)") for name in links + maps
                  if name.startswith("/dev/shm/")}
    return names


def ours_in_shm(before: set[str], pids: list[int], used: set[str]) -> list[str]:
    """Entries of /dev/shm that appeared since `before` and belong to these processes: torch
    names its segments torch_<pid>_...; any other name (Python's psm_... has no pid) counts
    only if one of them was seen using it. Other users of the machine create psm_ entries too:
    those are not this loader's leak."""
    new = set(os.listdir("/dev/shm")) - before
    return sorted(n for n in new if n in used or any(f"_{p}_" in f"_{n}_" for p in pids))


@pytest.mark.parametrize("mode", ["normal", "error", "sigint", "sigkill"])
def test_shutdown_leaves_no_shared_memory_or_workers(tmp_path: Path, mode: str) -> None:
    shards = make_shards(tmp_path, [40, 40])
    if mode == "error":  # every sample but the first batch's is undecodable: a worker fails later
        ld = PretrainLoader(resolve_shards(str(shards)), data_cfg(num_workers=2), rank=0, world_size=1, seed=0)
        first = set(sample_ids(next(iter(ld))))
        shards = make_shards(tmp_path / "bad", [40, 40], corrupt=frozenset(range(80)) - first)
    before = set(os.listdir("/dev/shm"))
    proc, pids = run_script(mode, shards)
    used = shm_used_by(pids)
    # another user's shared memory, created while the loader runs: not the loader's leak
    neighbour = Path(f"/dev/shm/psm_{os.getpid():x}{mode}")
    neighbour.write_bytes(b"")
    try:
        # the main process and its 2 workers (with an error, the DataLoader may already have stopped
        # the failing worker, whose stream ended after its error message)
        assert len(pids) == 3 or mode == "error" and len(pids) == 2, pids
        if mode == "sigint":
            time.sleep(0.5)
            used |= shm_used_by(pids)
            os.killpg(proc.pid, signal.SIGINT)  # what Ctrl-C in a terminal does: the whole group
        elif mode == "sigkill":  # the main process alone dies: its workers notice and exit
            time.sleep(0.5)
            used |= shm_used_by(pids)
            os.kill(proc.pid, signal.SIGKILL)
        check_exit(proc, mode, pids, before, used)
    finally:
        neighbour.unlink()


def check_exit(proc: subprocess.Popen, mode: str, pids: list[int], before: set[str], used: set[str]) -> None:
    """The script's exit as `mode` expects; no worker and no shared memory of it left."""
    try:
        out, err = proc.communicate(timeout=120)
    except subprocess.TimeoutExpired:
        proc.send_signal(signal.SIGQUIT)  # every thread's stack to stderr, then give up
        time.sleep(2)
        proc.kill()
        out, err = proc.communicate()
        raise AssertionError(f"{mode}: the loader's process did not exit within 120 s\n{err[-6000:]}") from None
    if mode == "normal":
        assert proc.returncode == 0, err
        assert out.split() == ["CLOSED"], out  # no worker left once the iterator is closed
    elif mode == "error":
        assert proc.returncode == 1
        last = err.strip().splitlines()[-1]
        assert last.startswith("satfuse.utils.SatfuseError: ") and "failed to decode" in last, err
    elif mode == "sigint":
        assert proc.returncode != 0 and "KeyboardInterrupt" in err
    else:
        assert proc.returncode == -signal.SIGKILL
    deadline = time.monotonic() + 30
    while any(alive(p) for p in pids[1:]) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not [p for p in pids[1:] if alive(p)]
    assert ours_in_shm(before, pids, used) == []


def test_torch_without_use_count_falls_back_with_a_warning(
    shard_dir: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture,
) -> None:
    monkeypatch.setattr(pretrain_loader, "supported", lambda: False)
    it = iter(PretrainLoader(resolve_shards(str(shard_dir)), data_cfg(num_workers=1), rank=0, world_size=1, seed=0))
    with caplog.at_level("WARNING", logger="satfuse.data.reading.pretrain_loader"):
        b = next(it)
    assert b["s2"].shape[0] == 4 and "fresh shared-memory tensor" in caplog.text
    del it

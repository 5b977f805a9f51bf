"""RNG capture/restore, StopFlag with real signals, pruning, async single-process save."""

from __future__ import annotations

import io
import os
import random
import signal
from pathlib import Path

import numpy as np
import pytest
import torch

from satfuse.checkpoint.layout import list_checkpoints, read_latest, read_meta
from satfuse.checkpoint.manager import CheckpointManager
from satfuse.checkpoint.state import ModelOptimState
from satfuse.engines.rng import capture_rng, restore_rng
from satfuse.engines.signals import REQUEUE_EXIT_CODE, StopFlag


def draws() -> tuple[float, float, list[float]]:
    return random.random(), float(np.random.standard_normal()), torch.rand(3).tolist()


def test_rng_round_trips_through_weights_only_torch_load() -> None:
    random.seed(1)
    np.random.seed(2)
    torch.manual_seed(3)
    np.random.standard_normal()  # leaves a cached gauss in the legacy state
    buf = io.BytesIO()
    torch.save(capture_rng(), buf)
    expected = draws()
    draws()
    buf.seek(0)
    restore_rng(torch.load(buf, weights_only=True))
    assert draws() == expected


def test_stop_flag_real_signal_and_restore() -> None:
    previous = signal.getsignal(signal.SIGUSR2)
    with StopFlag(["USR2", "SIGHUP"]) as flag:
        assert not flag.should_stop()
        os.kill(os.getpid(), signal.SIGUSR2)
        assert flag.should_stop() and flag.received == signal.SIGUSR2
    assert signal.getsignal(signal.SIGUSR2) == previous
    assert REQUEUE_EXIT_CODE == 75
    with pytest.raises(ValueError, match="unknown signal"):
        StopFlag(["SIGNOPE"])


def save_steps(mgr: CheckpointManager, steps: list[int]) -> None:
    model = torch.nn.Linear(3, 3)
    for s in steps:
        mgr.save(s, {"model_optim": ModelOptimState(model)}, {"s": s}, {"epoch": 0})


def test_keep_last_and_keep_every(tmp_path: Path) -> None:
    mgr = CheckpointManager(tmp_path, keep_last=2, keep_every=4)
    save_steps(mgr, list(range(1, 11)))
    assert [p.name for p in list_checkpoints(tmp_path)] == [
        "step_00000004", "step_00000008", "step_00000009", "step_00000010"]
    assert read_latest(tmp_path).name == "step_00000010"


def test_resaving_the_same_step_replaces_it_atomically(tmp_path: Path) -> None:
    mgr = CheckpointManager(tmp_path, keep_last=0)
    save_steps(mgr, [5, 5])
    assert [p.name for p in list_checkpoints(tmp_path)] == ["step_00000005"]
    assert mgr.find_resume("auto").name == "step_00000005"


@pytest.mark.filterwarnings("ignore:torch.distributed is disabled")
def test_async_save_in_one_process_copies_state_at_call_time(tmp_path: Path) -> None:
    model = torch.nn.Linear(64, 64)
    opt = torch.optim.AdamW(model.parameters())
    model(torch.randn(2, 64)).sum().backward()
    opt.step()
    saved = model.weight.detach().clone()
    mgr = CheckpointManager(tmp_path, async_save=True)
    mgr.save(1, {"model_optim": ModelOptimState(model, opt)}, {}, {})
    with torch.no_grad():
        model.weight.add_(1.0)  # the next step changes the live tensors
    path = mgr.wait()
    assert read_meta(path)["async"] is True
    fresh = torch.nn.Linear(64, 64)
    CheckpointManager(tmp_path).load(path, {"model_optim": ModelOptimState(fresh)})
    assert torch.equal(fresh.weight, saved)


def test_mmap_reader_loads_the_same_as_dcps_stock_reader(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The fast reader (one mmap per file, zero-copy tensor views) must produce exactly
    what DCP's own reader does, tensors and pickled (BYTE_IO) entries alike."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint import FileSystemReader

    from satfuse.checkpoint.dcp_storage import MmapReader

    torch.manual_seed(1)
    src = {"w": torch.randn(37, 5), "i": torch.arange(11, dtype=torch.int64), "extra": {"epoch": 3, "s": "x"}}
    dcp.save(src, checkpoint_id=tmp_path / "c", no_dist=True)

    def fresh() -> dict:
        return {"w": torch.zeros(37, 5), "i": torch.zeros(11, dtype=torch.int64), "extra": {"epoch": 0, "s": ""}}

    fast, stock = fresh(), fresh()
    with monkeypatch.context() as mp:  # the fast path must not fall back to the stock one
        mp.setattr(FileSystemReader, "read_data", lambda *a: pytest.fail("fell back to DCP's reader"))
        dcp.load(fast, storage_reader=MmapReader(tmp_path / "c"), no_dist=True)
    dcp.load(stock, storage_reader=FileSystemReader(tmp_path / "c"), no_dist=True)
    assert torch.equal(fast["w"], src["w"]) and torch.equal(fast["i"], src["i"])
    assert torch.equal(fast["w"], stock["w"]) and fast["extra"] == stock["extra"] == src["extra"]


def test_writer_output_is_stock_dcp_and_its_records_match_the_disk(tmp_path: Path) -> None:
    """The one-pass writer (no zip crc, crc32 taken while writing) must leave files that
    DCP's stock reader loads, and meta.json records that match a re-hash of the disk."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint import FileSystemReader

    from satfuse.checkpoint.layout import checkpoint_problems, file_record

    torch.manual_seed(2)
    model = torch.nn.Sequential(torch.nn.Linear(16, 8), torch.nn.Linear(8, 4))
    opt = torch.optim.AdamW(model.parameters())
    model(torch.randn(3, 16)).sum().backward()
    opt.step()
    base = torch.randn(1000, 6)
    extra = {"view": base[10:12], "t": base.t().contiguous(), "obj": {"epoch": 7}}  # a view, BYTE_IO
    path = CheckpointManager(tmp_path).save(
        3, {"model_optim": ModelOptimState(model, opt), "extra": extra}, {"r": 1}, {})
    assert checkpoint_problems(path) == []
    meta = read_meta(path)
    assert all(meta["files"][n] == file_record(path / n) for n in meta["files"])
    stored = FileSystemReader(path).read_metadata().storage_data
    view_len = next(info.length for idx, info in stored.items() if idx.fqn == "extra.view")
    assert view_len < base.nbytes // 4  # the view's 48 bytes (+ zip headers), not base's storage

    fresh = torch.nn.Sequential(torch.nn.Linear(16, 8), torch.nn.Linear(8, 4))
    fopt = torch.optim.AdamW(fresh.parameters())
    fresh(torch.randn(3, 16)).sum().backward()
    fopt.step()
    got = {"model_optim": ModelOptimState(fresh, fopt),
           "extra": {"view": torch.zeros(2, 6), "t": torch.zeros(6, 1000), "obj": {"epoch": 0}}}
    dcp.load(got, storage_reader=FileSystemReader(path), no_dist=True)
    assert all(torch.equal(a, b) for a, b in zip(model.parameters(), fresh.parameters(), strict=True))
    assert torch.equal(fopt.state_dict()["state"][0]["exp_avg"], opt.state_dict()["state"][0]["exp_avg"])
    assert torch.equal(got["extra"]["view"], base[10:12]) and torch.equal(got["extra"]["t"], extra["t"])
    assert got["extra"]["obj"] == {"epoch": 7}


def test_a_shard_cut_short_after_writing_fails_the_save(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Records taken while writing are checked against the disk before the commit."""
    from satfuse.checkpoint import dcp_storage
    from satfuse.utils import SatfuseError

    real_sync = dcp_storage.Crc32File.sync

    def sync_then_truncate(self: dcp_storage.Crc32File) -> dict:
        record = real_sync(self)
        os.truncate(self.path, record["size"] - 1)
        return record

    monkeypatch.setattr(dcp_storage.Crc32File, "sync", sync_then_truncate)
    mgr = CheckpointManager(tmp_path)
    with pytest.raises(SatfuseError, match="saving step 1 failed.*bytes on disk"):
        save_steps(mgr, [1])
    assert list_checkpoints(tmp_path) == [] and read_latest(tmp_path) is None

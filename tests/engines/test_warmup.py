"""A JIT build lock left by a killed DeepSpeed op build: refused with the file and the fix
instead of a `deepspeed.initialize` that waits forever."""

from __future__ import annotations

import fcntl
import os
import time
from pathlib import Path

import pytest
import torch

from satfuse.engines.deepspeed_engine import import_deepspeed
from satfuse.engines.warmup import (
    STALE_LOCK_S,
    check_build_locks,
    extensions_root,
    torch_locks_with_flock,
)
from satfuse.utils import SatfuseError


def make_lock(root: Path, age_s: float) -> Path:
    lock = root / "deepspeed_shm_comm" / "lock"
    lock.parent.mkdir(parents=True)
    lock.touch()
    then = time.time() - age_s
    os.utime(lock, (then, then))
    return lock


def test_stale_lock_stops_deepspeed_before_it_waits(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                   caplog: pytest.LogCaptureFixture) -> None:
    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(tmp_path))
    assert extensions_root() == tmp_path
    monkeypatch.setattr("satfuse.engines.warmup.torch_locks_with_flock", lambda: False)  # FileBaton torch
    check_build_locks()  # no lock: nothing to say
    lock = make_lock(tmp_path, STALE_LOCK_S + 60)
    with pytest.raises(SatfuseError) as err:
        import_deepspeed(torch.device("cpu"))  # the engine's first step, before deepspeed loads ops
    msg = str(err.value)
    assert str(lock) in msg and f"rm {lock}" in msg and "\n" not in msg
    lock.unlink()
    young = make_lock(tmp_path / "other", 5)
    with caplog.at_level("WARNING", logger="satfuse.engines.warmup"):
        check_build_locks(root=tmp_path / "other")  # a build in progress: say so, then wait as usual
    assert str(young) in caplog.text and "in progress" in caplog.text


def test_flock_locks_count_only_while_held(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """torch 2.14's FileLock leaves `lock` behind after every build or load: an old file nobody
    holds is no leftover (a SIGKILLed holder's lock is dropped by the kernel); one held now is a
    build in progress."""
    lock = make_lock(tmp_path, STALE_LOCK_S + 60)
    check_build_locks(root=tmp_path, flock=True)  # not refused, not reported
    assert "in progress" not in caplog.text
    fd = os.open(lock, os.O_RDONLY)
    fcntl.flock(fd, fcntl.LOCK_EX)
    try:
        with caplog.at_level("WARNING", logger="satfuse.engines.warmup"):
            check_build_locks(root=tmp_path, flock=True)
    finally:
        os.close(fd)
    assert str(lock) in caplog.text and "in progress" in caplog.text
    assert torch_locks_with_flock() == hasattr(__import__("torch.utils.cpp_extension").utils.cpp_extension, "FileLock")


def test_default_root_is_torchs(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("TORCH_EXTENSIONS_DIR", raising=False)
    root = extensions_root()
    assert root.parent.name == "torch_extensions" or root.parent == Path(
        os.environ.get("XDG_CACHE_HOME", "~/.cache")).expanduser() / "torch_extensions"
    assert root.name.startswith("py3") and root.name.endswith(("_cpu",)) == (torch.version.cuda is None
                                                                           and torch.version.hip is None)

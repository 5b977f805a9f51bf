"""Broken checkpoints and failing saves: never trusted, never destroying the good ones.

Damage is applied to a private copy of the 2-rank reference run (steps 16, 20, 24).
"""

from __future__ import annotations

import logging
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from torch import nn

from satfuse.checkpoint.layout import checkpoint_problems, list_partial, read_latest
from satfuse.checkpoint.manager import CheckpointManager
from satfuse.checkpoint.state import ModelOptimState
from satfuse.utils import SatfuseError
from tests.checkpoint import launch
from tests.checkpoint.toy_train import ToyModel

STEP24 = "checkpoints/step_00000024"


def flip_bytes(path: Path, offset: int = 100) -> None:
    data = bytearray(path.read_bytes())
    offset = min(offset, len(data) - 1)
    data[offset] ^= 0xFF
    path.write_bytes(bytes(data))


def shard(run: Path) -> Path:
    """A DCP data file of step 24 (the one holding tensors: the largest)."""
    return max((run / STEP24).glob("__*_*.distcp"), key=lambda p: p.stat().st_size)


@pytest.mark.parametrize("damage", ["flip", "truncate", "missing_rank_file", "meta_not_json"])
def test_damaged_newest_checkpoint(damage: str, ref_copy: Path, caplog: pytest.LogCaptureFixture) -> None:
    if damage == "flip":
        flip_bytes(shard(ref_copy))
        expect = "corrupted"
    elif damage == "truncate":
        f = shard(ref_copy)
        f.write_bytes(f.read_bytes()[:-7])
        expect = "truncated"
    elif damage == "missing_rank_file":
        (ref_copy / STEP24 / "rank_00001.pt").unlink()
        expect = "rank_00001.pt is missing"
    else:
        (ref_copy / STEP24 / "meta.json").write_text('{"format": "satfuse-ckpt/1", "st')
        expect = "not valid JSON"
    mgr = CheckpointManager(ref_copy)
    with caplog.at_level(logging.WARNING):
        found = mgr.find_resume("auto")
    assert found is not None and found.name == "step_00000020"  # falls back ...
    assert "step_00000024" in caplog.text and expect in caplog.text  # ... and says why
    with pytest.raises(SatfuseError, match=expect) as err:
        mgr.find_resume(str(ref_copy / STEP24))
    assert "step_00000024" in str(err.value) and "\n" not in str(err.value)


def test_load_refuses_a_corrupted_checkpoint_it_was_handed(ref_copy: Path) -> None:
    flip_bytes(shard(ref_copy))
    model = ToyModel()
    with pytest.raises(SatfuseError, match="corrupted"):
        CheckpointManager(ref_copy).load(ref_copy / STEP24, {"model_optim": ModelOptimState(model)})


def test_no_complete_checkpoint_at_all_is_an_error_not_a_fresh_start(ref_copy: Path) -> None:
    for step in (16, 20, 24):
        (ref_copy / f"checkpoints/step_{step:08d}/rank_00000.pt").unlink()
    with pytest.raises(SatfuseError, match="no complete checkpoint.*resume=none"):
        CheckpointManager(ref_copy).find_resume("auto")
    assert CheckpointManager(ref_copy).find_resume("none") is None


class WiderToy(ToyModel):
    def __init__(self) -> None:
        super().__init__(width=8)
        self.extra = nn.Linear(3, 3)


def test_model_mismatch_lists_the_differing_keys(ref_copy: Path) -> None:
    model = WiderToy()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    opt = torch.optim.AdamW(model.parameters())
    with pytest.raises(SatfuseError) as err:
        CheckpointManager(ref_copy).load(ref_copy / STEP24, {"model_optim": ModelOptimState(model, opt)})
    msg = str(err.value)
    assert "unexpected (not in the checkpoint): extra.bias, extra.weight" in msg
    assert "s1.0.weight [16, 2] -> [8, 2]" in msg and "head.weight [4, 32] -> [4, 16]" in msg
    assert "different model config" in msg and "checkpoint.resume=none" in msg
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())  # untouched


def test_unreadable_or_wrong_paths(ref_copy: Path, tmp_path: Path) -> None:
    # Tests run as root, so chmod 000 would not stop reads: use paths of the wrong type.
    a_file = tmp_path / "file"
    a_file.write_text("x")
    with pytest.raises(SatfuseError, match="is a file, not a checkpoint directory"):
        CheckpointManager(ref_copy).find_resume(str(a_file))
    with pytest.raises(SatfuseError, match="not found"):
        CheckpointManager(ref_copy).find_resume(str(tmp_path / "nope"))
    blocked = tmp_path / "blocked_run"
    blocked.mkdir()
    (blocked / "checkpoints").write_text("not a directory")
    model = ToyModel()
    with pytest.raises(SatfuseError, match="cannot create a checkpoint directory.*writable"):
        CheckpointManager(blocked).save(1, {"model_optim": ModelOptimState(model)}, {}, {})


def test_file_size_limit_during_save_keeps_previous_checkpoint(tmp_path: Path) -> None:
    """A write that the OS refuses (RLIMIT_FSIZE -> EFBIG, like a full disk) in the middle of
    a save: the save fails with a one-line error, the previous checkpoint and `latest` stay."""
    script = textwrap.dedent(f"""
        import resource, signal, torch
        from pathlib import Path
        from satfuse.checkpoint.manager import CheckpointManager
        from satfuse.checkpoint.state import ModelOptimState
        from satfuse.utils import SatfuseError
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        m = torch.nn.Linear(4, 4)
        mgr = CheckpointManager(Path({str(tmp_path / 'run')!r}))
        mgr.save(1, {{"model_optim": ModelOptimState(m)}}, {{"small": 1}}, {{}})
        resource.setrlimit(resource.RLIMIT_FSIZE, (1 << 20, 1 << 20))
        try:
            mgr.save(2, {{"model_optim": ModelOptimState(m)}}, {{"big": torch.ones(1 << 19)}}, {{}})
        except SatfuseError as exc:
            print("ERROR:", exc)
    """)
    res = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert "ERROR:" in res.stdout, res.stderr
    assert "saving step 2 failed" in res.stdout and "File too large" in res.stdout
    assert "step_00000001 is intact" in res.stdout
    run = tmp_path / "run"
    assert read_latest(run).name == "step_00000001"
    assert checkpoint_problems(run / "checkpoints/step_00000001") == []
    assert not (run / "checkpoints/step_00000002").exists() and not list_partial(run)


@pytest.fixture()
def small_disk(tmp_path: Path):
    mnt = tmp_path / "small_disk"
    mnt.mkdir()
    res = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=3m", "tmpfs", str(mnt)],
                         capture_output=True, text=True)
    if res.returncode != 0:
        pytest.fail(f"cannot mount a tmpfs here ({res.stderr.strip()}): this test needs root and "
                    "`mount -t tmpfs` (CI has both); never skipped quietly")
    yield mnt
    subprocess.run(["umount", "-l", str(mnt)], check=False)


def test_disk_full_on_one_rank_fails_cleanly_on_all(small_disk: Path, tmp_path: Path) -> None:
    run = small_disk / "run"
    logs = tmp_path / "logs"
    codes = launch.run(2, ["--run-dir", run, "--steps", 4, "--every", 2, "--ballast-at", 4,
                           "--ballast-mib", 8], logs, timeout=90)
    text = launch.logs(logs)
    assert all(c != 0 for c in codes), text  # no hang, no success
    assert text.count("saving step 4 failed") >= 2, text  # every rank knows
    assert "No space left on device" in text and "step_00000002 is intact" in text
    assert read_latest(run).name == "step_00000002"
    assert checkpoint_problems(run / "checkpoints/step_00000002") == []
    assert not (run / "checkpoints/step_00000004").exists() and not list_partial(run)

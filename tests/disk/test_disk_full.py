"""Full disks on a small real tmpfs: sharding, the run dir's config.yaml and metrics.jsonl,
and checkpoint saves each end in one line naming ENOSPC, the path, the free and the needed
bytes; nothing is left looking complete, metrics lines stay whole, and space is made before a
checkpoint save by pruning down to keep_last - 1 (never the last complete checkpoint)."""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import torch

from satfuse.checkpoint.layout import (
    checkpoint_problems,
    list_checkpoints,
    list_partial,
    read_latest,
)
from satfuse.checkpoint.manager import CheckpointManager
from satfuse.checkpoint.state import ModelOptimState
from satfuse.cli import main
from satfuse.utils import SatfuseError

ROOT = Path(__file__).resolve().parents[2]
PAGE = 4096


@pytest.fixture
def tmpfs(tmp_path: Path) -> Iterator[Callable[[str], Path]]:
    """A factory of small tmpfs mounts (root only; the CI containers run as root)."""
    mounts: list[Path] = []

    def make(size: str) -> Path:
        mnt = tmp_path / f"fs{len(mounts)}"
        mnt.mkdir()
        res = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(mnt)],
                             capture_output=True, text=True, check=False)
        if res.returncode != 0:
            pytest.fail(f"cannot mount a tmpfs here ({res.stderr.strip()}): the full-disk tests need root "
                        "and `mount -t tmpfs` (CI has both); never skipped quietly")
        mounts.append(mnt)
        return mnt

    yield make
    for mnt in mounts:
        subprocess.run(["umount", "-l", str(mnt)], check=False)


def fill(fs: Path, leave: int) -> Path:
    """A ballast file that leaves about `leave` bytes (whole pages) free."""
    st = os.statvfs(fs)
    ballast = fs / "ballast"
    ballast.write_bytes(b"\0" * max(0, st.f_bavail * st.f_frsize - leave))
    return ballast


def one_line(err: str) -> str:
    lines = [ln for ln in err.strip().splitlines() if ln.strip()]
    assert "Traceback" not in err, err
    return lines[-1]


def test_sharding_into_a_full_fs_is_one_line_and_leaves_nothing_complete(
        capsys: pytest.CaptureFixture[str], tmpfs: Callable[[str], Path], tmp_path: Path) -> None:
    from satfuse.data.sources.synth import write_sen12ms

    raw = tmp_path / "raw"
    write_sen12ms(raw, scenes=1, patches_per_scene=12, seed=0, size=32)
    out = tmpfs("192k") / "shards"
    capsys.readouterr()
    rc = main(["shard", "--src", str(raw), "--dataset", "sen12ms", "--out", str(out), "--maxcount", "4"])
    err = capsys.readouterr().err
    assert rc != 0
    line = one_line(err)
    assert f"{out}: no space left on device (ENOSPC) writing shards:" in line
    assert " free, about " in line and " bytes (" in line and " needed; " in line
    assert not (out / "manifest.json").exists() and not list(out.glob("*.tmp"))
    from satfuse.data.format.manifest import sidecar_path

    for tar in out.glob("*.tar"):  # a finished shard has its record (it is reused on rerun)
        assert sidecar_path(out, tar.name).is_file()


def test_metrics_lines_stay_whole_on_a_full_disk_and_a_torn_line_is_repaired(
        tmpfs: Callable[[str], Path], caplog: pytest.LogCaptureFixture) -> None:
    from satfuse.engines.run_records import MetricsLog

    fs = tmpfs("64k")
    path = fs / "run" / "metrics.jsonl"
    ballast = fill(fs, leave=PAGE)
    mlog = MetricsLog(path, True)
    with pytest.raises(SatfuseError) as info:
        for step in range(1000):  # ~330-byte lines: the one crossing the page is cut short
            mlog.write({"step": step, "pad": "x" * 300})
    mlog.close()
    msg = str(info.value)
    assert msg.startswith(f"{path}: no space left on device (ENOSPC) appending a metrics line:")
    assert " free, about " in msg and "needed" in msg and "\n" not in msg
    text = path.read_text()
    assert text.endswith("\n") and [json.loads(ln)["step"] for ln in text.splitlines()] == list(range(step))
    # a torn last line (from a kill, or an older version) is cut off when the log is opened again
    ballast.unlink()
    with open(path, "a") as fh:
        fh.write('{"step": 999, "lo')
    with caplog.at_level(logging.WARNING):
        MetricsLog(path, True).close()
    assert path.read_text() == text and "removed a torn last line (17 bytes" in caplog.text


def test_pretraining_with_a_full_run_dir_is_one_line(tmpfs: Callable[[str], Path], sen12ms_shards: Path) -> None:
    fs = tmpfs("64k")
    (fs / "run").mkdir()
    fill(fs, leave=0)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT / "src"), os.environ.get("PYTHONPATH", "")]),
           "OMP_NUM_THREADS": "1"}
    res = subprocess.run([sys.executable, "-m", "satfuse.cli", "pretrain", "--config", "hpc/pretrain/tiny.yaml",
                          f"data.shards={sen12ms_shards}", f"train.run_dir={fs / 'run'}", "train.steps=2"],
                         capture_output=True, text=True, timeout=300, cwd=ROOT, env=env)
    assert res.returncode != 0
    line = one_line(res.stderr)
    # the run_dir lease is the first file a run writes (before config.yaml)
    assert f"{fs / 'run'}: no space left on device (ENOSPC) claiming the run_dir (its lease file):" in line
    assert " free, about " in line and "needed" in line


def save(mgr: CheckpointManager, model: torch.nn.Module, opt: torch.optim.Optimizer, step: int) -> None:
    mgr.save(step, {"model_optim": ModelOptimState(model, opt)}, {"step": step}, {"epoch": 0})


@pytest.mark.filterwarnings("ignore:torch.distributed is disabled")
def test_checkpoint_saves_make_room_first_and_say_enospc_truly(tmpfs: Callable[[str], Path]) -> None:
    torch.manual_seed(0)
    model = torch.nn.Linear(256, 256)  # ~0.8 MB per checkpoint with AdamW's moments
    opt = torch.optim.AdamW(model.parameters())
    model(torch.randn(2, 256)).sum().backward()
    opt.step()
    # room for two checkpoints, not three: keep_last=2 must prune the oldest BEFORE saving
    run = tmpfs("2m") / "run"
    mgr = CheckpointManager(run, keep_last=2)
    for step in (1, 2, 3):
        save(mgr, model, opt, step)
    assert [p.name for p in list_checkpoints(run)] == ["step_00000002", "step_00000003"]
    # room for one: keep_last=1 never prunes the last complete checkpoint; the save fails truly
    run = tmpfs("1200k") / "run"
    mgr = CheckpointManager(run, keep_last=1)
    save(mgr, model, opt, 1)
    with pytest.raises(SatfuseError) as info:
        save(mgr, model, opt, 2)
    msg = str(info.value)
    assert "saving step 2 failed: no space left on device (ENOSPC): " in msg
    assert " free, about " in msg and " needed (" in msg and "step_00000001 is intact" in msg
    assert "checkpoint.keep_last=1 already keeps only the last complete checkpoint" in msg and "\n" not in msg
    assert read_latest(run).name == "step_00000001" and checkpoint_problems(run / "checkpoints/step_00000001") == []
    assert not list_partial(run)
    # keep_last=3 on the same room: lowering keep_last is the true advice there
    run = tmpfs("1200k") / "run"
    mgr = CheckpointManager(run, keep_last=3)
    save(mgr, model, opt, 1)
    with pytest.raises(SatfuseError, match=r"ENOSPC.*or lower checkpoint.keep_last \(now 3; when space is short"):
        save(mgr, model, opt, 2)


@pytest.mark.deepspeed
def test_deepspeed_save_on_a_full_disk_says_enospc(tmpfs: Callable[[str], Path], sen12ms_shards: Path,
                                                   tmp_path: Path) -> None:
    """torch.save inside DeepSpeed says only "unexpected pos 128 vs 0": the message must still
    name the full disk, free and needed bytes. The tiny ZeRO-1 checkpoint is ~10 MB: 16 MB hold
    one, and keep_last=1 never prunes the last complete checkpoint."""
    from tests.engines.ranks import logs, run_ranks

    run = tmpfs("16m") / "run"
    (tmp_path / "logs").mkdir()
    codes = run_ranks(1, [f"data.shards={sen12ms_shards}", f"train.run_dir={run}", "train.steps=2",
                          "checkpoint.every_steps=1", "checkpoint.keep_last=1"], tmp_path / "logs",
                      config="hpc/pretrain/tiny_deepspeed.yaml")
    text = logs(tmp_path / "logs")
    assert codes != [0]
    line = next(ln for ln in text.splitlines() if "saving step 2 failed" in ln)
    assert "saving step 2 failed: no space left on device (ENOSPC): " in line and " free, about " in line
    assert "step_00000001 is intact" in line and "checkpoint.keep_last=1 already keeps only the last complete checkpoint" in line
    assert read_latest(run).name == "step_00000001" and checkpoint_problems(run / "checkpoints/step_00000001") == []
    assert not list_partial(run)

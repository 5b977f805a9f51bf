"""Resume on the DDP engine verifies the checkpoint's crc32s while loading it: a damaged newest
checkpoint is found during the load, every rank continues from the previous one together, and
the run says which one it resumed from."""

from __future__ import annotations

from pathlib import Path

from tests.engines.ranks import logs, metrics, run_ranks
from tests.engines.test_pretrain import common


def test_damaged_newest_checkpoint_resumes_all_ranks_from_the_previous(sen12ms_shards, tmp_path: Path) -> None:
    run = tmp_path / "run"
    args = common(sen12ms_shards, run, 6, **{"checkpoint.every_steps": "3"})
    (tmp_path / "l1").mkdir()
    assert run_ranks(2, args, tmp_path / "l1") == [0, 0], logs(tmp_path / "l1")
    step6 = run / "checkpoints" / "step_00000006"
    data = max(step6.glob("__*_*.distcp"), key=lambda p: p.stat().st_size)
    raw = bytearray(data.read_bytes())
    raw[len(raw) // 2] ^= 0xFF  # tensor bytes: the structure (sizes, meta.json) stays complete
    data.write_bytes(bytes(raw))
    (tmp_path / "l2").mkdir()
    args = common(sen12ms_shards, run, 8, **{"checkpoint.every_steps": "3"})
    assert run_ranks(2, args, tmp_path / "l2") == [0, 0], logs(tmp_path / "l2")
    out = logs(tmp_path / "l2")
    assert "step_00000006 is damaged" in out and "found while loading it" in out
    assert f"resumed from {run / 'checkpoints' / 'step_00000003'} at step 3" in out
    steps = [r["step"] for r in metrics(run) if "loss" in r]
    assert steps[-5:] == [4, 5, 6, 7, 8], steps  # steps 4-6 redone from step 3's state

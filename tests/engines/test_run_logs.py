"""Run logs that the ecosystem's tools open: TensorBoard events of a pretraining run (read back
with tensorboard's own EventAccumulator), the W&B fallback message, and `satfuse report`'s
pretraining curves from metrics.jsonl."""

from __future__ import annotations

import json
import logging
import sys
from pathlib import Path

import pytest

from satfuse.cli import main

ROOT = Path(__file__).resolve().parents[2]
STEP_TAGS = ("train/loss", "train/lr", "train/pairs_per_s", "train/retrieval_top1",
             "train/grad_norm", "train/data_wait_s")


def _scalars(tb_dir: Path) -> dict[str, list[tuple[int, float]]]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(tb_dir))
    acc.Reload()
    return {tag: [(e.step, e.value) for e in acc.Scalars(tag)] for tag in acc.Tags()["scalars"]}


def _pretrain(shards: Path, heldout: Path, run: Path, *extra: str) -> None:
    from satfuse.engines.pretrain import run_pretrain

    code = run_pretrain(str(ROOT / "hpc" / "pretrain" / "tiny.yaml"), [
        f"data.shards={shards}", f"data.val_shards={heldout}", "data.batch_size=4", "data.crop=32",
        "train.steps=3", "train.log_every=1", "train.device=cpu", f"train.run_dir={run}",
        "checkpoint.every_steps=0", *extra])
    assert code == 0


def test_tensorboard_events_and_pretrain_curves(sen12ms_shards: Path, sen12ms_heldout: Path,
                                                tmp_path: Path) -> None:
    run = tmp_path / "run_a"
    _pretrain(sen12ms_shards, sen12ms_heldout, run, "log.tensorboard=true")
    got = _scalars(run / "tensorboard")
    for tag in STEP_TAGS:
        assert [s for s, _ in got[tag]] == [1, 2, 3], tag
    assert got["train/lr"][0][1] == pytest.approx(1e-3)
    assert all(v > 0 for _, v in got["train/pairs_per_s"])
    assert [s for s, _ in got["heldout/retrieval_top1"]] == [3]
    records = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    assert got["train/loss"][-1][1] == pytest.approx(records[2]["loss"])

    # a second run (log.tensorboard off: the default) overlaid in the report's curves
    run_b = tmp_path / "run_b"
    _pretrain(sen12ms_shards, sen12ms_heldout, run_b, "optim.lr=1e-4")
    assert not (run_b / "tensorboard").exists()
    assert main(["report", str(run), str(run_b), "--out", str(tmp_path / "rep")]) == 0
    png = (tmp_path / "rep" / "pretrain_curves.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 10_000


def test_curves_keep_the_resumed_record_of_a_repeated_step(tmp_path: Path) -> None:
    from satfuse.evaluation.curves import read_curves

    run = tmp_path / "run"
    run.mkdir()
    lines = [{"step": 1, "loss": 5.0, "retrieval_top1": 0.1}, {"step": 2, "loss": 4.0},
             {"step": 2, "loss": 3.5, "retrieval_top1": 0.3},  # re-run after a requeue
             {"step": 2, "heldout_retrieval_top1": 0.25, "heldout_retrieval_chance": 0.1}]
    (run / "metrics.jsonl").write_text("\n".join(json.dumps(x) for x in lines) + '\n{"step": 3, "lo')
    c = read_curves(run)
    assert c["steps"] == [1, 2] and c["loss"] == [5.0, 3.5] and c["heldout"] == (2, 0.25)


def test_wandb_missing_is_one_clear_warning(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                            caplog: pytest.LogCaptureFixture) -> None:
    from satfuse.config import LogConfig
    from satfuse.engines.metrics_sinks import WANDB_MISSING, MetricSinks

    monkeypatch.setitem(sys.modules, "wandb", None)  # import wandb -> ImportError
    with caplog.at_level(logging.WARNING):
        sinks = MetricSinks(LogConfig(wandb=True), tmp_path)
    assert sinks.wandb is None and not sinks.active
    assert [r.getMessage() for r in caplog.records] == [WANDB_MISSING]
    assert "pip install wandb" in WANDB_MISSING
    sinks.scalars(1, {"train/loss": 1.0})  # a no-op, not an error
    sinks.close()


def test_tensorboard_keeps_the_checkpoint_step_after_a_resume(tmp_path: Path) -> None:
    """A run saved at step 5 and killed at 10 resumes with steps 6..: TensorBoard purges what
    the killed attempt logged after the checkpoint (6..10), never the checkpoint's step 5."""
    from satfuse.config import LogConfig
    from satfuse.engines.metrics_sinks import MetricSinks

    first = MetricSinks(LogConfig(tensorboard=True), tmp_path)
    for step in range(1, 11):
        first.scalars(step, {"train/loss": float(step)})
    first.close()
    resumed = MetricSinks(LogConfig(tensorboard=True), tmp_path, start_step=5)
    for step in range(6, 9):
        resumed.scalars(step, {"train/loss": 100.0 + step})
    resumed.close()
    assert _scalars(tmp_path / "tensorboard")["train/loss"] == [
        (1, 1.0), (2, 2.0), (3, 3.0), (4, 4.0), (5, 5.0), (6, 106.0), (7, 107.0), (8, 108.0)]

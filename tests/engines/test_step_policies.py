"""train.nan_policy=skip, train.eval_every and metrics on log steps only, through the real trainer
(one process, tiny model)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from satfuse.config import ConfigError, PretrainConfig, load_config, validate_pretrain
from satfuse.distributed.env import DistEnv
from satfuse.engines import trainer as tr
from satfuse.utils import SatfuseError

TINY = Path(__file__).resolve().parents[2] / "hpc" / "pretrain" / "tiny.yaml"


def tiny(shards: Path, run_dir: Path, *extra: str) -> PretrainConfig:
    return load_config(PretrainConfig, TINY, [
        f"data.shards={shards}", f"train.run_dir={run_dir}", "train.steps=4", "train.log_every=1",
        "checkpoint.every_steps=4", *extra])


def nan_at(trainer: tr.Trainer, steps: set[int], monkeypatch: pytest.MonkeyPatch) -> list[dict]:
    """Make the loss non-finite at `steps`; returns the weights seen at the start of each step's loss."""
    real = trainer.module.loss
    seen: list[dict] = []

    def loss(outputs, loss_cfg, metrics=True):
        value, values = real(outputs, loss_cfg, metrics)
        seen.append({n: p.detach().clone() for n, p in trainer.module.named_parameters()})
        return (value * float("nan") if trainer.step + 1 in steps else value), values

    monkeypatch.setattr(trainer.module, "loss", loss)
    return seen


def same(a: dict, b: dict) -> bool:
    return all(torch.equal(a[k], b[k]) for k in a)


def test_nan_policy_skip_drops_the_update_counts_and_logs(sen12ms_shards: Path, tmp_path: Path,
                                                          monkeypatch: pytest.MonkeyPatch,
                                                          caplog: pytest.LogCaptureFixture) -> None:
    run = tmp_path / "run"
    trainer = tr.Trainer(tiny(sen12ms_shards, run, "train.nan_policy=skip"), DistEnv())
    weights = nan_at(trainer, {2, 3}, monkeypatch)
    with caplog.at_level("WARNING"):
        result = trainer.fit()
    assert result.status == "completed" and result.step == 4 and result.skipped_steps == 2
    assert not same(weights[0], weights[1])  # step 1 updated
    assert same(weights[1], weights[2]) and same(weights[2], weights[3])  # steps 2, 3 dropped
    assert "nan_policy=skip: non-finite loss or gradients at step 2" in caplog.text
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["skipped_steps"] for r in rows if "loss" in r] == [0, 1, 2, 2]
    assert (run / "checkpoints" / "latest").exists()


def test_nan_policy_skip_stops_after_the_limit_in_a_row(sen12ms_shards: Path, tmp_path: Path,
                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    cfg = tiny(sen12ms_shards, tmp_path / "run", "train.nan_policy=skip", "train.nan_skip_limit=2")
    trainer = tr.Trainer(cfg, DistEnv())
    nan_at(trainer, {2, 3}, monkeypatch)
    with pytest.raises(SatfuseError, match=r"2 steps in a row \(last: step 3.*train.nan_skip_limit=2"):
        trainer.fit()


def test_eval_every_logs_heldout_retrieval(sen12ms_shards: Path, tmp_path: Path) -> None:
    run = tmp_path / "run"
    cfg = tiny(sen12ms_shards, run, f"data.val_shards={sen12ms_shards}", "train.eval_every=2",
               "train.steps=5")
    tr.Trainer(cfg, DistEnv()).fit()
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows if "heldout_retrieval_top1" in r] == [2, 4, 5]


def test_metrics_on_log_steps_only(sen12ms_shards: Path, tmp_path: Path) -> None:
    """The retrieval metric (three collectives) is computed on log steps only."""
    trainer = tr.Trainer(tiny(sen12ms_shards, tmp_path / "run", "train.log_every=2"), DistEnv())
    asked: list[bool] = []
    real = trainer.module.loss
    trainer.module.loss = lambda o, c, metrics=True: asked.append(metrics) or real(o, c, metrics)
    trainer.fit()
    assert asked == [False, True, False, True]


@pytest.mark.parametrize(("overrides", "needle"), [
    (["train.eval_every=5"], "train.eval_every=5 needs data.val_shards"),
    (["train.nan_policy=skip", "train.engine=deepspeed"], "train.nan_policy=skip works with train.engine=ddp"),
    (["train.nan_skip_limit=0"], "train.nan_skip_limit=0 is out of range"),
])
def test_step_policy_keys_that_cannot_work_are_refused(overrides: list[str], needle: str) -> None:
    with pytest.raises(ConfigError, match=needle):
        validate_pretrain(load_config(PretrainConfig, None, overrides))


def test_term_during_the_requeue_save_stops_for_good(sen12ms_shards: Path, tmp_path: Path,
                                                     monkeypatch: pytest.MonkeyPatch,
                                                     caplog: pytest.LogCaptureFixture) -> None:
    """USR2 (a preemption notice) at step 2, then `scancel` while that checkpoint is written:
    the run ends "stopped" (143, not requeued), not "preempted", with the checkpoint kept."""
    import os
    import signal

    from satfuse.engines.signals import StopFlag

    monkeypatch.setattr(StopFlag, "term_seen", False)
    run = tmp_path / "run"
    trainer = tr.Trainer(tiny(sen12ms_shards, run, "train.steps=50", "checkpoint.every_steps=100"), DistEnv())
    real_loss, real_save = trainer.module.loss, trainer.save

    def loss(outputs, loss_cfg, metrics=True):
        if trainer.step + 1 == 2:
            os.kill(os.getpid(), signal.SIGUSR2)
        return real_loss(outputs, loss_cfg, metrics)

    def save(*args, **kwargs):
        if kwargs.get("last_step"):
            os.kill(os.getpid(), signal.SIGTERM)
        return real_save(*args, **kwargs)

    monkeypatch.setattr(trainer.module, "loss", loss)
    monkeypatch.setattr(trainer, "save", save)
    try:
        with caplog.at_level("WARNING"):
            result = trainer.fit()
    finally:
        trainer.stop.uninstall()
    assert result.status == "stopped" and result.step == 2
    assert (run / "checkpoints" / "latest").read_text().strip().endswith("step_00000002")
    assert "SIGTERM arrived while saving for the requeue signal" in caplog.text

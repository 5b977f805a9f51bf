"""Run-directory guarantees end to end: a fresh start never destroys an old run, resume
records (and applies) what changed, one writer per run_dir, ranks die with their launcher,
skipped samples are counted and bounded."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import yaml

from tests.engines.ranks import ROOT, logs, metrics, run_ranks, start_ranks, wait_for_step


def common(shards: Path, run_dir: Path, steps: int, **extra: str) -> list[str]:
    items = {"data.shards": str(shards), "train.run_dir": str(run_dir), "train.steps": str(steps),
             "train.log_every": "1", "checkpoint.every_steps": "3", **extra}
    return [f"{k}={v}" for k, v in items.items()]


def steps_of(run: Path) -> list[int]:
    return sorted(int(p.name.split("_")[1]) for p in (run / "checkpoints").glob("step_*"))


def test_resume_none_on_a_used_run_dir_refuses_then_force_moves_it_aside(sen12ms_shards, tmp_path):
    run = tmp_path / "run"
    (tmp_path / "a").mkdir()
    assert run_ranks(1, common(sen12ms_shards, run, 3), tmp_path / "a") == [0], logs(tmp_path / "a")
    before = steps_of(run)
    (tmp_path / "b").mkdir()
    codes = run_ranks(1, common(sen12ms_shards, run, 2) + ["checkpoint.resume=none"], tmp_path / "b")
    assert codes == [2], logs(tmp_path / "b")
    text = logs(tmp_path / "b")
    assert str(run) in text and "--force-new-run" in text and "new train.run_dir" in text
    assert steps_of(run) == before and len(metrics(run)) == 3  # nothing touched
    (tmp_path / "c").mkdir()
    codes = run_ranks(1, ["--force-new-run", *common(sen12ms_shards, run, 2)], tmp_path / "c")
    assert codes == [0], logs(tmp_path / "c")
    (prev,) = run.glob("previous-*")
    assert steps_of(prev) == before and len(metrics(prev)) == 3
    assert steps_of(run) == [2] and [m["step"] for m in metrics(run) if "loss" in m] == [1, 2]


def test_changed_lr_and_batch_size_on_resume_are_applied_and_recorded(sen12ms_shards, tmp_path):
    run = tmp_path / "run"
    assert run_ranks(1, common(sen12ms_shards, run, 3), tmp_path) == [0], logs(tmp_path)
    args = common(sen12ms_shards, run, 5, **{"optim.lr": "2e-4", "data.batch_size": "4", "optim.weight_decay": "0.0"})
    assert run_ranks(1, args, tmp_path) == [0], logs(tmp_path)
    lrs = {m["step"]: m["lr"] for m in metrics(run) if "lr" in m}  # the lr each step's update used
    assert lrs[3] == 1e-3 and lrs[4] == lrs[5] == 2e-4  # tiny.yaml: 1e-3, constant; 4 = first resumed step
    (rec,) = [json.loads(ln) for ln in (run / "overrides.jsonl").read_text().splitlines()]
    assert rec["step"] == 3
    assert rec["changed"]["optim.lr"] == {"was": 1e-3, "now": 2e-4}
    assert rec["changed"]["data.batch_size"] == {"was": 8, "now": 4}
    cfg = yaml.safe_load((run / "config.yaml").read_text())
    assert cfg["optim"]["lr"] == 2e-4 and cfg["data"]["batch_size"] == 4
    meta = json.loads((run / "checkpoints" / "step_00000005" / "meta.json").read_text())
    assert meta["config"]["optim"]["lr"] == 2e-4


def test_changed_optimizer_type_on_resume_is_refused_and_not_recorded(sen12ms_shards, tmp_path):
    run = tmp_path / "run"
    assert run_ranks(1, common(sen12ms_shards, run, 3), tmp_path) == [0], logs(tmp_path)
    assert run_ranks(1, common(sen12ms_shards, run, 5, **{"optim.name": "adamw"}), tmp_path) == [2]
    assert "optim.name was 'adam'" in logs(tmp_path)
    assert yaml.safe_load((run / "config.yaml").read_text())["optim"]["name"] == "adam"


def test_second_run_on_a_live_run_dir_refuses_then_takes_over_a_dead_one(sen12ms_shards, tmp_path):
    run = tmp_path / "run"
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    first = start_ranks(1, common(sen12ms_shards, run, 400), log_dir=tmp_path / "a")
    try:
        wait_for_step(run, 2, first)
        assert run_ranks(1, common(sen12ms_shards, run, 400), tmp_path / "b") == [2]
        err = [ln for ln in logs(tmp_path / "b").splitlines() if "ERROR" in ln]
        assert len(err) == 1 and "another run is writing" in err[0] and f"pid {first[0].pid}" in err[0]
        assert first[0].poll() is None  # the holder runs on, untouched
    finally:
        first[0].kill()
        first[0].wait()
    assert (run / ".lock").exists()  # SIGKILL left the lease behind...
    (tmp_path / "c").mkdir()
    assert run_ranks(1, common(sen12ms_shards, run, 4), tmp_path / "c") == [0], logs(tmp_path / "c")
    assert "taking over the lease" in logs(tmp_path / "c") and f"pid {first[0].pid} is no longer running" in logs(tmp_path / "c")
    assert not (run / ".lock").exists()  # ... and a finished run releases it


def _processes_mentioning(text: str) -> list[int]:
    pids = []
    for p in Path("/proc").iterdir():
        if not p.name.isdigit() or int(p.name) == os.getpid():
            continue
        try:
            cmd = (p / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
            state = (p / "stat").read_text().rsplit(")", 1)[-1].split()[0]
        except OSError:
            continue
        if text in cmd and state != "Z":
            pids.append(int(p.name))
    return pids


def test_sigkill_of_the_launcher_kills_every_rank(sen12ms_shards, tmp_path):
    run = tmp_path / "run"
    env = dict(os.environ, PYTHONUNBUFFERED="1", OMP_NUM_THREADS="1")
    log = open(tmp_path / "launcher.log", "wb")  # noqa: SIM115
    launcher = subprocess.Popen(
        [sys.executable, "-m", "satfuse.cli", "pretrain", "--nproc-per-node", "2", "--config",
         str(ROOT / "hpc/pretrain/tiny.yaml"), *common(sen12ms_shards, run, 2000)],
        cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT)
    try:
        wait_for_step(run, 2, [launcher], timeout=240)
        ranks = [p for p in _processes_mentioning(f"train.run_dir={run}") if p != launcher.pid]
        assert len(ranks) >= 3, ranks  # torchrun's agent and two ranks
        launcher.kill()
        launcher.wait()
        deadline = time.time() + 10
        while time.time() < deadline and _processes_mentioning(f"train.run_dir={run}"):
            time.sleep(0.2)
        left = _processes_mentioning(f"train.run_dir={run}")
        assert not left, f"still running after the launcher's SIGKILL: {left}"
    finally:
        for pid in _processes_mentioning(f"train.run_dir={run}"):
            os.kill(pid, signal.SIGKILL)


def test_skipped_samples_are_counted_and_bounded(sen12ms_shards, tmp_path):
    shards = tmp_path / "shards"
    shards.mkdir()
    for p in sen12ms_shards.iterdir():
        if p.is_file():
            (shards / p.name).write_bytes(p.read_bytes())
    tar = sorted(shards.glob("*.tar"))[0]
    tar.write_bytes(tar.read_bytes()[: tar.stat().st_size // 2])  # truncated mid-shard
    run = tmp_path / "ok"
    args = common(shards, run, 8, **{"data.max_skipped_fraction": "0.5"})
    assert run_ranks(1, args, tmp_path) == [0], logs(tmp_path)
    recs = [m for m in metrics(run) if "skipped_samples" in m]
    assert recs and recs[-1]["skipped_samples"] > 0
    assert any("epoch_done" in m for m in recs)  # 48 pairs / batch 8: epochs end within 8 steps
    assert f"{recs[-1]['skipped_samples']} samples skipped" in logs(tmp_path)
    (tmp_path / "f").mkdir()
    codes = run_ranks(1, common(shards, tmp_path / "strict", 8, **{"data.max_skipped_fraction": "0.0"}), tmp_path / "f")
    assert codes == [2]
    assert "data.max_skipped_fraction=0.0" in logs(tmp_path / "f")


def test_auto_start_without_checkpoint_keeps_the_dead_runs_metrics_apart(sen12ms_shards, tmp_path):
    run = tmp_path / "run"
    args = common(sen12ms_shards, run, 3, **{"checkpoint.every_steps": "100"})
    procs = start_ranks(1, args, log_dir=tmp_path)
    wait_for_step(run, 1, procs)
    procs[0].kill()  # before its first checkpoint
    procs[0].wait()
    assert run_ranks(1, args, tmp_path) == [0], logs(tmp_path)
    assert [m["step"] for m in metrics(run) if "loss" in m] == [1, 2, 3]  # no step logged twice
    (prev,) = run.glob("previous-*")
    assert (prev / "metrics.jsonl").exists()


def test_changed_lr_on_resume_is_applied_under_deepspeed(sen12ms_shards, tmp_path):
    run = tmp_path / "run"
    cfg = "hpc/pretrain/tiny_deepspeed.yaml"
    assert run_ranks(1, common(sen12ms_shards, run, 3), tmp_path, config=cfg) == [0], logs(tmp_path)
    assert run_ranks(1, common(sen12ms_shards, run, 5, **{"optim.lr": "2e-4"}), tmp_path, config=cfg) == [0], logs(tmp_path)
    lrs = {m["step"]: m["lr"] for m in metrics(run) if "lr" in m}  # the lr each step's update used
    assert lrs[3] == 1e-3 and lrs[4] == lrs[5] == 2e-4  # 4 = the first resumed step
    (rec,) = [json.loads(ln) for ln in (run / "overrides.jsonl").read_text().splitlines()]
    assert rec["changed"] == {"optim.lr": {"was": 1e-3, "now": 2e-4}, "train.steps": {"was": 3, "now": 5}}


def test_pretraining_refuses_a_finetune_run_dir_shards_and_a_source_tree(sen12ms_shards, tmp_path):
    """train.run_dir into another kind's directory is refused before the lease: nothing is
    written there (no lease, no config.yaml, no checkpoints)."""
    import pytest

    from satfuse.engines.pretrain import run_pretrain
    from satfuse.utils import SatfuseError

    ft = tmp_path / "ft"
    ft.mkdir()
    (ft / "config.yaml").write_text(yaml.safe_dump({"data": {}, "model": {}, "train": {}, "run_dir": str(ft), "label": ""}))
    shards = tmp_path / "shards"
    (shards / ".satfuse").mkdir(parents=True)
    (shards / "shards-000000.tar").write_bytes(b"")
    tree = tmp_path / "tree"
    (tree / "ROIs1158_spring" / "s2_1").mkdir(parents=True)
    (tree / "ROIs1158_spring" / "s2_1" / "p1.tif").write_bytes(b"")
    for where, what in ((ft, "fine-tuning run (config.yaml)"), (shards, "shard set (.satfuse, shards-000000.tar)"),
                        (tree, "source tree (GeoTIFFs such as ROIs1158_spring/s2_1/p1.tif)")):
        before = sorted(p.name for p in where.iterdir())
        with pytest.raises(SatfuseError, match="use another train.run_dir") as exc:
            run_pretrain(str(ROOT / "hpc" / "pretrain" / "tiny.yaml"), common(sen12ms_shards, where, 1) + [
                "data.num_workers=0", "train.device=cpu"])
        assert f"{where}: holds a {what}, not a pretraining run" in str(exc.value)
        assert sorted(p.name for p in where.iterdir()) == before

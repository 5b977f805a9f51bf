"""Exact resume, resharding, stop signals and async save, with real gloo ranks.

Each test runs the toy loop (tests/checkpoint/toy_train.py) as separate processes and
compares against the uninterrupted 2-rank reference run (conftest.py).
"""

from __future__ import annotations

import json
import logging
import os
import random
import signal
from pathlib import Path

import pytest
import torch

from satfuse.checkpoint.layout import checkpoint_problems, list_partial, read_latest, read_meta
from satfuse.checkpoint.manager import CheckpointManager
from satfuse.engines.signals import REQUEUE_EXIT_CODE
from tests.checkpoint import launch
from tests.checkpoint.conftest import EVERY, STEPS, Reference

log = logging.getLogger(__name__)


def assert_bitwise_equal(a_path: Path, b_path: Path) -> None:
    a, b = torch.load(a_path, weights_only=True), torch.load(b_path, weights_only=True)
    assert a["model"].keys() == b["model"].keys()
    for k in a["model"]:
        assert torch.equal(a["model"][k], b["model"][k]), f"parameter {k} differs"
    for k in a["optim"]:
        for n in a["optim"][k]:
            assert torch.equal(a["optim"][k][n], b["optim"][k][n]), f"optimizer {k}.{n} differs"


def progress_at_least(path: Path, step: int) -> bool:
    try:
        return int(path.read_text() or 0) >= step
    except (FileNotFoundError, ValueError):
        return False


def resume_to_end(run_dir: Path, tmp: Path, name: str) -> Path:
    out = tmp / f"{name}.pt"
    codes = launch.run(2, ["--run-dir", run_dir, "--steps", STEPS, "--every", EVERY,
                           "--out", out], tmp / f"logs_{name}")
    assert codes == [0, 0], launch.logs(tmp / f"logs_{name}")
    return out


def test_sigkill_at_random_step_then_resume_is_bitwise_exact(reference: Reference, tmp_path: Path) -> None:
    seed = int.from_bytes(os.urandom(2), "little")
    kill_step = random.Random(seed).randint(EVERY + 1, STEPS - 3)
    log.info("kill at step %d (seed %d)", kill_step, seed)
    run_dir, progress = tmp_path / "run", tmp_path / "progress"
    procs = launch.start(2, ["--run-dir", run_dir, "--steps", STEPS, "--every", EVERY,
                             "--progress", progress, "--sleep", 0.03], tmp_path / "logs_killed")
    try:
        launch.wait_for(lambda: progress_at_least(progress, kill_step), 60, f"step {kill_step}")
    finally:
        launch.kill(procs)  # SIGKILL every rank
    assert all(p.returncode == -signal.SIGKILL for p in procs), f"kill seed {seed}"
    found = CheckpointManager(run_dir).find_resume("auto")
    assert found is not None and read_meta(found)["step"] >= (kill_step // EVERY) * EVERY - EVERY
    final = resume_to_end(run_dir, tmp_path, "resumed")
    assert_bitwise_equal(reference.final, final)


def test_kill_during_save_falls_back_to_previous_and_stays_exact(
    reference: Reference, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    run_dir = tmp_path / "run"
    tmp_ckpt = run_dir / "checkpoints" / ".tmp-step_00000012"
    procs = launch.start(2, ["--run-dir", run_dir, "--steps", STEPS, "--every", EVERY,
                             "--slow-save-at", 12], tmp_path / "logs_killed")
    try:
        # rank 0 has written its part of step 12 and waits for rank 1, which is still pickling
        launch.wait_for(lambda: (tmp_ckpt / "rank_00000.pt").exists(), 60, "save of step 12 to start")
    finally:
        launch.kill(procs)
    assert tmp_ckpt.is_dir() and read_latest(run_dir).name == "step_00000008"
    with caplog.at_level(logging.WARNING):
        found = CheckpointManager(run_dir).find_resume("auto")
    assert found is not None and found.name == "step_00000008"
    assert ".tmp-step_00000012" in caplog.text  # says it ignored the half-written one
    final = resume_to_end(run_dir, tmp_path, "resumed")
    assert_bitwise_equal(reference.final, final)
    assert not list_partial(run_dir), "the next save removes debris of the killed one"


def test_sigusr1_to_one_rank_saves_on_all_and_exits_75(reference: Reference, tmp_path: Path) -> None:
    run_dir, progress = tmp_path / "run", tmp_path / "progress"
    procs = launch.start(2, ["--run-dir", run_dir, "--steps", STEPS, "--every", 0,
                             "--progress", progress, "--sleep", 0.05], tmp_path / "logs_sig")
    try:
        launch.wait_for(lambda: progress_at_least(progress, 5), 60, "step 5")
        os.kill(procs[1].pid, signal.SIGUSR1)  # only rank 1 is told, like SLURM/submitit
        codes = launch.wait(procs, 60, tmp_path / "logs_sig")
    finally:
        launch.kill(procs)
    assert codes == [REQUEUE_EXIT_CODE, REQUEUE_EXIT_CODE], launch.logs(tmp_path / "logs_sig")
    latest = read_latest(run_dir)
    meta = read_meta(latest)
    assert 5 <= meta["step"] < STEPS and meta["world_size"] == 2
    assert checkpoint_problems(latest) == []
    # ... and the requeued job continues to exactly the uninterrupted result.
    final = resume_to_end(run_dir, tmp_path, "requeued")
    assert_bitwise_equal(reference.final, final)


def test_async_save_checkpoints_resume_exactly(reference: Reference, tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    codes = launch.run(2, ["--run-dir", run_dir, "--steps", 12, "--every", EVERY, "--async-save"],
                       tmp_path / "logs_async")
    assert codes == [0, 0], launch.logs(tmp_path / "logs_async")
    latest = read_latest(run_dir)
    meta = read_meta(latest)
    assert meta["step"] == 12 and meta["async"] is True and checkpoint_problems(latest) == []
    final = resume_to_end(run_dir, tmp_path, "after_async")
    assert_bitwise_equal(reference.final, final)


def _epoch_ids(prefix: Path, world: int, epoch: int) -> list[int]:
    ids: list[int] = []
    for r in range(world):
        for line in Path(f"{prefix}.rank{r}").read_text().splitlines():
            rec = json.loads(line)
            if rec["epoch"] == epoch:
                ids += rec["ids"]
    return ids


@pytest.mark.parametrize("new_world", [1, 3])
def test_checkpoint_of_2_ranks_resumes_on_other_world_size(new_world: int, tmp_path: Path) -> None:
    save_steps = 6  # 2 ranks x 2 samples x 6 steps = 24 of the 48 samples of epoch 0
    src, ref_state, data = tmp_path / "src", tmp_path / "at6.pt", tmp_path / "data_src"
    codes = launch.run(2, ["--run-dir", src, "--steps", save_steps, "--every", 3, "--out", ref_state,
                           "--data-log", data], tmp_path / "logs_src")
    assert codes == [0, 0], launch.logs(tmp_path / "logs_src")
    ckpt = src / "checkpoints" / "step_00000006"
    rest = 24 // (2 * new_world)  # steps that finish epoch 0 on the new world size
    new_data = tmp_path / "data_new"
    codes = launch.run(new_world, ["--run-dir", tmp_path / "new", "--resume", ckpt,
                                   "--steps", save_steps + rest + 1, "--check-after-load", ref_state,
                                   "--data-log", new_data], tmp_path / "logs_new")
    assert codes == [0] * new_world, launch.logs(tmp_path / "logs_new")
    for r in range(new_world):
        verdict = json.loads(Path(f"{ref_state}.rank{r}.json").read_text())
        assert verdict["bad"] == [], f"rank {r}: loaded state differs from the saved one"
        assert verdict["step"] == save_steps and verdict["saved_world"] == 2
        assert verdict["last_epoch"] == save_steps  # LR schedule position
    # Epoch 0 continues where the 2 ranks stopped: every sample exactly once.
    seen = _epoch_ids(data, 2, 0) + _epoch_ids(new_data, new_world, 0)
    assert sorted(seen) == list(range(48))
    assert _epoch_ids(new_data, new_world, 1), "the extra step starts epoch 1"

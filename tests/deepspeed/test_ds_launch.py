"""DeepSpeed runs under every launcher: DeepSpeed's own `deepspeed` launcher and submitit
(its local executor: the same PretrainTask as on SLURM); torchrun is what the other tests
use. Plus `satfuse bench engines`, end to end with small sizes."""

from __future__ import annotations

import json
import math
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from satfuse.checkpoint.layout import checkpoint_problems, read_meta
from tests.engines.ranks import free_port, metrics

pytestmark = [pytest.mark.deepspeed, pytest.mark.slow]

ROOT = Path(__file__).resolve().parents[2]
CONFIG = str(ROOT / "hpc/pretrain/tiny_deepspeed.yaml")


def env() -> dict[str, str]:
    return dict(os.environ, DS_ACCELERATOR="cpu", OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT))


def check_run(run: Path, steps: int, world: int) -> None:
    rows = [m for m in metrics(run) if "loss" in m]
    assert [m["step"] for m in rows] == list(range(1, steps + 1))
    assert all(math.isfinite(m["loss"]) for m in rows)
    final = run / "checkpoints" / f"step_{steps:08d}"
    meta = read_meta(final)
    assert meta["kind"] == "deepspeed" and meta["world_size"] == world
    assert checkpoint_problems(final) == []


def test_deepspeed_launcher(sen12ms_shards, tmp_path):
    launcher = shutil.which("deepspeed", path=str(Path(sys.executable).parent))
    assert launcher, "the deepspeed launcher is installed with the deepspeed package"
    run = tmp_path / "run"
    cmd = [launcher, "--num_gpus", "2", "--no_local_rank", "--master_port", str(free_port()),
           "--module", "satfuse.cli", "pretrain", "--config", CONFIG, f"data.shards={sen12ms_shards}",
           f"train.run_dir={run}", "train.steps=6", "train.log_every=1"]
    res = subprocess.run(cmd, cwd=ROOT, env=env(), capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    check_run(run, 6, 2)


def test_submitit_local_executor(sen12ms_shards, tmp_path):
    run = tmp_path / "run"
    cmd = [sys.executable, "-m", "satfuse.cli", "submit", "pretrain", "--config", CONFIG, "--cluster",
           "local", "--tasks-per-node", "2", f"data.shards={sen12ms_shards}", f"train.run_dir={run}",
           "train.steps=6", "train.log_every=1", "--wait"]
    res = subprocess.run(cmd, cwd=ROOT, env=env(), capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    check_run(run, 6, 2)


def test_bench_engines(tmp_path):
    out = tmp_path / "bench.json"
    cmd = [sys.executable, "-m", "satfuse.cli", "bench", "engines", "--out", str(out), "--steps", "2",
           "--warmup", "1", "--batch", "4", "--crop", "32", "--engines", "zero2"]
    res = subprocess.run(cmd, cwd=ROOT, env=env(), capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]
    rows = json.loads(out.read_text())["result"]["engines"]
    assert set(rows) == {"ddp", "zero2"}
    assert rows["ddp"]["step_time_vs_ddp"] == 1.0
    for name in ("zero2",):
        assert rows[name]["step_s_median"] > 0 and rows[name]["peak_rss_delta_mib"] > 0
        # Same seed, batch and recipe: the engines train the same thing...
        assert math.isclose(rows[name]["final_loss"], rows["ddp"]["final_loss"], rel_tol=1e-5)
        # ...and ZeRO partitions Adam's moments over the 2 ranks (plus its fp32 partition).
        assert rows[name]["optim_state_vs_ddp"] < 0.8


def test_bench_memory(tmp_path):
    """`satfuse bench memory` at the smallest size (tiny, crop 32: at 16 its last map is 1x1 and
    BatchNorm refuses batch 1; 2 ranks, batches 1 and 2):
    DDP and ZeRO-3, with and without activation checkpointing, each row one launch whose peaks
    are measured above an idle baseline of a rank with torch imported. The search itself is
    tested without processes in tests/engines/test_bench_memory_search.py."""
    out = tmp_path / "memory.json"
    cmd = [sys.executable, "-m", "satfuse.cli", "bench", "memory", "--out", str(out), "--backbone", "tiny",
           "--crop", "32", "--engines", "zero3", "--budget-gb", "2", "--max-batch", "2"]
    res = subprocess.run(cmd, cwd=ROOT, env=env(), capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stderr[-3000:]
    doc = json.loads(out.read_text())["result"]
    rows = doc["rows"]
    assert set(rows) == {"ddp", "ddp+ac", "zero3", "zero3+ac"}
    for name, row in rows.items():
        assert row["activation_checkpointing"] == name.endswith("+ac")
        assert set(row["peak_mib_by_batch"]) == {"1", "2"} and row["peak_mib_at_1"] > 0, row
        assert row["idle_baseline_mib"] > 200  # torch (+ DeepSpeed) imported: what is subtracted
        assert row["largest_batch"] == 2 and row["capped"] and row["launches"] == 1, row
    assert doc["zero3_ac_batch_factor_vs_ddp"] == 1.0 and doc["zero3_ac_factor_is_lower_bound"]

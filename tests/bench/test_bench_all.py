"""`satfuse bench all`: one JSON with every benchmark, each figure measured in this run.

"Measured, not a constant" is checked two ways: the schema requires every throughput/time
figure to be a finite positive number next to its in-run reference, and a benchmark run twice
gives timings that differ (a hard-coded figure would not); the communication model is checked
against the real model's parameter count and its own formulas.
"""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
BENCHES = {"shard", "loader", "io", "loss", "ckpt", "engines", "train", "model"}


def satfuse(*args: str, timeout: int = 900) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "satfuse.cli", *args], cwd=ROOT, capture_output=True,
                          text=True, timeout=timeout)


def numbers(node, path=""):
    """Every numeric leaf as (path, value)."""
    if isinstance(node, dict):
        for k, v in node.items():
            yield from numbers(v, f"{path}.{k}")
    elif isinstance(node, list):
        for i, v in enumerate(node):
            yield from numbers(v, f"{path}[{i}]")
    elif isinstance(node, (int, float)) and not isinstance(node, bool):
        yield path, node


def positive(node, *keys: str) -> None:
    for key in keys:
        value = node[key]
        assert isinstance(value, (int, float)) and math.isfinite(value) and value > 0, (key, value)


def ratio_of_rows(node: dict, ratio: str, num: str, den: str, row_round: float = 0.0,
                  ratio_round: float = 0.0) -> None:
    """`node[ratio]` is the ratio of the two measured rows it names, within the rounding of the
    rows (half a unit of `row_round`) and of the ratio (`ratio_round`): a ratio computed from
    anything else, or a constant, fails."""
    h, r = row_round / 2, ratio_round / 2 + 1e-12
    low = (node[num] - h) / (node[den] + h) - r
    high = (node[num] + h) / (node[den] - h) + r
    assert low <= node[ratio] <= high, (ratio, node[ratio], num, node[num], den, node[den])


@pytest.mark.slow
def test_bench_all_writes_complete_json(tmp_path: Path) -> None:
    """`bench all --smallest`: every benchmark at its smallest sizes (about a minute; the full
    `bench all` measures for minutes and is `satfuse bench`'s, not the suite's)."""
    out = tmp_path / "RESULTS.json"
    proc = satfuse("bench", "all", "--smallest", "--out", str(out), timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    doc = json.loads(out.read_text())
    assert doc["smallest"] is True
    assert {"cores", "torch", "device", "date"} <= set(doc["machine"])
    assert set(doc["benches"]) == BENCHES
    for name, entry in doc["benches"].items():
        assert entry["wall_s"] > 0, name
        for path, value in numbers(entry["result"]):
            assert math.isfinite(value), f"{name}{path} = {value}"
    b = doc["benches"]
    positive(b["shard"]["result"], "read_pairs_per_s", "shard_pairs_per_s", "shard_over_read_time")
    positive(b["ckpt"]["result"], "torch_save_s", "manager_save_s", "save_ratio_vs_torch_save",
             "torch_load_s", "manager_load_s", "load_ratio_vs_torch_load")
    shard = b["shard"]["result"]
    ratio_of_rows(shard, "shard_over_read_time", "read_pairs_per_s", "shard_pairs_per_s", ratio_round=1e-9)
    ck = b["ckpt"]["result"]  # times rounded to 1e-4 s, ratios to 1e-3
    for ratio, num, den in (("save_ratio_vs_torch_save", "manager_save_s", "torch_save_s"),
                            ("save_ratio_vs_torch_save_fsync", "manager_save_s", "torch_save_fsync_s"),
                            ("load_ratio_vs_torch_load", "manager_load_s", "torch_load_s"),
                            ("load_ratio_already_verified", "manager_load_already_verified_s", "torch_load_s"),
                            ("load_ratio_overlapped", "manager_load_overlapped_s", "torch_load_s"),
                            ("load_ratio_overlapped_vs_same_threads", "manager_load_overlapped_s",
                             "torch_load_same_threads_s"),
                            ("async_blocking_ratio_vs_torch_save", "async_save_blocking_s", "torch_save_s")):
        ratio_of_rows(ck, ratio, num, den, row_round=1e-4, ratio_round=1e-3)
    for row in b["train"]["result"]["cpu"]:
        positive(row, "sec_per_step", "pairs_per_s")
    cpu_rows = {(r["model"], r["precision"], r["ranks"]): r for r in b["train"]["result"]["cpu"]}
    for sc in b["train"]["result"]["scaling"]:
        two, one = cpu_rows[(sc["model"], sc["precision"], 2)], cpu_rows[(sc["model"], sc["precision"], 1)]
        assert sc["efficiency_2_vs_1"] == pytest.approx(two["pairs_per_s"] / (2 * one["pairs_per_s"]), rel=1e-9)
    assert b["train"]["result"]["scaling"], "2-rank vs 1-rank efficiency missing"
    gpu = b["train"]["result"]["gpu"]
    assert all(r["pairs_per_s_per_gpu"] == "no GPU" for r in gpu) or all(
        isinstance(r["pairs_per_s_per_gpu"], float) for r in gpu)
    assert set(b["engines"]["result"]["engines"]) == {"ddp", "zero1"}  # DDP, the reference, and ZeRO-1
    assert b["loader"]["result"]["rows"] and b["loss"]["result"]["rows"]


def test_bench_all_runs_full_sizes_unless_asked_for_the_smallest(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """What each benchmark receives: its own defaults (plus `ALL_ARGS`) in `bench all`, the
    `SMALLEST_ARGS` only with --smallest; every benchmark of `bench all` has smallest sizes."""
    import argparse

    from satfuse.bench import commands

    in_all = set(commands.BENCHES) - commands.NEEDS_CLUSTER - commands.STANDALONE
    assert set(commands.SMALLEST_ARGS) == in_all == BENCHES
    seen: dict[str, argparse.Namespace] = {}
    mods = commands.available()
    for name in in_all:
        monkeypatch.setattr(mods[name], "run", lambda a, n=name: seen.__setitem__(n, a) or {})
    monkeypatch.setattr(commands, "available", lambda: mods)
    for smallest in (False, True):
        seen.clear()
        out = tmp_path / f"all-{smallest}.json"
        assert commands.run_all(argparse.Namespace(skip=[], smallest=smallest, out=str(out))) == 0
        assert json.loads(out.read_text())["smallest"] is smallest and set(seen) == in_all
        for name, got in seen.items():
            argv = commands.SMALLEST_ARGS[name] if smallest else commands.ALL_ARGS.get(name)
            assert got == commands.defaults_for(mods[name], argv), name
    assert seen["shard"].pairs == 4 and seen["engines"].ranks == 1


def test_timings_are_measured_each_run(tmp_path: Path) -> None:
    runs = []
    for i in range(2):
        out = tmp_path / f"loss{i}.json"
        proc = satfuse("bench", "loss", "--sizes", "16,32", "--world", "2", "--repeats", "1",
                       "--out", str(out))
        assert proc.returncode == 0, proc.stderr[-2000:]
        runs.append(json.loads(out.read_text()))
    a = [v for p, v in numbers(runs[0]["result"]) if "ms" in p or "_s" in p]
    b = [v for p, v in numbers(runs[1]["result"]) if "ms" in p or "_s" in p]
    assert a and len(a) == len(b)
    assert a != b, "identical timings in two runs: figures are not being measured"


def test_communication_model_follows_the_real_model(tmp_path: Path) -> None:
    import torch

    from satfuse.config import ModelConfig
    from satfuse.models import build_pretrain_model

    out = tmp_path / "model.json"
    proc = satfuse("bench", "model", "--backbone", "tiny", "--proj-hidden", "256", "--proj-out", "64",
                   "--batch-per-gpu", "8",
                   "--out", str(out))
    assert proc.returncode == 0, proc.stderr[-2000:]
    res = json.loads(out.read_text())["result"]
    cfg = ModelConfig(method="dual_simclr", backbone="tiny", proj_hidden=256, proj_out=64)
    with torch.device("meta"):
        params = sum(p.numel() for p in build_pretrain_model(cfg).parameters())
    assert res["params"] == params
    rows = {r["gpus"]: r for r in res["rows"]}
    assert set(rows) == {2**k for k in range(11)}
    assert rows[1]["allgather_bytes_fwd"] == 0 and rows[1]["grad_bytes_ddp_zero0"] == 0
    w, b, d = 8, 8, 64
    assert rows[w]["allgather_bytes_fwd"] == (w - 1) * b * 2 * d * 4
    assert rows[w]["grad_bytes_ddp_zero0"] == int(2 * (w - 1) / w * params * 4)
    assert rows[w]["grad_bytes_zero1"] == int(3 * (w - 1) / w * params * 4)
    assert rows[1024]["logits_bytes_local_loss"] < rows[1024]["logits_bytes_full"] / 500

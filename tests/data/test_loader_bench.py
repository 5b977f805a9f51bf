"""`satfuse bench loader` on a tiny synthetic set: every row measured, same sample counts."""

from __future__ import annotations

import json
import multiprocessing
import time
from pathlib import Path

from satfuse.bench.loader import cpu_used, worker_cpu_seconds
from satfuse.cli import main


def test_bench_loader_writes_json(tmp_path: Path) -> None:
    out = tmp_path / "loader.json"
    rc = main(["bench", "loader", "--out", str(out), "--scenes", "2", "--patches", "8", "--size", "32",
               "--maxcount", "4", "--workers", "0", "1", "--crops", "16", "--batch", "4", "--repeats", "1",
               "--epochs", "1"])
    assert rc == 0
    res = json.loads(out.read_text())["result"]
    rows = res["rows"]
    deal = {f"deal_{k}_w{w}_crop16" for k in ("shards", "members") for w in (0, 1)}
    verify = {"loader_w0_crop16_1epoch", "loader_w0_crop16_1epoch_noverify", "sha256_pass"}
    assert set(rows) == {"per_file_rasterio", "raw_tar_bytes", "loader_w0_crop16", "loader_w1_crop16",
                         "loader_w1_crop16_fresh"} | deal | verify
    # per-core efficiency: CPU seconds of the main process and of the workers, samples per CPU second
    w0, w1 = rows["loader_w0_crop16"], rows["loader_w1_crop16"]
    assert w0["workers_cpu_s"] == 0 and w0["main_cpu_s"] > 0 and w1["workers_cpu_s"] >= 0  # ticks: 10 ms
    for r in (w0, w1, rows["loader_w1_crop16_fresh"]):
        assert r["cpu_s"] == round(r["main_cpu_s"] + r["workers_cpu_s"], 4)
        assert r["samples_per_cpu_s"] == round(r["samples"] / r["cpu_s"], 1)
    table = res["workers"]["rows"]
    assert set(table) == {"w0_crop16", "w1_crop16", "w1_crop16_fresh"} and table["w0_crop16"]["efficiency_vs_w0"] == 1.0
    assert table["w1_crop16"]["samples_per_cpu_s"] == w1["samples_per_cpu_s"]
    for name, r in table.items():  # every ratio recomputed from the rows it is made of
        assert r["efficiency_vs_w0"] == round(r["samples_per_cpu_s"] / w0["samples_per_cpu_s"], 3), name
    # rank 0 of 2 ranks: 8 of the 16 pairs an epoch, minus the first batch; 4 shards vs the same pairs in 1
    assert rows["deal_shards_w1_crop16"]["samples"] == rows["deal_members_w1_crop16"]["samples"] == 8 - 4
    dealing = res["member_dealing"]
    assert dealing["world"] == 2 and dealing["shards"] == 4 and set(dealing["members_vs_shards"]) == {"w0_crop16", "w1_crop16"}
    for key, ratio in dealing["members_vs_shards"].items():
        members, whole = rows[f"deal_members_{key}"], rows[f"deal_shards_{key}"]
        assert ratio == round(members["samples_per_s"] / whole["samples_per_s"], 3), key
    verify_cost = res["verify_overhead"]
    on, off = verify_cost["rows"]
    assert (on, off) == ("loader_w0_crop16_1epoch", "loader_w0_crop16_1epoch_noverify")
    assert verify_cost["slowdown_first_epoch"] == round(rows[off]["samples_per_s"] / rows[on]["samples_per_s"], 3)
    assert verify_cost["sha256_pass_s"] == rows["sha256_pass"]["seconds"] > 0
    assert rows["per_file_rasterio"]["samples"] == rows["raw_tar_bytes"]["samples"] == res["samples"] == 16
    assert rows["loader_w0_crop16"]["samples"] == 16 - 4  # one epoch minus the first batch (start-up, timed apart)
    assert all(r["samples_per_s"] > 0 for r in rows.values()) and rows["per_file_rasterio"]["x_per_file"] == 1.0
    per_file, floor = rows["per_file_rasterio"]["samples_per_s"], rows["raw_tar_bytes"]["samples_per_s"]
    for name, r in rows.items():
        assert r["x_per_file"] == round(r["samples_per_s"] / per_file, 2), name
        assert r["fraction_of_floor"] == round(r["samples_per_s"] / floor, 3), name
    goal = res["goal_5x_per_file"]
    loaders = ("loader_w0_crop16", "loader_w1_crop16")  # not the 1-epoch, verify or fresh rows
    assert goal["best_row"] == max(loaders, key=lambda k: rows[k]["samples_per_s"])
    assert goal["x_per_file"] == rows[goal["best_row"]]["x_per_file"] and goal["met"] == (goal["x_per_file"] >= 5.0)



def _spin_then_wait(seconds: float, done) -> None:
    end = time.process_time() + seconds
    while time.process_time() < end:
        pass
    done.wait(60)


def test_worker_cpu_seconds_reads_child_processes() -> None:
    """Workers' CPU time comes from /proc for every live child process: a child that burns
    0.3 s of CPU shows it (whatever the machine's load), and a finished child is not read."""
    ctx = multiprocessing.get_context("fork")
    done = ctx.Event()
    child = ctx.Process(target=_spin_then_wait, args=(0.3, done))
    child.start()
    seen, deadline = 0.0, time.monotonic() + 120
    while seen < 0.29 and time.monotonic() < deadline:
        time.sleep(0.05)
        seen = worker_cpu_seconds().get(child.pid, 0.0)
    done.set()
    child.join(timeout=60)
    assert seen >= 0.29
    assert child.pid not in worker_cpu_seconds()
    # the window's CPU: main process delta + deltas of the workers alive at both readings
    assert cpu_used((1.0, {7: 2.0, 8: 1.0}), (1.5, {7: 2.25, 9: 4.0})) == {"main_cpu_s": 0.5, "workers_cpu_s": 0.25}

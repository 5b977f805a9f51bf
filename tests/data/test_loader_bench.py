"""`satfuse bench loader` on a tiny synthetic set: every row measured, same sample counts."""

from __future__ import annotations

import json
from pathlib import Path

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
    assert set(rows) == {"per_file_rasterio", "raw_tar_bytes", "loader_w0_crop16", "loader_w1_crop16"} | deal | verify
    # rank 0 of 2 ranks: 8 of the 16 pairs an epoch, minus the first batch; 4 shards vs the same pairs in 1
    assert rows["deal_shards_w1_crop16"]["samples"] == rows["deal_members_w1_crop16"]["samples"] == 8 - 4
    dealing = res["member_dealing"]
    assert dealing["world"] == 2 and dealing["shards"] == 4 and set(dealing["members_vs_shards"]) == {"w0_crop16", "w1_crop16"}
    assert all(v > 0 for v in dealing["members_vs_shards"].values())
    assert res["verify_overhead"]["slowdown_first_epoch"] > 0 and res["verify_overhead"]["sha256_pass_s"] > 0
    assert rows["per_file_rasterio"]["samples"] == rows["raw_tar_bytes"]["samples"] == res["samples"] == 16
    assert rows["loader_w0_crop16"]["samples"] == 16 - 4  # one epoch minus the first batch (start-up, timed apart)
    assert all(r["samples_per_s"] > 0 for r in rows.values()) and rows["per_file_rasterio"]["x_per_file"] == 1.0
    assert res["goal_5x_per_file"]["best_row"].startswith("loader_")

"""`satfuse bench shard` reports the I/O floor (rasterio reads + the same bytes written and
fsynced) measured in the same run, and its ratio is computed from the rows it prints."""

from __future__ import annotations

import argparse
from pathlib import Path

from satfuse.bench import shard as bench_shard


def test_floor_rows_are_measured_and_ratios_follow_them(tmp_path: Path) -> None:
    args = argparse.Namespace(pairs=4, size=32, maxcount=2, workers=1, repeats=2, workdir=tmp_path)
    r = bench_shard.run(args)
    assert r["bytes_written"] > 4 * 2 * 32 * 32 * 4  # 2 shards of real tars, not a constant
    for key in ("read_s", "write_fsync_s", "floor_s", "shard_s", "shard_over_floor_time_median"):
        assert r[key] > 0, key
    assert r["floor_s"] == r["read_s"] + r["write_fsync_s"]
    assert r["shard_over_floor_time"] == r["shard_s"] / r["floor_s"]
    assert r["meets_goal"] == (r["shard_over_floor_time"] <= r["goal_over_floor"])
    assert r["shard_over_read_time"] == r["shard_s"] / r["read_s"]  # the read-only ratio stays
    assert set(r["stage_cpu_ms_per_pair"]) == {"read_raw", "read_and_check", "stats_sums", "sha256"}
    assert all(v > 0 for v in r["stage_cpu_ms_per_pair"].values())
    assert not list(tmp_path.iterdir())  # floor files and shards are cleaned up


def test_write_floor_writes_each_size_durably(tmp_path: Path) -> None:
    bench_shard.write_floor([0, 10, 5 << 20], tmp_path / "w")
    assert sorted(p.stat().st_size for p in (tmp_path / "w").iterdir()) == [0, 10, 5 << 20]

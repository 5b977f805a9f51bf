"""`satfuse bench io` on a tiny synthetic set (64x64 patches): the facts its figures rest on.

Cold rows start with no shard page resident (mincore after POSIX_FADV_DONTNEED) and read
some but never more than the shard bytes; the warm row reads nothing new; without
read-around a crop touches fewer pages than the full patch; the model is the stated
arithmetic of the measured bytes/pair.
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path

import pytest

from satfuse.bench import io as bench_io
from satfuse.bench import io_pagecache


def args_for(tmp_path: Path, *extra: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    bench_io.add_arguments(parser)
    return parser.parse_args(["--scenes", "2", "--patches", "4", "--size", "64", "--maxcount", "4",
                              "--crops", "32", "0", "--batch", "4", "--geometry-samples", "4",
                              "--rate", "32=5000", "64=1500", "--nodes", "1", "64",
                              "--workdir", str(tmp_path), "--variants", "default", *extra])


@pytest.fixture(scope="module")
def result(tmp_path_factory: pytest.TempPathFactory) -> dict:
    return bench_io.run(args_for(tmp_path_factory.mktemp("io"), "--variants", "default", SMALLEST, BLOCKED,
                                 "--variant", "plain="))


SMALLEST = "zstd+float16+no-labels"
BLOCKED = "zstd-blocks+float16"


def measured(result: dict, name: str = "default") -> dict:
    (s,) = [s for s in result["sets"] if s["name"] == name and "rows" in s]
    return s


def test_page_cache_helpers_see_a_drop_and_a_read(tmp_path: Path) -> None:
    path = tmp_path / "f.bin"
    path.write_bytes(os.urandom(64 * bench_io.PAGE))
    io_pagecache.drop_cache(path)
    assert io_pagecache.resident_pages(path) == 0
    with open(path, "rb") as fh:
        fh.read()
    assert io_pagecache.resident_pages(path) == 64


def test_cold_rows_read_some_but_at_most_the_shards(result: dict) -> None:
    s = measured(result)
    assert s["pairs"] == 8 and s["patch"] == 64
    assert s["member_bytes"]["s1.npy"] >= 8 * 2 * 64 * 64 * 4 and s["member_bytes"]["s2.npy"] >= 8 * 13 * 64 * 64 * 2
    assert sum(s["member_bytes"].values()) + s["tar_framing_bytes"] == s["shard_bytes"]
    cold = [r for r in s["rows"] if r["cache"] == "cold"]
    assert len(cold) == 2 * len(bench_io.MODES)
    for r in cold:
        assert r["cold_verified"] and r["resident_before_pages"] == 0, r
        assert 0 < r["bytes_read"] <= r["shard_pages"] * bench_io.PAGE, r
        assert r["bytes_per_pair"] == round(r["bytes_read"] / r["pairs"])
    # the loader as shipped hashes every shard it opens: it reads all of them
    for r in cold:
        if r["mode"] == "shipped":
            assert r["bytes_read"] == r["shard_pages"] * bench_io.PAGE
    assert result["ok"]


def test_warm_row_reads_nothing_new(result: dict) -> None:
    s = measured(result)
    warm = [r for r in s["rows"] if r["cache"] == "warm"]
    assert warm
    for r in warm:
        assert r["resident_before_pages"] == r["shard_pages"] and r["bytes_read"] == 0, r


def test_a_crop_touches_fewer_pages_than_the_full_patch(result: dict) -> None:
    s = measured(result)
    touched = {r["crop"]: r for r in s["rows"] if r["mode"] == "touched"}
    assert touched[32]["bytes_read"] < touched[0]["bytes_read"]
    geo = s["geometry"]["crops"]
    assert geo["32"]["pages_today"] < geo["0"]["pages_today"] == geo["0"]["pages_full_patch"]
    ranges = {r["crop"]: r for r in s["prototype_range_reads"]}
    assert all(r["cold_verified"] for r in ranges.values())
    assert 0 < ranges[32]["bytes_per_pair"] < ranges[0]["bytes_per_pair"] <= s["shard_bytes_per_pair"] + bench_io.PAGE


def test_model_is_the_arithmetic_of_measured_bytes(result: dict) -> None:
    cold = {}
    for name in ("default", SMALLEST, BLOCKED):
        s = measured(result, name)
        cold.update({(name, r["crop"] or 64, r["mode"]): r["bytes_per_pair"] for r in s["rows"] if r["cache"] == "cold"})
        cold.update({(name, r["crop"] or 64, "range_reads"): r["bytes_per_pair"] for r in s["prototype_range_reads"]})
    rows = result["model"]["rows"]
    assert len(rows) == len(cold)
    for m in rows:
        bpp = cold[(m["set"], m["crop"], m["mode"])]
        rate = {32: 5000, 64: 1500}[m["crop"]]
        assert m["bytes_per_pair"] == bpp and m["pairs_per_s_per_gpu"] == rate
        per_node = bpp * rate * 8 / 1e9
        assert m["gb_per_s_per_node"] == pytest.approx(per_node, abs=0.005)
        assert m["gb_per_s_total"]["64"] == pytest.approx(per_node * 64, abs=0.05)
    assert len(result["model"]["table"]) == 2 + len(rows)
    assert bench_io.bandwidth(2_500_000, 1500, 8, [1, 64]) == {
        "gb_per_s_per_node": 30.0, "gb_per_s_total": {"1": 30.0, "64": 1920.0}}


def test_identical_flags_are_measured_once_and_bad_specs_fail(tmp_path: Path, result: dict) -> None:
    plain = [s for s in result["sets"] if s["name"] == "plain"]
    assert plain == [{"name": "plain", "flags": [], "same_as": "default"}]
    with pytest.raises(SystemExit, match="choose from"):
        bench_io.variants(args_for(tmp_path, "--variants", "gzip"))
    with pytest.raises(SystemExit, match="SIDE=PAIRS_PER_S"):
        bench_io.parse_rates(["128:5000"])
    with pytest.raises(SystemExit, match="NAME=FLAGS"):
        bench_io.variants(args_for(tmp_path, "--variant", "zstd"))
    with pytest.raises(SystemExit, match="no --rate for crop side 64"):
        bench_io.model(result["sets"], args_for(tmp_path, "--rate", "32=5000"))


def test_the_smallest_encoding_reads_fewer_bytes_per_pair(result: dict) -> None:
    base, small = measured(result), measured(result, SMALLEST)
    assert not any(k.startswith(("lc.", "dfc.")) for k in small["member_bytes"]), small["member_bytes"]
    assert any(k.startswith("s2.npy.") for k in small["member_bytes"])  # compressed member names

    def cold_shipped(s: dict) -> int:
        return next(r["bytes_per_pair"] for r in s["rows"] if r["mode"] == "shipped" and r["cache"] == "cold")

    assert cold_shipped(small) < 0.8 * cold_shipped(base)


def test_the_blocked_encoding_reads_only_the_crop_rows_cold(result: dict) -> None:
    """The shipped loader on a row-blocked set: no whole-shard sha256, no read-around, so a crop
    of 32 of 64 rows reads less than its full patch (at 64x64 pages and the block tables weigh:
    the 256x256 figures are the README's), and less than the smallest whole-member encoding at
    that crop, which reads every member whole; the full patch no more than the shard."""
    blocked, small = measured(result, BLOCKED), measured(result, SMALLEST)

    def cold_shipped(s: dict, crop: int) -> int:
        return next(r["bytes_per_pair"] for r in s["rows"]
                    if r["mode"] == "shipped" and r["cache"] == "cold" and r["crop"] == crop)

    assert cold_shipped(blocked, 32) < 0.9 * cold_shipped(blocked, 0)
    assert cold_shipped(blocked, 32) < 0.9 * cold_shipped(small, 32)
    assert cold_shipped(blocked, 0) <= blocked["shard_bytes_per_pair"] + bench_io.PAGE


def test_users_shard_sets_are_measured_as_given(tmp_path: Path) -> None:
    packed = bench_io.pack_variants(tmp_path / "work", args_for(tmp_path))
    mine = Path(packed[0]["dir"]).rename(tmp_path / "my-set")
    res = bench_io.run(args_for(tmp_path, "--shards", str(mine), "--crops", "32", "--batches", "1"))
    (s,) = res["sets"]
    assert s["name"] == "my-set" and s["cold_verified"] and s["pairs"] == 8
    shipped = next(r for r in s["rows"] if r["mode"] == "shipped" and r["cache"] == "cold")
    assert shipped["pairs"] == 4  # --batches 1 of batch 4
    assert 0 < shipped["bytes_read"] <= shipped["shard_pages"] * bench_io.PAGE
    assert [r["pairs"] for r in s["prototype_range_reads"]] == [4]  # --batches limits the prototype too
    with pytest.raises(SystemExit, match="no --rate for crop side 64"):  # the full patch of this set
        bench_io.run(args_for(tmp_path, "--shards", str(mine), "--crops", "0", "--rate", "32=5000"))

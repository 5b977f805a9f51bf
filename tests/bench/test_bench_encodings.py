"""`satfuse bench loader --encodings`: one row per shard encoding, measured on the same pairs."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from satfuse.cli import main


def test_bench_loader_encodings_rows(tmp_path: Path) -> None:
    out = tmp_path / "loader.json"
    rc = main(["bench", "loader", "--out", str(out), "--scenes", "2", "--patches", "8", "--size", "32",
               "--maxcount", "4", "--workers", "0", "--crops", "16", "--batch", "4", "--repeats", "1",
               "--epochs", "1", "--encodings", "default", "zstd", "zstd+float16", "zstd-blocks+float16"])
    assert rc == 0
    enc = json.loads(out.read_text())["result"]["encodings"]
    rows = enc["rows"]
    assert set(rows) == {"default", "zstd", "zstd+float16", "zstd-blocks+float16"} and enc["crop"] == 16
    assert rows["default"]["encoding"] is None and rows["zstd"]["encoding"]["compress"] == "zstd"
    assert set(rows["zstd"]["member_bytes_per_pair"]) == {"json", "s1.npy.zst", "s2.npy.zst", "lc.npy.zst"}
    assert rows["default"]["compression_ratio"] == {"s1.npy": 1.0, "s2.npy": 1.0}
    # each ratio recomputed from its row: decoded .npy bytes (128-byte header + the pixels of
    # the stored dtype, as the default row's members are) over the member's bytes in the tar
    npy = {"s1": 128 + 2 * 32 * 32 * 4, "s2": 128 + 13 * 32 * 32 * 2}
    assert {k: v for k, v in rows["default"]["member_bytes_per_pair"].items() if k[:2] in npy} == {
        "s1.npy": npy["s1"], "s2.npy": npy["s2"]}
    for name, r in rows.items():
        images = {k for k in r["member_bytes_per_pair"] if k[:2] in npy}
        assert set(r["compression_ratio"]) == images, name
        for k in images:
            decoded = 128 + 2 * 32 * 32 * 2 if k.startswith("s1") and "float16" in name else npy[k[:2]]
            assert r["compression_ratio"][k] == pytest.approx(decoded / r["member_bytes_per_pair"][k], rel=1e-3), (name, k)
        assert r["bytes_vs_default"] == round(r["bytes_per_pair"] / rows["default"]["bytes_per_pair"], 3), name
    assert rows["zstd"]["compression_ratio"]["s2.npy.zst"] > 1.0
    # float16 S1 is half the bytes before compression: fewer bytes than zstd alone
    assert rows["zstd+float16"]["member_bytes_per_pair"]["s1.npy.zst"] < rows["zstd"]["member_bytes_per_pair"]["s1.npy.zst"]
    assert rows["default"]["bytes_vs_default"] == 1.0 and rows["zstd+float16"]["bytes_vs_default"] < 1.0
    assert set(rows["zstd-blocks+float16"]["member_bytes_per_pair"]) == {"json", "s1.npy.zsb", "s2.npy.zsb", "lc.npy.zsb"}
    for r in rows.values():
        assert r["pairs"] == 16 and r["decode_us_per_pair_one_core"] > 0 and r["loader_w0_crop16_samples_per_s"] > 0
        assert r["decode_us_per_pair_one_core_crop16"] > 0 and r["loader_w0_crop16_cpu_ms_per_pair"] > 0

"""`satfuse bench loss` runs both sides (1 process, 2 gloo ranks) and writes its JSON."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from satfuse.cli import main


def test_bench_loss_writes_rows(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "loss.json"
    rc = main(
        ["bench", "loss", "--sizes", "8,32", "--dim", "16", "--repeats", "1", "--out", str(out)]
    )
    assert rc == 0
    result = json.loads(out.read_text())
    assert result["machine"]["cores"] >= 1
    rows = result["result"]["rows"]
    assert [r["global_batch"] for r in rows] == [8, 32]
    for r in rows:
        assert r["single_ms"] > 0 and r["ranks2_local_ms"] > 0 and r["ranks2_full_ms"] > 0
        assert r["ratio_local_vs_single"] == pytest.approx(
            r["ranks2_local_ms"] / r["single_ms"], rel=0.01
        )
        # Local rows against the global batch: half the full matrix on 2 ranks.
        assert r["logits_bytes_per_rank_local"] * 2 == r["logits_bytes_per_rank_full"]
    capsys.readouterr()


def test_bench_loss_rejects_bad_sizes(tmp_path: Path) -> None:
    assert main(["bench", "loss", "--sizes", "7", "--out", str(tmp_path / "x.json")]) == 2
    assert not (tmp_path / "x.json").exists()

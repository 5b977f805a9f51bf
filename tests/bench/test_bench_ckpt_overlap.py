"""`satfuse bench ckpt` measures the overlapped load (crc32s verified while DCP loads) in the
same run as the verify-then-load path and torch.load, and its ratios follow its rows."""

from __future__ import annotations

import argparse
from pathlib import Path

from satfuse.bench import ckpt as bench_ckpt


def test_overlapped_load_rows_and_ratios(tmp_path: Path) -> None:
    r = bench_ckpt.run(argparse.Namespace(params_m=0.05, width=64, repeats=2, dir=str(tmp_path)))
    assert r["loaded_state_equal"]
    for key in ("manager_load_overlapped_s", "torch_load_same_threads_s", "manager_load_s", "torch_load_s"):
        assert r[key] > 0, key
    h = 0.5e-4  # rows are rounded to 1e-4 s, ratios to 1e-3
    for ratio, num, den in (("load_ratio_overlapped", "manager_load_overlapped_s", "torch_load_s"),
                            ("load_ratio_overlapped_vs_same_threads", "manager_load_overlapped_s",
                             "torch_load_same_threads_s")):
        assert (r[num] - h) / (r[den] + h) - 6e-4 <= r[ratio] <= (r[num] + h) / (r[den] - h) + 6e-4, ratio
    assert isinstance(r["load_goal_met"], bool) and r["intra_op_threads"] >= 1

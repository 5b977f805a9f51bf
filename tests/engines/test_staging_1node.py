"""`data.stage_dir` on one node with two ranks: local rank 0 copies the whole set once (the
other rank waits for it), a resumed run reuses the verified copies, and the losses are
bitwise those of a run that reads the shards in place (one node: the same epoch plan)."""

from __future__ import annotations

import json
from pathlib import Path

from tests.engines.ranks import logs, metrics, run_ranks
from tests.engines.test_pretrain import common


def losses(run: Path) -> dict[int, float]:
    return {int(m["step"]): float(m["loss"]) for m in metrics(run) if "loss" in m}


def test_one_node_two_ranks_stage_once_reuse_and_match_unstaged(sen12ms_shards: Path, tmp_path: Path) -> None:
    ref, run, stage = tmp_path / "ref", tmp_path / "run", tmp_path / "stage"
    for d in ("ref-logs", "logs1", "logs2"):
        (tmp_path / d).mkdir()
    assert run_ranks(2, common(sen12ms_shards, ref, steps=5), tmp_path / "ref-logs") == [0, 0]
    staged = common(sen12ms_shards, run, steps=3, **{"data.stage_dir": str(stage), "checkpoint.every_steps": "3"})
    assert run_ranks(2, staged, tmp_path / "logs1") == [0, 0], logs(tmp_path / "logs1")[-3000:]
    (found,) = stage.glob("satfuse-*/staged-node0.json")  # one copier: one record, node 0
    first = json.loads(found.read_text())
    total = len(json.loads((sen12ms_shards / "manifest.json").read_text())["shards"])
    assert (first["copied"], first["reused"]) == (total, 0)
    assert not list(stage.rglob(".*tmp*"))
    staged[2] = "train.steps=5"
    assert run_ranks(2, staged, tmp_path / "logs2") == [0, 0], logs(tmp_path / "logs2")[-3000:]
    second = json.loads(found.read_text())
    assert (second["copied"], second["recopied"], second["reused"]) == (0, 0, total)
    assert "resumed from" in logs(tmp_path / "logs2")
    assert losses(run) == losses(ref)  # staging on one node does not change the data order

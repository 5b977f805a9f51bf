"""`data.stage_dir` under the DeepSpeed engine: two ranks on one node, local rank 0 copies,
both read the local copies (the staging agreement uses only the default process group,
which DeepSpeed shares)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.engines.ranks import logs, run_ranks

pytestmark = pytest.mark.deepspeed


def test_deepspeed_two_ranks_stage_once(sen12ms_shards: Path, tmp_path: Path) -> None:
    (tmp_path / "logs").mkdir()
    args = [f"data.shards={sen12ms_shards}", f"train.run_dir={tmp_path / 'run'}", "train.steps=2",
            f"data.stage_dir={tmp_path / 'stage'}"]
    codes = run_ranks(2, args, tmp_path / "logs", config="hpc/pretrain/tiny_deepspeed.yaml")
    assert codes == [0, 0], logs(tmp_path / "logs")[-3000:]
    (found,) = (tmp_path / "stage").glob("satfuse-*/staged-node0.json")
    total = len(json.loads((sen12ms_shards / "manifest.json").read_text())["shards"])
    assert json.loads(found.read_text())["copied"] == total

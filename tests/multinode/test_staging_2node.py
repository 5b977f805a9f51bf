"""`data.stage_dir` on the 2-node cluster: each node stages a disjoint share of the shards to
its own directory (`$SLURMD_NODENAME` in the value), a second run resumes without copying
intact files again, a damaged local copy is copied again, and a 1-node staged run resumes
on 2 nodes (the node that already holds shards reuses them, the other copies its share)."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest

from .conftest import REPO, cluster_env
from .helpers import TINY, logged_steps

pytestmark = pytest.mark.multinode

PYTHON = REPO / ".venv" / "bin" / "python"


def srun_staged(nodes: int, shards: Path, run: Path, stage: Path, steps: int) -> subprocess.CompletedProcess[str]:
    cmd = ["srun", f"-N{nodes}", f"-n{nodes}", str(PYTHON), "-m", "satfuse.cli", "pretrain", "--config", str(TINY),
           f"data.shards={shards}", f"data.stage_dir={stage}/$SLURMD_NODENAME", f"train.run_dir={run}",
           f"train.steps={steps}", "train.log_every=1", "checkpoint.every_steps=2", "train.comm_timeout_s=60"]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=240, env=cluster_env(), cwd=REPO, check=False)


def record(stage: Path, host: str, node: int) -> dict:
    """The copier's record of the last staging on `host` (as node `node`)."""
    (found,) = (stage / host).glob(f"satfuse-*/staged-node{node}.json")
    return json.loads(found.read_text())


def test_two_nodes_stage_disjoint_shares_reuse_and_recopy(
    multinode_cluster: Path, sen12ms_shards: Path, tmp_path: Path
) -> None:
    run, stage = tmp_path / "run", tmp_path / "stage"
    res = srun_staged(2, sen12ms_shards, run, stage, steps=4)
    assert res.returncode == 0, res.stderr[-4000:]
    a, b = record(stage, "sfnode1", 0), record(stage, "sfnode2", 1)
    total = len(json.loads((sen12ms_shards / "manifest.json").read_text())["shards"])
    assert a["copied"] + b["copied"] == total and a["reused"] == b["reused"] == 0
    assert not set(a["shards"]) & set(b["shards"]) and len(a["shards"]) + len(b["shards"]) == total
    # each node's directory holds only its own share
    assert {p.name for p in (stage / "sfnode2").glob("satfuse-*/part0/*.tar")} == {Path(s).name for s in b["shards"]}
    # damage one copy on sfnode2 (same size), then resume: only that file is copied again
    victim = next((stage / "sfnode2").glob("satfuse-*/part0/*.tar"))
    data = bytearray(victim.read_bytes())
    data[1000] ^= 0xFF
    victim.write_bytes(bytes(data))
    res = srun_staged(2, sen12ms_shards, run, stage, steps=6)
    assert res.returncode == 0, res.stderr[-4000:]
    assert "resumed from" in res.stderr
    a2, b2 = record(stage, "sfnode1", 0), record(stage, "sfnode2", 1)
    assert (a2["copied"], a2["recopied"], a2["reused"]) == (0, 0, len(a["shards"]))
    assert (b2["copied"], b2["recopied"], b2["reused"]) == (0, 1, len(b["shards"]) - 1)
    assert victim.read_bytes() == (sen12ms_shards / victim.name).read_bytes()
    assert logged_steps(run) == list(range(1, 7))


def test_one_node_staged_run_resumes_on_two_nodes(
    multinode_cluster: Path, sen12ms_shards: Path, tmp_path: Path
) -> None:
    run, stage = tmp_path / "run", tmp_path / "stage"
    res = srun_staged(1, sen12ms_shards, run, stage, steps=3)
    assert res.returncode == 0, res.stderr[-4000:]
    one = record(stage, "sfnode1", 0)
    total = len(json.loads((sen12ms_shards / "manifest.json").read_text())["shards"])
    assert one["copied"] == len(one["shards"]) == total  # one node holds the whole set
    res = srun_staged(2, sen12ms_shards, run, stage, steps=6)  # other node count: new shares
    assert res.returncode == 0, res.stderr[-4000:]
    a, b = record(stage, "sfnode1", 0), record(stage, "sfnode2", 1)
    assert (a["copied"], a["reused"]) == (0, len(a["shards"]))  # its half was already there
    assert b["copied"] == len(b["shards"]) and not set(a["shards"]) & set(b["shards"])
    assert logged_steps(run) == list(range(1, 7))

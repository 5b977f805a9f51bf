"""The dataset seam is open: a dataset registered from a test module (`toy_data`, no edit under
src/) is written by the real `satfuse synth`, packed by the real `satfuse shard` and read back
by `satfuse shard verify` and the evaluation loader, with its own layout, bands and options."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import torch

from satfuse.data.reading.eval_loader import EvalLoader
from satfuse.data.reading.shard_sets import resolve_shards
from tests.data.loader_shards import data_cfg

REPO = Path(__file__).resolve().parents[2]

# One process for the four commands: each `main` call is the real CLI (parser, registry lookup,
# plugin load) and the process start is paid once.
RUNNER = "import json, sys\nfrom satfuse.cli import main\nprint('RCS', json.dumps([main(a) for a in json.loads(sys.argv[1])]))\n"


def test_toy_dataset_is_synthesised_sharded_verified_and_loaded(tmp_path: Path) -> None:
    src, out = tmp_path / "toy", tmp_path / "shards" / "toy"
    shard = ["shard", "--src", str(src), "--dataset", "toy-bands", "--maxcount", "2"]
    runs = [
        ["synth", "toy-bands", "--out", str(src), "--tiles", "4", "--incomplete", "1"],
        [*shard, "--out", str(out)],
        [*shard, "--out", str(tmp_path / "shards" / "refused"), "--split", "train"],
        ["shard", "verify", str(out)],
    ]
    env = {**os.environ, "SATFUSE_PLUGINS": "tests.extensions.toy_data",
           "PYTHONPATH": os.pathsep.join([str(REPO / "src"), str(REPO), os.environ.get("PYTHONPATH", "")])}
    proc = subprocess.run([sys.executable, "-c", RUNNER, json.dumps(runs)], env=env, capture_output=True, text=True,
                          timeout=300)
    log = proc.stdout + proc.stderr
    rcs = next(json.loads(line[4:]) for line in proc.stdout.splitlines() if line.startswith("RCS "))
    assert rcs == [0, 0, 2, 0], log
    printed = [json.loads(line) for line in proc.stdout.splitlines() if line.startswith("{")]
    assert printed[0] == {"dataset": "toy-bands", "out": str(src), "pairs": 3}, log  # the toy's synth verb
    assert printed[1]["ok"] is True and printed[1]["samples"] == 3 and printed[1]["shards"] == 2, log
    # the toy's own option check (it reads no --split), before anything was written
    assert "--split: not used by --dataset toy-bands" in proc.stderr and not (tmp_path / "shards" / "refused").exists()

    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["dataset"] == "toy-bands" and manifest["total_samples"] == 3
    assert manifest["bands"] == {"s1": ["VV", "VH"], "s2": ["B2", "B3", "B4", "B8"]}  # the toy's 4 S2 bands
    assert manifest["resample"]["tolerance_m"] == 7.0 and manifest["toy_layout"] == "tiles/{tile}/{band}.tif"
    assert [(e["key"], e["reason"]) for e in manifest["excluded"]] == [("toy_t003", "toy: tile lacks nir.tif")]
    assert manifest["ignored"] == [{"path": "README.txt", "reason": "toy: not part of the layout (tiles/ only)"}]

    batch = next(iter(EvalLoader(resolve_shards(str(out)), data_cfg(crop=0), rank=0, world_size=1, batch_size=4)))
    assert batch["s2"].shape == (4, 4, 16, 16) and batch["s1"].shape == (4, 2, 16, 16)
    assert batch["mask"].tolist() == [True, True, True, False]
    assert sorted(batch["key"][:3]) == ["toy_t000", "toy_t001", "toy_t002"]
    assert torch.isfinite(batch["s2"]).all() and batch["s2"][:3].abs().sum() > 0

"""The checkpoint seam is open: a backend registered from a test file (no edit under src/)
commits, verifies, prunes, resumes ("auto", "latest", a step) and exports through the commit
protocol and the registry, which know nothing of its files but what it reports."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]

# Runs in a fresh process so that the plugin comes in through SATFUSE_PLUGINS, as on a rank.
SCRIPT = r"""
import json, shutil, sys
from pathlib import Path
import torch
from torch import nn
from satfuse.checkpoint.export import load_model
from satfuse.checkpoint.layout import checkpoint_problems, read_latest, read_meta
from satfuse.checkpoint.manager import CheckpointManager
from satfuse.checkpoint.resolve import parse_resume
from satfuse.checkpoint.state import ModelOptimState
from satfuse.config import CheckpointConfig
from satfuse.registry import CHECKPOINT_BACKENDS
from satfuse.utils import SatfuseError

run = Path(sys.argv[1])
out = {"toy_loaded_by_plugin": "toy_pt" in CHECKPOINT_BACKENDS.names()}
Toy = CHECKPOINT_BACKENDS.get("toy_pt")
backend = Toy.from_config(run, CheckpointConfig(keep_last=2, every_steps=1), 60.0)
torch.manual_seed(0)
model = nn.Linear(3, 2)
weights = {}
for step in (1, 2, 3):
    with torch.no_grad():
        model.weight.add_(1.0)
    weights[step] = model.weight.detach().clone()
    path = backend.save(step, {"model_optim": ModelOptimState(model)}, {"step": step}, {"epoch": 0})
steps = sorted(p.name for p in (run / "checkpoints").iterdir() if p.name.startswith("step_"))
meta = read_meta(path)
out.update(steps=steps, pointer=read_latest(run).name, kind=meta["kind"], files=sorted(meta["files"]),
           problems=checkpoint_problems(path))

# the protocol asks the backend what a complete checkpoint needs: drop model.pt from meta.json
unlisted = run.parent / "unlisted"
shutil.copytree(path, unlisted)
doc = json.loads((unlisted / "meta.json").read_text())
del doc["files"]["model.pt"]
(unlisted / "meta.json").write_text(json.dumps(doc))
out["unlisted_problems"] = checkpoint_problems(unlisted)

# damage step 3 (same size, other bytes): auto resumes step 2, latest refuses step 3
blob = bytearray((path / "model.pt").read_bytes())
blob[-1] ^= 0xFF
(path / "model.pt").write_bytes(bytes(blob))
fresh = Toy(run)
out["auto"] = fresh.find_resume(parse_resume("auto")).name
try:
    fresh.find_resume("latest")
    out["latest"] = "accepted"
except SatfuseError as exc:
    out["latest"] = str(exc)
out["step"] = fresh.find_resume("2").name

other = nn.Linear(3, 2)
rank_states, loaded_meta = fresh.load(run / "checkpoints" / "step_00000002", {"model_optim": ModelOptimState(other)})
out["loaded_equal"] = torch.equal(other.weight, weights[2])
out["loaded_step"] = rank_states[0]["step"]
out["loaded_path"] = fresh.loaded_path.name

exported, _, kind = load_model(run / "checkpoints" / "step_00000002", lambda meta: nn.Linear(3, 2))
out["export_kind"] = kind
out["export_equal"] = torch.equal(exported.weight, weights[2])
try:
    CheckpointManager(run).load(run / "checkpoints" / "step_00000002", {"model_optim": ModelOptimState(nn.Linear(3, 2))})
    out["dcp_refusal"] = "accepted"
except SatfuseError as exc:
    out["dcp_refusal"] = str(exc)
print("RESULT " + json.dumps(out))
"""


def test_a_backend_from_a_plugin_module_commits_verifies_prunes_resumes_and_exports(tmp_path: Path) -> None:
    env = {**os.environ, "SATFUSE_PLUGINS": "tests.extensions.ckpt_toy_backend", "OMP_NUM_THREADS": "1",
           "PYTHONPATH": os.pathsep.join([str(ROOT / "src"), str(ROOT), os.environ.get("PYTHONPATH", "")])}
    proc = subprocess.run([sys.executable, "-c", SCRIPT, str(tmp_path / "run")], env=env,
                          capture_output=True, text=True, timeout=300)
    line = next((ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")), None)
    assert proc.returncode == 0 and line, proc.stdout + proc.stderr
    out = json.loads(line.removeprefix("RESULT "))
    assert out["toy_loaded_by_plugin"]
    assert out["steps"] == ["step_00000002", "step_00000003"] and out["pointer"] == "step_00000003"  # pruned
    assert out["kind"] == "toy_pt" and out["files"] == ["model.pt", "rank_00000.pt"] and out["problems"] == []
    assert out["unlisted_problems"] == ["model.pt is not listed in meta.json"]  # the backend's required file
    assert out["auto"] == "step_00000002" and out["step"] == "step_00000002"
    assert "step_00000003: not a complete checkpoint: model.pt crc32" in out["latest"]
    assert out["loaded_equal"] and out["loaded_step"] == 2 and out["loaded_path"] == "step_00000002"
    assert out["export_kind"] == "toy_pt" and out["export_equal"]  # export picks the exporter by kind
    assert "written by the toy_pt engine, not DDP; resume it with train.engine=toy_pt" in out["dcp_refusal"]

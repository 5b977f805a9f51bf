"""The engines seam is open: an engine registered from a test file trains through the real
`satfuse pretrain`, and the built-in engines register without importing torch or DeepSpeed."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_builtin_engines_register_torch_free_and_a_kind_refuses_its_keys() -> None:
    """`train.engine` is checked (name, the engine's own refusals) without torch: `satfuse submit`
    on a login node; registering `deepspeed` imports neither torch nor DeepSpeed."""
    code = (
        "import sys\n"
        "from satfuse.config import ConfigError, PretrainConfig, load_config, validate_pretrain\n"
        "from satfuse.engines.kinds import EngineKind\n"
        "from satfuse.registry import ENGINES\n"
        "validate_pretrain(load_config(PretrainConfig, None, ['train.engine=deepspeed']))\n"
        "print(ENGINES.names(), 'torch' in sys.modules, 'deepspeed' in sys.modules)\n"
        "ENGINES.register('stepless', EngineKind(target='nowhere:Nothing', nan_skip=False))\n"
        "for extra in (['train.engine=stepless', 'train.nan_policy=skip'], ['train.engine=nope']):\n"
        "    try:\n"
        "        validate_pretrain(load_config(PretrainConfig, None, extra))\n"
        "    except Exception as exc:\n"
        "        print(type(exc).__name__, exc)\n"
    )
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    env.pop("SATFUSE_PLUGINS", None)
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    lines = out.stdout.splitlines()
    assert lines[0] == "['ddp', 'deepspeed'] False False", out.stdout + out.stderr
    assert lines[1].startswith("ConfigError config: train.nan_policy=skip works with train.engine=ddp (")
    assert "use train.nan_policy=stop with train.engine=stepless" in lines[1]
    assert lines[2] == ("SatfuseError unknown engine 'nope' in train.engine; choose one of: ddp, deepspeed, "
                        "stepless (a plugin's entries need SATFUSE_PLUGINS=module)")


def test_a_plugin_engine_trains_through_satfuse_pretrain(sen12ms_shards: Path, tmp_path: Path) -> None:
    run = tmp_path / "run"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), *sys.path]),
           "SATFUSE_PLUGINS": "tests.extensions.toy_engine", "OMP_NUM_THREADS": "1"}
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "SLURM_PROCID"):
        env.pop(key, None)
    cmd = [sys.executable, "-m", "satfuse.cli", "pretrain", "--config", "tiny", f"data.shards={sen12ms_shards}",
           f"train.run_dir={run}", "train.steps=2", "train.log_every=1", "checkpoint.every_steps=2",
           "data.crop=16", "train.engine=toy"]
    done = subprocess.run(cmd, env=env, cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    meta = json.loads((run / "checkpoints" / "step_00000002" / "meta.json").read_text())
    assert meta["engine"] == "toy" and meta["config"]["train"]["engine"] == "toy"  # the toy class saved
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows if "loss" in r] == [1, 2]

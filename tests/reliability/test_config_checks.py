"""Config values checked (ranges, run_dir) before anything starts; errors say where they came from."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from satfuse.config import ConfigError, PretrainConfig, load_config, validate_pretrain

ROOT = Path(__file__).resolve().parents[2]
TINY = str(ROOT / "hpc/pretrain/tiny.yaml")


@pytest.mark.parametrize("override, message", [
    ("optim.lr=-1e-3", "optim.lr=-0.001 is out of range"),
    ("optim.weight_decay=-1", "optim.weight_decay=-1.0 is out of range"),
    ("train.steps=0", "nothing to train with 0 steps"),
    ("data.batch_size=0", "data.batch_size=0 is out of range"),
    ("loss.temperature=0", "loss.temperature=0.0 is out of range"),
    ("optim.betas=[0.9, 1.5]", "optim.betas"),
    ("train.run_dir=", "train.run_dir is empty"),
    ("checkpoint.force_new_run=true", "force_new_run=true needs checkpoint.resume=none"),
])
def test_out_of_range_values_fail_naming_the_key(override: str, message: str) -> None:
    cfg = load_config(PretrainConfig, TINY, [override])
    with pytest.raises(ConfigError, match=message.replace("[", r"\[").replace(".", r"\.")):
        validate_pretrain(cfg)


def test_run_dir_that_is_a_file(tmp_path: Path) -> None:
    f = tmp_path / "run"
    f.write_text("x")
    with pytest.raises(ConfigError, match="is an existing file"):
        validate_pretrain(load_config(PretrainConfig, TINY, [f"train.run_dir={f}"]))
    with pytest.raises(ConfigError, match="which is a file"):
        validate_pretrain(load_config(PretrainConfig, TINY, [f"train.run_dir={f}/sub/run"]))


def test_unknown_key_on_the_command_line_is_reported_as_such() -> None:
    with pytest.raises(ConfigError) as info:
        load_config(PretrainConfig, TINY, ["train.stepz=3"])
    text = str(info.value)
    assert text.startswith("command line: unknown key train.stepz") and "tiny.yaml" not in text


def _cli(*args: str, cwd: Path = ROOT) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "satfuse.cli", "pretrain", *args], cwd=cwd,
                          capture_output=True, text=True, timeout=120)


def test_nproc_per_node_checks_config_and_shards_before_torchrun(sen12ms_shards: Path, tmp_path: Path) -> None:
    bad = _cli("--nproc-per-node", "2", "--config", TINY, f"data.shards={sen12ms_shards}",
               f"train.run_dir={tmp_path / 'r'}", "optim.lr=-1")
    assert bad.returncode == 2, bad.stderr
    assert "optim.lr=-1.0 is out of range" in bad.stderr
    assert "ChildFailedError" not in bad.stderr and "Traceback" not in bad.stderr
    assert len([ln for ln in bad.stderr.splitlines() if "ERROR" in ln]) == 1
    missing = _cli("--nproc-per-node", "2", "--config", TINY, f"data.shards={tmp_path / 'nope'}",
                   f"train.run_dir={tmp_path / 'r'}")
    assert missing.returncode == 2 and "ChildFailedError" not in missing.stderr
    assert str(tmp_path / "nope") in missing.stderr


def test_train_steps_zero_and_run_dir_file_end_in_one_line(tmp_path: Path) -> None:
    f = tmp_path / "file"
    f.write_text("")
    res = _cli("--config", TINY, f"train.run_dir={f}")
    assert res.returncode == 2 and "Traceback" not in res.stderr and "is an existing file" in res.stderr
    res = _cli("--config", TINY, f"train.run_dir={tmp_path / 'r'}", "train.steps=0")
    assert res.returncode == 2 and "nothing to train" in res.stderr
    assert not (tmp_path / "r").exists()

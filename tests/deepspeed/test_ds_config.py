"""The DeepSpeed config is built from satfuse's config + a DeepSpeed file, and every
unsupported combination is refused before DeepSpeed starts (no process group needed)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from satfuse.config import PretrainConfig, load_config
from satfuse.engines.deepspeed_engine import build_ds_config, check_combination
from satfuse.utils import SatfuseError

ROOT = Path(__file__).resolve().parents[2]
CPU = torch.device("cpu")


def cfg_with(*overrides: str) -> PretrainConfig:
    return load_config(PretrainConfig, ROOT / "hpc/pretrain/tiny_deepspeed.yaml", list(overrides))


def ds_file(tmp_path: Path, doc: dict) -> str:
    path = tmp_path / "ds.json"
    path.write_text(json.dumps(doc))
    return str(path)


def ds_config(cfg: PretrainConfig, world: int = 2, device: torch.device = CPU) -> dict:
    """The DeepSpeed config from the sections the engine passes (deepspeed, optim, precision, batch)."""
    return build_ds_config(cfg.deepspeed, cfg.optim, cfg.train.precision, cfg.data.batch_size, world, device)


def built(cfg: PretrainConfig, world: int = 2) -> dict:
    ds = ds_config(cfg, world)
    check_combination(ds, CPU, cfg.train.precision, cfg.optim, cfg.checkpoint)
    return ds


@pytest.mark.parametrize("name", sorted(p.name for p in (ROOT / "hpc/deepspeed").glob("*.*")
                                        if p.suffix in (".json", ".yaml")))
def test_every_shipped_config_builds_with_its_precision(name):
    precision = "bf16" if "bf16" in name else "fp16" if "fp16" in name else "fp32"
    cfg = cfg_with(f"deepspeed.config=hpc/deepspeed/{name}", f"train.precision={precision}",
                   "train.steps=20", "checkpoint.every_steps=4")
    ds = ds_config(cfg, 2, torch.device("cuda") if precision == "fp16" else CPU)
    assert ds["train_micro_batch_size_per_gpu"] == cfg.data.batch_size
    assert ds["train_batch_size"] == cfg.data.batch_size * ds["gradient_accumulation_steps"] * 2
    assert ds["zero_optimization"]["stage"] == int(name[4])  # zeroN_...: the file's own stage
    assert ds["bf16"]["enabled"] == (precision == "bf16")
    assert ds["fp16"]["enabled"] == (precision == "fp16")
    if precision == "bf16":
        assert ds["data_types"]["grad_accum_dtype"] == "fp32"


def test_satfuse_owns_the_recipe():
    ds = built(cfg_with("optim.grad_clip=1.5", "data.batch_size=6", "deepspeed.zero_stage=2"), world=3)
    assert ds["gradient_clipping"] == 1.5
    assert ds["train_micro_batch_size_per_gpu"] == 6 and ds["train_batch_size"] == 18
    assert ds["zero_optimization"]["stage"] == 2  # the override beats the file's stage 1
    assert "optimizer" not in ds and "scheduler" not in ds


def test_yaml_deepspeed_file_with_accumulation():
    cfg = cfg_with("deepspeed.config=hpc/deepspeed/zero2_accum4.yaml", "train.steps=20",
                   "checkpoint.every_steps=8")
    ds = built(cfg)
    assert ds["gradient_accumulation_steps"] == 4 and ds["train_batch_size"] == 8 * 4 * 2


@pytest.mark.parametrize(
    ("overrides", "doc", "needle"),
    [
        (["train.precision=fp16"], None, "fp16"),
        (["deepspeed.zero_stage=4"], None, "stage 4 does not exist"),
        (["optim.name=lars", "deepspeed.zero_stage=3"], None, "stage 3.*use optim.name=adam or optim.name=adamw"),
        ([], {"zero_optimization": {"stage": 2, "offload_param": {"device": "cpu"}}}, "needs ZeRO-3"),
        ([], {"zero_optimization": {"stage": 3, "offload_param": {"device": "cpu"}}}, "offload_param moves"),
        (["train.precision=fp32", "deepspeed.config=hpc/deepspeed/zero1_bf16.json"], None,
         "enables bf16 but train.precision=fp32"),
        (["optim.name=lars", "deepspeed.zero_stage=1"], None, "LARS"),
        (["checkpoint.async_save=true"], None, "async_save"),
        (["deepspeed.config=hpc/deepspeed/nope.json"], None, "not found"),
        ([], {"optimizer": {"type": "Adam"}}, "'optimizer' section"),
        ([], {"gradient_clipping": 2.0}, "optim.grad_clip"),
        ([], {"train_micro_batch_size_per_gpu": 99}, "data.batch_size"),
        ([], {"train_batch_size": 7}, "train_batch_size=7"),
        ([], {"pipeline": {"stages": 2}}, "data-parallel"),
        ([], {"zero_optimization": {"stage": 2, "offload_optimizer": {"device": "cpu"}}}, "offload_optimizer"),
        (["train.precision=bf16"], {"data_types": {"grad_accum_dtype": "bf16"}}, "grad_accum_dtype"),
    ],
)
def test_unsupported_combinations_fail_at_start(tmp_path, overrides, doc, needle):
    if doc is not None:
        overrides = [*overrides, f"deepspeed.config={ds_file(tmp_path, doc)}"]
    with pytest.raises(SatfuseError, match=needle) as err:
        built(cfg_with(*overrides))
    assert "\n" not in str(err.value)


def test_cli_refuses_lars_under_zero3_with_one_line(sen12ms_shards, tmp_path):
    """Through the real command: exit 2, one error line naming the optimizers to use, no
    traceback, no step taken."""
    cmd = [sys.executable, "-m", "satfuse.cli", "pretrain", "--config", "hpc/pretrain/tiny_deepspeed.yaml",
           f"data.shards={sen12ms_shards}", f"train.run_dir={tmp_path / 'run'}",
           "deepspeed.config=hpc/deepspeed/zero3_fp32.json", "optim.name=lars"]
    res = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert res.returncode == 2, res.stderr
    errors = [line for line in res.stderr.splitlines() if "ERROR" in line or "error" in line.lower()]
    assert len(errors) == 1 and "ZeRO stage 3" in errors[0] and "optim.name=adam or optim.name=adamw" in errors[0], res.stderr
    assert "Traceback" not in res.stderr
    assert not (tmp_path / "run" / "checkpoints").exists()

"""A typo in a DeepSpeed file is refused before DeepSpeed starts, naming the key (path) and
the closest valid one: at the top level DeepSpeed itself would ignore it silently, nested it
would end in a pydantic traceback."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from satfuse.config import PretrainConfig, load_config
from satfuse.engines.deepspeed_engine import build_ds_config
from satfuse.utils import SatfuseError

ROOT = Path(__file__).resolve().parents[2]


def build(tmp_path: Path, doc: dict) -> dict:
    path = tmp_path / "ds.json"
    path.write_text(json.dumps(doc))
    cfg = load_config(PretrainConfig, ROOT / "hpc/pretrain/tiny_deepspeed.yaml", [f"deepspeed.config={path}"])
    return build_ds_config(cfg.deepspeed, cfg.optim, cfg.train.precision, cfg.data.batch_size, 2,
                           torch.device("cpu"))


@pytest.mark.parametrize(("doc", "needle"), [
    ({"zero_optimisation": {"stage": 2}}, "unknown DeepSpeed key 'zero_optimisation'"
                                          " (DeepSpeed would ignore it and train with its default); "
                                          "did you mean 'zero_optimization'?"),
    ({"gradient_acumulation_steps": 4}, "'gradient_acumulation_steps' (DeepSpeed would ignore it and train with "
                                        "its default); did you mean 'gradient_accumulation_steps'?"),
    ({"zero_optimization": {"stage": 1, "reduce_bucket_sise": 5e8}},
     "unknown DeepSpeed key 'zero_optimization.reduce_bucket_sise'; did you mean 'reduce_bucket_size'?"),
    ({"zero_optimization": {"stage": 1, "offload_optimizer": {"devic": "cpu"}}},
     "unknown DeepSpeed key 'zero_optimization.offload_optimizer.devic'; did you mean 'device'?"),
    ({"bf16": {"enabled": False, "immediate_grad_updat": True}},
     "unknown DeepSpeed key 'bf16.immediate_grad_updat'; did you mean 'immediate_grad_update'?"),
    ({"zero_optimization": {"stage": 1, "overlap_comm": "sometimes"}},
     "DeepSpeed key 'zero_optimization.overlap_comm': Input should be a valid boolean"),
])
def test_typos_are_one_line_naming_the_key_and_the_closest(tmp_path: Path, doc: dict, needle: str) -> None:
    with pytest.raises(SatfuseError) as info:
        build(tmp_path, doc)
    msg = str(info.value)
    assert msg.startswith(str(tmp_path / "ds.json")) and needle in msg and "\n" not in msg


def test_valid_nested_keys_pass(tmp_path: Path) -> None:
    ds = build(tmp_path, {"zero_optimization": {"stage": 2, "reduce_bucket_size": 5e8, "overlap_comm": False},
                          "steps_per_print": 100, "wall_clock_breakdown": False})
    assert ds["zero_optimization"]["reduce_bucket_size"] == 5e8 and ds["steps_per_print"] == 100

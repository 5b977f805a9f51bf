"""Each component receives its own config sections (issue 15, item 5): an engine is built from
`train`, `optim` and `checkpoint` (DeepSpeed also `deepspeed` and the per-rank batch size),
without a `PretrainConfig` (tests/config/test_whole_config.py: who may take the whole config)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from satfuse.config import (
    CheckpointConfig,
    DeepSpeedConfig,
    LossConfig,
    ModelConfig,
    OptimConfig,
    TrainConfig,
)
from satfuse.engines.ddp import DDPEngine
from satfuse.engines.deepspeed_engine import build_ds_config, check_combination
from satfuse.engines.optim import lr_factor
from satfuse.models import build_pretrain_model
from satfuse.utils import SatfuseError
from tests.models.test_methods import batch

CPU = torch.device("cpu")


def tiny_model() -> torch.nn.Module:
    torch.manual_seed(0)
    return build_pretrain_model(ModelConfig(backbone="tiny", proj_hidden=32, proj_out=16))


def one_step(engine: DDPEngine) -> None:
    loss, _ = engine.module.loss(engine.model(batch(n=4)), LossConfig())
    engine.backward_step(loss)


def test_ddp_engine_trains_saves_and_loads_from_its_sections_alone(tmp_path: Path) -> None:
    train = TrainConfig(run_dir=str(tmp_path / "run"), steps=4)
    optim = OptimConfig(lr=0.5, schedule="cosine", warmup_steps=1)
    checkpoint = CheckpointConfig(every_steps=2, keep_last=1)
    engine = DDPEngine(tiny_model(), CPU, train, optim, checkpoint)
    for _ in range(2):
        one_step(engine)
    assert engine.lr() == pytest.approx(0.5 * lr_factor(2, 4, optim))  # optim + train.steps
    assert engine.ckpt.due(2) and not engine.ckpt.due(1)  # checkpoint.every_steps
    path = engine.save(2, {"step": 2}, {"engine": engine.kind})
    assert path.parent == tmp_path / "run" / "checkpoints"  # train.run_dir

    fresh = DDPEngine(tiny_model(), CPU, train, optim, checkpoint)
    assert fresh.find_resume("auto") == path
    rank_states, _ = fresh.load(path)
    assert rank_states[0]["step"] == 2
    for a, b in zip(engine.module.parameters(), fresh.module.parameters(), strict=True):
        assert torch.equal(a, b)


def test_deepspeed_config_from_its_sections_alone() -> None:
    """The DeepSpeed config is built from the `deepspeed` section, `optim`, train.precision and
    the per-rank batch (data.batch_size), and refused against the `checkpoint` section."""
    section = DeepSpeedConfig(config="hpc/deepspeed/zero1_fp32.json", zero_stage=2)
    optim = OptimConfig(grad_clip=1.5)
    ds = build_ds_config(section, optim, "fp32", 6, 3, CPU)
    assert ds["train_micro_batch_size_per_gpu"] == 6 and ds["train_batch_size"] == 18
    assert ds["gradient_clipping"] == 1.5 and ds["zero_optimization"]["stage"] == 2
    check_combination(ds, CPU, "fp32", optim, CheckpointConfig())
    with pytest.raises(SatfuseError, match="checkpoint.async_save=true is not supported"):
        check_combination(ds, CPU, "fp32", optim, CheckpointConfig(async_save=True))

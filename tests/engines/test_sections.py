"""Each component receives its own config sections (issue 15, item 5): an engine is built from
`train`, `optim` and `checkpoint` (DeepSpeed also `deepspeed` and the per-rank batch size),
without a `PretrainConfig`; only the composition roots see the whole config."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest
import torch

import satfuse
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

SRC = Path(satfuse.__file__).resolve().parent
CPU = torch.device("cpu")
# The places that split a run's config into sections (or record all of it): nothing else
# may take a PretrainConfig.
COMPOSITION_ROOTS = {
    "engines/trainer.py:Trainer.__init__",  # builds loader, model, engine from their sections
    "engines/pretrain.py:pretrain",  # the entry point: process group, then the trainer
    "engines/pretrain.py:show_shell_commands",  # `--dry-run`: what every section would do
    "engines/run_records.py:write_config",  # config.yaml records the whole resolved config
}


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


def takers_of_the_whole_config() -> set[str]:
    """Every function under src/satfuse with a parameter annotated `PretrainConfig`."""
    found = set()
    for path in sorted(SRC.rglob("*.py")):
        tree = ast.parse(path.read_text())
        parents = {child: node for node in ast.walk(tree) for child in ast.iter_child_nodes(node)}
        for node in ast.walk(tree):
            if not isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                continue
            args = [*node.args.posonlyargs, *node.args.args, *node.args.kwonlyargs]
            if any(a.annotation is not None and "PretrainConfig" in ast.unparse(a.annotation) for a in args):
                owner = parents.get(node)
                name = f"{owner.name}.{node.name}" if isinstance(owner, ast.ClassDef) else node.name
                found.add(f"{path.relative_to(SRC).as_posix()}:{name}")
    return found


def test_only_the_composition_roots_take_the_whole_config() -> None:
    assert takers_of_the_whole_config() == COMPOSITION_ROOTS

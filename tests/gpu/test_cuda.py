"""Tests that need a CUDA GPU (marked `cuda`): skipped without one, run by `make gpu-check`.

They run the real Trainer on the GPU: bf16 and fp16 + GradScaler, channels_last + compile,
pinned batches; and the NCCL process group of one rank.
"""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch

from satfuse.bench import gpu
from satfuse.config import PretrainConfig, load_config
from satfuse.distributed.env import DistEnv
from satfuse.engines import trainer as tr

pytestmark = [pytest.mark.cuda,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]


TINY = Path(__file__).resolve().parents[2] / "hpc" / "pretrain" / "tiny.yaml"

def cfg(shards: Path, run_dir: Path, *extra: str) -> PretrainConfig:
    return load_config(PretrainConfig, TINY, [
        f"data.shards={shards}", f"train.run_dir={run_dir}", "train.steps=6", "train.log_every=3",
        "train.device=cuda", "data.num_workers=1", *extra])


@pytest.mark.parametrize("precision", ["bf16", "fp16"])
def test_trainer_on_cuda(sen12ms_shards: Path, tmp_path: Path, precision: str) -> None:
    t = tr.Trainer(cfg(sen12ms_shards, tmp_path / "run", f"train.precision={precision}"), DistEnv())
    assert t.device.type == "cuda" and t.loader.pin_memory and torch.backends.cudnn.benchmark
    result = t.fit()
    assert result.step == 6 and math.isfinite(result.final_loss)
    precision_checks(t, precision)


def precision_checks(t: tr.Trainer, precision: str) -> None:
    """After training: the layers ran in the autocast dtype (a finite loss would not show autocast
    off), and under fp16 a step whose gradients overflow is skipped with the scale backed off."""
    batch = tr.to_device(next(iter(t.loader)), t.device, t.cfg.train.channels_last)
    with t.engine.autocast(), gpu.layer_dtypes(t.module) as seen:
        out = t.forward(batch)
    loss, _ = t.module.loss(out, t.cfg.loss)
    dtypes = gpu.check_dtypes(seen, loss, precision)
    assert dtypes["ok"], dtypes
    assert t.engine.scaler.is_enabled() == (precision == "fp16")
    if precision == "fp16":
        overflow = gpu.overflow_step(t.module, t.engine.optimizer, t.engine.scaler, loss)
        assert overflow["ok"], overflow


def test_channels_last_and_compile_on_cuda(sen12ms_shards: Path, tmp_path: Path) -> None:
    t = tr.Trainer(cfg(sen12ms_shards, tmp_path / "run", "train.precision=bf16",
                       "train.channels_last=true", "train.compile=true"), DistEnv())
    result = t.fit()
    assert result.step == 6 and math.isfinite(result.final_loss)


def test_pinned_batch_copies_non_blocking() -> None:
    batch = {"s1": torch.randn(4, 2, 16, 16).pin_memory()}
    out = tr.to_device(batch, torch.device("cuda"), channels_last=True)
    torch.cuda.synchronize()
    assert out["s1"].is_cuda and out["s1"].is_contiguous(memory_format=torch.channels_last)
    assert torch.equal(out["s1"].cpu(), batch["s1"])


def test_training_step_does_not_synchronise(sen12ms_shards: Path, tmp_path: Path) -> None:
    """A bf16 step on the GPU queues its work without any CUDA synchronisation."""
    t = tr.Trainer(cfg(sen12ms_shards, tmp_path / "run", "train.precision=bf16",
                       "train.channels_last=true"), DistEnv())
    batches = iter(t.loader)
    for _ in range(2):
        t.train_step(next(batches))  # warm-up: cuDNN autotuning, optimizer state
    batch = next(batches)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        out = t.train_step(batch)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert math.isfinite(tr.read_metrics(out)["loss"])

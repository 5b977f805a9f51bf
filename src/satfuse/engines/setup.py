"""Where and how a pretraining run computes: device, engine, input transfer, compiled forward.

The decisions made once before the first step (which CUDA device a local rank uses, the engine
`train.engine` names, cuDNN autotuning, torch.compile) and the per-batch host-to-device copy,
kept out of the training loop (`satfuse.engines.trainer`) so that it reads as the loop alone. Each
function takes the config section or value it reads, not the whole `PretrainConfig`.
"""

from __future__ import annotations

from typing import Any

import torch

from satfuse.config import CheckpointConfig, DeepSpeedConfig, OptimConfig, TrainConfig
from satfuse.distributed.env import cuda_index
from satfuse.engines.base import Engine
from satfuse.registry import ENGINES
from satfuse.utils import SatfuseError


def select_device(want: str, local_rank: int) -> torch.device:
    """The device of `train.device` (auto/cpu/cuda) for this local rank."""
    if want == "cuda" or (want == "auto" and torch.cuda.is_available()):
        if not torch.cuda.is_available():
            raise SatfuseError("train.device=cuda but no CUDA device is visible; use train.device=cpu")
        return torch.device("cuda", cuda_index(local_rank, torch.cuda.device_count()))
    return torch.device("cpu")


def build_engine(model: torch.nn.Module, device: torch.device, train: TrainConfig, optim: OptimConfig,
                 checkpoint: CheckpointConfig, deepspeed: DeepSpeedConfig, micro_batch: int) -> Engine:
    """The engine `train.engine` names in `satfuse.registry.ENGINES`, from the sections engines
    read (`Engine.from_sections`; `deepspeed` and `micro_batch` are for engines that need them)."""
    cls = ENGINES.get(train.engine).engine_class()
    if not (isinstance(cls, type) and issubclass(cls, Engine)):
        raise SatfuseError(f"train.engine={train.engine}: {cls!r} is not an Engine subclass "
                           "(satfuse.engines.base.Engine); register one")
    return cls.from_sections(model, device, train, optim, checkpoint, deepspeed, micro_batch)


def to_device(batch: dict[str, Any], device: torch.device, channels_last: bool = False) -> dict[str, Any]:
    """Tensors to `device` with non_blocking copies (they overlap with compute when the loader
    pinned the batch); 4-D image tensors in channels_last when the model is."""
    def move(v: torch.Tensor) -> torch.Tensor:
        if channels_last and v.dim() == 4:
            return v.to(device, non_blocking=True, memory_format=torch.channels_last)
        return v.to(device, non_blocking=True)

    return {k: (move(v) if torch.is_tensor(v) else v) for k, v in batch.items()}


def configure_backends(crop: int, device: torch.device) -> None:
    """cuDNN autotuning for fixed input shapes: with a fixed crop (`crop` = data.crop > 0) every
    batch has the same shape, so benchmarking the convolution algorithms once pays back at once."""
    if device.type == "cuda" and crop > 0:
        torch.backends.cudnn.benchmark = True


def compiled_forward(train: TrainConfig, model: torch.nn.Module) -> torch.nn.Module:
    """`train.compile=true`: the forward pass through torch.compile (inductor)."""
    if not train.compile:
        return model
    ENGINES.get(train.engine).check_compile(train.engine)
    return torch.compile(model)

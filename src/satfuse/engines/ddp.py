"""DDP engine: torch DistributedDataParallel + torch.distributed.checkpoint (DCP).

Gradients of the global contrastive loss reach every rank's parameters through the
all-gather in `satfuse.losses`; DDP then averages them. fp16 uses a GradScaler (GPU only);
bf16 needs none.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel as DDP

from satfuse.checkpoint.manager import CheckpointManager
from satfuse.config import CheckpointConfig, DeepSpeedConfig, OptimConfig, TrainConfig
from satfuse.distributed.collectives import is_distributed
from satfuse.engines.base import Engine
from satfuse.engines.optim import build_optimizer, build_scheduler

log = logging.getLogger(__name__)


class DDPEngine(Engine):
    kind = "ddp"

    def __init__(self, module: nn.Module, device: torch.device, train: TrainConfig, optim: OptimConfig,
                 checkpoint: CheckpointConfig) -> None:
        """From its sections: `train` (precision; steps, the LR schedule's length; run_dir and
        comm_timeout_s, where and how long the checkpointer writes), `optim` (optimizer, schedule,
        clipping) and `checkpoint` (handed to the DCP backend, which owns the cadence)."""
        super().__init__(module, device, train.precision)
        self.optim = optim
        module.to(device)
        distributed = is_distributed()
        if distributed:
            ids = [device.index] if device.type == "cuda" else None
            self.model = DDP(module, device_ids=ids)
        self.optimizer = build_optimizer(module, optim)
        self.scheduler = build_scheduler(self.optimizer, optim, train.steps)
        self.scaler = torch.amp.GradScaler(device.type, enabled=train.precision == "fp16")
        self.ckpt = CheckpointManager.from_config(Path(train.run_dir), checkpoint, train.comm_timeout_s)

    @classmethod
    def from_sections(cls, module: nn.Module, device: torch.device, train: TrainConfig, optim: OptimConfig,
                      checkpoint: CheckpointConfig, deepspeed: DeepSpeedConfig, micro_batch: int) -> DDPEngine:
        """DDP reads neither `deepspeed` nor `micro_batch` (its batch is the loader's)."""
        return cls(module, device, train, optim, checkpoint)

    def backward_step(self, loss: torch.Tensor,
                      skip: Callable[[torch.Tensor], bool] | None = None) -> torch.Tensor:
        """No host read: the norm stays a 0-d device tensor (fp16's GradScaler.step reads
        its inf check on the host: torch's own synchronisation, fp16 only).

        `skip(grad_norm)` (train.nan_policy=skip) is asked after the gradients are reduced and
        before the update; True drops this step's update (the LR schedule still advances, so
        the LR stays a function of the step number)."""
        self.scaler.scale(loss).backward()
        self.scaler.unscale_(self.optimizer)  # a no-op without fp16; the norm is of true grads
        clip = self.optim.grad_clip if self.optim.grad_clip > 0 else float("inf")
        norm = nn.utils.clip_grad_norm_(self.module.parameters(), clip).detach()
        if skip is None or not skip(norm):
            self.scaler.step(self.optimizer)
        self.scaler.update()
        self.optimizer.zero_grad(set_to_none=True)
        self.scheduler.step()
        return norm

    def lr(self) -> float:
        """The optimizer's current learning rate (the first parameter group's)."""
        return float(self.optimizer.param_groups[0]["lr"])

    def engine_state(self) -> dict[str, Any]:
        return {"scheduler": self.scheduler.state_dict(), "scaler": self.scaler.state_dict()}

    def load_engine_state(self, state: dict[str, Any]) -> None:
        self.scheduler.load_state_dict(state["scheduler"])
        if state.get("scaler"):
            self.scaler.load_state_dict(state["scaler"])

    def sync_buffers(self) -> None:
        """Give every rank rank 0's BatchNorm running statistics before a save.

        DDP broadcasts rank 0's buffers at the start of each forward, so between steps the
        ranks' buffers differ (each updated them with its own batch). DCP writes one copy of a
        replicated tensor, from whichever rank its planner picks: without this, a resumed run
        would start from another rank's statistics and drift from the uninterrupted one.
        """
        if self.model is not self.module:
            for buf in self.module.buffers():
                dist.broadcast(buf, src=0)

    def before_save(self, step: int) -> None:
        """Every rank holds rank 0's BatchNorm statistics before DCP writes one copy."""
        self.sync_buffers()

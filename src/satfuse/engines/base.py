"""The engine layer: the only place where DDP and DeepSpeed differ.

The training loop (`satfuse.engines.trainer`) owns data, model forward, the global loss,
logging and signals. An engine owns what the two backends do differently: wrapping the
model, backward + optimizer step (with clipping, loss scaling and the LR schedule), and its
checkpoint backend (`ckpt`, a `satfuse.checkpoint.backend.CheckpointBackend`), which
saves/loads in its own sharded format. The trainer asks the engine, never the backend behind
it: `checkpoint_due`, `find_resume`, `save`, `load`, `resumed_from`, `wait`.

An engine is built from its own config sections (`train`, `optim`, `checkpoint`; DeepSpeed
also `deepspeed` and the per-rank batch size), never from the whole `PretrainConfig`: the
trainer (`satfuse.engines.trainer`) is the one place that splits the run's config, so an
engine can be built, tested and benchmarked without a loader, a model config or a loss.
"""

from __future__ import annotations

import contextlib
import functools
import logging
from abc import ABC, abstractmethod
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import nn

from satfuse.checkpoint.backend import CheckpointBackend
from satfuse.checkpoint.resolve import ResumeSpec
from satfuse.checkpoint.state import ModelOptimState
from satfuse.config import CheckpointConfig, DeepSpeedConfig, OptimConfig, TrainConfig
from satfuse.utils import SatfuseError

log = logging.getLogger(__name__)

# CPU flags of native bf16 arithmetic (x86: AVX512-BF16, AMX; Arm: BF16 in /proc/cpuinfo "Features")
NATIVE_BF16_FLAGS = frozenset({"avx512_bf16", "amx_bf16", "bf16"})


def autocast_context(precision: str, device: torch.device):
    """bf16/fp16 autocast for the forward pass; fp32 is a no-op context.

    The contrastive loss itself upcasts to fp32 (logits and softmax), so only the backbones
    run in reduced precision.
    """
    if precision == "fp32":
        return contextlib.nullcontext()
    dtype = torch.bfloat16 if precision == "bf16" else torch.float16
    return torch.autocast(device_type=device.type, dtype=dtype)


def check_precision(precision: str, device: torch.device) -> None:
    """Refuse unsupported combinations at start, not mid-run."""
    if precision == "fp16" and device.type != "cuda":
        raise SatfuseError(
            "train.precision=fp16 needs a CUDA GPU (fp16 autocast + GradScaler); on CPU use "
            "train.precision=bf16 or fp32"
        )
    if precision == "bf16" and device.type == "cuda" and not torch.cuda.is_bf16_supported():
        raise SatfuseError("train.precision=bf16 is not supported by this GPU; use fp16 or fp32")
    if precision == "bf16" and device.type == "cpu" and cpu_has_native_bf16() is False:
        log.warning(
            "train.precision=bf16 on a CPU without native bf16 (no avx512_bf16/amx_bf16): torch "
            "emulates it, many times slower than fp32 (`satfuse bench train` measures it here); "
            "use train.precision=fp32 on this machine"
        )


@functools.cache
def cpu_has_native_bf16(cpuinfo: str = "/proc/cpuinfo") -> bool | None:
    """Whether this CPU does bf16 arithmetic natively; None where the flags cannot be read
    (not Linux). Why it matters: without it every bf16 matmul/conv is emulated, far slower
    than fp32, so a config meant for GPUs crawls on a laptop or a CPU CI runner."""
    try:
        text = Path(cpuinfo).read_text()
    except OSError:
        return None
    for line in text.splitlines():
        key, _, value = line.partition(":")
        if key.strip() in ("flags", "Features"):
            return bool(NATIVE_BF16_FLAGS & set(value.split()))
    return None


class Engine(ABC):
    """The engine contract: what the training loop asks of DDP, DeepSpeed or a plugin's engine.

    `module` is the bare model (for `.loss`, `.backbones`), `model` what the forward pass goes
    through (a DDP wrapper, a DeepSpeed engine). An engine is registered in
    `satfuse.registry.ENGINES` by an `EngineKind` (`satfuse.engines.kinds`) and built by
    `from_sections`; one trainer step is one optimizer step on every engine.
    """

    # the name the engine is registered under in ENGINES (`train.engine`), recorded in meta.json
    kind: str = "base"
    ckpt: CheckpointBackend  # the checkpoint backend (DCP, DeepSpeed): built by the engine, used through it
    optimizer: torch.optim.Optimizer  # the torch optimizer every engine builds (`optim.build_optimizer`)
    # micro-batches per trainer step: the trainer calls `backward_step` this many times per
    # step, so one trainer step is one optimizer step on every engine (DeepSpeed: its
    # gradient_accumulation_steps)
    accumulation: int = 1
    # satfuse's torch optimizer and LR schedule (`satfuse.engines.optim`), on every engine: a
    # resume with changed optim.* keys re-applies them here (`optim.apply_hparams`)
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LambdaLR

    def __init__(self, module: nn.Module, device: torch.device, precision: str) -> None:
        """`precision` is `train.precision` (fp32/bf16/fp16): the autocast of the forward pass."""
        self.module = module
        self.precision = precision
        self.device = device
        self.model: nn.Module = module

    @classmethod
    @abstractmethod
    def from_sections(cls, module: nn.Module, device: torch.device, train: TrainConfig, optim: OptimConfig,
                      checkpoint: CheckpointConfig, deepspeed: DeepSpeedConfig, micro_batch: int) -> Engine:
        """Build the engine from the config sections engines read (never the whole config):
        `train`, `optim`, `checkpoint` for every engine; `deepspeed` and `micro_batch`
        (data.batch_size, the per-rank batch) for those that need them, ignored by the others."""

    @abstractmethod
    def backward_step(self, loss: torch.Tensor,
                      skip: Callable[[torch.Tensor], bool] | None = None) -> float | torch.Tensor:
        """Backward, clip, optimizer step, LR schedule step, zero grads. Returns grad norm
        before clipping (nan if not computed), as a float or a 0-d tensor (read on log steps).

        `skip(grad_norm)` (train.nan_policy=skip) is asked after the gradients are reduced and
        before the update; True drops this step's update on every rank (the LR schedule still
        advances). Only an engine registered with `nan_skip=True` receives it: the others are
        refused it in the config (`EngineKind.check_config`)."""

    @abstractmethod
    def lr(self) -> float:
        """The learning rate the next optimizer step will use (logged per step)."""

    # ------------------------------------------------------------------ checkpoints
    def app_state(self) -> dict[str, Any]:
        """What a checkpoint restores: the bare model and its optimizer, as one
        `ModelOptimState` (DDP's `module.` prefix never reaches the files)."""
        return {"model_optim": ModelOptimState(self.module, self.optimizer)}

    def checkpoint_due(self, step: int, last_step: bool = False) -> bool:
        """Whether the trainer saves `step` (`checkpoint.every_steps`, and the last step of a
        run unless just saved; see `CommitProtocol.due`)."""
        return self.ckpt.due(step, last_step=last_step)

    def find_resume(self, resume: ResumeSpec | str) -> Path | None:
        """The checkpoint `checkpoint.resume` means, verified (None: start fresh). Collective.
        A backend that checks crc32s while loading gets "auto"'s choice unhashed."""
        return self.ckpt.find_resume(resume, checksums=not self.ckpt.verifies_while_loading)

    def before_save(self, step: int) -> None:  # noqa: B027 - optional hook
        """Bring the model into its checkpointed form on every rank (before `save` writes)."""

    def save(self, step: int, rank_state: dict[str, Any], meta: dict[str, Any]) -> Path:
        """Write checkpoint `step` through the backend (collective); returns its directory."""
        self.before_save(step)
        return self.ckpt.save(step, self.app_state(), rank_state, meta)

    def load(self, path: Path) -> tuple[list[dict[str, Any]], dict[str, Any]]:
        """Load into the engine; return (rank states of all ranks of the saving run, meta)."""
        return self.ckpt.load(Path(path), self.app_state())

    @property
    def resumed_from(self) -> Path | None:
        """The checkpoint the last `load` actually loaded: an older one than asked for when the
        newest proved damaged while loading (None before any load)."""
        return self.ckpt.loaded_path

    def wait(self) -> None:
        """Block until pending asynchronous saves are committed (collective)."""
        self.ckpt.wait()

    def engine_state(self) -> dict[str, Any]:
        """Small, replicated training state (scheduler, scaler) kept in the per-rank files."""
        return {}

    def load_engine_state(self, state: dict[str, Any]) -> None:  # noqa: B027 - optional hook
        """Inverse of `engine_state`."""

    def autocast(self):
        """The forward pass's autocast context for `precision` (a no-op for fp32)."""
        return autocast_context(self.precision, self.device)

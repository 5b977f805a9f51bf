"""DeepSpeed engine: the second backend of the one training loop (`satfuse.engines.trainer`).

The model, the global contrastive loss, the loader and the logging are the DDP path's; this
module only wraps the model with `deepspeed.initialize` and maps the engine layer onto
DeepSpeed: `backward_step` -> `engine.backward` + `engine.step`, checkpoints -> DeepSpeed's
own sharded `save_checkpoint`/`load_checkpoint` inside satfuse's atomic checkpoint layout
(`satfuse.checkpoint.deepspeed_backend`).

Who decides what (precedence, checked at start):
- satfuse's config owns the training recipe, so DDP and DeepSpeed runs of one YAML train
  the same thing: per-rank batch (`data.batch_size` -> `train_micro_batch_size_per_gpu`;
  `train_batch_size` is computed), optimizer and LR schedule (`optim.*`, `train.steps`: the
  optimizer is satfuse's own torch optimizer and the schedule its LambdaLR, handed to
  DeepSpeed as client objects, so nothing is compiled and the update is DDP's), gradient
  clipping (`optim.grad_clip`) and precision (`train.precision`).
- the DeepSpeed file (`deepspeed.config`, JSON or YAML, see hpc/deepspeed/) owns the rest:
  the ZeRO stage and its tuning, `gradient_accumulation_steps`, loss-scaling knobs of its
  fp16 section, communication settings. `deepspeed.zero_stage` (>= 0) overrides its stage.
- a file that sets a satfuse-owned key to a different value is refused with the key named;
  restating the same value is fine (so the `*_bf16.json` files say `"bf16": enabled`).

Unsupported combinations fail in `DeepSpeedEngine.__init__`, before any step: fp16 off
CUDA, parameter or optimizer offload on CPU (a CPU run keeps everything there already), LARS
under ZeRO/bf16 (flattened partitions break its per-layer trust ratio; at ZeRO-3 the
parameters themselves are partitioned, so it is adam/adamw), bf16 gradient accumulation in bf16 (diverges: DeepSpeed #2352,
#2768), tensor/pipeline/sequence parallelism (the loss gathers over the default group, which
must be DeepSpeed's data-parallel group), async checkpoint saves.

With `gradient_accumulation_steps = k > 1` one trainer step is one optimizer step, as under
DDP: the trainer feeds k micro-batches (`Engine.accumulation`) through `backward_step`
before it counts the step, so `train.steps`, `checkpoint.every_steps` and the LR schedule
(`satfuse.engines.optim.build_scheduler`, the DDP engine's) all count optimizer steps.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
from collections.abc import Callable
from datetime import timedelta
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import yaml
from torch import nn

from satfuse.checkpoint.deepspeed_backend import DeepSpeedCheckpointManager
from satfuse.config import CheckpointConfig, DeepSpeedConfig, OptimConfig, TrainConfig
from satfuse.distributed import collectives
from satfuse.distributed.launcher_env import default_local_rank
from satfuse.distributed.ports import free_port
from satfuse.engines.base import Engine, check_precision
from satfuse.engines.ds_keys import check_keys
from satfuse.engines.optim import build_optimizer, build_scheduler
from satfuse.engines.warmup import check_build_locks
from satfuse.resources import resolve_config
from satfuse.utils import SatfuseError

log = logging.getLogger(__name__)

SUPPORTED_STAGES = (0, 1, 2, 3)
# Keys the DeepSpeed file may only restate: satfuse's config is their source of truth.
OWNED_SCALARS = {
    "train_micro_batch_size_per_gpu": "data.batch_size",
    "gradient_clipping": "optim.grad_clip",
}
OWNED_SECTIONS = {"optimizer": "optim.*", "scheduler": "optim.* (schedule, warmup_steps)"}
PARALLEL_KEYS = ("pipeline", "tensor_parallel", "sequence_parallel_size", "autotp_size")


# --------------------------------------------------------------------------------------------
# DeepSpeed config: read, check, fill
# --------------------------------------------------------------------------------------------


def resolve_ds_config_path(path: str) -> Path:
    """The DeepSpeed file as given, else a packaged name (`zero1_bf16`) or the packaged copy
    of `hpc/deepspeed/...`, so the default works from any directory (`satfuse.resources`)."""
    return resolve_config(path, "deepspeed")


def read_ds_file(path: Path) -> dict[str, Any]:
    """A DeepSpeed config as a dict: JSON, or YAML for `.yaml`/`.yml` files."""
    text = path.read_text()
    try:
        data = yaml.safe_load(text) if path.suffix in (".yaml", ".yml") else json.loads(text)
    except (json.JSONDecodeError, yaml.YAMLError) as exc:
        raise SatfuseError(f"{path}: not valid {path.suffix[1:].upper()} ({exc}); fix the syntax") from None
    if not isinstance(data, dict):
        raise SatfuseError(f"{path}: a DeepSpeed config must be a mapping of keys, got {type(data).__name__}")
    return data


def _refuse_owned(raw: dict[str, Any], micro_batch: int, grad_clip: float, where: Path, world: int,
                  gas: int) -> None:
    """A satfuse-owned key in the DeepSpeed file must agree with satfuse's config
    (`micro_batch` is data.batch_size, `grad_clip` optim.grad_clip)."""
    for key, section in OWNED_SECTIONS.items():
        if key in raw:
            raise SatfuseError(
                f"{where}: remove the '{key}' section: the optimizer and LR schedule come from "
                f"the satfuse config ({section}) so that DDP and DeepSpeed train the same recipe"
            )
    mine = {"train_micro_batch_size_per_gpu": micro_batch, "gradient_clipping": float(grad_clip)}
    for key, value in mine.items():
        if key in raw and float(raw[key]) != float(value):
            raise SatfuseError(
                f"{where}: {key}={raw[key]} disagrees with {OWNED_SCALARS[key]}={value}; satfuse's "
                f"config owns it: set {OWNED_SCALARS[key]} (or remove {key} from the file)"
            )
    want = micro_batch * gas * world
    if "train_batch_size" in raw and int(raw["train_batch_size"]) != want:
        raise SatfuseError(
            f"{where}: train_batch_size={raw['train_batch_size']} but data.batch_size "
            f"({micro_batch}) x gradient_accumulation_steps ({gas}) x world size ({world}) "
            f"= {want}; remove train_batch_size from the file (satfuse computes it)"
        )


def _precision_sections(raw: dict[str, Any], precision: str, where: Path) -> dict[str, Any]:
    """bf16/fp16 sections: `enabled` follows train.precision; the file keeps its tuning."""
    out: dict[str, Any] = {}
    for name in ("bf16", "fp16"):
        section = dict(raw.get(name) or {})
        if section.get("enabled") and precision != name:
            raise SatfuseError(
                f"{where}: enables {name} but train.precision={precision}; set "
                f"train.precision={name} or use a file without {name} (e.g. hpc/deepspeed/zero1_fp32.json)"
            )
        section["enabled"] = precision == name
        out[name] = section
    if "amp" in raw and (raw["amp"] or {}).get("enabled"):
        raise SatfuseError(f"{where}: 'amp' (apex) is not supported; use train.precision=bf16 or fp16")
    return out


def _grad_accum_dtype(raw: dict[str, Any], precision: str, where: Path) -> dict[str, Any]:
    """bf16 + ZeRO must accumulate gradients in fp32 (bf16 accumulation diverged: #2352)."""
    types = dict(raw.get("data_types") or {})
    if precision == "bf16":
        if types.get("grad_accum_dtype", "fp32") != "fp32":
            raise SatfuseError(
                f"{where}: data_types.grad_accum_dtype={types['grad_accum_dtype']} with bf16 is "
                "refused (bf16 gradient accumulation diverges, DeepSpeed #2352); use fp32"
            )
        types["grad_accum_dtype"] = "fp32"
    if precision in ("bf16", "fp16"):
        # DeepSpeed casts parameters but keeps buffers fp32; CPU batch_norm refuses bf16
        # weights with fp32 running stats, so the buffers follow the parameters' dtype.
        types.setdefault("buffer_dtype", precision)
    return types


def _zero_section(raw: dict[str, Any], override: int, where: Path, device: torch.device) -> dict[str, Any]:
    zero = dict(raw.get("zero_optimization") or {})
    stage = int(override) if override >= 0 else int(zero.get("stage", 0))
    if stage not in SUPPORTED_STAGES:
        raise SatfuseError(
            f"{where}: ZeRO stage {stage} does not exist; use deepspeed.zero_stage=0, 1, 2 or 3"
        )
    zero["stage"] = stage
    if zero.get("offload_param") and stage != 3:
        raise SatfuseError(f"{where}: zero_optimization.offload_param needs ZeRO-3 (stage is {stage}); remove it")
    if zero.get("offload_param") and device.type != "cuda":
        raise SatfuseError(
            f"{where}: zero_optimization.offload_param moves parameters to the CPU, which is "
            "where a CPU run keeps them already; remove it (it is for GPU runs)"
        )
    if zero.get("offload_optimizer") and device.type != "cuda":
        raise SatfuseError(
            f"{where}: zero_optimization.offload_optimizer moves optimizer state to the CPU, "
            "which is where a CPU run keeps it already; remove it (it is for GPU runs)"
        )
    return zero


def build_ds_config(section: DeepSpeedConfig, optim: OptimConfig, precision: str, micro_batch: int,
                    world: int, device: torch.device) -> dict[str, Any]:
    """The full DeepSpeed config dict of this run (see the module doc for precedence): the
    `deepspeed` section's file and stage, filled with what satfuse owns (`optim`'s clipping and
    optimizer name, train.precision, `micro_batch` = data.batch_size per rank)."""
    where = resolve_ds_config_path(section.config)
    raw = read_ds_file(where)
    check_keys(raw, where)  # a typo would be ignored (top level) or a pydantic traceback (nested)
    for key in PARALLEL_KEYS:
        if raw.get(key):
            raise SatfuseError(
                f"{where}: '{key}' is not supported: the global contrastive loss gathers over the "
                "default process group, which must be DeepSpeed's data-parallel group; remove it"
            )
    gas = int(raw.get("gradient_accumulation_steps", 1))
    if gas < 1:
        raise SatfuseError(f"{where}: gradient_accumulation_steps must be >= 1, got {gas}")
    _refuse_owned(raw, micro_batch, optim.grad_clip, where, world, gas)
    ds = {k: v for k, v in raw.items() if k not in ("train_batch_size",)}
    ds.update(_precision_sections(raw, precision, where))
    ds["data_types"] = _grad_accum_dtype(raw, precision, where)
    ds["zero_optimization"] = _zero_section(raw, section.zero_stage, where, device)
    ds.update(
        train_micro_batch_size_per_gpu=micro_batch,
        gradient_accumulation_steps=gas,
        train_batch_size=micro_batch * gas * world,
        gradient_clipping=float(optim.grad_clip),
    )
    ds.setdefault("steps_per_print", 10**9)  # satfuse logs; DeepSpeed's own prints are noise
    ds.setdefault("wall_clock_breakdown", False)
    ds["checkpoint"] = {**(raw.get("checkpoint") or {}), "load_universal": False}
    if optim.name not in ("adam", "adamw"):
        ds["zero_allow_untested_optimizer"] = True
    return ds


def check_combination(ds: dict[str, Any], device: torch.device, precision: str, optim: OptimConfig,
                      checkpoint: CheckpointConfig) -> None:
    """Refuse, at start, what would fail or silently train something else mid-run: the built
    DeepSpeed config `ds` against train.precision, the optimizer (`optim`) and the checkpoint
    section (async saves)."""
    check_precision(precision, device)
    if precision == "fp16" and device.type != "cuda":
        raise SatfuseError("train.precision=fp16 with DeepSpeed needs CUDA; use bf16 or fp32 on CPU")
    stage = ds["zero_optimization"]["stage"]
    if optim.name == "lars" and stage == 3:
        raise SatfuseError(
            "optim.name=lars with ZeRO stage 3: ZeRO-3 partitions every parameter across ranks, "
            "so LARS cannot see a whole layer for its trust ratio; use optim.name=adam or "
            "optim.name=adamw (or deepspeed.zero_stage=0 for LARS)"
        )
    if optim.name == "lars" and (stage > 0 or precision != "fp32"):
        raise SatfuseError(
            f"optim.name=lars with ZeRO stage {stage} / {precision}: DeepSpeed flattens "
            "parameters into partitions there, so LARS's per-layer trust ratio would be wrong; "
            "use deepspeed.zero_stage=0 with train.precision=fp32, or optim.name=adam/adamw"
        )
    if checkpoint.async_save:
        raise SatfuseError(
            "checkpoint.async_save=true is not supported with train.engine=deepspeed (DeepSpeed "
            "writes its own shards synchronously); set checkpoint.async_save=false"
        )


# --------------------------------------------------------------------------------------------
# process group and accelerator
# --------------------------------------------------------------------------------------------


def ensure_process_group(device: torch.device, timeout_s: int) -> None:
    """DeepSpeed needs a process group even on one rank; satfuse creates none for world
    size 1, and DeepSpeed's own fallback is MPI discovery (mpi4py). A private 1-rank gloo
    group on a free local port avoids both."""
    default_local_rank()  # DeepSpeed asserts LOCAL_RANK is set, even for one rank
    if collectives.dist_ready():
        return
    backend = "nccl" if device.type == "cuda" else "gloo"
    dist.init_process_group(backend, init_method=f"tcp://127.0.0.1:{free_port()}", rank=0,
                            world_size=1, timeout=timedelta(seconds=timeout_s))


def import_deepspeed(device: torch.device):
    """Import DeepSpeed on the accelerator that matches `device` (CPU: DS_ACCELERATOR=cpu)."""
    if device.type == "cpu":
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
    check_build_locks()  # a lock left by a killed JIT build would hang initialize() silently
    import deepspeed  # optional: deepspeed
    from deepspeed.accelerator import get_accelerator  # optional: deepspeed

    accel = get_accelerator().device_name()
    want = "cpu" if device.type == "cpu" else "cuda"
    if not str(accel).startswith(want):
        raise SatfuseError(
            f"DeepSpeed picked the {accel} accelerator but satfuse trains on {device.type}; set "
            f"DS_ACCELERATOR={want} (or train.device={'cuda' if accel.startswith('cuda') else 'cpu'})"
        )
    logging.getLogger("DeepSpeed").setLevel(max(logging.WARNING, log.getEffectiveLevel()))
    return deepspeed


def _cast_floats(obj: Any, dtype: torch.dtype) -> Any:
    if torch.is_tensor(obj):
        return obj.to(dtype) if obj.is_floating_point() else obj
    if isinstance(obj, dict):
        return {k: _cast_floats(v, dtype) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(_cast_floats(v, dtype) for v in obj)
    return obj


def install_input_cast(module: nn.Module, dtype: torch.dtype):
    """Cast the batch to the model's dtype on every forward.

    Why: DeepSpeed's bf16/fp16 keep the whole model in that dtype (fp32 master weights live
    in the optimizer); autocast then runs some ops (batch_norm on CPU) in fp32 against bf16
    weights and fails. A pre-hook on the bare module covers the training forward (through
    the DeepSpeed engine) and the trainer's evaluation, which calls the module directly.
    """
    return module.register_forward_pre_hook(lambda _m, args: _cast_floats(args, dtype))


# --------------------------------------------------------------------------------------------
# the engine
# --------------------------------------------------------------------------------------------


class DeepSpeedEngine(Engine):
    """`Engine` on DeepSpeed ZeRO 0/1/2/3 (fp32, bf16; fp16 on CUDA)."""

    kind = "deepspeed"

    def __init__(self, module: nn.Module, device: torch.device, train: TrainConfig, optim: OptimConfig,
                 checkpoint: CheckpointConfig, deepspeed: DeepSpeedConfig, micro_batch: int) -> None:
        """From its sections, as `DDPEngine` (`train`, `optim`, `checkpoint`), plus `deepspeed`
        (the DeepSpeed file and ZeRO stage) and `micro_batch`, data.batch_size: DeepSpeed's
        `train_micro_batch_size_per_gpu`, which satfuse's config owns (the module doc)."""
        super().__init__(module, device, train.precision)
        self.ds_section = deepspeed
        world = collectives.world()
        self.ds_config = build_ds_config(deepspeed, optim, train.precision, micro_batch, world, device)
        check_combination(self.ds_config, device, train.precision, optim, checkpoint)
        self.gas = int(self.ds_config["gradient_accumulation_steps"])
        ds_lib = import_deepspeed(device)
        ensure_process_group(device, train.comm_timeout_s)
        module.to(device)
        self.optimizer = build_optimizer(module, optim)
        self.accumulation = self.gas  # micro-batches per trainer (= optimizer) step
        self.scheduler = build_scheduler(self.optimizer, optim, train.steps)
        self.model, self.ds_optimizer, _, _ = ds_lib.initialize(
            model=module, optimizer=self.optimizer, lr_scheduler=self.scheduler,
            config=self.ds_config, dist_init_required=False,
        )
        self._check_data_parallel()
        if train.precision != "fp32":
            dtype = torch.bfloat16 if train.precision == "bf16" else torch.float16
            self._cast_hook = install_input_cast(module, dtype)
        self.ckpt = DeepSpeedCheckpointManager.from_config(Path(train.run_dir), checkpoint,
                                                           train.comm_timeout_s, engine=self)
        log.info("DeepSpeed engine: ZeRO stage %d, %s, %d rank(s), gradient accumulation %d",
                 self.zero_stage, train.precision, world, self.gas)

    @classmethod
    def from_sections(cls, module: nn.Module, device: torch.device, train: TrainConfig, optim: OptimConfig,
                      checkpoint: CheckpointConfig, deepspeed: DeepSpeedConfig, micro_batch: int) -> DeepSpeedEngine:
        """Every section `__init__` takes (the `Engine` contract's signature)."""
        return cls(module, device, train, optim, checkpoint, deepspeed, micro_batch)

    @property
    def zero_stage(self) -> int:
        return int(self.ds_config["zero_optimization"]["stage"])

    def _check_data_parallel(self) -> None:
        """The loss gathers over the default group; that is only right if it is the DP group."""
        world = collectives.world()
        dp, mp = int(self.model.dp_world_size), int(self.model.mp_world_size)
        if dp != world or mp != 1:
            raise SatfuseError(
                f"DeepSpeed data-parallel size {dp} (model-parallel {mp}) differs from the world "
                f"size {world}: the global contrastive loss needs pure data parallelism; remove "
                f"tensor/pipeline/sequence parallel settings from {self.ds_section.config}"
            )

    def autocast(self):
        """No autocast: under bf16/fp16 DeepSpeed runs the whole model in that dtype (inputs
        are cast by `install_input_cast`); the loss upcasts to fp32 itself."""
        return contextlib.nullcontext()

    # ------------------------------------------------------------------ step
    def backward_step(self, loss: torch.Tensor,
                      skip: Callable[[torch.Tensor], bool] | None = None) -> float:
        """One micro-batch: DeepSpeed scales by 1/k, reduces, clips, steps and schedules at
        the boundary (every `accumulation`-th call; the trainer makes that one step).

        The grad norm (metrics.jsonl's `grad_norm`, before clipping) is DeepSpeed's, except at
        ZeRO-0 fp32: there DeepSpeed steps our torch optimizer itself and its clipping keeps no
        norm (`get_global_grad_norm()` is None), so the log showed NaN. It is measured here
        instead, after backward's all-reduce at the boundary (every rank holds the averaged
        gradient) and before the step: one more pass over the gradients per optimizer step.

        `skip` is refused: DeepSpeed steps inside its engine, so an update cannot be dropped
        after the reduction (its `EngineKind` says nan_skip=False; the config refuses it first)."""
        if skip is not None:
            raise SatfuseError("train.nan_policy=skip is not supported by train.engine=deepspeed; "
                               "use train.nan_policy=stop")
        boundary = self.model.is_gradient_accumulation_boundary()
        self.model.backward(loss)
        norm: Any = None
        if boundary and not hasattr(self.ds_optimizer, "_global_grad_norm"):  # DeepSpeed's own test
            grads = [p.grad.detach() for p in self.module.parameters() if p.grad is not None]
            # what torch>=2.6's nn.utils.get_total_norm computes, spelled so older torch runs it too
            if grads:
                norm = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g, 2.0) for g in grads]), 2.0)
        self.model.step()
        if boundary and norm is None:
            norm = self.model.get_global_grad_norm()
        return float(norm) if norm is not None else float("nan")

    def lr(self) -> float:
        """The optimizer's current learning rate (satfuse's torch optimizer, stepped by DeepSpeed)."""
        return float(self.optimizer.param_groups[0]["lr"])

    def engine_state(self) -> dict[str, Any]:
        return {"scheduler": self.scheduler.state_dict(), "micro_steps": int(self.model.micro_steps)}

    def load_engine_state(self, state: dict[str, Any]) -> None:
        """The schedule's position (the one source of truth; DeepSpeed's copy is not loaded),
        re-applied to the optimizer so the next step uses the resumed lr."""
        self.scheduler.load_state_dict(state["scheduler"])
        for group, lr in zip(self.optimizer.param_groups, self.scheduler.get_last_lr(), strict=True):
            group["lr"] = lr
        self.model.micro_steps = int(state.get("micro_steps", self.model.micro_steps))

    # ------------------------------------------------------------------ checkpoints
    def before_save(self, step: int) -> None:
        """Warn when a stop signal saves off the accumulation boundary (checked at start)."""
        partial = int(self.model.micro_steps) % self.gas
        if partial:
            log.warning("saving step %d in the middle of gradient accumulation: the partial "
                        "gradients of %d micro-batches are not saved", step, partial)

    def describe(self) -> dict[str, Any]:
        """What meta.json records about the engine (checked again at resume)."""
        import deepspeed  # optional: deepspeed

        return {
            "zero_stage": self.zero_stage,
            "precision": self.precision,
            "dp_world_size": int(self.model.dp_world_size),
            "gradient_accumulation_steps": self.gas,
            "config_file": str(self.ds_section.config),
            "deepspeed_version": deepspeed.__version__,
        }

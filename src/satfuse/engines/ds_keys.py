"""Key checks of a DeepSpeed config file, before DeepSpeed reads it.

Why: DeepSpeed reads its top level with `dict.get(key, default)`, so a typo there
(`zero_optimisation`, `gradient_acumulation_steps`) is silently ignored and the run trains
with the default (ZeRO-0, no accumulation) while reporting success. Its nested sections are
pydantic models that forbid unknown keys, but a typo there ends in a long pydantic
traceback from inside `deepspeed.initialize`. Here both become one line naming the file, the
key path and the closest valid key.

`TOP_LEVEL_KEYS` lists the top-level keys DeepSpeed 0.19 reads (from its `runtime/config.py`,
`runtime/constants.py` and the sub-config modules); a key DeepSpeed adds later and satfuse
does not know yet is refused with this list's closest match, so extend the list then.
"""

from __future__ import annotations

import difflib
import importlib
from pathlib import Path
from typing import Any

from satfuse.utils import SatfuseError

TOP_LEVEL_KEYS = frozenset({
    "activation_checkpointing", "aio", "amp", "autotp_size", "autotuning", "bf16", "bfloat16", "checkpoint",
    "comet", "comms_logger", "communication_data_type", "compile", "compression_training",
    "csv_monitor", "curriculum_learning", "data_efficiency", "data_types", "dataloader_drop_last",
    "disable_allgather", "disable_python_gc", "dump_state", "eigenvalue", "elasticity", "expert_parallel",
    "flops_profiler", "fp16", "gradient_accumulation_steps", "gradient_allreduce_op", "gradient_clipping",
    "gradient_predivide_factor", "graph_harvesting", "hybrid_engine", "managed_gradient_accumulation",
    "memory_breakdown", "nebula", "optimizer", "pipeline", "prescale_gradients", "progressive_layer_drop",
    "quantize_training", "scheduler", "seq_parallel_communication_data_type", "sequence_parallel_size",
    "sparse_attention", "sparse_gradients", "steps_per_print", "tensor_parallel", "tensorboard", "timers",
    "torch_autocast", "train_batch_size", "train_micro_batch_size_per_gpu",
    "use_data_before_expert_parallelism", "vocabulary_size", "wall_clock_breakdown", "wandb",
    "weight_quantization", "zero_allow_untested_optimizer", "zero_force_ds_cpu_optimizer",
    "zero_optimization",
})

# sections DeepSpeed validates with a pydantic model (module, class): checked the same way here
SECTION_MODELS = {
    "zero_optimization": ("deepspeed.runtime.zero.config", "DeepSpeedZeroConfig"),
    "bf16": ("deepspeed.runtime.precision_config", "DeepSpeedBF16Config"),
    "bfloat16": ("deepspeed.runtime.precision_config", "DeepSpeedBF16Config"),
    "fp16": ("deepspeed.runtime.precision_config", "DeepSpeedFP16Config"),
    "comms_logger": ("deepspeed.comm.config", "CommsLoggerConfig"),
    "tensorboard": ("deepspeed.monitor.config", "TensorBoardConfig"),
    "wandb": ("deepspeed.monitor.config", "WandbConfig"),
    "csv_monitor": ("deepspeed.monitor.config", "CSVConfig"),
    "comet": ("deepspeed.monitor.config", "CometConfig"),
}


def closest(key: str, valid: set[str] | frozenset[str]) -> str:
    """' (did you mean X?)' for the nearest valid key, or a short list when none is near."""
    near = difflib.get_close_matches(key, sorted(valid), n=1, cutoff=0.6)
    if near:
        return f"did you mean '{near[0]}'?"
    return f"valid keys: {', '.join(sorted(valid)[:12])}{', ...' if len(valid) > 12 else ''}"


def check_top_level(raw: dict[str, Any], where: Path) -> None:
    """Refuse keys DeepSpeed would silently ignore."""
    for key in raw:
        if key not in TOP_LEVEL_KEYS:
            raise SatfuseError(
                f"{where}: unknown DeepSpeed key '{key}' (DeepSpeed would ignore it and train with its "
                f"default); {closest(str(key), TOP_LEVEL_KEYS)}"
            )


def _field_names(model: Any) -> set[str]:
    names = set()
    for name, info in model.model_fields.items():
        names.add(info.alias or name)
        names.add(name)
    return names


def _model_at(model: Any, path: tuple[Any, ...]) -> Any:
    """The pydantic model class that holds the last key of `path` (for its valid field names)."""
    for part in path[:-1]:
        info = next((i for n, i in model.model_fields.items() if part in (n, i.alias)), None)
        sub = getattr(info, "annotation", None) if info else None
        for cand in (sub, *getattr(sub, "__args__", ())):
            if isinstance(cand, type) and hasattr(cand, "model_fields"):
                model = cand
                break
        else:
            return None
    return model


def check_sections(raw: dict[str, Any], where: Path) -> None:
    """Validate the pydantic-checked sections now: one line naming the key path."""
    for section, (module, name) in SECTION_MODELS.items():
        value = raw.get(section)
        if not isinstance(value, dict):
            continue
        try:
            model = getattr(importlib.import_module(module), name)
        except (ImportError, AttributeError):  # another DeepSpeed version: it will check itself
            continue
        errors = _validation_errors(model, value)
        if not errors:
            continue
        err = errors[0]
        loc = tuple(err.get("loc", ()))
        path = ".".join([section, *(str(p) for p in loc)])
        if err.get("type") == "extra_forbidden" and loc:
            holder = _model_at(model, loc)
            hint = closest(str(loc[-1]), _field_names(holder)) if holder is not None else "remove it"
            raise SatfuseError(f"{where}: unknown DeepSpeed key '{path}'; {hint}")
        got = err.get("input")
        raise SatfuseError(f"{where}: DeepSpeed key '{path}': {err.get('msg', 'invalid')} (got {got!r})")


def _validation_errors(model: Any, value: dict[str, Any]) -> list[dict[str, Any]]:
    try:
        import pydantic  # optional: deepspeed (pydantic comes with it)
    except ImportError:  # pragma: no cover - DeepSpeed depends on pydantic
        return []
    try:
        model(**value)
    except pydantic.ValidationError as exc:
        return list(exc.errors())
    except (TypeError, ValueError) as exc:  # a validator of DeepSpeed's own
        return [{"loc": (), "msg": str(exc).splitlines()[0], "input": value}]
    return []


def check_keys(raw: dict[str, Any], where: Path) -> None:
    """Both checks: top-level names, then the pydantic sections."""
    check_top_level(raw, where)
    check_sections(raw, where)

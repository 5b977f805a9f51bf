"""One config system for every command: dataclasses, loaded from YAML, overridden by `key=value`.

Why dataclasses and not free dicts: a typo in a 200-GPU job's config should fail before the
job is queued, naming the key, not silently fall back to a default. Every section below is a
dataclass; `load_config(Schema, "hpc/pretrain/x.yaml", ["train.steps=100"])` builds it, checks
every key and coerces every value to the field's type.

Overrides use dotted paths (`optim.lr=1e-4`); values are parsed as YAML scalars/lists, so
`data.shards=[a.tar,b.tar]` and `train.precision=bf16` both work.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, TypeVar, get_args, get_origin, get_type_hints

import yaml

from satfuse.checkpoint.resolve import ResumeSpec, parse_resume
from satfuse.registry import BACKBONES, ENGINES, METHODS
from satfuse.resources import SCHEMA_KINDS, resolve_config
from satfuse.utils import ConfigError, atomic_write_text, file_in_the_way

T = TypeVar("T")


# --------------------------------------------------------------------------------------------
# Schemas
# --------------------------------------------------------------------------------------------


@dataclass
class DataConfig:
    """Where the pretraining shards are and how they are streamed."""

    shards: str | list[str] = "shards/sen12ms"  # a shard dir (with manifest.json), a brace URL or a pipe: URL; a list of those mixes sets
    shard_weights: list[float] = field(default_factory=list)  # shares of each epoch per set of a data.shards list (empty: by size)
    manifest: str = ""  # defaults to <shard dir>/manifest.json
    stage_dir: str = ""  # node-local dir ($VARS expanded, e.g. $TMPDIR): each node copies its fixed share there at start and reads only it; empty = off
    val_shards: str = ""  # held-out shards for retrieval accuracy (empty: none)
    batch_size: int = 32  # per rank
    num_workers: int = 1  # loader worker processes per rank (0 = read in the training process)
    shuffle_buffer: int = 256  # raw samples a loader slot holds for shuffling
    crop: int = 128  # random crop size for pretraining (authors: 128); 0 = full patch
    on_decode_error: Literal["skip", "fatal"] = "skip"  # an undecodable sample: skip it (counted, warned) or fail
    # with on_decode_error=skip: fail the run once more than this fraction of the samples read
    # were skipped (undecodable, truncated or altered shards); 0 = any skip fails
    max_skipped_fraction: float = 0.01  # the largest share of skipped samples a run tolerates
    s1_clip: list[float] = field(default_factory=lambda: [-25.0, 0.0])  # S1 dB range kept before normalising
    s2_clip: list[float] = field(default_factory=lambda: [0.0, 10000.0])  # S2 reflectance range kept before normalising


@dataclass
class ModelConfig:
    """Which method and backbone. Sizes follow the authors (ResNet-50, 2048-2048-128 head).

    `method` and `backbone` are names in `satfuse.registry.METHODS` / `BACKBONES` (plugins add
    more), checked by `check_model_names` when the config is validated, not by a Literal here."""

    method: str = "dual_simclr"  # pretraining method, a name in satfuse.registry.METHODS
    backbone: str = "resnet50"  # trunk per modality, a name in satfuse.registry.BACKBONES (tiny: tests and CPU demos)
    proj_hidden: int = 2048  # hidden width of the projection head
    proj_out: int = 128  # embedding size the contrastive loss compares
    sync_bn: bool = False  # BatchNorm statistics over the global batch (SyncBatchNorm; CUDA only)
    activation_checkpointing: bool = False  # recompute backbone activations in backward: less memory, same gradients, more compute (DDP and DeepSpeed)
    simclr_input: Literal["s2_rgb", "s2", "s1s2"] = "s2_rgb"  # SimCLR only
    mma_dim: int = 256  # MMA only: embedding size of the aligned feature maps


def check_model_names(model: ModelConfig) -> None:
    """`model.method` and `model.backbone` name registered entries; an unknown one is refused
    listing the registry's names. Checked by name only (`Registry.require`): the built-ins are
    registered lazily, so a login node's `satfuse submit` validates without importing torch."""
    METHODS.require(model.method)
    BACKBONES.require(model.backbone)


@dataclass
class LossConfig:
    """The global contrastive loss (`satfuse.losses`)."""

    temperature: float = 0.07  # softmax temperature of the logits (authors: 0.07)
    variant: Literal["nt_xent", "infonce"] = "nt_xent"  # infonce = cross-modal terms only
    local_loss: bool = True  # open_clip scheme: logits of local rows vs the global batch


@dataclass
class OptimConfig:
    """Optimizer and LR schedule, the same for both engines (`satfuse.engines.optim`)."""

    name: Literal["adam", "adamw", "lars"] = "adam"  # optimizer (authors: adam)
    lr: float = 3e-5  # base learning rate
    weight_decay: float = 1e-4  # L2 (adam, lars) or decoupled (adamw) weight decay
    betas: list[float] = field(default_factory=lambda: [0.9, 0.999])  # Adam/AdamW moment decays
    momentum: float = 0.9  # LARS only
    schedule: Literal["constant", "cosine"] = "constant"  # LR after warmup, over train.steps optimizer steps
    warmup_steps: int = 0  # linear warmup, in optimizer steps
    min_lr_ratio: float = 0.0  # cosine: the final LR as a fraction of optim.lr
    grad_clip: float = 0.0  # max global gradient norm; 0 = off


@dataclass
class TrainConfig:
    """The training loop (`satfuse.engines.trainer`)."""

    run_dir: str = "runs/pretrain"  # checkpoints, metrics.jsonl, config.yaml and logs of the run
    steps: int = 1000  # total optimizer steps, on both engines (DeepSpeed: each runs its accumulation's micro-batches)
    seed: int = 0  # initial weights and the data order
    precision: Literal["fp32", "bf16", "fp16"] = "fp32"  # compute precision (fp16: CUDA only)
    engine: str = "ddp"  # a name in satfuse.registry.ENGINES: ddp (DDP + DCP checkpoints), deepspeed (ZeRO)
    device: Literal["auto", "cpu", "cuda"] = "auto"  # auto: CUDA when visible
    log_every: int = 10  # metrics (and the NaN check) every N steps
    eval_every: int = 0  # held-out retrieval on data.val_shards every N steps, logged (0 = at the end only)
    max_requeues: int = 5  # SLURM requeues after preemption before the job stops for good
    # A dead peer fails the job after this, never a silent hang. It also bounds the checkpoint
    # collectives: raise it if one rank's checkpoint write can take longer.
    comm_timeout_s: int = 300  # seconds a collective may wait for a peer before the job fails
    # non-finite loss/grad norm: stop (checked on log steps and saves), or skip = drop that step's
    # update on every rank (agreed each step; DDP engine only), failing after nan_skip_limit in a row
    nan_policy: Literal["stop", "skip"] = "stop"  # what a non-finite loss/grad norm does (below)
    nan_skip_limit: int = 10  # nan_policy=skip: stop after this many skipped steps in a row
    # run_dir/.lock: a holder whose heartbeat is older than this is taken to be gone
    lease_timeout_s: int = 600  # seconds after which a silent run_dir lease is taken over
    channels_last: bool = False  # model and 4-D batches in channels_last (NHWC): faster convs on GPU tensor cores
    compile: bool = False  # torch.compile the forward pass (inductor; the first steps compile, DDP engine only)


@dataclass
class CheckpointConfig:
    """Checkpoint cadence, retention and resume."""

    every_steps: int = 100  # save every N optimizer steps (0: only at the end and on a stop signal)
    keep_last: int = 3  # newest complete checkpoints kept
    keep_every: int = 0  # additionally keep every Nth step (0 = none)
    async_save: bool = False  # DDP: write in the background while training goes on
    resume: str = "auto"  # auto (newest complete in run_dir) | none | latest | step_XXXXXXXX or N | PATH
    trust_checkpoint: bool = False  # load checkpoint files that are not plain data (may run their code)
    # resume=none on a used run_dir: move the old run to run_dir/previous-<time>/ (else refuse)
    force_new_run: bool = False  # start afresh in a used run_dir, keeping the old run aside

    @property
    def resume_spec(self) -> ResumeSpec:
        """`resume`, parsed once into its typed value (`satfuse.checkpoint.resolve`): what
        every reader of the setting compares, instead of lower-cased strings of its own."""
        return parse_resume(self.resume)


@dataclass
class DeepSpeedConfig:
    """DeepSpeed engine settings (train.engine=deepspeed)."""

    config: str = "hpc/deepspeed/zero1_fp32.json"  # DeepSpeed JSON/YAML config
    zero_stage: int = -1  # -1: take it from the DeepSpeed config file


@dataclass
class LogConfig:
    """Where run curves go besides metrics.jsonl (written by rank 0 only)."""

    tensorboard: bool = False  # TensorBoard event files under {run_dir}/tensorboard/
    wandb: bool = False  # a Weights & Biases run (offline unless WANDB_MODE says otherwise)
    wandb_project: str = "satfuse"  # W&B project name (used only with log.wandb=true)


@dataclass
class PretrainConfig:
    """Everything `satfuse pretrain` reads, one section per component."""

    data: DataConfig = field(default_factory=DataConfig)  # shards and the streaming loader
    model: ModelConfig = field(default_factory=ModelConfig)  # method, backbone, heads
    loss: LossConfig = field(default_factory=LossConfig)  # the contrastive loss
    optim: OptimConfig = field(default_factory=OptimConfig)  # optimizer and LR schedule
    train: TrainConfig = field(default_factory=TrainConfig)  # the loop, engine, precision
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)  # save cadence and resume
    deepspeed: DeepSpeedConfig = field(default_factory=DeepSpeedConfig)  # DeepSpeed engine only
    log: LogConfig = field(default_factory=LogConfig)  # TensorBoard / W&B


# --------------------------------------------------------------------------------------------
# Loading and overriding
# --------------------------------------------------------------------------------------------


def load_config(schema: type[T], path: str | Path | None = None, overrides: list[str] | None = None,
                kind: str | None = None) -> T:
    """Build `schema` from a YAML file or packaged name (optional) and `key=value` overrides, strictly.

    `kind` says where a bare name is looked up (see `satfuse.resources`); by default the
    schema's own kind (PretrainConfig -> hpc/pretrain, ...).
    """
    raw: dict[str, Any] = {}
    where = "command line"
    if path:
        resolved = resolve_config(path, kind or SCHEMA_KINDS.get(schema.__name__))
        raw, where = read_yaml(resolved), str(resolved)
    for item in overrides or []:
        apply_override(schema, raw, item)
    return from_dict(schema, raw, where=where)


def apply_override(schema: type, raw: dict[str, Any], item: str) -> None:
    """Parse `key=value`, check the key and the value's type against `schema`, then set it in
    `raw`. Why the value is checked here: once merged into the YAML's dict, a bad value would be
    reported against the YAML file, which is not where the mistake is."""
    key, value = parse_override(item)
    tp = check_override_key(schema, key, item)
    if tp is not None:
        coerce(tp, value, f"command line (override {item!r})", key)
    set_dotted(raw, key, value)


class _UniqueKeyLoader(yaml.SafeLoader):
    """PyYAML's safe loader, refusing a key given twice in one mapping (PyYAML keeps the last
    silently, so a second `train:` section would drop the first without a word)."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
        seen: dict[Any, int] = {}
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=True)  # type: ignore[no-untyped-call]
            try:
                first = seen.get(key)
            except TypeError:  # an unhashable key: PyYAML's own error follows
                continue
            line = key_node.start_mark.line + 1
            if first is not None:
                raise _DuplicateKey(key, first, line)
            seen[key] = line
        return super().construct_mapping(node, deep=deep)


class _DuplicateKey(Exception):
    def __init__(self, key: Any, first: int, second: int) -> None:
        super().__init__(key, first, second)
        self.key, self.first, self.second = key, first, second


def read_yaml(path: str | Path, kind: str | None = None) -> dict[str, Any]:
    """A YAML mapping from a file or a packaged config name (`kind` narrows where names are looked up).

    A key given twice in one mapping (e.g. two `data:` sections) is refused, naming both lines."""
    p = resolve_config(path, kind)
    try:
        data = yaml.load(p.read_text(), Loader=_UniqueKeyLoader) or {}  # noqa: S506 - a SafeLoader subclass
    except _DuplicateKey as dup:
        raise ConfigError(f"{p}: key {dup.key!r} is given twice (lines {dup.first} and {dup.second}), and only one "
                          "would be used; merge them into one") from None
    except yaml.YAMLError as exc:
        raise ConfigError(f"{p}: not valid YAML ({exc.__class__.__name__}); fix the syntax") from exc
    if not isinstance(data, dict):
        raise ConfigError(f"{p}: top level must be a mapping of sections, got {type(data).__name__}")
    return data


def parse_override(item: str) -> tuple[str, Any]:
    if "=" not in item:
        raise ConfigError(f"override {item!r} is not key=value (e.g. train.steps=100)")
    key, text = item.split("=", 1)
    key = key.strip()
    if not key:
        raise ConfigError(f"override {item!r} has an empty key")
    try:
        value = yaml.safe_load(text) if text != "" else ""
    except yaml.YAMLError:
        value = text
    return key, value


def check_override_key(schema: type, key: str, item: str) -> Any:
    """An override's key must exist in the schema: reported as a command-line error (the
    YAML file is not where the typo is). Returns the key's annotated type (None when the key
    goes past a value: set_dotted/coerce report it)."""
    node: Any = schema
    parts = key.split(".")
    for i, part in enumerate(parts):
        if not dataclasses.is_dataclass(node):
            return None  # a value, not a section: set_dotted/coerce report it
        names = {f.name for f in dataclasses.fields(node)}
        if part not in names:
            where = ".".join(parts[:i]) or "top level"
            raise ConfigError(
                f"command line: unknown key {'.'.join(parts[: i + 1])} (in override {item!r}); "
                f"valid keys in {where}: {', '.join(sorted(names))}"
            )
        node = get_type_hints(node)[part]
    return node


def set_dotted(raw: dict[str, Any], key: str, value: Any) -> None:
    parts = key.split(".")
    node = raw
    for part in parts[:-1]:
        nxt = node.setdefault(part, {})
        if not isinstance(nxt, dict):
            raise ConfigError(f"override {key}: {part} is a value, not a section")
        node = nxt
    node[parts[-1]] = value


def from_dict(schema: type[T], raw: dict[str, Any], where: str = "config", prefix: str = "") -> T:
    """Strictly convert a nested dict to the dataclass `schema`."""
    if not isinstance(raw, dict):
        raise ConfigError(f"{where}: {prefix or 'top level'} must be a mapping, got {raw!r}")
    hints = get_type_hints(schema)
    names = {f.name for f in dataclasses.fields(schema)}  # type: ignore[arg-type]
    unknown = sorted(set(raw) - names)
    if unknown:
        dotted = ", ".join(f"{prefix}{k}" for k in unknown)
        valid = ", ".join(sorted(names))
        raise ConfigError(f"{where}: unknown key {dotted}; valid keys here: {valid}")
    kwargs = {}
    for name, value in raw.items():
        kwargs[name] = coerce(hints[name], value, where, f"{prefix}{name}")
    return schema(**kwargs)


def coerce(tp: Any, value: Any, where: str, key: str) -> Any:
    """Check/convert one value to the annotated type; fail naming the key."""
    origin = get_origin(tp)
    if dataclasses.is_dataclass(tp):
        return from_dict(tp, value, where, prefix=f"{key}.")
    if origin is Literal:
        choices = get_args(tp)
        if value not in choices:
            raise ConfigError(f"{where}: {key}={value!r} is not one of {list(choices)}")
        return value
    if origin in (typing.Union, types.UnionType):
        args = [a for a in get_args(tp) if a is not type(None)]
        if value is None:
            return None
        if isinstance(value, (list, tuple)):  # `str | list[str]`: a list takes the list alternative
            listed = [a for a in args if get_origin(a) is list]
            if listed:
                return coerce(listed[0], value, where, key)
        return coerce(args[0], value, where, key)
    if origin is list:
        (item_tp,) = get_args(tp) or (Any,)
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{where}: {key} must be a list, got {value!r}")
        return [coerce(item_tp, v, where, key) for v in value]
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{where}: {key} must be a mapping, got {value!r}")
        return dict(value)
    if tp is Any:
        return value
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise ConfigError(f"{where}: {key} must be true or false, got {value!r}")
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{where}: {key} must be an integer, got {value!r}")
        return value
    if tp is float:
        if isinstance(value, str):  # PyYAML reads `1e-3` (no dot) as a string
            with contextlib.suppress(ValueError):
                value = float(value)
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{where}: {key} must be a number, got {value!r}")
        if not math.isfinite(value):  # every float field: NaN passes every range check, inf trains nonsense
            raise ConfigError(f"{where}: {key}={value!r} is not a finite number; give a finite value "
                              "(or drop the key for its default)")
        return float(value)
    if tp is str:
        if isinstance(value, (dict, list)):
            raise ConfigError(f"{where}: {key} must be a string, got {value!r}")
        return "" if value is None else str(value)
    return value


# (dotted key, lower bound, inclusive?, upper bound or None): what a pretraining run accepts.
PRETRAIN_RANGES: tuple[tuple[str, float, bool, float | None], ...] = (
    ("data.batch_size", 1, True, None),
    ("data.num_workers", 0, True, None),
    ("data.shuffle_buffer", 1, True, None),
    ("data.crop", 0, True, None),
    ("data.max_skipped_fraction", 0, True, 1),
    ("loss.temperature", 0, False, None),
    ("optim.lr", 0, True, None),
    ("optim.weight_decay", 0, True, None),
    ("optim.momentum", 0, True, None),
    ("optim.warmup_steps", 0, True, None),
    ("optim.min_lr_ratio", 0, True, 1),
    ("optim.grad_clip", 0, True, None),
    ("train.steps", 1, True, None),
    ("train.log_every", 1, True, None),
    ("train.eval_every", 0, True, None),
    ("train.nan_skip_limit", 1, True, None),
    ("train.comm_timeout_s", 1, True, None),
    ("train.lease_timeout_s", 10, True, None),
    ("checkpoint.every_steps", 0, True, None),
)


def validate_pretrain(cfg: Any) -> None:
    """Ranges, not only types, checked before any process group or file exists: a negative
    lr would otherwise surface as torch's ValueError on every rank, `train.steps=0` as a
    checkpoint of untrained weights, an empty run_dir as files in the current directory."""
    check_model_names(cfg.model)
    for key, low, inclusive, high in PRETRAIN_RANGES:
        section, name = key.split(".")
        value = getattr(getattr(cfg, section), name)
        bad = value < low if inclusive else value <= low
        if bad or (high is not None and value > high):
            bound = f">= {low}" if inclusive else f"> {low}"
            if high is not None:
                bound += f" and <= {high}"
            extra = " (there is nothing to train with 0 steps)" if key == "train.steps" else ""
            raise ConfigError(f"config: {key}={value!r} is out of range: it must be {bound}{extra}")
    if any(not 0 <= b < 1 for b in cfg.optim.betas) or len(cfg.optim.betas) != 2:
        raise ConfigError(f"config: optim.betas={cfg.optim.betas!r}: give two numbers in [0, 1), e.g. [0.9, 0.999]")
    if cfg.checkpoint.force_new_run and cfg.checkpoint.resume_spec.kind != "none":
        raise ConfigError(f"config: checkpoint.force_new_run=true needs checkpoint.resume=none (got "
                          f"{cfg.checkpoint.resume!r}): it is for a fresh start in a used run_dir")
    if cfg.train.eval_every and not cfg.data.val_shards:
        raise ConfigError(f"config: train.eval_every={cfg.train.eval_every} needs data.val_shards (held-out "
                          "shards to evaluate on); set data.val_shards or train.eval_every=0")
    ENGINES.get(cfg.train.engine).check_config(cfg.train.engine, cfg.train)  # the engine's own refusals
    if not str(cfg.train.run_dir).strip():
        raise ConfigError("config: train.run_dir is empty; give the run's directory, e.g. train.run_dir=runs/my_run")
    run_dir = Path(cfg.train.run_dir)
    what = file_in_the_way(run_dir)
    if what:
        raise ConfigError(f"{run_dir}: train.run_dir {what}, not a directory; "
                          "pick another train.run_dir (or move the file away)")


def to_dict(cfg: Any) -> dict[str, Any]:
    """Plain nested dict (for saving beside checkpoints and in logs)."""
    return dataclasses.asdict(cfg)


def dump_yaml(cfg: Any, path: str | Path) -> None:
    """Write the resolved config atomically, so a run dir always says what ran."""
    atomic_write_text(Path(path), yaml.safe_dump(to_dict(cfg), sort_keys=False))

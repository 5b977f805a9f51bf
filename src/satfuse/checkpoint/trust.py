"""What satfuse trusts when it reads a checkpoint: data loads, code needs `--trust-checkpoint`.

Why: a pickle can run any code while it loads (an object's `__reduce__`), and checkpoints
get shared (a colleague's `runs/.../checkpoints/step_X`, a download). So every file satfuse
reads from a checkpoint directory is read as plain data, and a file that is not plain data
is refused, naming it, unless the user says they trust it:

- satfuse's own files (`rank_XXXXX.pt`: step, loader position, RNG, schedule, scaler) hold
  only dicts, lists, numbers, strings and tensors: `torch.load(weights_only=True)`, no
  fallback.
- DCP's `.metadata` is a pickle by PyTorch's design (read with plain `pickle.load` by DCP's
  stock reader, and in a framing torch's weights-only unpickler cannot parse). satfuse reads
  it with a restricted unpickler that resolves only DCP's own metadata classes, torch.Size,
  torch dtypes/layouts and `pathlib` paths (`read_dcp_metadata`); anything else is refused.
- DeepSpeed's files (`mp_rank_00_model_states.pt`, `*_optim_states.pt`) are `torch.load`ed by
  DeepSpeed with `weights_only=False`. satfuse forces them through torch's weights-only
  unpickler (`TORCH_FORCE_WEIGHTS_ONLY_LOAD`) with four inert DeepSpeed classes allowed
  (`DEEPSPEED_SAFE_GLOBALS`: a loss-scaler record, an enum, a named tuple). No directory
  counts as "own": the run_dir being resumed is read exactly like a downloaded one, because
  a path or a file's owner says nothing about who crafted its bytes.

`--trust-checkpoint` (`checkpoint.trust_checkpoint=true` for `satfuse pretrain`,
`model.trust_checkpoint=true` for `satfuse finetune`) lifts the refusal knowingly: the file
is then loaded with full unpickling, with a warning naming it. Exports (`satfuse ckpt
export`) are tensors and JSON-like values only and are always read with `weights_only=True`.
"""

from __future__ import annotations

import collections
import contextlib
import importlib
import logging
import os
import pathlib
import pickle
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from torch.distributed.checkpoint import FileSystemReader
from torch.distributed.checkpoint import filesystem as dcp_filesystem
from torch.distributed.checkpoint import metadata as dcp_metadata

from satfuse.checkpoint.layout import rank_file
from satfuse.utils import SatfuseError

log = logging.getLogger(__name__)

TRUST_FLAG = "--trust-checkpoint"
PRETRAIN_KEY = "checkpoint.trust_checkpoint"
FINETUNE_KEY = "model.trust_checkpoint"

# DeepSpeed classes found in its ZeRO-1/2 (fp32, bf16) optimizer files: plain records, an enum
# and a named tuple; none runs code when rebuilt from its state.
DEEPSPEED_SAFE_GLOBALS = (
    "deepspeed.runtime.fp16.loss_scaler:LossScaler",
    "deepspeed.runtime.fp16.loss_scaler:DynamicLossScaler",
    "deepspeed.utils.tensor_fragment:fragment_address",
    "deepspeed.runtime.zero.config:ZeroStageEnum",
)


def refusal(path: Path | str, why: str) -> SatfuseError:
    """The one-line error for a file that is not plain data, with the one way to trust it."""
    return SatfuseError(
        f"{path}: refused: {why}, so loading it could run code hidden in it; if you trust "
        f"whoever wrote it, pass {TRUST_FLAG} ({PRETRAIN_KEY}=true for `satfuse pretrain`), "
        "otherwise ask for an export (`satfuse ckpt export`), which is plain data"
    )


def reason(exc: BaseException) -> str:
    """The useful line of torch's long weights-only error ("Unsupported global: GLOBAL x.y")."""
    text = str(exc)
    found = re.search(r"GLOBAL ([\w.]+)", text)
    if found:
        return f"it holds Python objects, not only tensors and containers (GLOBAL {found.group(1)})"
    first = text.strip().splitlines()[0][:200] if text.strip() else type(exc).__name__
    return f"it is not plain data ({first})"


def warn_trusted(path: Path | str) -> None:
    log.warning("%s: loading with full unpickling because of %s: it runs whatever code the file "
                "holds", path, TRUST_FLAG)


def load_torch_file(path: Path, trust: bool = False) -> Any:
    """`torch.load(weights_only=True)`; a file that needs more is refused unless `trust`."""
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        if not trust:
            raise refusal(path, reason(exc)) from None
    warn_trusted(path)
    return torch.load(path, map_location="cpu", weights_only=False)


# -------------------------------------------------------------------------------------------
# DCP's .metadata
# -------------------------------------------------------------------------------------------

_DCP_CLASSES = {
    ("torch.distributed.checkpoint.metadata", name): getattr(dcp_metadata, name)
    for name in ("Metadata", "MetadataIndex", "StorageMeta", "TensorProperties", "TensorStorageMetadata",
                 "ChunkStorageMetadata", "BytesStorageMetadata", "_MEM_FORMAT_ENCODING")
    if hasattr(dcp_metadata, name)
}
_DCP_CLASSES[("torch.distributed.checkpoint.filesystem", "_StorageInfo")] = dcp_filesystem._StorageInfo
_DCP_CLASSES[("torch", "Size")] = torch.Size
_DCP_CLASSES[("pathlib", "PosixPath")] = pathlib.PosixPath
_DCP_CLASSES[("pathlib", "WindowsPath")] = pathlib.PureWindowsPath
_DCP_CLASSES[("pathlib", "PurePosixPath")] = pathlib.PurePosixPath
_DCP_CLASSES[("collections", "OrderedDict")] = collections.OrderedDict
if hasattr(torch.serialization, "_get_layout"):
    _DCP_CLASSES[("torch.serialization", "_get_layout")] = torch.serialization._get_layout


class _MetadataUnpickler(pickle.Unpickler):
    """Resolves only DCP's metadata classes and inert torch values (dtypes, layouts)."""

    def find_class(self, module: str, name: str) -> Any:
        found = _DCP_CLASSES.get((module, name))
        if found is not None:
            return found
        if module == "torch" and isinstance(getattr(torch, name, None), (torch.dtype, torch.layout,
                                                                          torch.memory_format)):
            return getattr(torch, name)
        raise pickle.UnpicklingError(f"Unsupported global: GLOBAL {module}.{name}")


def read_dcp_metadata(path: Path, trust: bool = False) -> Any:
    """DCP's `.metadata` through the restricted unpickler (full pickle only if `trust`)."""
    with open(path, "rb") as fh:
        try:
            return _MetadataUnpickler(fh).load()
        except (pickle.UnpicklingError, AttributeError, TypeError, EOFError) as exc:
            if not trust:
                raise refusal(path, reason(exc)) from None
        warn_trusted(path)
        fh.seek(0)
        return pickle.load(fh)  # noqa: S301 - the user passed --trust-checkpoint


class SafeFileSystemReader(FileSystemReader):
    """DCP's FileSystemReader with `.metadata` read by `read_dcp_metadata` (its tensors are
    already read with `weights_only=True` by DCP)."""

    trust: bool = False

    def read_metadata(self, *args: Any, **kwargs: Any) -> Any:
        path = self._get_metadata_path(kwargs.get("rank"))
        metadata = read_dcp_metadata(Path(path), trust=self.trust)
        if getattr(metadata, "storage_meta", None) is None:
            metadata.storage_meta = dcp_metadata.StorageMeta()
        metadata.storage_meta.load_id = self.load_id
        return metadata


# -------------------------------------------------------------------------------------------
# DeepSpeed's files
# -------------------------------------------------------------------------------------------


def deepspeed_safe_globals() -> list[Any]:
    out = []
    for spec in DEEPSPEED_SAFE_GLOBALS:
        mod, _, name = spec.partition(":")
        with contextlib.suppress(ImportError, AttributeError):  # another DeepSpeed version
            out.append(getattr(importlib.import_module(mod), name))
    return out


def deepspeed_files(ckpt_dir: Path) -> list[Path]:
    return sorted(Path(ckpt_dir).glob("*_states.pt"))


def check_deepspeed_files(ckpt_dir: Path, trust: bool = False) -> None:
    """Refuse, naming the file, a DeepSpeed file holding anything beyond the allowed classes.

    The scan reads the pickle's opcodes without running them; the loads themselves then run
    under `deepspeed_weights_only()`, which is what actually keeps code from running.
    """
    if trust:
        return
    allowed = {f"{g.__module__}.{g.__qualname__}" for g in deepspeed_safe_globals()}
    for path in deepspeed_files(ckpt_dir):
        try:
            unsafe = [g for g in torch.serialization.get_unsafe_globals_in_checkpoint(path) if g not in allowed]
        except (pickle.UnpicklingError, RuntimeError, ValueError) as exc:
            raise refusal(path, reason(exc)) from None
        if unsafe:
            raise refusal(path, f"it holds Python objects beyond DeepSpeed's plain records ({', '.join(unsafe[:5])})")


@contextlib.contextmanager
def deepspeed_weights_only(trust: bool = False) -> Iterator[None]:
    """Every `torch.load` inside (DeepSpeed's, which pass weights_only=False) runs weights-only
    with DeepSpeed's inert classes allowed; a no-op when the user trusts the checkpoint."""
    if trust:
        yield
        return
    key = "TORCH_FORCE_WEIGHTS_ONLY_LOAD"
    before = os.environ.get(key)
    os.environ[key] = "1"
    try:
        with torch.serialization.safe_globals(deepspeed_safe_globals()):
            yield
    finally:
        if before is None:
            os.environ.pop(key, None)
        else:
            os.environ[key] = before


def unpickling_cause(exc: BaseException) -> pickle.UnpicklingError | None:
    """The pickle refusal somewhere in an exception's chain (DeepSpeed wraps its loads)."""
    seen = 0
    cur: BaseException | None = exc
    while cur is not None and seen < 20:
        if isinstance(cur, pickle.UnpicklingError):
            return cur
        cur = cur.__cause__ or cur.__context__
        seen += 1
    return None


def load_rank_files(ckpt_dir: Path, world_size: int, trust: bool = False) -> list[Any]:
    """Every `rank_XXXXX.pt` of a checkpoint, loaded as data (refused, naming the file, when
    it is not); commands that never need the rank states still check them, so a checkpoint
    with one crafted file is refused as a whole everywhere, not only on resume."""
    return [load_torch_file(Path(ckpt_dir) / rank_file(r), trust) for r in range(int(world_size))
            if (Path(ckpt_dir) / rank_file(r)).is_file()]


def foreign_owner(ckpt_dir: Path) -> int | None:
    """The uid of another user owning a file of `ckpt_dir` (None: all are this user's).

    "Own" for the fine-tuning warning: every file of the directory belongs to the current
    user. A colleague's directory on a shared filesystem is foreign; a copy the user made is
    theirs by this rule, which is why nothing is *loaded* differently for own directories."""
    me = os.geteuid()
    for p in [Path(ckpt_dir), *Path(ckpt_dir).iterdir()]:
        with contextlib.suppress(OSError):
            uid = p.stat().st_uid
            if uid != me:
                return uid
    return None

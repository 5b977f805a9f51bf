"""The checkpoint backend contract: what a backend (DCP, DeepSpeed, the next one) provides, so
that the commit protocol (`satfuse.checkpoint.protocol`) never needs to know its files.

A backend writes its files into the directory `begin()` hands it, reports what it wrote to
`finish()` (each rank its own files: the protocol hashes nothing another rank wrote), and
says which files every complete checkpoint of its kind must list (`required_files`, checked
by `layout.checkpoint_problems`). It is registered under its `kind`, the word meta.json
records, in `satfuse.registry.CHECKPOINT_BACKENDS`; resume, `ckpt inspect/export` and
verification look the backend up by that word.

Adding a checkpoint backend: one module with a `CheckpointBackend` subclass (a `kind`, the
members below) and `CHECKPOINT_BACKENDS.register(kind, TheClass)` in it; an engine then
builds it (`from_config`) and hands its `app_state()` to `save`/`load`. A module outside
src/ joins through `SATFUSE_PLUGINS` (tests/extensions/ckpt_text_backend.py does).
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

from torch import nn

from satfuse.checkpoint.layout import META_NAME, read_meta, recorded_kind
from satfuse.checkpoint.protocol import CommitProtocol
from satfuse.registry import CHECKPOINT_BACKENDS
from satfuse.utils import SatfuseError

if TYPE_CHECKING:
    from satfuse.config import CheckpointConfig

# what builds the pretraining model a checkpoint describes, from its meta.json (export)
Builder = Callable[[dict[str, Any]], nn.Module]


class CheckpointBackend(CommitProtocol, ABC):
    """One way of writing a training state into a step directory, inside the commit protocol.

    Every instance method is collective when a process group is up (all ranks, same order).
    """

    kind: ClassVar[str]  # recorded in meta.json; the key of CHECKPOINT_BACKENDS
    # how messages name the engine that saves with this backend ("not DDP")
    label: ClassVar[str] = ""
    # True: `load` checks the crc32s itself while reading (so `find_resume("auto")` may skip
    # them, see `CommitProtocol.find_resume`); False: they are checked before the load
    verifies_while_loading: ClassVar[bool] = False

    @classmethod
    @abstractmethod
    def from_config(cls, run_dir: Path, section: CheckpointConfig, timeout_s: float,
                    **engine: Any) -> CheckpointBackend:
        """The backend of the `checkpoint` config section for `run_dir`; `timeout_s` bounds
        its collectives (`train.comm_timeout_s`); `engine`: what this backend needs of the
        engine that saves with it (DeepSpeed: `engine=` the DeepSpeedEngine)."""

    @classmethod
    @abstractmethod
    def required_files(cls, meta: dict[str, Any]) -> list[str]:
        """The backend files every complete checkpoint of this kind lists in meta.json (the
        rank files are the protocol's and not named here); `meta` is the checkpoint's
        meta.json, so the list may depend on what was recorded (world size, ZeRO stage)."""

    @classmethod
    @abstractmethod
    def claims(cls, path: Path) -> bool:
        """Whether the directory `path`, which has no meta.json, is a checkpoint of this
        kind written outside satfuse (so `ckpt inspect/export` take it as a step directory
        and say what is missing, instead of looking for a run around it)."""

    @classmethod
    @abstractmethod
    def load_model(cls, ckpt_dir: Path, builder: Builder, trust: bool = False
                   ) -> tuple[nn.Module, dict[str, Any]]:
        """The exporter: (model built by `builder` from meta.json with the weights of the
        step directory `ckpt_dir`, meta), in this one process without a process group.
        Verifies the checkpoint first; `trust` (--trust-checkpoint): read files that are not
        plain data anyway (`satfuse.checkpoint.trust`)."""

    @classmethod
    def check_files(cls, ckpt_dir: Path, trust: bool = False) -> None:  # noqa: B027 - optional hook
        """Refuse (a SatfuseError naming the file) a backend file that is not plain data,
        unless `trust`; `ckpt inspect` calls it before reading anything. The default checks
        nothing: a backend whose files are read as data when loaded needs no check of its own."""

    @abstractmethod
    def save(self, step: int, app_state: dict[str, Any], rank_state: dict[str, Any],
             meta: dict[str, Any]) -> Path:
        """Write checkpoint `step` and return its final directory (committed when this
        returns, unless the backend saves asynchronously: then by `wait()`).

        `app_state`: the engine's model (+ optimizer) as `state.ModelOptimState`s: what
        must be restored and what the model fingerprint is taken from; `rank_state`: this
        rank's small state that does not reshard (loader position, RNG, schedule), written
        to its rank file; `meta`: added to meta.json."""

    @abstractmethod
    def load(self, path: Path, app_state: dict[str, Any]) -> tuple[list[dict[str, Any]], dict[str, Any]]:
        """Restore checkpoint `path` into `app_state` and return (rank states of every rank
        of the saving run, in rank order; meta). Refuses a checkpoint of another kind or
        model. Sets `loaded_path` to what it loaded (a damaged `path` may make it load the
        newest intact checkpoint instead)."""

    def wait(self) -> Path | None:
        """Commit an in-flight asynchronous save (its path; None when there is none)."""
        return None

    def close(self) -> None:
        """Commit anything pending and free the backend's buffers (end of training)."""
        self.wait()

    def check_kind(self, path: Path, meta: dict[str, Any]) -> None:
        """Refuse a checkpoint another backend wrote, naming the engine that resumes it (the
        other backend would only fail on files it does not know, with tracebacks)."""
        kind = recorded_kind(meta)
        if kind != self.kind:
            engine = meta.get("engine") or kind
            raise SatfuseError(f"{path}: written by the {engine} engine, not {self.label or self.kind}; "
                               f"resume it with train.engine={engine}, or start a new run_dir")


def backend_of(ckpt_dir: Path) -> type[CheckpointBackend]:
    """The backend of a step directory: by meta.json's recorded kind, else the one that
    claims the directory (a checkpoint written without satfuse, refused by its loader)."""
    ckpt_dir = Path(ckpt_dir)
    if not ckpt_dir.is_dir():
        raise SatfuseError(f"{ckpt_dir}: not a checkpoint directory; pass a step_XXXXXXXX directory")
    if (ckpt_dir / META_NAME).is_file():
        kind = recorded_kind(read_meta(ckpt_dir))  # a damaged meta.json is named as such
    else:
        claimed = [name for name, backend in CHECKPOINT_BACKENDS.items() if backend.claims(ckpt_dir)]
        if not claimed:
            raise SatfuseError(
                f"{ckpt_dir}: neither a satfuse checkpoint ({META_NAME}) nor one a checkpoint backend "
                f"({', '.join(CHECKPOINT_BACKENDS.names())}) recognises; pass a step_XXXXXXXX "
                "directory from `satfuse ckpt ls RUN_DIR`")
        kind = claimed[0]
    return CHECKPOINT_BACKENDS.get(kind)

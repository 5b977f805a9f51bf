"""The DCP checkpoint backend (DDP runs): `CheckpointManager` writes and reads the model and
optimizer with torch.distributed.checkpoint through `dcp_storage`, inside the commit protocol
of `satfuse.checkpoint.protocol` (temp directory, meta.json last, rename, `latest`, prune);
registered as checkpoint kind "dcp" (`satfuse.checkpoint.backend` is the contract).

- `save()`: every rank writes its part of model/optimizer (DCP) and its own non-reshardable
  state (`rank_XXXXX.pt`: loader position, RNG) into the temp directory; the protocol commits.
  With `async_save` the write runs in a background thread and is committed by the next
  `save()` or by `wait()`.
- `load()`: refuses a checkpoint of another model (listing the differing keys), loads DCP
  state into the current world size (DCP reshards), and returns the rank states of ALL
  ranks of the saving run, so a loader can continue the epoch on a different world size.
  A checkpoint `find_resume("auto", checksums=False)` chose is verified while it loads
  (`satfuse.checkpoint.overlap`), with the fallback to an intact one if it is damaged.
"""

from __future__ import annotations

import logging
import time
import warnings
from concurrent.futures import Future
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
import torch.distributed.checkpoint as dcp
from torch import nn
from torch.distributed.checkpoint.api import CheckpointException
from torch.distributed.checkpoint.staging import DefaultStager, StagingOptions

from satfuse.checkpoint.backend import Builder, CheckpointBackend
from satfuse.checkpoint.dcp_storage import DCP_METADATA, Crc32Writer, MmapReader
from satfuse.checkpoint.export import load_dcp_model
from satfuse.checkpoint.layout import rank_file, read_meta
from satfuse.checkpoint.overlap import Verifier, agree
from satfuse.checkpoint.protocol import Staged, remove_tree
from satfuse.checkpoint.state import (
    MISMATCH_FIX,
    fingerprint,
    load_rank_state,
    short_error,
    to_plain,
    write_rank_state,
)
from satfuse.checkpoint.trust import read_dcp_metadata
from satfuse.distributed.collectives import dist_ready, rank, world
from satfuse.registry import CHECKPOINT_BACKENDS
from satfuse.utils import SatfuseError

if TYPE_CHECKING:
    from satfuse.config import CheckpointConfig

log = logging.getLogger(__name__)
# One process without a process group is a supported mode here (tests, export, 1-GPU runs);
# DCP warns about it on every call, also from the async-save thread.
warnings.filterwarnings("ignore", message="torch.distributed is disabled, unavailable or uninitialized")


@dataclass
class _Pending:
    """An async save whose DCP write is still running; committed by `wait()`."""

    staged: Staged
    future: Future
    local_error: str | None = None
    written: dict[str, dict[str, Any]] = field(default_factory=dict)  # filled by the writer thread
    started: float = field(default_factory=time.perf_counter)


@CHECKPOINT_BACKENDS.register("dcp")
class CheckpointManager(CheckpointBackend):
    """Saves, finds and loads the DCP checkpoints of one run directory (see `CommitProtocol`
    for keep_last, keep_every, every_steps, timeout_s, trust).

    async_save: `save()` returns after staging a copy of the state; the write runs in a
    background thread and is committed (meta.json, rename, `latest`) by the next `save()`
    or by `wait()`, which the trainer calls before it exits.
    """

    kind = "dcp"
    label = "DDP"
    verifies_while_loading = True  # `checkpoint.overlap`: crc32s checked while DCP reads

    def __init__(self, run_dir: Path, keep_last: int = 3, keep_every: int = 0,
                 async_save: bool = False, timeout_s: float = 1800.0, trust: bool = False,
                 every_steps: int = 0) -> None:
        super().__init__(run_dir, keep_last=keep_last, keep_every=keep_every, timeout_s=timeout_s,
                         trust=trust, every_steps=every_steps)
        self.async_save = async_save
        self._pending: _Pending | None = None
        self._stager: DefaultStager | None = None
        self.last_save_seconds: float = 0.0  # blocking time of the last save() call

    @classmethod
    def from_config(cls, run_dir: Path, section: CheckpointConfig, timeout_s: float,
                    **engine: Any) -> CheckpointManager:
        """The manager of the `checkpoint` config section (needs nothing of its engine)."""
        return cls(run_dir, async_save=section.async_save, **cls.config_kwargs(section, timeout_s))

    @classmethod
    def required_files(cls, meta: dict[str, Any]) -> list[str]:
        """DCP's `.metadata` (the index without which no shard can be read)."""
        return [DCP_METADATA]

    @classmethod
    def claims(cls, path: Path) -> bool:
        """A torch.distributed.checkpoint directory: it has DCP's `.metadata`."""
        return (Path(path) / DCP_METADATA).is_file()

    @classmethod
    def load_model(cls, ckpt_dir: Path, builder: Builder, trust: bool = False
                   ) -> tuple[nn.Module, dict[str, Any]]:
        """`export.load_dcp_model`: DCP's reader in one process, no process group."""
        return load_dcp_model(ckpt_dir, builder, trust)

    @staticmethod
    def _written(tmp: Path, me: int, records: dict[str, dict[str, Any]]) -> dict[str, dict[str, Any] | None]:
        """This rank's files for the commit: its shards (records taken while writing; a shard
        another writer wrote is hashed by this rank) and, on rank 0, DCP's `.metadata`."""
        written: dict[str, dict[str, Any] | None] = {p.name: None for p in tmp.glob(f"__{me}_*.distcp")}
        if me == 0 and (tmp / DCP_METADATA).exists():
            written[DCP_METADATA] = None
        return {**written, **records}

    # --------------------------------------------------------------- save
    def save(self, step: int, app_state: dict[str, Any], rank_state: dict[str, Any],
             meta: dict[str, Any]) -> Path:
        """Write checkpoint `step`; returns its final path (committed unless async)."""
        t0 = time.perf_counter()
        self.wait()
        me = rank()
        staged = self.begin(step, meta, *fingerprint(app_state))
        local_error = None
        writer = Crc32Writer(staged.tmp)
        try:
            writer.records[rank_file(me)] = write_rank_state(staged.tmp / rank_file(me), rank_state)
        except OSError as exc:
            local_error = f"rank {me}: {exc}"
        if self.async_save:
            self._start_async(staged, app_state, local_error, writer)
            self.last_saved_step = int(step)  # committed by wait(); a failure raises there
            self.last_save_seconds = time.perf_counter() - t0
            return staged.final
        try:
            with _quiet_single_process():
                dcp.save(app_state, checkpoint_id=staged.tmp, storage_writer=writer, process_group=self.group())
        except (Exception, CheckpointException) as exc:  # DCP raises on every rank together
            why = self.disk_why(exc, staged.tmp)  # before the partial files are removed
            if me == 0:
                remove_tree(staged.tmp)
            raise self.save_error(step, why, exc) from exc
        self.finish(staged, local_error, self._written(staged.tmp, me, writer.records))
        self.last_save_seconds = time.perf_counter() - t0
        return staged.final

    def _start_async(self, staged: Staged, app_state: dict[str, Any], local_error: str | None,
                     writer: Crc32Writer) -> None:
        # The stager copies every tensor (CPU ones too) before save() returns, so the next
        # optimizer step cannot change what is written (pytorch #144657). One stager per
        # manager keeps its copy buffers between saves: no re-allocation per checkpoint.
        if self._stager is None:
            self._stager = DefaultStager(StagingOptions(
                use_pinned_memory=torch.cuda.is_available(), use_shared_memory=False,
                use_async_staging=False, use_non_blocking_copy=False))
        with _quiet_single_process():
            fut = dcp.async_save(to_plain(app_state), checkpoint_id=staged.tmp, storage_writer=writer,
                                 process_group=self.group(), no_dist=not dist_ready(),
                                 async_stager=self._stager)
        staged.doc = {**staged.doc, "async": True}
        self._pending = _Pending(staged, fut, local_error, writer.records)

    def wait(self) -> Path | None:
        """Finish and commit an in-flight async save (collective). Returns its path."""
        pending, self._pending = self._pending, None
        if pending is None:
            return None
        staged = pending.staged
        try:
            pending.future.result()
        except (Exception, CheckpointException) as exc:  # every rank sees the failure
            why = self.disk_why(exc, staged.tmp)
            if rank() == 0:
                remove_tree(staged.tmp)
            raise self.save_error(staged.step, why, exc) from exc
        self.finish(staged, pending.local_error, self._written(staged.tmp, rank(), pending.written))
        log.info("async checkpoint step %d committed (%.2fs after save())",
                 staged.step, time.perf_counter() - pending.started)
        return staged.final

    def close(self) -> None:
        """Commit any async save and free the staging buffers (collective)."""
        self.wait()
        if self._stager is not None:
            self._stager.close()
            self._stager = None

    # --------------------------------------------------------------- load
    def load(self, path: Path, app_state: dict[str, Any]) -> tuple[list[dict[str, Any]], dict[str, Any]]:
        """Load `path` into app_state (in place; plain dict entries are replaced) and return
        (rank states of every rank of the saving run, in rank order; meta). Collective.

        A path `find_resume("auto", checksums=False)` chose is verified while it loads
        (`checkpoint.overlap`); if any rank finds it damaged, all ranks load the newest
        intact checkpoint instead (`loaded_path` says which)."""
        self.wait()
        if self.is_deferred(Path(path)):
            return self._load_overlapped(Path(path), app_state)
        path = self.verify(Path(path))
        meta = read_meta(path)
        self._load_state(path, meta, app_state)
        return self._finish_load(path, meta)

    def _load_state(self, path: Path, meta: dict[str, Any], app_state: dict[str, Any]) -> None:
        """Kind and model check, then DCP load of model/optimizer into app_state."""
        self.check_kind(path, meta)
        self.check_model(path, meta, fingerprint(app_state)[0])
        read_dcp_metadata(path / DCP_METADATA, self.trust)  # a refusal names the file, on every rank
        try:
            with _quiet_single_process():
                dcp.load(app_state, storage_reader=self._reader(path), process_group=self.group())
        except (Exception, CheckpointException) as exc:  # turned into a one-line user error
            raise SatfuseError(
                f"{path}: loading the checkpoint failed ({short_error(exc)}); {MISMATCH_FIX}"
            ) from exc

    def _finish_load(self, path: Path, meta: dict[str, Any]) -> tuple[list[dict[str, Any]], dict[str, Any]]:
        rank_states = [load_rank_state(path / rank_file(r), self.trust) for r in range(int(meta["world_size"]))]
        self.loaded_path = path
        log.info("loaded %s (step %s, saved by %s ranks, loading on %d)", path, meta.get("step"),
                 meta["world_size"], world())
        return rank_states, meta

    def _load_overlapped(self, path: Path, app_state: dict[str, Any]) -> tuple[list[dict[str, Any]], dict[str, Any]]:
        """Load while a thread checks this rank's share of the crc32s; all ranks agree on the
        verdict before anyone returns. Damaged: all fall back to the newest intact checkpoint
        (`find_resume("auto")`, which verifies first and names what it skips)."""
        meta = read_meta(path)
        verifier = Verifier(path, meta, rank(), world())
        failure: BaseException | None = None
        threads = torch.get_num_threads()
        # one core for the verifier: else a parallel copy waits for its descheduled OpenMP
        # worker (measured on 2 cores: 2-intra-op-thread copies 2-30x slower than 1 under load)
        torch.set_num_threads(max(1, threads - 1))
        try:
            self._load_state(path, meta, app_state)
        except Exception as exc:  # noqa: BLE001 - raised below unless the checkpoint is damaged
            failure = exc  # every rank gets here alike (same meta; DCP shares its errors)
        finally:
            torch.set_num_threads(threads)
        problems = agree(verifier.result(), self.group())
        self.mark_verified(path, intact=not problems)
        if not problems:
            if failure is not None:
                raise failure
            return self._finish_load(path, meta)
        if rank() == 0:
            log.warning("checkpoint %s is damaged (%s): found while loading it; loading the newest "
                        "intact checkpoint instead", path, "; ".join(problems))
        fallback = self.find_resume("auto")  # verifies before choosing, skipping `path` by its crc32s
        if fallback is None:  # every checkpoint vanished meanwhile
            raise SatfuseError(f"{path}: damaged ({'; '.join(problems)}) and no other checkpoint to resume "
                               "from; start over with checkpoint.resume=none --force-new-run")
        return self.load(fallback, app_state)

    def _reader(self, path: Path) -> MmapReader:
        reader = MmapReader(path)
        reader.trust = self.trust
        return reader


class _quiet_single_process:
    """DCP warns on every call without a process group; one process is a supported mode here."""

    def __enter__(self) -> None:
        self._ctx = warnings.catch_warnings()
        self._ctx.__enter__()
        warnings.filterwarnings("ignore", message=".*torch.distributed is disabled.*")

    def __exit__(self, *exc: object) -> None:
        self._ctx.__exit__(*exc)

"""The checkpoint commit protocol, shared by both backends (DCP: `manager`, DeepSpeed:
`deepspeed_backend`): where a checkpoint is written, when it counts as saved, which one a
run resumes from and which ones are deleted. A backend only writes its files into the
directory `begin()` gives it. One job, so one file (~500 lines, a third of it the disk-space
and failure messages a save needs).

- `begin(step, ...)`: rank 0 makes `.tmp-step_X/` (after `make_room` when the disk is short),
  every rank gets the directory and the meta.json document.
- `finish(...)`: every rank reports the files it wrote (their sizes + crc32, hashed by that
  rank, from the bytes while writing where the backend could); rank 0 writes `meta.json` LAST,
  renames the directory, then updates `latest`, then prunes old checkpoints. A kill at any
  point leaves either the old set of checkpoints or the new one, never a half-written
  directory that looks complete.
- `find_resume(spec)`: `checkpoint.resume` (`satfuse.checkpoint.resolve.ResumeSpec`) to a
  verified checkpoint; "auto": the newest checkpoint that verifies (meta, every file's size and
  crc32), skipping broken ones with a warning naming them; `verify`/`is_verified` remember
  which paths this process has checked. `find_resume("auto", checksums=False)` checks all
  but the crc32s and marks the choice `deferred`: a backend that verifies while loading
  (`verifies_while_loading`, DCP) then checks the crc32s
  while it loads, and every rank agrees on the result before the state is used
  (`checkpoint.overlap`).
- `check_model`: refuses a checkpoint of another model, listing the differing keys.
- `due(step, last_step=...)`: the save cadence (`checkpoint.every_steps`, the last step).

The protocol knows no backend's files: a backend (`satfuse.checkpoint.backend`) reports what
it wrote and says what a complete checkpoint of its kind needs. DCP has no atomic commit of
its own (NeMo #7952, torchtitan #1729), nor has DeepSpeed, hence the temp directory.
Collectives run on a separate gloo group (`collectives.gloo_group`), so an async save's
background thread never shares a group with the training loop. Without a process group
everything works in one process.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

import torch

import satfuse
from satfuse.checkpoint.layout import (
    DEL_PREFIX,
    LATEST,
    META_FORMAT,
    META_NAME,
    TMP_PREFIX,
    checkpoint_problems,
    checkpoints_dir,
    file_record,
    fsync_dir,
    list_checkpoints,
    list_partial,
    parse_step,
    rank_file,
    read_latest,
    read_meta,
    step_name,
)
from satfuse.checkpoint.resolve import (
    ResumeSpec,
    is_run_dir,
    parse_resume,
    resolve_checkpoint,
    run_checkpoint,
)
from satfuse.checkpoint.state import MISMATCH_FIX, fingerprint_diff, short_error
from satfuse.diskspace import free_bytes, human, is_no_space
from satfuse.distributed.collectives import (
    all_gather_object,
    broadcast_object,
    gloo_group,
    rank,
    world,
)
from satfuse.models.legacy import upgrade_fingerprint
from satfuse.utils import SatfuseError, atomic_write_text

if TYPE_CHECKING:
    from satfuse.config import CheckpointConfig

log = logging.getLogger(__name__)

# Words of a collective that gave up on a peer (gloo/NCCL/our own timeouts), not a disk problem.
_UNANSWERED = ("timed out", "timeout", "connection reset", "connection closed", "broken pipe",
               "peer", "read error")


def remove_tree(path: Path) -> None:
    """Delete a directory, ignoring errors (debris of a failed save)."""
    shutil.rmtree(path, ignore_errors=True)


def local_files(tmp: Path, rank: int, written: dict[str, dict[str, Any] | None] | None = None
                ) -> dict[str, dict[str, Any]]:
    """Size + crc32 of the files this rank wrote: the backend's report `written` (file name
    -> the record computed from the bytes while writing, e.g. `dcp_storage.Crc32Writer`'s, or
    None: read back and hashed here, by the rank that wrote it) and the rank's own rank file.
    """
    written = dict(written or {})
    names = set(written) | {rank_file(rank)}
    return {n: _checked(tmp / n, rec) if (rec := written.get(n)) else file_record(tmp / n) for n in sorted(names)}


def _checked(path: Path, record: dict[str, Any]) -> dict[str, Any]:
    """A record computed while writing, after checking the file on disk has its size
    (a file that vanished or was cut short fails the save here, not the next resume)."""
    size = path.stat().st_size
    if size != record["size"]:
        raise OSError(f"{path.name} has {size} bytes on disk, {record['size']} were written")
    return record


@dataclass
class Staged:
    """A save between `begin` and `finish`: its temp and final directories, its meta.json."""

    step: int
    tmp: Path
    final: Path
    doc: dict[str, Any]


class CommitProtocol:
    """The commit protocol of one run directory (see the module doc); backends subclass it
    (`satfuse.checkpoint.backend.CheckpointBackend`, the contract) and set `kind`.

    Every method except the read-only helpers is collective when a process group is
    initialised: call it on every rank, in the same order.

    keep_last: keep the newest K committed checkpoints (<= 0: keep all);
    keep_every: additionally keep every step divisible by N (0: none);
    every_steps: `due()` is true every N steps (0: only at the last step);
    timeout_s: bound on every collective of the protocol's group. Generous by default (a
    slow filesystem can keep a rank writing for many minutes while the others wait in DCP's
    gather), but finite: a rank that dies mid-save fails the others with an error naming the
    collective instead of hanging them;
    trust: load files that are not plain data with full unpickling (`--trust-checkpoint`);
    without it they are refused, naming the file (`satfuse.checkpoint.trust`).
    """

    kind: ClassVar[str]  # recorded in meta.json; resume, export and verify look the backend up by it

    def __init__(self, run_dir: Path, keep_last: int = 3, keep_every: int = 0,
                 timeout_s: float = 1800.0, trust: bool = False, every_steps: int = 0) -> None:
        self.run_dir = Path(run_dir)
        self.trust = trust  # --trust-checkpoint: files that are not plain data may be unpickled
        self.timeout_s = timeout_s
        self.ckpt_dir = checkpoints_dir(self.run_dir)
        self.keep_last = keep_last
        self.keep_every = keep_every
        self.every_steps = every_steps
        self.last_saved_step: int | None = None  # set by a backend's save
        self.num_parameters = 0  # of the last saved model, for the size estimate of a failed save
        self._group: Any = None
        self._verified: set[str] = set()
        self._deferred: set[str] = set()  # chosen by find_resume(checksums=False), crc32s not yet checked
        self.loaded_path: Path | None = None  # what the last load() loaded (a fallback may differ from its argument)

    @staticmethod
    def config_kwargs(section: CheckpointConfig, timeout_s: float) -> dict[str, Any]:
        """Constructor arguments from the `checkpoint` config section."""
        return {"keep_last": section.keep_last, "keep_every": section.keep_every,
                "every_steps": section.every_steps, "timeout_s": timeout_s,
                "trust": section.trust_checkpoint}

    # --------------------------------------------------------------- cadence
    def due(self, step: int, last_step: bool = False) -> bool:
        """Whether `step` is to be saved: every `every_steps`, and the last step of a run
        (also a stopped one) unless it was just saved. A resumed run re-saves even at the
        end: after a world-size change the newest checkpoint is then in the current layout
        (DeepSpeed need not convert it again)."""
        if step == self.last_saved_step:
            return False
        return last_step or bool(self.every_steps and step % self.every_steps == 0)

    # --------------------------------------------------------------- groups
    def group(self) -> Any:
        """The protocol's own gloo group (created on first use, collectively)."""
        if self._group is None:
            self._group = gloo_group(self.timeout_s)
        return self._group

    # --------------------------------------------------------------- begin
    def begin(self, step: int, meta: dict[str, Any], fingerprint: dict[str, list[int]],
              num_parameters: int, **extra: Any) -> Staged:
        """Collective: rank 0 makes a fresh temp directory (making room first when the disk
        is short); every rank gets it with the meta.json document (`extra` added to it)."""
        name = step_name(step)
        tmp, final = self.ckpt_dir / f"{TMP_PREFIX}{name}", self.ckpt_dir / name
        error = self._prepare_tmp(tmp) if rank() == 0 else None
        error = broadcast_object(error, self.group())  # also the barrier: nobody writes before tmp exists
        if error:
            raise SatfuseError(error)
        self.num_parameters = num_parameters
        doc = {
            **meta,
            "format": META_FORMAT,
            "kind": self.kind,
            "step": int(step),
            "epoch": meta.get("epoch"),
            "world_size": world(),
            "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            "satfuse_version": satfuse.__version__,
            "torch_version": torch.__version__,
            "model": {"fingerprint": fingerprint, "parameters": num_parameters},
            "checksum": "crc32",
            **extra,
        }
        return Staged(int(step), tmp, final, doc)

    def _prepare_tmp(self, tmp: Path) -> str | None:
        """Rank 0: a fresh temp directory. Returns an error message or None."""
        try:
            self.ckpt_dir.mkdir(parents=True, exist_ok=True)
            if tmp.exists():
                log.warning("removing %s left by an interrupted save", tmp)
                remove_tree(tmp)
            self.make_room()
            tmp.mkdir()
        except OSError as exc:
            return (f"{self.ckpt_dir}: cannot create a checkpoint directory ({exc.strerror or exc}); "
                    "check that train.run_dir is a writable directory")
        return None

    # --------------------------------------------------------------- finish
    def finish(self, staged: Staged, local_error: str | None,
               written: dict[str, dict[str, Any] | None] | None = None) -> Path:
        """Every rank reports the files it wrote; rank 0 commits; all ranks agree on the
        outcome. `written`: the backend's report of this rank's files (see `local_files`)."""
        me = rank()
        report: dict[str, Any] = {"error": local_error}
        if local_error is None:
            try:
                report["files"] = local_files(staged.tmp, me, written)
            except OSError as exc:
                report["error"] = f"rank {me}: {exc}"
        reports = all_gather_object(report, self.group())
        errors = [r["error"] for r in reports if r["error"]]
        outcome = None
        if me == 0:
            if errors:
                remove_tree(staged.tmp)
                outcome = "; ".join(errors)
            else:
                outcome = self._commit(staged.tmp, staged.final, staged.doc, reports)
        outcome = broadcast_object(outcome, self.group())
        if outcome:
            raise self.save_error(staged.step, outcome)
        self.last_saved_step = staged.step
        return staged.final

    def _commit(self, tmp: Path, final: Path, doc: dict[str, Any],
                reports: list[dict[str, Any]]) -> str | None:
        """Rank 0: meta.json last inside tmp, rename, `latest`, prune. Returns an error or None."""
        files: dict[str, Any] = {}
        for r in reports:
            files.update(r["files"])
        try:
            for p in tmp.iterdir():  # anything no rank reported (a backend that reports less)
                if p.name not in files and p.is_file():
                    log.debug("%s: no rank reported %s; rank 0 hashes it", tmp, p.name)
                    files[p.name] = file_record(p)
            doc = {**doc, "files": dict(sorted(files.items())),
                   "total_bytes": sum(f["size"] for f in files.values()), "complete": True}
            atomic_write_text(tmp / META_NAME, json.dumps(doc, indent=1, sort_keys=False) + "\n")
            fsync_dir(tmp)
            old = None
            if final.exists():
                old = final.with_name(f"{DEL_PREFIX}{final.name}")
                remove_tree(old)
                os.replace(final, old)
            os.replace(tmp, final)
            fsync_dir(self.ckpt_dir)
            if old is not None:
                remove_tree(old)
        except OSError as exc:
            remove_tree(tmp)
            return f"rank 0 commit: {exc}"
        try:
            atomic_write_text(self.ckpt_dir / LATEST, final.name + "\n")
        except OSError as exc:
            # The checkpoint itself is complete and will be found by resume=auto.
            log.warning("%s committed but the `latest` pointer could not be updated: %s", final, exc)
        self._verified.add(str(final.resolve()))
        self.prune(keep=final)
        log.info("checkpoint %s committed (%d files, %.1f MiB)", final, len(files),
                 doc["total_bytes"] / 2**20)
        return None

    def save_error(self, step: int, why: str, exc: BaseException | None = None) -> SatfuseError:
        """The one-line error of a failed save: a peer that did not answer, a full disk (with
        the fix keep_last allows), or the cause as it is; always says what is still intact."""
        latest = read_latest(self.run_dir)
        prev = f"the previous checkpoint {latest.name} is intact" if latest else "no earlier checkpoint exists"
        text = f"{why} {exc or ''}".lower()  # DCP wraps per-rank failures: look inside
        if any(w in text for w in _UNANSWERED) and "no space" not in text and "errno 28" not in text:
            return SatfuseError(
                f"{self.ckpt_dir}: saving step {step} failed: a rank did not answer within "
                f"train.comm_timeout_s={self.timeout_s:.0f}s ({why}); a peer was stopped (SIGSTOP), "
                f"hung or died, not a disk problem; nothing was committed and {prev}: find the "
                "stopped/dead rank, then resume"
            )
        if any(w in text for w in ("no space left", "errno 28", "enospc")):
            needed = self.needed_estimate()
            need = f", about {human(needed)} needed" if needed else ""
            if self.keep_last > 1:
                fix = (f"free space there, or lower checkpoint.keep_last (now {self.keep_last}; when space is "
                       "short, older checkpoints are pruned to keep_last - 1 before a save, never the last "
                       "complete one), and resume")
            elif self.keep_last == 1:
                fix = ("free space there and resume (checkpoint.keep_last=1 already keeps only the last "
                       "complete checkpoint)")
            else:
                fix = ("free space there, or set checkpoint.keep_last (now 0: every checkpoint is kept) so that "
                       "older ones are pruned, and resume")
            return SatfuseError(
                f"{self.ckpt_dir}: saving step {step} failed: no space left on device (ENOSPC): "
                f"{human(free_bytes(self.ckpt_dir))} free{need} ({why}); nothing was committed and {prev}: {fix}"
            )
        return SatfuseError(
            f"{self.ckpt_dir}: saving step {step} failed ({why}); nothing was committed and "
            f"{prev}: fix the cause there and resume"
        )

    # --------------------------------------------------------------- disk space
    def disk_why(self, exc: BaseException, tmp: Path) -> str:
        """The failure in one line; a full disk named as such (torch.save on a full disk
        says only "unexpected pos 704 vs 598", so the disk itself is asked)."""
        why = short_error(exc)
        if "No space left" not in why and (
                is_no_space(exc) or free_bytes(tmp) < max(self.needed_estimate(), 1 << 20)):
            why = f"No space left on device; {why}"
        return why

    def needed_estimate(self) -> int:
        """Bytes one checkpoint takes: the newest committed one's size, else parameters x 12
        (fp32 weights + AdamW's two moments); 0 when unknown."""
        for p in reversed(list_checkpoints(self.run_dir)):
            with contextlib.suppress(OSError, ValueError, SatfuseError, KeyError, TypeError):
                return int(read_meta(p)["total_bytes"])
        return self.num_parameters * 12

    def make_room(self) -> None:
        """Rank 0, before a save: when the disk cannot hold one more checkpoint, prune the
        oldest down to keep_last - 1 now (pruning otherwise runs only after a successful save,
        so lowering keep_last could not help), never the last complete one, never one that
        keep_every or `latest` protects."""
        needed = self.needed_estimate()
        if self.keep_last <= 0 or not needed or free_bytes(self.ckpt_dir) >= needed:
            return
        committed = [p for p in list_checkpoints(self.run_dir) if (p / META_NAME).is_file()]
        latest = read_latest(self.run_dir)
        floor = max(1, self.keep_last - 1)
        for p in list(committed):
            if len(committed) <= floor or free_bytes(self.ckpt_dir) >= needed:
                break
            if (latest is not None and p.name == latest.name) or p == committed[-1] or (
                    self.keep_every > 0 and (parse_step(p) or 0) % self.keep_every == 0):
                continue
            log.warning("disk space is short (%s free, about %s needed): pruning %s before the save "
                        "(checkpoint.keep_last=%d)", human(free_bytes(self.ckpt_dir)), human(needed),
                        p.name, self.keep_last)
            doomed = p.with_name(f"{DEL_PREFIX}{p.name}")
            os.replace(p, doomed)
            remove_tree(doomed)
            committed.remove(p)

    # --------------------------------------------------------------- pruning
    def prune(self, keep: Path) -> None:
        """Delete committed checkpoints beyond keep_last/keep_every (never `keep`, never
        the one `latest` points to) and debris of interrupted saves."""
        for p in list_partial(self.run_dir):
            if p != keep:  # debris of interrupted saves and deletions
                remove_tree(p)
        if self.keep_last <= 0:
            return
        committed = [p for p in list_checkpoints(self.run_dir) if (p / META_NAME).is_file()]
        protected = {keep.name}
        latest = read_latest(self.run_dir)
        if latest is not None:
            protected.add(latest.name)
        protected.update(p.name for p in committed[-self.keep_last:])
        if self.keep_every > 0:
            protected.update(p.name for p in committed if (parse_step(p) or 0) % self.keep_every == 0)
        for p in committed:
            if p.name not in protected:
                doomed = p.with_name(f"{DEL_PREFIX}{p.name}")
                try:
                    os.replace(p, doomed)  # a kill mid-delete leaves debris, not a broken step dir
                except OSError as exc:
                    log.warning("could not delete old checkpoint %s: %s", p, exc)
                    continue
                remove_tree(doomed)
                log.debug("pruned %s", p)

    # --------------------------------------------------------------- resume
    def find_resume(self, resume: ResumeSpec | str | Path | None, checksums: bool = True) -> Path | None:
        """The checkpoint `checkpoint.resume` means (`resolve.parse_resume`), verified, or
        None for a fresh start: "none" -> None; "auto" -> the newest complete checkpoint
        (None if there are none); "latest", a step, a PATH -> that checkpoint, verified.
        Collective: rank 0 verifies, all agree. `checksums=False` (only "auto"; a backend
        that verifies while loading): every check but the crc32s, and the choice is
        `deferred` until its load has verified it."""
        spec = parse_resume(resume)
        if spec.kind == "none":
            return None
        auto = spec.kind == "auto"
        result: tuple[str | None, str | None] = (None, None)
        if rank() == 0:
            try:
                if auto:
                    found = self._find_auto(checksums)
                elif spec.kind == "path" and spec.path is not None:
                    found = self._find_path(spec.path)
                else:
                    found = self._find_path(run_checkpoint(spec, self.run_dir))
                result = (str(found) if found else None, None)
            except SatfuseError as exc:
                result = (None, str(exc))
        path, error = broadcast_object(result, self.group())
        if error:
            raise SatfuseError(error)
        if path is not None:
            key = str(Path(path).resolve())
            if checksums or not auto:
                self._verified.add(key)
            elif key not in self._verified:
                self._deferred.add(key)
        return Path(path) if path else None

    def _find_auto(self, checksums: bool = True) -> Path | None:
        for p in list_partial(self.run_dir):
            if p.name.startswith(TMP_PREFIX):
                log.warning("ignoring %s: a save that never finished (killed during save?)", p)
        candidates = list(reversed(list_checkpoints(self.run_dir)))
        skipped: list[str] = []
        for cand in candidates:
            problems = checkpoint_problems(cand, checksums=checksums)
            if not problems:
                if skipped:
                    log.warning("resuming from %s, the newest complete checkpoint (skipped: %s)",
                                cand.name, ", ".join(skipped))
                return cand
            log.warning("skipping checkpoint %s: %s", cand, "; ".join(problems))
            skipped.append(cand.name)
        if skipped:
            raise SatfuseError(
                f"{self.ckpt_dir}: no complete checkpoint among {', '.join(skipped)}; inspect "
                "them with `satfuse ckpt inspect`, resume from one with resume=PATH, or start over "
                "in a new train.run_dir (or with checkpoint.resume=none --force-new-run, which "
                "moves them to run_dir/previous-<time>/)"
            )
        return None

    def _find_path(self, path: Path) -> Path:
        """A path the user gave (`resolve.resolve_checkpoint` forms), verified; a run
        directory means its newest complete checkpoint, as resume=auto does for this run."""
        if is_run_dir(path):
            found = CommitProtocol(path)._find_auto()
            if found is None:
                raise SatfuseError(f"{path}: run directory without checkpoints; pass a step_XXXXXXXX directory")
            return found
        path = resolve_checkpoint(path)
        problems = checkpoint_problems(path, checksums=True)
        if problems:
            raise SatfuseError(
                f"{path}: not a complete checkpoint: {'; '.join(problems)}; pick another with "
                "`satfuse ckpt ls RUN_DIR` (resume=auto skips broken ones)"
            )
        return path

    # --------------------------------------------------------------- load

    def verify(self, path: Path) -> Path:
        """`path` itself when this process verified it (found or committed it), else the
        checkpoint `find_resume(path)` verifies (collective then)."""
        path = Path(path)
        if self.is_verified(path):
            return path
        return self.find_resume(str(path)) or path

    def is_verified(self, path: Path) -> bool:
        return str(Path(path).resolve()) in self._verified

    def is_deferred(self, path: Path) -> bool:
        """Chosen by `find_resume("auto", checksums=False)`: its crc32s are checked by the load."""
        return str(Path(path).resolve()) in self._deferred

    def mark_verified(self, path: Path, intact: bool) -> None:
        """The collective verdict of an overlapped load on a deferred path."""
        key = str(Path(path).resolve())
        self._deferred.discard(key)
        if intact:
            self._verified.add(key)

    # --------------------------------------------------------------- model check
    def check_model(self, path: Path, meta: dict[str, Any], current: dict[str, list[int]]) -> None:
        """Refuse a checkpoint of another model (`current`: the model's fingerprint)."""
        saved = upgrade_fingerprint((meta.get("model") or {}).get("fingerprint"))
        if not current or saved is None:
            return
        diff = fingerprint_diff(saved, current)
        if diff:
            raise SatfuseError(f"{path}: model mismatch ({'; '.join(diff)}): {MISMATCH_FIX}")

"""The output directory of a sharding run: claiming it, refusing someone else's, removing stale files.

One job, shared by both writers: `out_lease` around the whole run (one writer at a time;
`merge` joins job-array parts under it),
`check_paths` before the scan, `prepare_out` (refuse a
non-empty directory that is not a shard directory, or one holding another shard set, unless
`--overwrite`, which empties it first), `remove_stale` (an old manifest must not describe
a changing directory; tars past the new plan must not be picked up by a glob) and
`publish_or_discard` (a refused empty run leaves nothing of its own behind).
"""

from __future__ import annotations

import contextlib
import functools
import inspect
import json
import logging
import re
import shutil
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

from satfuse.data.format.manifest import (
    FORMAT,
    MANIFEST_NAME,
    MISSING_NAME,
    MISSING_PART_GLOB,
    OWNER_FILE,
    PART_GLOB,
    STATE_DIR,
    EmptySetError,
    is_own_file,
    merge_parts,
    publish,
    shard_name_problem,
    sidecar_path,
    tar_name_pattern,
)
from satfuse.data.sources.layout import MAX_SHOWN
from satfuse.engines.rundir import RunLease, describe
from satfuse.utils import SatfuseError, atomic_write_text

log = logging.getLogger(__name__)

LEASE = ".lock"  # a whole run's lease in STATE_DIR; a job-array part's is .lock-part-<index>
LEASE_RE = re.compile(r"^\.lock(-part-\d+)?$")
LEASE_TIMEOUT_S = 600.0  # a holder silent this long (killed on another node) is taken over
F = TypeVar("F", bound=Callable[..., Any])


@contextlib.contextmanager
def out_lease(src: Path | None, out: Path, part: int | None) -> Iterator[None]:
    """Hold `out`'s lease while one `satfuse shard` run (or job-array part `part`) writes it;
    `satfuse shard merge` (`src` None) holds the whole run's, so a merge refuses, and is
    refused by, a writer or another merge: it reads the parts' records and tars while they
    would still change, and two merges would publish manifest.json over each other.

    Why: two runs into one directory either crash (one's --overwrite or stale-file removal
    takes the other's files away) or both report success while one set silently wins. The
    lease is the run directory's (`satfuse.engines.rundir.RunLease`: atomic link(2), heartbeat,
    takeover of a provably dead holder). Job-array parts write disjoint shards, so each part
    has its own lease file, and a whole run and any part refuse each other. What this run
    created only for its lease (`out`, `.satfuse/`) is removed again when it ends empty, so a
    refused run leaves nothing behind."""
    out = Path(out)
    if src is not None:
        check_paths(Path(src), out)  # before anything is created: never a lease inside the source
    state = out / STATE_DIR
    created = [d for d in (state, out, *out.parents) if not d.exists()]  # deepest first
    name = LEASE if part is None else f"{LEASE}-part-{part}"
    fix = "choose another --out"
    lease = RunLease(out, LEASE_TIMEOUT_S, name=f"{STATE_DIR}/{name}", what="shard directory", fix=fix)
    try:
        lease.acquire()
        others = [LEASE] if part is not None else sorted(
            p.name for p in state.glob(f"{LEASE}-part-*") if LEASE_RE.match(p.name))
        for other in others:
            holder = RunLease(out, LEASE_TIMEOUT_S, name=f"{STATE_DIR}/{other}").live_holder()
            if holder is not None:
                who = "a whole run or merge" if other == LEASE else f"job-array part {other.rsplit('-', 1)[1]}"
                raise SatfuseError(f"{out}: {who} is writing this shard directory ({describe(holder)}); "
                                   f"wait for it to end, stop it, or {fix}")
        lease.start_heartbeat()
        yield
    finally:
        lease.release()
        for d in created:  # only while empty: a refused or failed first run leaves no directory
            try:
                d.rmdir()
            except OSError:
                break


def merge(out: Path, command: list[str] | None = None) -> dict[str, Any]:
    """Join the part manifests of a job-array run into `manifest.json` (`manifest.merge_parts`),
    holding the shard directory's lease as a whole run: refused while a part, a whole run or
    another merge writes `out`."""
    with out_lease(None, Path(out), None):
        return merge_parts(Path(out), command)


def holding_out_lease(fn: F) -> F:
    """Run a sharding entry point (arguments `src`, `out`, `shard_index`) inside `out_lease`."""
    sig = inspect.signature(fn)

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        bound = sig.bind(*args, **kwargs)
        bound.apply_defaults()
        a = bound.arguments
        part = a["shard_index"] if a.get("num_shards") is not None else None
        with out_lease(a["src"], a["out"], part):
            return fn(*args, **kwargs)

    return wrapper  # type: ignore[return-value]


def named_out(out: Path) -> Path:
    """`out` itself, or its absolute form when the path has no name of its own (`--out .`,
    `--out ..`): the directory's name is the set's name and the prefix of its tars, which
    would otherwise be empty (`-000000.tar`). A name the manifest readers refuse (`a:b` reads as
    a URL scheme) is refused here, before anything is packed."""
    out = Path(out)
    named = out if out.name not in ("", ".", "..") else out.resolve()
    if not named.name:
        raise SatfuseError(f"{out}: the output directory needs a name (it names the tars, NAME-000000.tar); pass --out shards/NAME")
    if problem := shard_name_problem(f"{named.name}-000000.tar"):  # a set no reader would open
        raise SatfuseError(f"{out}: the directory's name makes tar names ({named.name}-000000.tar) that {problem}; "
                           "pass --out with a plain name, e.g. shards/NAME")
    return named


def check_paths(src: Path, out: Path) -> None:
    """Refuse an output inside the source (or containing it), or one that is a file."""
    s, o = src.resolve(), out.resolve()
    if o == s or s in o.parents:
        raise SatfuseError(f"{out}: output is inside the source {src}; write shards outside the dataset tree (e.g. shards/NAME)")
    if o in s.parents:
        raise SatfuseError(f"{out}: output contains the source {src}; choose an output directory outside it")
    if out.exists() and not out.is_dir():
        raise SatfuseError(f"{out}: exists and is not a directory; choose another --out")


@dataclass(frozen=True)
class Claim:
    """What a run found before it wrote anything, so that a refused run removes only what it
    created (never a file that existed before it). The directories it created are removed by
    `out_lease`, which every writer holds and which saw them first."""

    new_marker: bool  # True when the run wrote `.satfuse/owner.json`


def prepare_out(out: Path, overwrite: bool, settings: dict[str, Any]) -> Claim:
    """Claim the output directory: refuse someone else's non-empty dir, or one holding
    another shard set (another dataset, or tars of another name), unless `overwrite`, which
    empties it first so no old tar is left behind for a glob to pick up. Returns what it
    created, for `publish_or_discard`."""
    marker = out / STATE_DIR / OWNER_FILE
    if not overwrite and (problem := claim_problem(out, settings)) is not None:
        raise SatfuseError(problem)
    if overwrite and out.is_dir() and any(out.iterdir()):
        log.warning("%s: --overwrite: removing its contents", out)
        for child in out.iterdir():
            if child.name == STATE_DIR and child.is_dir() and not child.is_symlink():
                for sub in child.iterdir():  # every file but the leases of the runs now writing here
                    if not LEASE_RE.match(sub.name):
                        shutil.rmtree(sub) if sub.is_dir() and not sub.is_symlink() else sub.unlink()
                continue
            shutil.rmtree(child) if child.is_dir() and not child.is_symlink() else child.unlink()
    new_marker = not marker.is_file()
    (out / STATE_DIR).mkdir(parents=True, exist_ok=True)
    if new_marker:
        atomic_write_text(marker, json.dumps({"format": FORMAT, "name": out.name, **settings}, indent=1))
    return Claim(new_marker)


def publish_or_discard(out: Path, manifest: dict[str, Any], records: list[dict[str, Any]], claim: Claim) -> None:
    """`manifest.publish`; when it refuses an empty set, first remove what this run wrote (its
    empty tars, their resume records, and the marker it created; `out_lease` then removes the directories it created), so nothing is
    left behind that looks like a partial set or is reused by a rerun. Tars an earlier run
    wrote (reused here) stay: this run does not own them, and the error says so."""
    try:
        publish(out, manifest)
    except EmptySetError as exc:
        written = [r["name"] for r in records if not r.get("reused")]
        for name in written:
            (out / name).unlink(missing_ok=True)
            sidecar_path(out, name).unlink(missing_ok=True)
        if claim.new_marker:
            (out / STATE_DIR / OWNER_FILE).unlink(missing_ok=True)
        kept = len(records) - len(written)
        older = f"; {kept} empty tar(s) of an earlier run are left as they were" if kept else ""
        raise EmptySetError(f"{exc} (the {len(written)} empty tar(s) and records this run wrote were removed{older})") from None


def claim_problem(out: Path, settings: dict[str, Any]) -> str | None:
    """Why `prepare_out` (without --overwrite) would refuse `out`, or None; writes nothing
    (`satfuse submit shard` asks before it queues the parts)."""
    if not out.is_dir():
        return None
    if not (out / STATE_DIR / OWNER_FILE).is_file() and not only_our_files(out):
        return f"{out}: not empty and not a satfuse shard directory; choose an empty --out or pass --overwrite to replace its contents"
    if (other := other_shard_set(out, settings)) is not None:
        return f"{out}: holds another shard set ({other}); choose another --out or pass --overwrite to replace it"
    return None


def other_shard_set(out: Path, settings: dict[str, Any]) -> str | None:
    """What says `out` holds a shard set other than the one about to be written, or None."""
    marker = out / STATE_DIR / OWNER_FILE
    if marker.is_file():
        try:
            owner = json.loads(marker.read_text())
        except (OSError, ValueError):
            owner = {}
        if owner.get("dataset", settings["dataset"]) != settings["dataset"]:
            return f"dataset {owner.get('dataset')!r} per {marker}, this run packs {settings['dataset']!r}"
        if owner.get("name", out.name) != out.name:
            return f"name {owner.get('name')!r} per {marker}"
    manifest = out / MANIFEST_NAME
    if manifest.is_file():
        try:
            doc = json.loads(manifest.read_text())
        except (OSError, ValueError):
            doc = {}
        if doc.get("dataset", settings["dataset"]) != settings["dataset"] or doc.get("name", out.name) != out.name:
            return f"{doc.get('dataset')!r} shards named {doc.get('name')!r} per {manifest}"
    ours = tar_name_pattern(out.name)
    strays = sorted(p.name for p in out.glob("*.tar*") if not ours.match(p.name))
    if strays:
        return f"tars of another name: {', '.join(strays[:MAX_SHOWN])}{' ...' if len(strays) > MAX_SHOWN else ''}"
    return None


def only_our_files(out: Path) -> bool:
    """True for an empty dir or one holding only what this tool writes (a job-array part
    may look while another part has created `.satfuse/` but not yet its marker)."""
    return all(is_own_file(out, child.name) for child in out.iterdir())


def remove_stale(out: Path, name: str, num_planned: int, part: int | None) -> None:
    """Before writing: a stale manifest must not describe a changing directory; shards past
    the new plan (from an older, larger run) must not be picked up by a glob."""
    (out / MANIFEST_NAME).unlink(missing_ok=True)
    (out / MISSING_NAME).unlink(missing_ok=True)  # rewritten with the manifest, when there are missing entries
    if part is None:
        for p in [*out.glob(PART_GLOB), *out.glob(MISSING_PART_GLOB)]:
            p.unlink()
    for tar in out.glob(f"{name}-*.tar"):
        stem = tar.name[len(name) + 1 : -4]
        if stem.isdigit() and int(stem) >= num_planned:
            tar.unlink(missing_ok=True)
            sidecar_path(out, tar.name).unlink(missing_ok=True)

"""Staging shards to node-local storage (`data.stage_dir`), so training reads no shared filesystem.

Why: a node of 8 GPUs at the pairs/s Dual-SimCLR reaches would have to read tens of GB/s from
the parallel filesystem, every epoch; node-local NVMe gives that, Lustre/GPFS per node does
not. So, with `data.stage_dir` set, each node copies its *fixed* share of the shards there at
start and the loader reads only those copies.

- Which shards a node holds: `stream_plan.node_groups(counts, seed, nodes)`, a deterministic
  balanced split of the shards into one group per node (node index = the launcher's node
  rank, ranks numbered node by node). The epoch plan then deals each group's shards to that
  node's ranks only (`stream_plan.epoch_slots`): the node keeps its shards every epoch.
- Where: `<stage_dir>/satfuse-<set key>/part<k>/<tar name>`, the set key a digest of every
  shard's name, size and sha256 (all mixed sets), each part with its manifest.json beside the
  tars, marked `STAGED_KEY` (the copier hashed every tar against it, so the loader's first
  open compares the size only and does not read the copy whole a second time). Another shard set, or the same names with other bytes, gets another directory:
  a stale or foreign copy is never read.
- Who copies: the node's local rank 0, in a thread, `data.stage_dir`'s files written as
  temp + fsync + rename with the sha256 computed while copying and compared to the manifest;
  every rank (both engines: only the default process group is used) meanwhile agrees every
  `POLL_S` seconds, in one small all-reduce, whether any copier is still busy or failed, so a
  long copy never runs into the process group's timeout and a failure on one node stops all.
- Reuse: a local copy is kept when its size matches the manifest and its bytes hash to the
  manifest's sha256 (a full local read, hashed in parallel threads): the cheaper size-only
  test would leave a same-size damaged copy in place for every requeue, and the loader's
  first-open check could then only skip or fail on it, not re-copy it. Anything else is
  re-copied. Copies of shards the node no longer holds (another node count) are left alone.
- Room: refused up front, in one line, when the stage dir lacks space for what must be copied.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

from tqdm import tqdm

from satfuse.config import DataConfig
from satfuse.data.format.manifest import STAGED_KEY
from satfuse.data.reading.shard_sets import ShardSet
from satfuse.data.reading.stream_plan import node_groups
from satfuse.diskspace import free_bytes, human, is_no_space, no_space_error
from satfuse.distributed.collectives import agree_max, control_group
from satfuse.distributed.env import current_env
from satfuse.distributed.launcher_env import world_info_from_env
from satfuse.utils import SatfuseError

log = logging.getLogger(__name__)

POLL_S = 1.0  # how often the ranks agree on whether every node's copier is done
CHUNK = 8 << 20  # copy buffer: large reads suit parallel filesystems
COPY_THREADS = 4  # shards copied (and reused copies hashed) at once by a node's copier


@dataclass(frozen=True)
class NodeLayout:
    """Where a rank sits for staging: its node and its place on the node."""

    node: int = 0
    nodes: int = 1
    local_rank: int = 0
    local_world: int = 1

    @classmethod
    def from_env(cls, rank: int, world_size: int) -> NodeLayout:
        """The layout the launcher gave (the joined process group's, else `launcher_env`'s), checked against the loader's rank and
        world size and against the node-by-node rank numbering the plan relies on."""
        info = current_env() or world_info_from_env()
        if world_size == 1:
            return cls()
        if (info.rank, info.world_size) != (rank, world_size):
            raise SatfuseError(f"data.stage_dir: the launcher says rank {info.rank} of {info.world_size}, the loader "
                               f"was built for rank {rank} of {world_size}; start the ranks with torchrun or srun")
        nodes, local = max(1, info.num_nodes), max(1, info.local_world_size)
        if nodes * local != world_size or rank // local != info.node_rank or rank % local != info.local_rank:
            raise SatfuseError(
                f"data.stage_dir needs ranks numbered node by node with the same count on every node; rank {rank} "
                f"is local rank {info.local_rank} of {local} on node {info.node_rank} of {nodes} (world {world_size}): "
                "launch with torchrun or `srun --distribution=block` and equal tasks per node, or unset data.stage_dir")
        return cls(node=info.node_rank, nodes=nodes, local_rank=info.local_rank, local_world=local)


def node_layout(cfg: DataConfig, rank: int, world_size: int, node: NodeLayout | None) -> NodeLayout | None:
    """None without `data.stage_dir`; else `node` or the launcher's layout."""
    if not cfg.stage_dir:
        return None
    return node if node is not None else NodeLayout.from_env(rank, world_size)


@dataclass(frozen=True)
class StagedShard:
    """One shard of the set: where it is now, where its local copy goes, what it must hash to."""

    index: int
    source: str
    dest: Path
    sha256: str
    size: int


def stage_root(stage_dir: str) -> Path:
    """`data.stage_dir` with environment variables expanded (`$TMPDIR`, `$SLURMD_NODENAME`)."""
    path = os.path.expanduser(os.path.expandvars(stage_dir))
    if "$" in path:
        raise SatfuseError(f"data.stage_dir={stage_dir!r}: an environment variable in it is not set here ({path}); "
                           "export it or give a plain path")
    return Path(path)


def _parts(shards: ShardSet) -> list[tuple[ShardSet | None, dict]]:
    return [(p, p.manifest) for p in shards.parts] if shards.parts else [(None, shards.manifest)]


def plan_copies(shards: ShardSet, root: Path) -> tuple[Path, list[StagedShard]]:
    """Every shard of the set with its local destination, and the set's directory under `root`."""
    bounds = list(shards.mix.bounds) if shards.mix is not None else [0, len(shards.urls)]
    rows: list[tuple[int, str, dict]] = []
    for k, (_, man) in enumerate(_parts(shards)):
        by_name = {s["name"]: s for s in man["shards"]}
        for i in range(bounds[k], bounds[k + 1]):
            url = shards.urls[i]
            if url.startswith("pipe:") or "://" in url:
                raise SatfuseError(f"data.stage_dir: {url} is not a local path; staging copies shards from a "
                                   "filesystem path (unset data.stage_dir for pipe:/remote shards)")
            rec = by_name.get(os.path.basename(url), {})
            if not rec.get("sha256") or "bytes" not in rec:
                raise SatfuseError(f"data.stage_dir: the manifest of {url} records no sha256/bytes for it; "
                                   "re-shard with `satfuse shard` (staging verifies every copy against them)")
            rows.append((k, url, rec))
    key = hashlib.sha256(json.dumps([[k, r["name"], r["sha256"], int(r["bytes"])] for k, _, r in rows]).encode())
    set_dir = root / f"satfuse-{key.hexdigest()[:16]}"
    out = [StagedShard(i, url, set_dir / f"part{k}" / os.path.basename(url), r["sha256"], int(r["bytes"]))
           for i, (k, url, r) in enumerate(rows)]
    return set_dir, out


def stage(shards: ShardSet, stage_dir: str, seed: int, node: NodeLayout) -> ShardSet:
    """Copy this node's share (local rank 0), wait for every node, return the set with local URLs.

    Collective: every rank of the job calls it at the same point (the loader's constructor)."""
    box: dict[str, BaseException] = {}
    cancel = threading.Event()  # set when another node failed: this node stops copying
    copier, rows = None, []
    try:  # a bad value on one node only (an unset variable) must stop every rank, not hang them
        set_dir, rows = plan_copies(shards, stage_root(stage_dir))
        owner = node_groups(shards.counts, seed, node.nodes, shards.mix)
        mine = [r for r in rows if owner[r.index] == node.node]
        _check_share(shards, owner, node.nodes, stage_dir)
    except SatfuseError as exc:
        box["error"] = exc
    else:
        if node.local_rank == 0:
            copier = threading.Thread(target=_guarded, args=(box, shards, set_dir, mine, node, cancel),
                                      name="satfuse-stage", daemon=True)
            copier.start()
    try:
        _wait_for_all_nodes(copier, box, node)
    except BaseException:  # another node failed (or Ctrl-C): stop this node's copier before leaving
        cancel.set()
        if copier is not None:
            copier.join(timeout=60)
        raise
    urls = [str(r.dest) for r in rows]
    parts = []
    for k, part in enumerate(shards.parts):
        a, b = shards.mix.bounds[k], shards.mix.bounds[k + 1]  # type: ignore[union-attr]
        parts.append(dataclasses.replace(part, urls=urls[a:b]))
    return dataclasses.replace(shards, urls=urls, parts=parts)


def _check_share(shards: ShardSet, owner: list[int], nodes: int, stage_dir: str) -> None:
    """Every node must hold samples (of every mixed set): else its ranks would have nothing to read."""
    bounds = list(shards.mix.bounds) if shards.mix is not None else [0, len(shards.urls)]
    for a, b in zip(bounds, bounds[1:], strict=False):
        held = {owner[i] for i in range(a, b) if shards.counts[i] > 0}
        if len(held) < nodes:
            what = f" of {shards.parts[bounds.index(a)].spec}" if shards.parts else ""
            raise SatfuseError(f"data.stage_dir={stage_dir}: {b - a} shards{what} cannot give each of {nodes} nodes "
                               "its own; use fewer nodes, re-shard into more shards, or unset data.stage_dir")


def _guarded(box: dict[str, BaseException], shards: ShardSet, set_dir: Path, mine: list[StagedShard],
             node: NodeLayout, cancel: threading.Event) -> None:
    try:
        copy_share(shards, set_dir, mine, node.node, cancel)
    except BaseException as exc:  # noqa: BLE001 - handed to the main thread, which raises it
        box["error"] = exc


def _wait_for_all_nodes(copier: threading.Thread | None, box: dict[str, BaseException], node: NodeLayout) -> None:
    """Poll until every node's copier finished; raise on every rank if one failed."""
    group = control_group()
    while True:
        busy = copier is not None and copier.is_alive()
        failed = "error" in box
        busy_any, failed_any = agree_max([int(busy), int(failed)], group)
        if failed_any:
            if failed:
                err = box["error"]
                if isinstance(err, SatfuseError):
                    raise err
                raise SatfuseError(f"data.stage_dir: staging failed on node {node.node}: "
                                   f"{err.__class__.__name__}: {err}") from err
            raise SatfuseError("data.stage_dir: staging failed on another node (its log names the shard and why); "
                               "fix that and restart")
        if not busy_any:
            return
        time.sleep(POLL_S)


# --------------------------------------------------------------------------------------------
# The copier (local rank 0 of each node)
# --------------------------------------------------------------------------------------------


def copy_share(shards: ShardSet, set_dir: Path, mine: list[StagedShard], node: int = 0,
               cancel: threading.Event | None = None) -> dict[str, int]:
    """Make `set_dir` hold intact copies of `mine`: reuse verified copies, copy the rest.
    Returns counts and bytes {"reused", "copied", "recopied", "bytes_copied"}. `cancel` set:
    the copies in flight stop at their next chunk (their temp files removed) and it raises."""
    cancel = cancel or threading.Event()
    parts = _parts(shards)
    for k, (_, man) in enumerate(parts):
        folder = set_dir / f"part{k}"
        folder.mkdir(parents=True, exist_ok=True)
        # every tar a loader finds here was hashed while copied or reused: not hashed again on open
        _publish(folder / "manifest.json", json.dumps({**man, STAGED_KEY: True}, indent=1).encode())
    _drop_dead_temps(mine)
    present = [r for r in mine if _size(r.dest) == r.size]
    absent = [r for r in mine if r not in present]
    need = sum(r.size for r in absent)
    free = free_bytes(set_dir)
    if need > free:
        raise SatfuseError(
            f"{set_dir}: data.stage_dir has {human(free)} free but node {node}'s share needs {human(need)} more "
            f"({len(absent)} of its {len(mine)} shards to copy); point data.stage_dir at a larger local disk, "
            "use more nodes, or unset it")
    stats = {"reused": 0, "copied": 0, "recopied": 0, "bytes_copied": 0}
    lock = threading.Lock()
    with ThreadPoolExecutor(max_workers=COPY_THREADS, thread_name_prefix="satfuse-stage") as pool:
        intact = list(pool.map(lambda r: _hash_file(r.dest) == r.sha256, present))
    redo = [r for r, ok in zip(present, intact, strict=True) if not ok]
    for r in redo:
        log.warning("%s: local copy does not hash to the manifest's sha256 (damaged); copying it again", r.dest)
    stats["reused"] = len(present) - len(redo)
    stats["recopied"] = len(redo)
    todo = absent + redo
    total = sum(r.size for r in todo)
    log.info("staging node %d: %d shards (%s) to copy to %s, %d local copies verified and reused",
             node, len(todo), human(total), set_dir, stats["reused"])
    bar = tqdm(total=total, unit="B", unit_scale=True, desc=f"staging node {node}", disable=not todo, mininterval=2)

    def one(r: StagedShard) -> None:
        _copy_verified(r, bar, lock, cancel)
        with lock:
            stats["bytes_copied"] += r.size

    try:
        with ThreadPoolExecutor(max_workers=COPY_THREADS, thread_name_prefix="satfuse-stage") as pool:
            list(pool.map(one, todo))
    finally:
        bar.close()
    stats["copied"] = len(absent)
    _fsync_dir(set_dir)
    _write_record(set_dir, node, mine, stats)
    return stats


def _size(path: Path) -> int:
    try:
        return path.stat().st_size
    except OSError:
        return -1


def _drop_dead_temps(mine: list[StagedShard]) -> None:
    """Remove the temp files of copiers that died mid-copy (killed job, node reboot): their
    process is gone, so nothing will rename them; a live copier's temps are left alone."""
    for r in mine:
        for tmp in r.dest.parent.glob(f".{r.dest.name}.tmp-*"):
            pid = tmp.name.rsplit(".tmp-", 1)[1].split("-", 1)[0]
            try:
                os.kill(int(pid), 0)
            except (ValueError, ProcessLookupError):
                log.info("%s: removing the temp file of a copier that died", tmp)
                tmp.unlink(missing_ok=True)
            except PermissionError:  # alive, another user's
                pass


def _hash_file(path: Path) -> str:
    h = hashlib.sha256()
    buf = bytearray(CHUNK)
    view = memoryview(buf)
    with open(path, "rb") as fh:
        while n := fh.readinto(buf):
            h.update(view[:n])
    return h.hexdigest()


def _copy_verified(r: StagedShard, bar: tqdm, lock: threading.Lock, cancel: threading.Event) -> None:
    """Copy one shard to a temp file, hashing as it goes; rename into place only if it matches."""
    tmp = r.dest.with_name(f".{r.dest.name}.tmp-{os.getpid()}-{threading.get_ident()}")
    h = hashlib.sha256()
    buf = bytearray(CHUNK)
    view = memoryview(buf)
    try:
        with open(r.source, "rb") as src, open(tmp, "wb") as dst:
            while n := src.readinto(buf):
                if cancel.is_set():
                    raise SatfuseError(f"data.stage_dir: copying {r.source} stopped (staging failed elsewhere)")
                h.update(view[:n])
                dst.write(view[:n])
                with lock:
                    bar.update(n)
            dst.flush()
            os.fsync(dst.fileno())
        if h.hexdigest() != r.sha256:
            raise SatfuseError(f"{r.source}: its bytes do not hash to the manifest's sha256 while staging it to "
                               f"{r.dest.parent} (the shared copy is damaged); restore it or re-shard "
                               "(`satfuse shard verify` lists every damaged shard)")
        os.replace(tmp, r.dest)
    except OSError as exc:
        if is_no_space(exc):
            raise no_space_error(r.dest.parent, r.size, "staging a shard",
                                 "point data.stage_dir at a larger local disk or use more nodes") from exc
        raise SatfuseError(f"data.stage_dir: copying {r.source} to {r.dest} failed: {exc}") from exc
    finally:
        if tmp.exists():
            tmp.unlink()


def _publish(path: Path, data: bytes) -> None:
    """Atomic write (temp + fsync + rename); concurrent writers of the same bytes are harmless."""
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}-{threading.get_ident()}")  # one per writer
    with open(tmp, "wb") as fh:
        fh.write(data)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)


def _fsync_dir(path: Path) -> None:
    for folder in [path, *sorted(p for p in path.iterdir() if p.is_dir())]:
        fd = os.open(folder, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def _write_record(set_dir: Path, node: int, mine: list[StagedShard], stats: dict[str, int]) -> None:
    """`staged-node<N>.json`: which shards this node holds and what the last staging did (for
    people and tests; the loader never reads it)."""
    record = {"node": node, "shards": [str(r.dest.relative_to(set_dir)) for r in mine], **stats,
              "time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
    _publish(set_dir / f"staged-node{node}.json", json.dumps(record, indent=1).encode())

"""Streaming loader throughput (samples/s) vs per-file rasterio reads of the same pairs vs
the raw tar-bytes floor, measured in one run.

Why these three: per-file GeoTIFF reads are what a plain EO dataset class does (the
reference the shards must beat: goal >= 5x); reading the tar bytes without decoding is the
floor no loader can beat on this disk. The loader rows do *more* work than the reference
(decode, crop, clip + normalise, batch, DataLoader transfer), the reference only reads the
two rasters. Every row reads from the page cache (the data were just written), so the
ratios compare CPU cost, not disk speed; on a cluster filesystem per-file opens cost more.

Measured 2026-11-25 (2-core shared CPU VM, default args: 128 samples of 256x256 in 8 shards,
batch 16; the machine was loaded by other jobs, so the per-file row itself moved between 146
and 392 samples/s - read the ratios, each taken within one run). Before/after runs alternated:
- before (per-file reads into a buffer, tarfile headers parsed every epoch): best row
  loader_w0_crop128 at 3.59x, 4.06x, 2.85x per file (884, 930, 914 samples/s).
- after (mmap + member index, zero-copy views, crop read straight into the batch):
  loader_w0_crop128 at 6.22x, 16.69x, 7.28x (2441, 2982, 1508 samples/s); goal met in every
  run. Full-patch rows: w0_crop0 1.08-1.85x (was 0.66-1.05x). With workers (w2) a batch goes
  through a fresh shared-memory tensor, which costs ~25 ms per 13.6 MB batch on this VM
  (page faults), more than decoding it: w2_crop128 2.6-3.6x (was 1.5-2.3x).
- The w0 rows read every shard in one slot, so epochs 2-3 reuse the member index: with the
  index rebuilt each epoch (as a worker among many would) w0_crop128 is ~15% slower
  (A/B in one process: 1674-2189 vs 1568-3087 samples/s).

Member dealing (`deal_*` rows, `member_dealing` in the JSON): rank 0 of `--deal-world` ranks
reads the shard set (whole shards dealt) and the same pairs packed into one shard (fewer
shards than slots: member ranges dealt). Measured 2026-12-01, defaults (8 shards vs 1, 2
ranks), machine load 11-14 on 2 cores, two runs: members/shards rate 0.88, 0.94 (w0 crop 0),
0.77, 1.54 (w2 crop 0), 1.09, 1.24 (w0 crop 128), 0.85, 0.98 (w2 crop 128): no cost above the
noise for local tars (a worker indexes a whole shard's headers, ~10 us a member, once per
iterator). Whole shards are still dealt when there are enough: fewer headers to index, and a
`pipe:` shard is streamed from its start to the end of the range a slot reads, so with S
slots on one streamed shard the bytes read are (S + 1) / 2 times the shard's.

Per core (`workers` in the JSON): each loader row also reports the CPU seconds of the main
process (`time.process_time`, all threads) and of the workers (`/proc/PID/stat`, user +
system) over the timed window, `busy_cores` = CPU seconds / wall seconds and
`samples_per_cpu_s` = samples / CPU seconds, which does not depend on how many cores the
neighbours leave free. The main process reads each batch's tensors once (`--touch`, one
thread), so the hand-off's page faults are counted where a trainer would pay them. `*_fresh`
rows run the workers with the previous hand-off (a fresh shared-memory tensor per batch,
`pretrain_loader.BATCH_RING = False`) beside the batch ring; `--no-verify` takes the
per-worker sha256 check out of every loader row. Measured 2026-12-01 (README, "Loader
workers, per core"): per CPU second the ring delivers 1.8-3.2x the fresh hand-off at crop 128
and 2.8-4.3x at 256^2 (1, 2, 4 workers).
"""

from __future__ import annotations

import argparse
import logging
import multiprocessing
import os
import tarfile
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from satfuse.bench.encodings import ENCODINGS
from satfuse.bench.encodings import measure as measure_encodings
from satfuse.config import DataConfig

log = logging.getLogger(__name__)


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--shards", default="", help="an existing shard dir (default: synthesise one)")
    p.add_argument("--raw", default="", help="the SEN12MS tree the shards came from (per-file reference)")
    p.add_argument("--scenes", type=int, default=4, help="synthetic scenes (when synthesising)")
    p.add_argument("--patches", type=int, default=32, help="synthetic patches per scene")
    p.add_argument("--size", type=int, default=256, help="synthetic patch size (SEN12MS: 256)")
    p.add_argument("--maxcount", type=int, default=16, help="samples per shard (when synthesising)")
    p.add_argument("--workers", nargs="*", type=int, default=[0, 1, 2, 4],
                   help="loader num_workers rows (each also reports CPU seconds and samples per CPU second)")
    p.add_argument("--fresh", action=argparse.BooleanOptionalAction, default=True,
                   help="also time each worker row with the previous hand-off (a fresh shared-memory "
                        "tensor per batch instead of the reused batch ring): rows *_fresh")
    p.add_argument("--touch", action=argparse.BooleanOptionalAction, default=True,
                   help="the main process reads every tensor of each batch once (a sum), as a trainer "
                        "or a host-to-device copy would: the hand-off's page faults are then counted")
    p.add_argument("--verify", action=argparse.BooleanOptionalAction, default=True,
                   help="--no-verify: the loader/deal rows run without the per-shard sha256 check (its "
                        "cost per worker: every worker checks the shards it opens)")
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--crops", nargs="*", type=int, default=[0, 128], help="loader crop rows (0 = full patch)")
    p.add_argument("--repeats", type=int, default=3, help="best of N for each row")
    p.add_argument("--epochs", type=int, default=3, help="loader epochs per row (workers start once)")
    p.add_argument("--encodings", nargs="*", default=list(ENCODINGS),
                   help="also pack the pairs with these `satfuse shard` encodings and compare bytes/pair, ratio, decode "
                        "us/pair/core, loader samples/s (default: all of them; none: --encodings with no name; with "
                        "--shards: that set as packed)")
    p.add_argument("--deal-world", type=int, default=2,
                   help="ranks of the dealing rows (rank 0 timed): the shard set vs the same pairs in 1 shard")


def synthesise(workdir: Path, args: argparse.Namespace) -> tuple[Path, Path]:
    from satfuse.data.packing.shard_writer import shard_dataset  # lazy: --help stays fast
    from satfuse.data.sources.synth import write_sen12ms  # lazy: --help stays fast

    raw, shards = workdir / "raw", workdir / "shards" / "bench"
    write_sen12ms(raw, scenes=args.scenes, patches_per_scene=args.patches, seed=0, size=args.size)
    shard_dataset(raw, "sen12ms", shards, maxcount=args.maxcount, seed=0, command=["bench", "loader"])
    return raw, shards


def one_shard(workdir: Path, raw: Path, total: int) -> Path:
    """The same pairs packed into a single shard: on `--deal-world` ranks it has fewer shards
    than slots, so the loader deals member ranges instead of whole shards."""
    from satfuse.data.packing.shard_writer import shard_dataset  # lazy: --help stays fast

    out = workdir / "shards" / "bench-1shard"
    shard_dataset(raw, "sen12ms", out, maxcount=max(1, total), seed=0, command=["bench", "loader"])
    return out


def per_file_reads(raw: Path) -> tuple[float, int]:
    """Reference: open and read both GeoTIFFs of every pair with rasterio."""
    import rasterio  # lazy: --help stays fast

    from satfuse.data.sources.tree_scan import scan  # lazy: --help stays fast

    pairs = scan(raw, "sen12ms").pairs
    t0 = time.perf_counter()
    for pair in pairs:
        for path in (pair.s1, pair.s2):
            with rasterio.open(path) as src:
                src.read()
    return time.perf_counter() - t0, len(pairs)


def raw_tar_bytes(urls: list[str]) -> tuple[float, int]:
    """Floor: read every member's bytes of every shard, decode nothing."""
    t0 = time.perf_counter()
    keys = set()
    for url in urls:
        with tarfile.open(url, "r:") as tf:
            for info in tf:
                fh = tf.extractfile(info)
                if fh is not None:
                    fh.read()
                    keys.add(info.name.split(".", 1)[0])
    return time.perf_counter() - t0, len(keys)


def sha256_pass(shards) -> tuple[float, int]:
    """The loader's integrity check alone: one sha256 pass over every shard (the worst case
    per epoch, when every shard is indexed afresh by another worker)."""
    from satfuse.data.reading.stream_io import MappedTar, verify_digest  # lazy: --help stays fast

    t0 = time.perf_counter()
    for url in shards.urls:
        if verify_digest(url, MappedTar(url)):
            raise RuntimeError(f"{url}: sha256 differs from the manifest")
    return time.perf_counter() - t0, shards.total


def unverified(fn: Callable[[], tuple]) -> Callable[[], tuple]:
    """`fn` with the loader's per-shard sha256 check off (the A/B of its cost)."""
    from satfuse.data.reading import stream_io  # lazy: --help stays fast

    def run() -> tuple:
        stream_io.VERIFY_SHARDS = False
        try:
            return fn()
        finally:
            stream_io.VERIFY_SHARDS = True

    return run


def worker_cpu_seconds() -> dict[int, float]:
    """CPU seconds (user + system) of every live child process (the DataLoader workers), by
    pid, from /proc/PID/stat (fields 14-15, in clock ticks)."""
    tick = os.sysconf("SC_CLK_TCK")
    out = {}
    for child in multiprocessing.active_children():
        try:
            fields = Path(f"/proc/{child.pid}/stat").read_text().rsplit(")", 1)[1].split()
        except OSError:  # exited meanwhile
            continue
        out[child.pid] = (int(fields[11]) + int(fields[12])) / tick
    return out


def cpu_used(before: tuple[float, dict[int, float]], after: tuple[float, dict[int, float]]) -> dict[str, float]:
    """CPU seconds spent between two `(time.process_time(), worker_cpu_seconds())` readings:
    the main process (all its threads) and the workers alive at both readings."""
    main = after[0] - before[0]
    workers = sum(after[1][pid] - before[1][pid] for pid in after[1] if pid in before[1])
    return {"main_cpu_s": main, "workers_cpu_s": workers}


def consume(batch: dict[str, Any], touch: bool) -> int:
    """The batch's sample count, after reading each of its tensors once when `touch` (on one
    thread: idle intra-op threads spin after a parallel op, which would bill the main process
    CPU time the loader did not use)."""
    if touch:
        import torch  # lazy: --help stays fast

        threads = torch.get_num_threads()
        torch.set_num_threads(1)
        try:
            for v in batch.values():
                if isinstance(v, torch.Tensor):
                    v.sum()
        finally:
            torch.set_num_threads(threads)
    return len(batch["key"])


def loader_epochs(
    shards, workers: int, batch: int, crop: int, epochs: int, world: int = 1, touch: bool = True,
) -> tuple[float, int, float, dict[str, float]]:
    """`epochs` epochs of PretrainLoader on rank 0 of `world`: (seconds after the first batch,
    samples after the first batch, start-up seconds = worker start + first batch, CPU seconds
    of the main process and of the workers over the same window as the samples). Workers
    start once per iterator, so the steady rate is what a training run sees."""
    from satfuse.data.reading.pretrain_loader import PretrainLoader  # lazy: --help stays fast

    cfg = DataConfig(batch_size=batch, num_workers=workers, shuffle_buffer=64, crop=crop)
    ld = PretrainLoader(shards, cfg, rank=0, world_size=world, seed=0)
    t0 = time.perf_counter()
    it = iter(ld)
    next(it)
    t1 = time.perf_counter()
    cpu0 = (time.process_time(), worker_cpu_seconds())
    n = sum(consume(next(it), touch) for _ in range(ld.steps_per_epoch * epochs - 1))
    cpu1 = (time.process_time(), worker_cpu_seconds())
    elapsed = time.perf_counter() - t1
    del it
    return elapsed, n, t1 - t0, cpu_used(cpu0, cpu1)


def fresh_handoff(fn: Callable[[], tuple]) -> Callable[[], tuple]:
    """`fn` with the workers' previous hand-off: a fresh shared-memory tensor per batch."""
    from satfuse.data.reading import pretrain_loader  # lazy: --help stays fast

    def run() -> tuple:
        pretrain_loader.BATCH_RING = False
        try:
            return fn()
        finally:
            pretrain_loader.BATCH_RING = True

    return run


def row_functions(
    args: argparse.Namespace, raw: Path | None, shards, single=None,
) -> dict[str, Callable[[], tuple]]:
    fns: dict[str, Callable[[], tuple]] = {}
    checked = (lambda fn: fn) if args.verify else unverified
    if raw is not None:
        fns["per_file_rasterio"] = lambda: per_file_reads(raw)
    fns["raw_tar_bytes"] = lambda: raw_tar_bytes(shards.urls)
    for crop in args.crops:
        for workers in args.workers:
            fns[f"loader_w{workers}_crop{crop}"] = checked(
                lambda w=workers, c=crop: loader_epochs(shards, w, args.batch, c, args.epochs, touch=args.touch))
            if workers > 0 and args.fresh:
                fns[f"loader_w{workers}_crop{crop}_fresh"] = checked(fresh_handoff(
                    lambda w=workers, c=crop: loader_epochs(shards, w, args.batch, c, args.epochs, touch=args.touch)))
    if single is not None:  # whole-shard vs member dealing: same pairs, same ranks, same workers
        for crop in args.crops:
            for workers in args.workers:
                for kind, ss in (("shards", shards), ("members", single)):
                    fns[f"deal_{kind}_w{workers}_crop{crop}"] = checked(
                        lambda w=workers, c=crop, s=ss: loader_epochs(s, w, args.batch, c, args.epochs, args.deal_world))
    # the sha256 check's cost: the best loader row's configuration without it (1 epoch: every
    # shard indexed, so hashed, once; later epochs reuse the index), and the hash pass alone
    crop = max(args.crops)
    fns[f"loader_w0_crop{crop}_1epoch"] = lambda: loader_epochs(shards, 0, args.batch, crop, 1)
    fns[f"loader_w0_crop{crop}_1epoch_noverify"] = unverified(
        lambda: loader_epochs(shards, 0, args.batch, crop, 1))
    fns["sha256_pass"] = lambda: sha256_pass(shards)
    return fns


def dealing_costs(rows: dict[str, dict[str, Any]], shards, single, args: argparse.Namespace) -> dict[str, Any]:
    """Member dealing's rate as a fraction of whole-shard dealing's, per (workers, crop)."""
    out: dict[str, Any] = {"world": args.deal_world, "shards": len(shards.urls), "members_rows_shards": 1,
                           "members_vs_shards": {}}
    for crop in args.crops:
        for workers in args.workers:
            whole, members = rows[f"deal_shards_w{workers}_crop{crop}"], rows[f"deal_members_w{workers}_crop{crop}"]
            slots = args.deal_world * max(1, workers)
            if len(shards.urls) < slots:
                out.setdefault("note", []).append(f"w{workers}: {len(shards.urls)} shards < {slots} slots, both rows deal members")
            out["members_vs_shards"][f"w{workers}_crop{crop}"] = round(members["samples_per_s"] / whole["samples_per_s"], 3)
    return out


def measure(fns: dict[str, Callable[[], tuple]], repeats: int) -> dict[str, dict[str, Any]]:
    """Best of `repeats` per row, the rows taking turns in each round: on a shared machine a
    load spike then hits every row alike instead of one row's whole measurement."""
    runs: dict[str, list[tuple]] = {name: [] for name in fns}
    for _ in range(max(1, repeats)):
        for name, fn in fns.items():
            runs[name].append(fn())
    rows = {}
    for name, results in runs.items():
        fastest = min(results, key=lambda r: r[0])
        rows[name] = row(fastest[0], fastest[1])
        if len(fastest) > 2:
            rows[name]["startup_s"] = round(min(r[2] for r in results), 3)
        if len(fastest) > 3:
            rows[name].update(per_core(fastest[0], fastest[1], fastest[3]))
    return rows


def per_core(seconds: float, samples: int, cpu: dict[str, float]) -> dict[str, Any]:
    """Per-core efficiency of a loader row (the fastest repeat), from the CPU time its
    processes actually used in the timed window: cpu_s = main process (all threads) +
    workers, user + system; busy_cores = cpu_s / seconds; samples_per_cpu_s = samples /
    cpu_s (= samples_per_s / busy_cores): what one fully busy core delivers in this
    configuration, so it is comparable across worker counts and machine sizes."""
    main, workers = round(cpu["main_cpu_s"], 4), round(cpu["workers_cpu_s"], 4)
    cpu_s = round(main + workers, 4)
    return {"main_cpu_s": main, "workers_cpu_s": workers, "cpu_s": cpu_s, "busy_cores": round(cpu_s / seconds, 2),
            "samples_per_cpu_s": round(samples / cpu_s, 1) if cpu_s > 0 else None}


def workers_table(rows: dict[str, dict[str, Any]], args: argparse.Namespace) -> dict[str, Any]:
    """The worker-count rows side by side: samples/s, busy cores and samples per CPU second,
    per crop, each row's samples per CPU second relative to in-process (w0), and with workers
    the same for the previous hand-off (`fresh`, a new shared-memory tensor per batch)."""
    out: dict[str, Any] = {"cores": os.cpu_count(), "rows": {}}
    for crop in args.crops:
        ref = rows.get(f"loader_w0_crop{crop}", {}).get("samples_per_cpu_s")
        for workers in args.workers:
            for suffix in ("", "_fresh"):
                r = rows.get(f"loader_w{workers}_crop{crop}{suffix}")
                if r is None:
                    continue
                out["rows"][f"w{workers}_crop{crop}{suffix}"] = {
                    "samples_per_s": r["samples_per_s"], "busy_cores": r.get("busy_cores"),
                    "samples_per_cpu_s": r.get("samples_per_cpu_s"),
                    "efficiency_vs_w0": (round(r["samples_per_cpu_s"] / ref, 3)
                                         if ref and r.get("samples_per_cpu_s") else None)}
    return out


def run(args: argparse.Namespace) -> dict[str, Any]:
    from satfuse.data.reading.shard_sets import resolve_shards  # lazy: --help stays fast

    with tempfile.TemporaryDirectory(prefix="satfuse-bench-loader-") as tmp:
        if args.shards:
            shard_dir, raw = Path(args.shards), Path(args.raw) if args.raw else None
        else:
            raw, shard_dir = synthesise(Path(tmp), args)
        shards = resolve_shards(str(shard_dir))
        single = resolve_shards(str(one_shard(Path(tmp), raw, shards.total))) if raw is not None else None
        rows = measure(row_functions(args, raw, shards, single), args.repeats)
        ref = rows.get("per_file_rasterio", {}).get("samples_per_s")
        floor = rows["raw_tar_bytes"]["samples_per_s"]
        for r in rows.values():
            r["x_per_file"] = round(r["samples_per_s"] / ref, 2) if ref else None
            r["fraction_of_floor"] = round(r["samples_per_s"] / floor, 3)
        verify = {k: v for k, v in rows.items() if k.endswith("_1epoch") or k.endswith("_noverify")}
        on, off = sorted(verify)
        loaders = {k: v for k, v in rows.items()
                   if k.startswith("loader_") and k not in verify and not k.endswith("_fresh")}
        top = max(loaders, key=lambda k: loaders[k]["samples_per_s"])
        goal = {"best_row": top, "x_per_file": loaders[top]["x_per_file"],
                "met": bool(ref) and loaders[top]["x_per_file"] >= 5.0}
        encodings = None
        if args.encodings:  # satfuse.bench.encodings: one row per `satfuse shard` encoding
            encodings = measure_encodings(Path(tmp), raw, Path(args.shards) if args.shards else None, args,
                                          loader_epochs)
        dealing = (dealing_costs(rows, shards, single, args) if single is not None
                   else {"note": "member dealing rows need --raw (the pairs are packed again into one shard)"})
        return {
            "goal_5x_per_file": goal,
            "workers": workers_table(rows, args),
            "member_dealing": dealing,
            "samples": shards.total, "shards": len(shards.urls), "patch": args.size if not args.shards else None,
            "batch": args.batch, "rows": rows,
            **({"encodings": encodings} if encodings is not None else {}),
            "verify_overhead": {"rows": [on, off], "slowdown_first_epoch": round(
                rows[off]["samples_per_s"] / rows[on]["samples_per_s"], 3),
                "sha256_pass_s": rows["sha256_pass"]["seconds"]},
            "note": ("per_file_rasterio reads both rasters only; loader rows also decode, crop, normalise and "
                     "batch; loader rates are steady-state (after the first batch), start-up is startup_s; "
                     "all rows read from the page cache"),
        }


def row(seconds: float, samples: int) -> dict[str, Any]:
    return {"seconds": round(seconds, 4), "samples": samples, "samples_per_s": round(samples / seconds, 1)}

"""Bytes read from storage per pair by the loader (cold/warm, per crop and encoding); GB/s model.

Why bytes per pair: at 1,500-5,000 pairs/s per GPU a node needs tens of GB/s, more than a
parallel filesystem gives one node, so the loader's bytes per pair decide the cluster design.

How bytes are counted: mincore(2) on each shard file after a loader run from a cold cache
(every shard dropped from the page cache with posix_fadvise(POSIX_FADV_DONTNEED), checked by
mincore before the run). A page that is resident afterwards was read from storage by the run.
Why mincore and not /proc/self/io `read_bytes`: mincore counts per shard file, whichever
process faulted the page in (DataLoader workers are other processes), and it includes the
kernel's read-ahead, which is real storage traffic; `read_bytes` counts only this process and
every file it reads. `read_bytes` is still reported next to it (workers=0 rows: same process).

Loader modes, each the real `PretrainLoader` over one epoch:
- `shipped`: as `satfuse pretrain` reads today (each shard's sha256 checked against the
  manifest when a worker first indexes it; the kernel's default read-around on the map).
- `noverify`: the sha256 check off (`stream_io.VERIFY_SHARDS = False`).
- `touched`: check off and the map advised MADV_RANDOM (no read-around): the pages the decode
  itself touches, the floor of this layout. Bench-only prototype; the loader is unchanged.

Layout geometry (`geometry`): for the first samples of each set, the pages a random crop
touches in today's row-major (C, H, W) `.npy` members, against band-major square tiles
(page-aligned band starts) - computed from the members' real offsets in the tars. A member
that is not a plain `.npy` (e.g. compressed) counts as read whole.

Prototype (`prototype_range_reads`): the crop read as one pread per band of its row range,
read-ahead off, cold: what a loader could read with today's format (bench only).

Default: a synthetic SEN12MS set packed once per encoding variant (`VARIANTS`: extra
`satfuse shard` flags). `--shards DIR ...` measures your own shard sets (real data), the
only way to know a compressed encoding's real ratio. `--variant NAME=FLAGS` adds a variant.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import logging
import mmap
import os
import shlex
import tarfile
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from satfuse.bench.encodings import ENCODINGS, cli_flags
from satfuse.bench.io_layout import geometry, npy_members, range_reads
from satfuse.bench.io_pagecache import PAGE, drop_cache, read_bytes, resident_pages
from satfuse.config import DataConfig
from satfuse.data.commands import register as register_data_commands

log = logging.getLogger(__name__)

# Encoding variants of the synthetic set: (name, extra `satfuse shard` flags): the encodings
# `bench loader --encodings` knows, plus the smallest pretraining set (no label members).
# Variants with the same flags are packed and measured once.
VARIANTS: list[tuple[str, list[str]]] = [(name, cli_flags(name)) for name in ENCODINGS] + [
    ("zstd+float16+no-labels", [*cli_flags("zstd+float16"), "--no-labels"]),
]
MODES = ("shipped", "noverify", "touched")


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--shards", nargs="*", default=[], help="shard set directories to measure (default: synthesise)")
    p.add_argument("--variants", nargs="*", default=[name for name, _ in VARIANTS], metavar="NAME",
                   help=f"built-in encodings of the synthetic set to measure (default: all of {[n for n, _ in VARIANTS]})")
    p.add_argument("--variant", action="append", default=[], metavar="NAME=FLAGS",
                   help="another encoding of the synthetic set: NAME=extra `satfuse shard` flags (repeatable)")
    p.add_argument("--scenes", type=int, default=4, help="synthetic scenes")
    p.add_argument("--patches", type=int, default=16, help="synthetic patches per scene")
    p.add_argument("--size", type=int, default=256, help="synthetic patch size (SEN12MS: 256)")
    p.add_argument("--maxcount", type=int, default=16, help="samples per synthetic shard")
    p.add_argument("--crops", nargs="*", type=int, default=[128, 0], help="crop rows (0 = full patch)")
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--workers", type=int, default=0, help="loader num_workers (0: read_bytes is comparable)")
    p.add_argument("--batches", type=int, default=0, help="batches per row (0: one epoch)")
    p.add_argument("--geometry-samples", type=int, default=16, help="samples per set for the page geometry")
    p.add_argument("--workdir", default="", help="where the synthetic set is written (must not be tmpfs)")
    p.add_argument("--rate", nargs="*", default=["128=5000", "256=1500"], metavar="SIDE=PAIRS_PER_S",
                   help="pairs/s per GPU by crop side (full patch: its side)")
    p.add_argument("--gpus-per-node", type=int, default=8)
    p.add_argument("--nodes", nargs="*", type=int, default=[1, 64])


# --------------------------------------------------------------------------------------------
# Shard sets: packing and the tars' own member bytes
# --------------------------------------------------------------------------------------------


def satfuse_cli(argv: list[str]) -> None:
    """Run a `satfuse synth|shard` command in-process through the data commands' real parser;
    its stdout is dropped (the bench's stdout is its JSON). Raises on a non-zero return. The
    parser is built from `satfuse.data.commands`, not `satfuse.cli`: the CLI imports every bench
    module to list them, so importing it back would be a cycle."""
    parser = argparse.ArgumentParser(prog="satfuse")
    register_data_commands(parser.add_subparsers(dest="command"))
    args = parser.parse_args(argv)
    with contextlib.redirect_stdout(io.StringIO()):
        rc = args.func(args)
    if rc:
        raise RuntimeError(f"`satfuse {shlex.join(argv)}` returned {rc}")


def pack_variants(workdir: Path, args: argparse.Namespace) -> list[dict[str, Any]]:
    """Synthesise one SEN12MS tree and pack it once per distinct flag list."""
    raw = workdir / "raw"
    satfuse_cli(["synth", "sen12ms", "--out", str(raw), "--scenes", str(args.scenes),
                 "--patches-per-scene", str(args.patches), "--size", str(args.size)])
    sets, packed = [], {}
    for name, flags in variants(args):
        key = tuple(flags)
        if key in packed:
            sets.append({"name": name, "flags": flags, "dir": packed[key][1], "same_as": packed[key][0]})
            continue
        out = workdir / "shards" / name
        satfuse_cli(["shard", "--src", str(raw), "--dataset", "sen12ms", "--out", str(out),
                     "--maxcount", str(args.maxcount), *flags])
        packed[key] = (name, str(out))
        sets.append({"name": name, "flags": flags, "dir": str(out)})
    return sets


def variants(args: argparse.Namespace) -> list[tuple[str, list[str]]]:
    known = dict(VARIANTS)
    unknown = [n for n in args.variants if n not in known]
    if unknown:
        raise SystemExit(f"bench io: --variants {unknown}: choose from {list(known)} (or --variant NAME=FLAGS)")
    out = [(n, known[n]) for n in args.variants]
    for spec in args.variant:
        name, sep, flags = spec.partition("=")
        if not sep or not name:
            raise SystemExit(f"bench io: --variant {spec!r} is not NAME=FLAGS (e.g. --variant 'zstd=--compress zstd')")
        out.append((name, shlex.split(flags)))
    return out


def member_bytes(urls: list[str]) -> dict[str, Any]:
    """Bytes of each member kind, summed over the tars' own headers (any encoding), and the
    tar framing (headers, padding, end blocks) as the rest of the file sizes."""
    from satfuse.data.reading.stream_io import split_name  # lazy: --help stays fast

    per_ext: dict[str, int] = {}
    keys = 0
    total = sum(os.path.getsize(u) for u in urls)
    for url in urls:
        last = None
        with tarfile.open(url, "r:") as tf:
            for info in tf:
                if not info.isfile():
                    continue
                key, ext = split_name(info.name)
                per_ext[ext] = per_ext.get(ext, 0) + info.size
                keys += key != last
                last = key
    members = sum(per_ext.values())
    return {"pairs": keys, "shard_bytes": total, "member_bytes": dict(sorted(per_ext.items())),
            "tar_framing_bytes": total - members,
            "shard_bytes_per_pair": round(total / max(1, keys)),
            "member_bytes_per_pair": {k: round(v / max(1, keys)) for k, v in sorted(per_ext.items())}}


# --------------------------------------------------------------------------------------------
# Loader rows
# --------------------------------------------------------------------------------------------


@contextlib.contextmanager
def loader_mode(mode: str) -> Iterator[None]:
    """The loader as shipped, without the sha256 check, or also without read-around."""
    from satfuse.data.reading import stream_io  # lazy: --help stays fast

    init = stream_io.MappedTar.__init__

    def random_init(self, path: str) -> None:
        init(self, path)
        if isinstance(self.data, mmap.mmap):
            self.data.madvise(mmap.MADV_RANDOM)

    if mode != "shipped":
        stream_io.VERIFY_SHARDS = False
    if mode == "touched":
        stream_io.MappedTar.__init__ = random_init
    try:
        yield
    finally:
        stream_io.VERIFY_SHARDS = True
        stream_io.MappedTar.__init__ = init


def run_loader(shards, crop: int, args: argparse.Namespace) -> tuple[int, float]:
    """(pairs decoded, seconds) of one loader pass: one epoch or `--batches` batches."""
    from satfuse.data.reading.pretrain_loader import PretrainLoader  # lazy: --help stays fast

    cfg = DataConfig(batch_size=args.batch, num_workers=args.workers, crop=crop)
    ld = PretrainLoader(shards, cfg, rank=0, world_size=1, seed=0)
    steps = args.batches or ld.steps_per_epoch
    t0 = time.perf_counter()
    it = iter(ld)
    pairs = sum(len(next(it)["key"]) for _ in range(steps))
    del it
    return pairs, time.perf_counter() - t0


def measure_row(shards, crop: int, mode: str, cold: bool, args: argparse.Namespace) -> dict[str, Any]:
    """One loader pass; bytes read = pages resident after minus before, over the shard files."""
    urls = shards.urls
    if cold:
        for url in urls:
            drop_cache(url)
    before = sum(resident_pages(u) for u in urls)
    io0 = read_bytes()
    with loader_mode(mode):
        pairs, seconds = run_loader(shards, crop, args)
    io1 = read_bytes()
    after = sum(resident_pages(u) for u in urls)
    total_pages = sum(-(-os.path.getsize(u) // PAGE) for u in urls)
    new = max(0, after - before) * PAGE
    return {"mode": mode, "cache": "cold" if cold else "warm", "pairs": pairs,
            "resident_before_pages": before, "resident_after_pages": after, "shard_pages": total_pages,
            "cold_verified": before == 0 if cold else None,
            "bytes_read": new, "bytes_per_pair": round(new / max(1, pairs)),
            "fraction_of_shard_bytes": round(new / (total_pages * PAGE), 4),
            "proc_read_bytes_per_pair": (round((io1 - io0) / max(1, pairs))
                                         if io0 is not None and io1 is not None and not args.workers else None),
            "seconds": round(seconds, 4), "pairs_per_s": round(pairs / seconds, 1)}


def loader_rows(shards, args: argparse.Namespace) -> list[dict[str, Any]]:
    rows = []
    for crop in args.crops:
        for mode in MODES:
            rows.append({"crop": crop, **measure_row(shards, crop, mode, True, args)})
            if mode == "shipped":  # every page of the pass is resident now: the warm row
                rows.append({"crop": crop, **measure_row(shards, crop, mode, False, args)})
    return rows


# --------------------------------------------------------------------------------------------
# The bandwidth model
# --------------------------------------------------------------------------------------------


def parse_rates(specs: list[str]) -> dict[int, float]:
    rates = {}
    for spec in specs:
        side, sep, value = spec.partition("=")
        try:
            rates[int(side)] = float(value)
        except ValueError:
            raise SystemExit(f"bench io: --rate {spec!r} is not SIDE=PAIRS_PER_S (e.g. 128=5000)") from None
        if not sep:
            raise SystemExit(f"bench io: --rate {spec!r} is not SIDE=PAIRS_PER_S (e.g. 128=5000)")
    return rates


def bandwidth(bytes_per_pair: float, pairs_per_s_per_gpu: float, gpus_per_node: int, nodes: list[int]) -> dict[str, Any]:
    """GB/s (1e9 bytes/s) one node and all nodes must read at the given rate."""
    per_node = bytes_per_pair * pairs_per_s_per_gpu * gpus_per_node / 1e9
    return {"gb_per_s_per_node": round(per_node, 2),
            "gb_per_s_total": {str(n): round(per_node * n, 1) for n in nodes}}


def model(sets: list[dict[str, Any]], args: argparse.Namespace) -> tuple[list[dict[str, Any]], list[str]]:
    """Rows per (set, crop, loader mode or the range-read prototype) from the cold rows'
    bytes/pair, and the text table."""
    rates = parse_rates(args.rate)
    rows = []
    for s in sets:
        if "rows" not in s:
            continue
        side = s["patch"]
        for r in [*s["rows"], *({**p, "mode": "range_reads", "cache": "cold"} for p in s["prototype_range_reads"])]:
            if r["cache"] != "cold":
                continue
            crop_side = r["crop"] or side
            if crop_side not in rates:
                raise SystemExit(f"bench io: no --rate for crop side {crop_side} (give --rate {crop_side}=PAIRS_PER_S)")
            rows.append({"set": s["name"], "crop": crop_side, "mode": r["mode"], "bytes_per_pair": r["bytes_per_pair"],
                         "pairs_per_s_per_gpu": rates[crop_side],
                         **bandwidth(r["bytes_per_pair"], rates[crop_side], args.gpus_per_node, args.nodes)})
    head = (f"| set | crop | loader | MB/pair read | pairs/s/GPU | GB/s per node ({args.gpus_per_node} GPUs) | "
            + " | ".join(f"GB/s, {n} node{'s' if n > 1 else ''}" for n in args.nodes) + " |")
    table = [head, "|" + "---|" * (6 + len(args.nodes))]
    for m in rows:
        table.append(f"| {m['set']} | {m['crop']} | {m['mode']} | {m['bytes_per_pair'] / 1e6:.3f} | "
                     f"{m['pairs_per_s_per_gpu']:g} | {m['gb_per_s_per_node']:g} | "
                     + " | ".join(f"{m['gb_per_s_total'][str(n)]:g}" for n in args.nodes) + " |")
    return rows, table


# --------------------------------------------------------------------------------------------


def measure_set(entry: dict[str, Any], args: argparse.Namespace) -> dict[str, Any]:
    from satfuse.data.reading.shard_sets import resolve_shards  # lazy: --help stays fast

    shards = resolve_shards(entry["dir"])
    first = npy_members(shards.urls[0], 1)
    patch = next((m[2][1] for m in first[0] if m[2]), args.size) if first and first[0] else args.size
    rates = parse_rates(args.rate)
    missing = sorted({c or patch for c in args.crops} - set(rates))
    if missing:  # before the measurement, not after
        raise SystemExit(f"bench io: {entry['dir']}: no --rate for crop side {missing[0]} "
                         f"(give --rate {missing[0]}=PAIRS_PER_S)")
    members = member_bytes(shards.urls)  # reads headers: before any cold row
    geo = geometry(shards.urls, args.crops, args.geometry_samples)
    rows = loader_rows(shards, args)
    ranges = range_reads(shards.urls, args.crops, limit=args.batches * args.batch)
    cold = [r for r in rows if r["cache"] == "cold"] + ranges
    if not all(r["cold_verified"] for r in cold):
        log.warning("bench io: %s: the page cache kept shard pages after POSIX_FADV_DONTNEED (tmpfs?); "
                    "cold rows are not cold - use --workdir on a disk", entry["dir"])
    return {**entry, "patch": patch, "shards": len(shards.urls), **members, "geometry": geo, "rows": rows,
            "prototype_range_reads": ranges,
            "cold_verified": all(r["cold_verified"] for r in cold)}


def run(args: argparse.Namespace) -> dict[str, Any]:
    parse_rates(args.rate)  # a bad --rate fails before anything is packed
    with contextlib.ExitStack() as stack:
        if args.shards:
            names = [Path(d).name for d in args.shards]
            entries = [{"name": n if names.count(n) == 1 else str(d), "dir": str(d)} for n, d in zip(names, args.shards, strict=True)]
        else:
            if args.workdir:
                Path(args.workdir).mkdir(parents=True, exist_ok=True)
            root = stack.enter_context(tempfile.TemporaryDirectory(prefix="satfuse-bench-io-", dir=args.workdir or None))
            entries = pack_variants(Path(root), args)
        measured: dict[str, dict[str, Any]] = {}
        sets = []
        for e in entries:
            if "same_as" in e:
                sets.append({"name": e["name"], "flags": e["flags"], "same_as": e["same_as"]})
                continue
            measured[e["name"]] = measure_set(e, args)
            sets.append(measured[e["name"]])
    rows, table = model(sets, args)
    for line in table:
        log.info("%s", line)
    ra = Path("/sys/block")
    return {
        "sets": sets,
        "model": {"gpus_per_node": args.gpus_per_node, "nodes": args.nodes, "rates": parse_rates(args.rate),
                  "rows": rows, "table": table},
        "read_ahead_kb": {p.name: int((p / "queue/read_ahead_kb").read_text()) for p in sorted(ra.glob("*"))
                          if (p / "queue/read_ahead_kb").exists() and not p.name.startswith(("loop", "zram", "ram"))},
        "ok": all(s.get("cold_verified", True) for s in sets),
        "note": ("bytes_per_pair: pages resident after the pass that were not before (mincore), per decoded pair; "
                 "shipped = loader as `satfuse pretrain` runs it (sha256 per shard, default read-around), "
                 "noverify = sha256 check off, touched = check off and MADV_RANDOM (pages the decode touches)"),
    }

"""Shard encodings side by side (`satfuse bench loader --encodings ...`): bytes per pair of
each member, compression ratio, decode cost per pair on one core, loader samples/s.

Why in the loader bench: what an encoding buys (fewer bytes read per pair) is paid for in
decode time on the loader's cores; both are only comparable when measured in one run on
the same pairs. Rows are packed from the same source tree with `satfuse shard` flags
(`satfuse.data.format.codecs`); with `--shards DIR` the given set alone is measured (its bytes
and decode cost: run it on real shards, since synthetic data compresses differently).
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

# row name -> `satfuse shard` flags (codecs.make_encoding keyword arguments)
ENCODINGS: dict[str, dict[str, Any]] = {
    "default": {},
    "zstd": {"compress": "zstd"},
    "lz4": {"compress": "lz4"},
    "float16": {"s1_dtype": "float16"},
    "zstd+float16": {"compress": "zstd", "s1_dtype": "float16"},
    # row blocks with crc32s (satfuse.data.format.blocks): a crop reads and checks only its rows
    "zstd-blocks+float16": {"compress": "zstd-blocks", "s1_dtype": "float16"},
    "blocks+float16": {"compress": "blocks", "s1_dtype": "float16"},
}


def cli_flags(name: str) -> list[str]:
    """The `satfuse shard` flags of encoding `name` (shared with `bench io`'s variants)."""
    kw = ENCODINGS[name]
    parts = ["--compress", kw["compress"]] if "compress" in kw else []
    return parts + (["--s1-dtype", kw["s1_dtype"]] if "s1_dtype" in kw else [])


def flags(name: str) -> str:
    """The row's `satfuse shard` flags, for the JSON."""
    return " ".join(cli_flags(name)) or "(none)"


def pack(raw: Path, out: Path, name: str, maxcount: int) -> Path:
    from satfuse.data.format.codecs import make_encoding  # lazy: --help stays fast
    from satfuse.data.packing.shard_writer import shard_dataset  # lazy: --help stays fast

    shard_dataset(raw, "sen12ms", out, maxcount=maxcount, seed=0, command=["bench", "loader", "--encodings", name],
                  encoding=make_encoding(**ENCODINGS[name]))
    return out


def member_bytes(urls: list[str]) -> tuple[dict[str, float], int]:
    """Mean stored bytes per pair of each member kind (tar extension), and the pair count."""
    from satfuse.data.reading.stream_io import index_shard  # lazy: --help stays fast

    sizes: dict[str, int] = {}
    n = 0
    for url in urls:
        index = index_shard(url)
        for _, members in index.samples:
            n += 1
            for ext, ref in members.items():
                sizes[ext] = sizes.get(ext, 0) + ref.size
    return {ext: s / max(n, 1) for ext, s in sorted(sizes.items())}, n


def decode_cost(shards, repeats: int, crop: int = 0) -> tuple[float, dict[str, float]]:
    """Best-of-`repeats` CPU seconds per pair of this thread (`time.thread_time`: on a shared
    machine, wall time would count the waits for a core) to turn both image members (in the
    page cache) into float32 arrays: decompress + the cast `collate` does, no normalising;
    and the decoded `.npy` size per member (what the ratio divides by). `crop` > 0: a
    crop x crop window off the block grid (top 5, left 7: a row-blocked member then decodes
    ceil(crop / rows) + 1 blocks, its usual case), cut as the loader cuts it."""
    from satfuse.data.format.codecs import find_member  # lazy: --help stays fast
    from satfuse.data.reading.stream_io import (  # lazy: --help stays fast
        decode_pair,
        load_member,
        read_shard,
    )

    samples = [raw for s, url in enumerate(shards.urls) for raw in read_shard(url, s, set(range(shards.counts[s])), shards.counts[s] - 1)]
    decoded: dict[str, float] = {}
    for ext in ("s1.npy", "s2.npy"):
        found = find_member(samples[0].members, ext)
        if found is not None:
            arr = load_member(samples[0], *found, (2 if ext == "s1.npy" else 13,))
            decoded[found[0]] = 128 + arr.nbytes  # np.save header + data
    best = float("inf")
    window = (lambda h, w: (min(5, h - crop), min(7, w - crop), crop)) if crop else None
    for _ in range(max(1, repeats)):
        t0 = time.thread_time()
        for raw in samples:
            s1, s2 = decode_pair(raw, window)
            np.asarray(s1, dtype=np.float32)  # touches (reads) every pixel, as collate does
            np.asarray(s2, dtype=np.float32)
        best = min(best, time.thread_time() - t0)
    return best / max(1, len(samples)), decoded


def measure(workdir: Path, raw: Path | None, given: Path | None, args: argparse.Namespace,
            loader_epochs: Callable[..., tuple]) -> dict[str, Any]:
    """One row per encoding (or the given set), with ratios against the `default` row.
    `loader_epochs`: `satfuse.bench.loader`'s timed loader pass, passed in by that module (which
    imports this one: importing it back would be a cycle)."""
    from satfuse.data.reading.shard_sets import resolve_shards  # lazy: --help stays fast

    names = list(args.encodings) if given is None else ["given"]  # --shards DIR: that set, as packed
    unknown = [n for n in names if n not in ENCODINGS and n != "given"]
    if unknown:
        raise SystemExit(f"--encodings {unknown}: choose from {list(ENCODINGS)}")
    rows: dict[str, dict[str, Any]] = {}
    crop = max(args.crops)
    for name in names:
        shard_dir = given if given is not None else pack(raw, workdir / "enc" / name.replace("+", "_"), name, args.maxcount)
        shards = resolve_shards(str(shard_dir))
        per_member, n = member_bytes(shards.urls)
        secs, decoded = decode_cost(shards, args.repeats)
        crop_secs = decode_cost(shards, args.repeats, crop)[0] if crop else None
        elapsed, samples, _, cpu = min(loader_epochs(shards, 0, args.batch, crop, args.epochs) for _ in range(max(1, args.repeats)))
        tar_bytes = sum(s.get("bytes", 0) for s in shards.manifest["shards"])
        rows[name] = {
            "flags": flags(name) if name in ENCODINGS else "as packed",
            "encoding": shards.manifest.get("encoding"),
            "pairs": n,
            "bytes_per_pair": round(tar_bytes / max(n, 1)),
            "member_bytes_per_pair": {k: round(v) for k, v in per_member.items()},
            "compression_ratio": {k: round(decoded[k] / per_member[k], 3) for k in decoded if per_member.get(k)},
            "decode_us_per_pair_one_core": round(secs * 1e6, 1),
            f"loader_w0_crop{crop}_samples_per_s": round(samples / elapsed, 1),
            # the whole loader (read, decode, crop, normalise, batch) on its one process, per pair
            f"loader_w0_crop{crop}_cpu_ms_per_pair": round(sum(cpu.values()) / max(1, samples) * 1e3, 3),
        }
        if crop_secs is not None:
            rows[name][f"decode_us_per_pair_one_core_crop{crop}"] = round(crop_secs * 1e6, 1)
    if "default" in rows:
        base = rows["default"]["bytes_per_pair"]
        for r in rows.values():
            r["bytes_vs_default"] = round(r["bytes_per_pair"] / base, 3)
    return {"rows": rows, "crop": crop,
            "note": ("synthetic data's entropy is not the real data's: compression ratios hold for these bytes only; "
                     "measure real shards with `satfuse bench loader --shards DIR --encodings default` or `satfuse bench io --shards DIR`; "
                     "decode = decompress + cast both images to float32 on one thread, pixels in the page cache")}

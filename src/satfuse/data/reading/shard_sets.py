"""Shard sets: a `data.shards` spec resolved to URLs, per-shard counts and band statistics.

One job: turn what the user wrote (a shard directory, a brace pattern, a comma list,
`pipe:` commands, or a list of those to mix) into a `ShardSet`, checking it against its
manifest (`satfuse.data.format.manifest.load`): counts always come from a manifest, never from
reading tars. Several sets are mixed into one (`resolve_mix`): shards concatenated in list
order, a `Mix` for the epoch plan (`stream_plan.mixed_runs`), band sets checked to agree and
normalisation stats pooled (`STATS_POOLING`).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from braceexpand import braceexpand

from satfuse.data.format.bands import manifest_bands
from satfuse.data.format.codecs import find_member
from satfuse.data.format.manifest import MANIFEST_NAME, load, url_tar_name
from satfuse.data.reading.stream_io import RawSample, index_shard, load_member, manifest_digests
from satfuse.data.reading.stream_plan import Mix
from satfuse.utils import SatfuseError

log = logging.getLogger(__name__)


@dataclass
class ShardSet:
    """Resolved shard URLs with their sample counts (from the manifest) and band statistics."""

    urls: list[str]
    counts: list[int]
    manifest: dict
    stats: dict
    spec: str = ""
    mix: Mix | None = None  # several sets mixed (see resolve_mix); None: one set
    parts: list[ShardSet] = field(default_factory=list)  # the mixed sets, in data.shards order
    digests: list[str] = field(default_factory=list)  # each shard's manifest sha256, in urls order

    @property
    def total(self) -> int:
        return sum(self.counts)

    def fingerprint(self, sha256s: bool = True) -> str:
        """Identifies the shard set in loader states (names, counts and sha256s, not paths):
        a directory re-packed with another seed has the same names and counts but other bytes.
        `sha256s=False`: the names-and-counts fingerprint loader states written before sha256s
        were part of it hold (still accepted on resume, see PretrainLoader._validate)."""
        names = [url_tar_name(u) for u in self.urls]
        parts: list = [names, self.counts, self.digests] if sha256s else [names, self.counts]
        if self.mix is not None:  # which shard belongs to which set, and the weights, decide the plan
            parts += [list(self.mix.bounds), list(self.mix.weights)]
        text = json.dumps(parts)
        return hashlib.sha256(text.encode()).hexdigest()[:16]



def split_spec(spec: str) -> list[str]:
    """Comma list -> parts (a pipe: command may contain commas: split only before `pipe:`)."""
    if spec.startswith("pipe:"):
        return [p for p in re.split(r",(?=pipe:)", spec) if p.strip()]
    return [p.strip() for p in spec.split(",") if p.strip()]



def resolve_shards(spec: str | list[str], manifest: str = "", weights: list[float] | None = None) -> ShardSet:
    """Turn a shard spec into URLs + per-shard counts + stats.

    `spec`: a directory holding manifest.json; a (brace-expanded) path such as
    `dir/NAME-{000000..000127}.tar`; a comma list of those; or `pipe:` commands (then
    `manifest` is required). Counts always come from a manifest, never from reading tars.
    A list of such specs is several shard sets to mix (`resolve_mix`), with optional `weights`.
    """
    if isinstance(spec, list):
        if len(spec) == 1 and not weights:
            return resolve_shards(spec[0], manifest)
        return resolve_mix(spec, manifest, list(weights or []))
    if weights:
        raise SatfuseError(f"data.shard_weights={weights} needs a list of shard sets in data.shards "
                           f"(got the single set {spec!r}); drop data.shard_weights or list the sets")
    spec = (spec or "").strip()
    if not spec:
        raise SatfuseError("data.shards is empty; set it to a shard directory (e.g. shards/sen12ms)")
    if Path(spec).is_dir():
        return _resolve_dir(Path(spec), spec, manifest)
    urls = [u for part in split_spec(spec) for u in braceexpand(part)]
    if not urls:
        raise SatfuseError(f"data.shards={spec!r} expands to no shard; give a directory or NAME-{{000000..000009}}.tar")
    piped = [u for u in urls if u.startswith("pipe:") or "://" in u]
    for u in urls:
        if u not in piped and not Path(u).is_file():
            raise SatfuseError(f"{u}: shard not found (from data.shards={spec!r}); check the path/brace range")
    if manifest:
        mpath = Path(manifest)
    elif piped:
        raise SatfuseError(f"data.shards={spec!r} uses pipe:/remote URLs: pass data.manifest=PATH/manifest.json")
    else:
        mpath = Path(urls[0]).parent / MANIFEST_NAME
    man = load(mpath, f"shard spec {spec!r}")
    by_name = {s["name"]: s for s in man["shards"]}
    counts, digests = [], []
    for u in urls:
        name = url_tar_name(u)
        if name not in by_name:
            raise SatfuseError(f"{u}: shard {name!r} is not listed in {mpath}; pass the matching data.manifest")
        counts.append(int(by_name[name]["count"]))
        digests.append(by_name[name]["sha256"])
    urls = [u if u in piped else os.path.abspath(u) for u in urls]  # a local path is never read as a URL
    _refuse_repeats(urls, f"data.shards={spec!r}")
    _warn_unchecked(urls, digests, mpath)
    return ShardSet(urls=urls, counts=counts, manifest=man, stats=man["stats"], spec=spec, digests=digests)


def _resolve_dir(root: Path, spec: str, manifest: str) -> ShardSet:
    man = load(Path(manifest) if manifest else root / MANIFEST_NAME, f"shard spec {spec!r}")
    if not man["shards"]:
        raise SatfuseError(f"{root}: manifest lists no shards; re-shard with `satfuse shard`")
    urls, counts, digests = [], [], []
    for s in man["shards"]:
        path = root / s["name"]  # a plain file name (manifest.load checked it): never a pipe:/URL
        if not path.is_file():
            raise SatfuseError(f"{path}: listed in the manifest but missing; restore it or re-shard")
        urls.append(os.path.abspath(path))  # absolute: webdataset can never take it for a URL
        counts.append(int(s["count"]))
        digests.append(s["sha256"])
    return ShardSet(urls=urls, counts=counts, manifest=man, stats=man["stats"], spec=spec, digests=digests)


def _warn_unchecked(urls: list[str], digests: list[str], mpath: Path) -> None:
    """The loader checks a local shard's sha256 against the manifest.json beside it; with
    data.manifest elsewhere and none there (or one listing other bytes) say so once, rather
    than reading unchecked shards without a word."""
    unchecked = [u for u, d in zip(urls, digests, strict=True) if not (u.startswith("pipe:") or "://" in u)
                 and manifest_digests(os.path.dirname(u)).get(os.path.basename(u), ("",))[0] != d]
    if unchecked:
        log.warning("%s: %d shard(s) have no manifest.json beside them listing the sha256 of %s, so the loader "
                    "cannot check their bytes on open; copy that manifest beside them, or run `satfuse shard "
                    "verify` on the set", os.path.dirname(unchecked[0]), len(unchecked), mpath)


def shard_identity(url: str) -> str:
    """What makes two URLs the same shard: the resolved file for a local path, the text otherwise."""
    return url if url.startswith("pipe:") or "://" in url else os.path.realpath(url)


def _refuse_repeats(urls: list[str], what: str) -> None:
    """One shard listed twice (`a.tar,./a.tar`, or one set under two spellings) would be read
    twice per epoch: refused, naming the file."""
    seen: set[str] = set()
    for u in urls:
        ident = shard_identity(u)
        if ident in seen:
            raise SatfuseError(f"{what}: shard {ident} is listed twice (the same file under two spellings?), so "
                               "it would be read twice per epoch; list each shard/set once (data.shard_weights "
                               "weights a set up)")
        seen.add(ident)


def same_set_warning(a: ShardSet, b: ShardSet, a_key: str, b_key: str) -> str:
    """A warning when two shard sets share shards ('' when disjoint). Why: results on
    `b_key` are reported as held-out, which they are not when it holds training shards."""
    shared = {shard_identity(u) for u in a.urls} & {shard_identity(u) for u in b.urls}
    shared |= set(a.digests) & set(b.digests)
    if not shared:
        return ""
    return (f"{b_key}={b.spec} shares {len(shared)} shard(s) with {a_key}={a.spec} (same files or same bytes): "
            f"its scores are not held-out; point {b_key} at a disjoint shard set")


# --------------------------------------------------------------------------------------------
# Mixed shard sets
# --------------------------------------------------------------------------------------------

STATS_POOLING = ("count-weighted per band: each set's manifest mean/std weighted by the pixels it contributes to an "
                 "epoch (its share of samples x pixels per sample), pooled variance, min of mins, max of maxes")


def resolve_mix(specs: list[str], manifest: str, weights: list[float]) -> ShardSet:
    """Several shard sets as one: shards concatenated in list order, a `Mix` for the plan,
    band sets checked to agree and normalisation stats pooled (`STATS_POOLING`)."""
    if manifest:
        raise SatfuseError("data.manifest names one manifest but data.shards lists several sets; give each set as "
                           "a directory holding its manifest.json (or mix sets one at a time)")
    if weights and len(weights) != len(specs):
        raise SatfuseError(f"data.shard_weights has {len(weights)} weights for {len(specs)} sets in data.shards; "
                           "give one weight per set (or none)")
    if any(not w > 0 for w in weights):
        raise SatfuseError(f"data.shard_weights={weights}: every weight must be > 0 (drop a set instead of weighting it 0)")
    if len(set(specs)) != len(specs):
        raise SatfuseError(f"data.shards={specs} lists a set twice; use data.shard_weights to weight a set up")
    parts = [resolve_shards(s) for s in specs]
    for p in parts:
        if p.total == 0:
            raise SatfuseError(f"data.shards: {p.spec} holds no sample (its manifest counts 0); drop it from the list")
    for other in parts[1:]:
        for sensor in ("s1", "s2"):
            a = manifest_bands(parts[0].manifest, parts[0].spec)[sensor]
            b = manifest_bands(other.manifest, other.spec)[sensor]
            if a != b:
                diff = sorted(set(a) ^ set(b)) or ["same bands, other order"]
                raise SatfuseError(f"data.shards: {parts[0].spec} and {other.spec} have different {sensor} bands "
                                   f"({', '.join(diff)}: {a} vs {b}); mix only sets with the same bands")
    _refuse_repeats([u for p in parts for u in p.urls], f"data.shards={specs}")
    bounds = [0]
    for p in parts:
        bounds.append(bounds[-1] + len(p.urls))
    urls = [u for p in parts for u in p.urls]
    counts = [c for p in parts for c in p.counts]
    mix = Mix(bounds=tuple(bounds), weights=tuple(float(w) for w in weights))
    shares = mix.shares(counts)
    stats = {sensor: pool_stats([p.stats[sensor] for p in parts], [p.total for p in parts], shares)
             for sensor in ("s1", "s2")}
    return ShardSet(urls=urls, counts=counts, manifest=parts[0].manifest, stats=stats, spec=",".join(specs), mix=mix,
                    parts=parts, digests=[d for p in parts for d in p.digests])


def pool_stats(stats: list[dict], totals: list[int], shares: list[int]) -> dict:
    """One sensor's stats over the mixed sets (see STATS_POOLING). A set whose manifest has no
    pixel count is weighted by its share of samples alone."""
    weights = []
    for st, total, share in zip(stats, totals, shares, strict=True):
        per_sample = float(st.get("count", 0)) / total if total and st.get("count") else 1.0
        weights.append(share * per_sample)
    w = np.asarray(weights, dtype=np.float64)
    if w.sum() <= 0:
        w = np.ones(len(stats))
    w = w / w.sum()
    means = np.asarray([st["mean"] for st in stats], dtype=np.float64)
    stds = np.asarray([st["std"] for st in stats], dtype=np.float64)
    mean = (w[:, None] * means).sum(0)
    var = (w[:, None] * (stds**2 + (means - mean) ** 2)).sum(0)
    out: dict[str, Any] = {"mean": mean.tolist(), "std": np.sqrt(var).tolist(),
                           "count": int(sum(int(st.get("count", 0)) for st in stats)), "pooling": STATS_POOLING,
                           "set_weights": [round(float(x), 6) for x in w]}
    if all(st.get("min") for st in stats) and all(st.get("max") for st in stats):
        out["min"] = np.min([st["min"] for st in stats], axis=0).tolist()
        out["max"] = np.max([st["max"] for st in stats], axis=0).tolist()
    return out


def patch_size(ss: ShardSet) -> tuple[int, int] | None:
    """(H, W) of a set's patches: the manifest's `patch_size` if it records one, else the S1
    header of the first sample of its first local shard (headers only); None if unknown
    (pipe: sets: then a crop too large is reported when the first sample is decoded)."""
    if ss.manifest.get("patch_size"):
        size = ss.manifest["patch_size"]
        return (int(size), int(size)) if isinstance(size, int) else (int(size[0]), int(size[1]))
    for url, count in zip(ss.urls, ss.counts, strict=True):
        if count and not (url.startswith("pipe:") or "://" in url):
            index = index_shard(url)
            found = find_member(index.samples[0][1], "s1.npy") if index.samples else None
            if found is not None:  # s1.npy, or s1.npy.zst / .lz4 (satfuse.data.format.codecs)
                try:
                    members = index.samples[0][1]
                    shape = load_member(RawSample(0, 0, "", dict(members)), *found, (2,)).shape
                except ValueError:
                    return None
                return int(shape[1]), int(shape[2])
            return None
    return None


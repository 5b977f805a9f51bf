"""Streaming pretraining loader over WebDataset shards, with exact and world-size-changing resume.

Why not a stock `wds.WebDataset(...)` pipeline: webdataset gives neither exact mid-epoch resume
nor equal batch counts per rank (see notes/lessons-from-anchors.md). Here every epoch is a plan
computed from the manifest counts alone (`satfuse.data.stream_plan`), so all ranks agree on
`steps_per_epoch` without communicating, and a checkpoint needs only a few integers per worker.

Epoch semantics
- Each epoch the shards are permuted (seed, epoch); the concatenated samples are cut into
  `world_size x workers` contiguous slots of equal size (+-1 sample), slot = rank * workers +
  worker. Slots are disjoint and together cover the whole shard set, so each rank sees a
  disjoint part of the data and the ranks' shares differ by at most `workers` samples even
  when shard sizes are uneven (a shard may be split between two neighbouring slots).
- Fewer shards than `world_size x workers` (4 shards on 2 ranks x 4 workers, or 1 shard):
  each shard is cut into `ceil(slots / shards)` contiguous member ranges and the ranges are
  permuted instead (`stream_plan.deal_members`); everything else - equal batches, disjoint
  ranks, seeded order, exact and world-size-changing resume - is the same. A worker then
  indexes the headers of a whole shard to read its range (local tars; a `pipe:` shard is
  streamed up to the range's end), which `satfuse bench loader` measures (`member_dealing`).
- Several shard sets (`data.shards=[a, b]`, optional `data.shard_weights`): one plan over
  all their shards; each epoch a set gives its weighted share (no weights: all its samples;
  with weights the epoch ends when the set the weights use up first has been read once, the
  others give a seeded, per-epoch different part), and the runs of all sets are permuted
  together (`stream_plan.mixed_runs`). Band sets must agree; stats are pooled
  (`STATS_POOLING`) and recorded under `normalization["mix"]` in checkpoints.
- A slot streams its samples through a shuffle buffer of `data.shuffle_buffer` raw samples
  (bytes only: samples are decoded when they leave the buffer) seeded by (seed, epoch, slot).
- Batches of `data.batch_size` are built in the worker; the rank interleaves its workers
  round robin. `steps_per_epoch` = min over ranks of the batches the rank can fill; every rank
  stops each epoch at exactly that many batches, so no rank waits at an epoch end.
- Samples not used in an epoch (with drop_last), per rank: the workers' incomplete last
  batches (<= workers x (batch_size - 1)) plus the batches cut to match the emptiest rank
  (<= workers x batch_size, since slot sizes differ by at most one sample); in all
  < world_size x workers x 2 x batch_size per epoch. The permutation changes each epoch, so
  they are different samples every epoch.
- Random crops (`data.crop`) and SimCLR views use an RNG seeded by (seed, epoch, key), so they
  do not depend on worker count or timing.
- DataLoader workers start once per `iter(loader)` and then follow the plan epoch after epoch
  on their own (a spawned worker costs seconds); every worker yields the same number of items
  per epoch (padding markers after its batches), so torch's strict round robin reproduces the
  plan's schedule. Labels are not read in pretraining. From local tars the shuffle buffer
  holds only member offsets (each worker indexes a shard's headers once and memory-maps it,
  `satfuse.data.stream_io`), and only the crop's pixels are read, straight into the batch.

Resume (`state_dict` / `load_state_dict`)
- The state holds the epoch, the batches this rank consumed in it and, per worker, the cursor:
  how many samples the worker had pulled from its shuffle buffer when it built the last batch
  the trainer received. Prefetched batches are not counted, so they are produced again.
- Same world size, workers, batch size, buffer size, seed: exact. Each worker recomputes its
  shuffle order, skips `cursor` samples without decoding them (local tars: nothing is read
  but the shard's headers; wholly consumed shards are not opened), and the next batch is bitwise the one the
  uninterrupted run would have produced.
- Different world size (or workers/batch/buffer): the shuffle buffer's choices depend only on
  counts, so the new run recomputes exactly which samples every old slot had consumed (its
  first `cursor` outputs) without reading any data. The rest of the epoch - the samples that sat
  in the old shuffle buffers and everything not yet read - is cut into the new slots as above.
  No sample of the epoch is repeated; the samples skipped in that epoch are only those of the
  rule above applied to the remainder on the new world size: < new_world x new_workers x 2 x
  batch_size (tested for 2 -> 1, 2 -> 3 and 2 -> 3 -> 1 within one epoch). The next epoch is a
  normal one. Batch counts of the resumed epoch: `steps_this_epoch` (not steps_per_epoch).
  These bounds assume the shards hold what the manifest says (see decode errors).

Decode errors (`data.on_decode_error`)
- "fatal": the first undecodable sample (or truncated/unreadable tar) raises SatfuseError
  naming the shard and key.
- "skip": a warning naming shard and key, the `decode_errors` counter goes up, and the worker
  continues. A worker that runs out of samples before its quota (the plan was made from the
  manifest counts) tops up by re-reading its own slot in a new shuffle order (pass 1, 2, ...),
  so every rank still delivers `steps_per_epoch` batches: the topped-up samples are repeats
  within the epoch, at most as many as were skipped. A slot with no readable sample at all is
  a SatfuseError, never a hang.
"""

from __future__ import annotations

import hashlib
import json
import logging
import re
from collections import deque
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from braceexpand import braceexpand
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from satfuse.config import DataConfig
from satfuse.data.bands import manifest_bands
from satfuse.data.normalize import S2_RGB, BandStats, normalize, normalize_into
from satfuse.data.stream_io import (
    RawSample,
    ShardCache,
    decode_label,
    decode_pair,
    index_shard,
    load_npy,
    read_shard,
)
from satfuse.data.stream_plan import (
    EpochPlan,
    Mix,
    Run,
    make_plan,
    runs_size,
    shuffle_order,
    slot_rng,
    split_runs,
    stable_seed,
)
from satfuse.utils import SatfuseError

log = logging.getLogger(__name__)

MANIFEST_FORMAT = "satfuse-shards/1"
STATE_VERSION = 1


# --------------------------------------------------------------------------------------------
# Shard sets
# --------------------------------------------------------------------------------------------


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

    @property
    def total(self) -> int:
        return sum(self.counts)

    def fingerprint(self) -> str:
        """Identifies the shard set in loader states (names and counts, not paths)."""
        names = [shard_name(u) for u in self.urls]
        parts: list = [names, self.counts]
        if self.mix is not None:  # which shard belongs to which set, and the weights, decide the plan
            parts += [list(self.mix.bounds), list(self.mix.weights)]
        text = json.dumps(parts)
        return hashlib.sha256(text.encode()).hexdigest()[:16]


TAR_NAME = re.compile(r"([^/\s'\"]+\.tar)")


def shard_name(url: str) -> str:
    """The tar's file name inside a path or a pipe: command (`pipe:aws s3 cp s3://b/x.tar -`)."""
    found = TAR_NAME.findall(url)
    return found[-1] if found else Path(url).name


def split_spec(spec: str) -> list[str]:
    """Comma list -> parts (a pipe: command may contain commas: split only before `pipe:`)."""
    if spec.startswith("pipe:"):
        return [p for p in re.split(r",(?=pipe:)", spec) if p.strip()]
    return [p.strip() for p in spec.split(",") if p.strip()]


def load_manifest(path: Path, spec: str) -> dict:
    if not path.is_file():
        raise SatfuseError(
            f"{path}: no manifest.json for shard spec {spec!r}; the shard set is incomplete "
            "(the manifest is written last) or the path is wrong: re-run `satfuse shard` or pass data.manifest=PATH"
        )
    try:
        manifest = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise SatfuseError(f"{path}: manifest is not valid JSON ({exc}); re-run `satfuse shard`") from exc
    if not isinstance(manifest, dict) or manifest.get("format") != MANIFEST_FORMAT:
        raise SatfuseError(f"{path}: not a {MANIFEST_FORMAT} manifest; re-shard with `satfuse shard`")
    for key in ("shards", "stats"):
        if key not in manifest:
            raise SatfuseError(f"{path}: manifest has no {key!r}; re-shard with `satfuse shard`")
    for sensor in ("s1", "s2"):
        if sensor not in manifest["stats"]:
            raise SatfuseError(f"{path}: manifest stats lack {sensor!r}; re-shard with `satfuse shard`")
    return manifest


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
        mpath = Path(urls[0]).parent / "manifest.json"
    man = load_manifest(mpath, spec)
    by_name = {s["name"]: int(s["count"]) for s in man["shards"]}
    counts = []
    for u in urls:
        name = shard_name(u)
        if name not in by_name:
            raise SatfuseError(f"{u}: shard {name!r} is not listed in {mpath}; pass the matching data.manifest")
        counts.append(by_name[name])
    return ShardSet(urls=urls, counts=counts, manifest=man, stats=man["stats"], spec=spec)


def _resolve_dir(root: Path, spec: str, manifest: str) -> ShardSet:
    man = load_manifest(Path(manifest) if manifest else root / "manifest.json", spec)
    if not man["shards"]:
        raise SatfuseError(f"{root}: manifest lists no shards; re-shard with `satfuse shard`")
    urls, counts = [], []
    for s in man["shards"]:
        path = root / s["name"]
        if not path.is_file():
            raise SatfuseError(f"{path}: listed in the manifest but missing; restore it or re-shard")
        urls.append(str(path))
        counts.append(int(s["count"]))
    return ShardSet(urls=urls, counts=counts, manifest=man, stats=man["stats"], spec=spec)


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
                    parts=parts)


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
            if index.samples and "s1.npy" in index.samples[0][1]:
                try:
                    shape = load_npy(index.samples[0][1]["s1.npy"], (2,)).shape
                except ValueError:
                    return None
                return int(shape[1]), int(shape[2])
            return None
    return None


# --------------------------------------------------------------------------------------------
# Per-sample transform (runs in the workers)
# --------------------------------------------------------------------------------------------


class FatalDataError(Exception):
    """Bad data or config that skipping cannot fix (e.g. crop larger than the patch)."""


@dataclass
class SampleTransform:
    """Decode -> crop (seeded by seed, epoch, key) -> normalise -> optional SimCLR views."""

    s1: BandStats
    s2: BandStats
    seed: int
    crop: int
    method: str = "dual_simclr"
    simclr_input: str = "s2_rgb"
    center: bool = False
    labels: bool = False  # pretraining never reads label members

    def __call__(self, raw: RawSample, epoch: int) -> dict[str, Any]:
        rng = np.random.default_rng(stable_seed("sample", self.seed, epoch, raw.key)) if self._uses_rng else None
        window: list[int] = []

        def choose(h: int, w: int) -> tuple[int, int, int]:
            window.extend(self._window(h, w, rng, raw))
            return window[0], window[1], window[2]

        s1, s2 = decode_pair(raw, choose, len(self.s2.mean))  # read-only views: pixels are read by `collate`
        item: dict[str, Any] = {"s1": Pending(s1, self.s1), "s2": Pending(s2, self.s2), "key": raw.key}
        label = decode_label(raw) if self.labels else None
        if label is not None:
            top, left, size = window
            lab = label[1][:, top : top + size, left : left + size] if size else label[1]
            item[label[0]] = np.ascontiguousarray(lab)
        if self.method == "simclr":
            item["s1"], item["s2"] = normalize(s1, self.s1), normalize(s2, self.s2)
            item["view1"], item["view2"] = self._views(item, rng)
        return item

    @property
    def _uses_rng(self) -> bool:
        """The per-sample RNG (seed, epoch, key) feeds random crops and SimCLR views only;
        building it costs ~15 us, so it is skipped when neither is drawn (same streams)."""
        return self.method == "simclr" or (self.crop > 0 and not self.center)

    def _window(self, h: int, w: int, rng: np.random.Generator | None, raw: RawSample) -> tuple[int, int, int]:
        """(top, left, size) of the crop; size 0 = the full patch."""
        c = self.crop
        if c <= 0:
            return 0, 0, 0
        if c > h or c > w:
            raise FatalDataError(
                f"shard #{raw.shard} sample {raw.key}: data.crop={c} is larger than the {h}x{w} patch; "
                f"set data.crop <= {min(h, w)} (0 = full patch)"
            )
        if self.center or rng is None:  # no rng only for centre crops (see _uses_rng)
            return (h - c) // 2, (w - c) // 2, c
        return int(rng.integers(0, h - c + 1)), int(rng.integers(0, w - c + 1)), c

    def _views(self, item: dict[str, Any], rng: np.random.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        from satfuse.data.augment import simclr_views

        if self.simclr_input == "s2_rgb":
            x = item["s2"][S2_RGB]
        elif self.simclr_input == "s2":
            x = item["s2"]
        else:
            x = np.concatenate([item["s1"], item["s2"]], axis=0)
        gen = torch.Generator().manual_seed(int(rng.integers(0, 2**62)))
        return simclr_views(torch.from_numpy(np.ascontiguousarray(x)), gen, int(x.shape[-1]))


@dataclass
class Pending:
    """A cropped raw array - a view of the shard's map or of the member bytes - whose
    normalisation is deferred to `collate`, which casts it straight into the batch tensor
    and standardises it there in place: the crop's pixels are read once, never copied alone."""

    raw: np.ndarray
    stats: BandStats


def collate(items: list[dict[str, Any]]) -> dict[str, Any]:
    """Stack a list of samples; arrays become tensors, keys a list."""
    out: dict[str, Any] = {"key": [it["key"] for it in items]}
    for name in items[0]:
        if name == "key":
            continue
        vals = [it[name] for it in items]
        if isinstance(vals[0], Pending):
            tensor = torch.empty((len(vals), *vals[0].raw.shape), dtype=torch.float32)
            if get_worker_info() is not None:  # written once, straight into what the main process maps
                tensor.share_memory_()
            batch = tensor.numpy()
            for i, v in enumerate(vals):
                normalize_into(v.raw, v.stats, batch[i])
            out[name] = tensor
        elif isinstance(vals[0], torch.Tensor):
            out[name] = torch.stack(vals)
        else:
            out[name] = torch.from_numpy(np.stack(vals))
    return out


# --------------------------------------------------------------------------------------------
# One slot's stream (runs inside a DataLoader worker, or in-process with num_workers=0)
# --------------------------------------------------------------------------------------------


@dataclass
class SlotTask:
    """What one worker must deliver in one epoch: its slot, where to start, how many batches."""

    worker: int
    slot: int
    runs: list[Run]
    cursor: int
    quota: int


@dataclass
class EpochSpec:
    urls: list[str]
    epoch: int
    seed: int
    generation: int
    n_slots: int
    batch_size: int
    shuffle_buffer: int
    drop_last: bool
    on_error: str
    transform: SampleTransform
    cache: ShardCache | None = None  # the worker's indexed shards, kept across epochs


@dataclass
class StreamSpec:
    """Everything a worker needs to follow the plan on its own, epoch after epoch, from a
    starting position (a fresh start or a resumed state)."""

    urls: list[str]
    counts: list[int]
    seed: int
    rank: int
    world_size: int
    workers: int
    batch_size: int
    shuffle_buffer: int
    drop_last: bool
    on_error: str
    transform: SampleTransform
    epoch: int
    base: dict | None
    cursors: list[int]
    batches: list[int]
    mix: Mix | None = None

    def plan(self, epoch: int, base: dict | None) -> EpochPlan:
        return make_plan(self.counts, self.seed, epoch, base, world_size=self.world_size, workers=self.workers,
                         batch_size=self.batch_size, drop_last=self.drop_last, mix=self.mix)

    def epoch_spec(self, epoch: int, plan: EpochPlan, cache: ShardCache | None = None) -> EpochSpec:
        return EpochSpec(self.urls, epoch, self.seed, plan.generation, len(plan.slots), self.batch_size,
                         self.shuffle_buffer, self.drop_last, self.on_error, self.transform, cache)


def read_in_order(spec: EpochSpec, runs: list[Run], order: np.ndarray, start: int) -> Iterator[RawSample]:
    """Samples order[start:], reading the slot's runs sequentially and holding at most
    `shuffle_buffer` samples; positions before `start` in the order are not read at all."""
    needed = np.zeros(len(order), dtype=bool)
    needed[order[start:]] = True
    stream = _read_needed(spec, runs, needed)
    store: dict[int, RawSample] = {}
    for pos in order[start:].tolist():
        while pos not in store:
            local, sample = next(stream)
            store[local] = sample
        yield store.pop(pos)


def _read_needed(spec: EpochSpec, runs: list[Run], needed: np.ndarray) -> Iterator[tuple[int, RawSample]]:
    offset = 0
    for shard, lo, hi in runs:
        local = np.nonzero(needed[offset : offset + hi - lo])[0]
        if len(local):
            wanted = {lo + int(i) for i in local}
            for sample in read_shard(spec.urls[shard], shard, wanted, max(wanted), spec.cache):
                yield offset + sample.index - lo, sample
        offset += hi - lo


class _SlotWorker:
    """Builds the batches of one slot in one epoch, topping up from extra passes after
    skipped samples; yields `{"__error__": msg}` instead of raising (the main process raises)."""

    def __init__(self, spec: EpochSpec, task: SlotTask, errors: int = 0) -> None:
        self.spec, self.task = spec, task
        self.n = runs_size(task.runs)
        self.errors = errors

    def batches(self) -> Iterator[dict[str, Any]]:
        spec, task = self.spec, self.task
        cursor, emitted, pending = task.cursor, 0, []
        if task.quota <= 0:
            return
        if self.n == 0:
            yield {"__error__": f"slot {task.slot} has no samples but must deliver {task.quota} batches"}
            return
        while True:
            pass_, start = divmod(cursor, self.n)
            rng = slot_rng(spec.seed, spec.epoch, spec.generation, task.slot, spec.n_slots, pass_)
            order = shuffle_order(self.n, spec.shuffle_buffer, rng)
            good = 0
            for raw in read_in_order(spec, task.runs, order, start):
                cursor += 1
                item = self._transform(raw)
                if isinstance(item, str):
                    yield {"__error__": item}
                    return
                if item is None:
                    continue
                good += 1
                pending.append(item)
                if len(pending) == spec.batch_size:
                    yield self._pack(pending, cursor)
                    pending, emitted = [], emitted + 1
                    if emitted == task.quota:
                        return
            if pending and not spec.drop_last and pass_ == 0 and emitted == task.quota - 1:
                yield self._pack(pending, cursor)
                return
            if start == 0 and good == 0:
                shards = sorted({spec.urls[s] for s, _, _ in task.runs})
                yield {"__error__": f"{shards[0]}: no readable sample in slot {task.slot}'s shards {shards}; "
                       "fix or re-create the shards"}
                return
            if pass_ == 0:
                log.warning("slot %d came up short after %d skipped samples; topping up from a re-read",
                            task.slot, self.errors)

    def _transform(self, raw: RawSample) -> dict[str, Any] | str | None:
        """The item, None for a skipped sample, or a fatal message."""
        url = self.spec.urls[raw.shard]
        try:
            return self.spec.transform(raw, self.spec.epoch)
        except FatalDataError as exc:
            return f"{url}: {exc}"
        except Exception as exc:  # noqa: BLE001 - any decode failure of untrusted bytes
            if self.spec.on_error == "fatal":
                return (f"{url}: sample {raw.key} failed to decode ({exc}); fix the shard or set "
                        "data.on_decode_error=skip")
            self.errors += 1
            log.warning("%s: skipping sample %s: %s", url, raw.key, exc)
            return None

    def _pack(self, items: list[dict[str, Any]], cursor: int) -> dict[str, Any]:
        batch = collate(items)
        batch["_meta"] = (self.task.worker, self.spec.epoch, cursor, self.errors)
        return batch


class _StreamDataset(IterableDataset):
    """A rank's endless stream; each DataLoader worker follows its own slot, epoch after epoch.

    Workers are started once per `iter()`, not per epoch (a spawned worker costs seconds).
    Per epoch every worker yields the same number of items - its batches, then padding
    markers - so torch's strict round-robin over workers reproduces the plan's schedule
    and the main process never buffers more than a few batches.
    """

    def __init__(self, spec: StreamSpec) -> None:
        super().__init__()
        self.spec = spec

    def __iter__(self) -> Iterator[dict[str, Any]]:
        info = get_worker_info()
        w = info.id if info is not None else 0
        sp = self.spec
        epoch, base, cursors, done = sp.epoch, sp.base, list(sp.cursors), list(sp.batches)
        errors = 0
        cache = ShardCache()  # this worker's shard indexes and maps, built once, used every epoch
        while True:
            plan = sp.plan(epoch, base)
            sched = plan.schedule(sp.rank)
            left = [sched.count(v) - done[v] for v in range(sp.workers)]
            slot = plan.slot(sp.rank, w)
            task = SlotTask(w, slot, plan.slots[slot], cursors[w], left[w])
            worker = _SlotWorker(sp.epoch_spec(epoch, plan, cache), task, errors)
            for batch in worker.batches():
                yield batch
                if "__error__" in batch:
                    return
            errors = worker.errors
            for _ in range(max(left, default=0) - max(left[w], 0)):
                yield {"_pad": True, "_meta": (w, epoch, None, errors)}
            epoch, base, cursors, done = epoch + 1, None, [0] * sp.workers, [0] * sp.workers


# --------------------------------------------------------------------------------------------
# The loader
# --------------------------------------------------------------------------------------------


class PretrainLoader:
    """Endless iterator of pretraining batches, epoch after epoch; see the module docstring."""

    def __init__(
        self, shards: ShardSet, cfg: DataConfig, *, rank: int, world_size: int, seed: int,
        method: str = "dual_simclr", simclr_input: str = "s2_rgb", drop_last: bool = True,
        pin_memory: bool = False,
    ) -> None:
        self.shards, self.cfg = shards, cfg
        # batches in page-locked memory, so the trainer's non_blocking copy to a GPU overlaps
        # with compute (the trainer sets it when it trains on CUDA)
        self.pin_memory = pin_memory
        self.rank, self.world_size, self.seed = rank, world_size, seed
        self.method, self.drop_last = method, drop_last
        self.workers = max(1, cfg.num_workers)
        self._check(shards, cfg)
        self.s1_stats = BandStats.from_manifest(shards.stats, "s1", cfg.s1_clip)
        self.s2_stats = BandStats.from_manifest(shards.stats, "s2", cfg.s2_clip)
        self.transform = SampleTransform(self.s1_stats, self.s2_stats, seed, cfg.crop, method, simclr_input)
        self.bands = manifest_bands(shards.manifest, shards.spec)  # the model's input channels follow these
        self.steps_per_epoch = self._plan(0, None).steps
        if self.steps_per_epoch == 0:
            raise SatfuseError(
                f"{shards.spec}: {shards.total} samples cannot fill one batch of {cfg.batch_size} per worker on "
                f"{world_size} ranks x {self.workers} workers; lower data.batch_size or data.num_workers"
            )
        self._epoch, self._step, self._base = 0, 0, None
        self._cursors, self._batches = [0] * self.workers, [0] * self.workers
        self._errors_before, self._errors_run = 0, [0] * self.workers

    def _check(self, shards: ShardSet, cfg: DataConfig) -> None:
        if not 0 <= self.rank < self.world_size:
            raise SatfuseError(f"rank {self.rank} is outside world size {self.world_size}")
        if cfg.batch_size < 1:
            raise SatfuseError(f"data.batch_size={cfg.batch_size}; it must be >= 1")
        if shards.mix is not None and cfg.crop > 0:  # the crop must fit the smallest patch of the mix
            for part in shards.parts:
                size = patch_size(part)
                if size is not None and cfg.crop > min(size):
                    raise SatfuseError(f"data.crop={cfg.crop} is larger than the {size[0]}x{size[1]} patches of "
                                       f"{part.spec} (one of the mixed data.shards); set data.crop <= {min(size)}")

    def _plan(self, epoch: int, base: dict | None) -> EpochPlan:
        return make_plan(
            self.shards.counts, self.seed, epoch, base, world_size=self.world_size, workers=self.workers,
            batch_size=self.cfg.batch_size, drop_last=self.drop_last, mix=self.shards.mix,
        )

    @property
    def normalization(self) -> dict:
        """Stored with checkpoints: how raw bands became model inputs."""
        out = {
            "s1": {**self.s1_stats.to_dict(), "bands": list(self.bands["s1"])},
            "s2": {**self.s2_stats.to_dict(), "bands": list(self.bands["s2"])},
            "crop": self.cfg.crop,
            "source": self.shards.spec,
        }
        if self.shards.mix is not None:
            out["mix"] = {
                "sets": [p.spec for p in self.shards.parts], "weights": list(self.shards.mix.weights),
                "samples_per_epoch": self.shards.mix.shares(self.shards.counts), "stats": STATS_POOLING,
                "stats_set_weights": self.shards.stats["s2"].get("set_weights"),
            }
        return out

    @property
    def decode_errors(self) -> int:
        """Samples skipped as undecodable so far (this run and the runs it resumed from)."""
        return self._errors_before + sum(self._errors_run)

    @property
    def epoch(self) -> int:
        return self._epoch

    @property
    def steps_this_epoch(self) -> int:
        """Batches of the current epoch (= steps_per_epoch except in an epoch resumed on a new world size)."""
        return self._plan(self._epoch, self._base).steps

    # -- iteration ---------------------------------------------------------------------------

    def __iter__(self) -> Iterator[dict[str, Any]]:
        """Batches from the current position on, forever. Each call starts workers afresh."""
        self._errors_before, self._errors_run = self.decode_errors, [0] * self.workers
        spec = StreamSpec(
            urls=self.shards.urls, counts=self.shards.counts, seed=self.seed, rank=self.rank,
            world_size=self.world_size, workers=self.workers, batch_size=self.cfg.batch_size,
            shuffle_buffer=self.cfg.shuffle_buffer, drop_last=self.drop_last, on_error=self.cfg.on_decode_error,
            transform=self.transform, epoch=self._epoch, base=self._base, cursors=list(self._cursors),
            batches=list(self._batches), mix=self.shards.mix,
        )
        loader = DataLoader(_StreamDataset(spec), batch_size=None, num_workers=self.cfg.num_workers,
                            pin_memory=self.pin_memory)
        stream = iter(loader)
        ready: dict[int, deque] = {w: deque() for w in range(self.workers)}
        while True:
            schedule = self._plan(self._epoch, self._base).schedule(self.rank)
            for w in schedule[self._step :]:
                while not ready[w]:
                    self._pull(stream, ready)
                yield self._deliver(ready[w].popleft(), w, len(schedule))
            if self._step >= len(schedule):
                self._next_epoch()

    def _pull(self, stream: Iterator[dict[str, Any]], ready: dict[int, deque]) -> None:
        batch = next(stream, None)
        if batch is None:
            raise SatfuseError(f"{self.shards.spec}: the loader's workers stopped early (rank {self.rank})")
        if "__error__" in batch:
            raise SatfuseError(batch["__error__"])
        w, _, _, errors = batch["_meta"]
        self._errors_run[w] = errors
        if not batch.get("_pad"):
            ready[w].append(batch)

    def _deliver(self, batch: dict[str, Any], w: int, steps: int) -> dict[str, Any]:
        _, epoch, cursor, errors = batch.pop("_meta")
        if epoch != self._epoch:
            raise SatfuseError(f"loader out of step: worker {w} sent epoch {epoch} during epoch {self._epoch}")
        self._cursors[w], self._errors_run[w] = cursor, errors
        self._batches[w] += 1
        self._step += 1
        batch["epoch"] = self._epoch
        if self._step == steps:
            self._next_epoch()
        return batch

    def _next_epoch(self) -> None:
        self._epoch, self._step, self._base = self._epoch + 1, 0, None
        self._cursors, self._batches = [0] * self.workers, [0] * self.workers

    # -- checkpoint state --------------------------------------------------------------------

    def state_dict(self) -> dict:
        """Where this rank is: small and JSON-able; save every rank's (see load_state_dict)."""
        return {
            "version": STATE_VERSION,
            "epoch": self._epoch,
            "step": self._step,
            "rank": self.rank,
            "world_size": self.world_size,
            "num_workers": self.workers,
            "batch_size": self.cfg.batch_size,
            "shuffle_buffer": self.cfg.shuffle_buffer,
            "drop_last": self.drop_last,
            "seed": self.seed,
            "cursors": list(self._cursors),
            "batches": list(self._batches),
            "samples_consumed": int(sum(self._cursors)),
            "decode_errors": self.decode_errors,
            "shards": self.shards.fingerprint(),
            "base": self._base,
        }

    def load_state_dict(self, states: list[dict]) -> None:
        """Resume from the states of ALL ranks of the saving run, in rank order (then iter())."""
        first = self._validate(states)
        self._errors_before, self._errors_run = int(first.get("decode_errors", 0)), [0] * self.workers
        self._epoch = int(first["epoch"])
        same = (
            first["world_size"] == self.world_size and first["num_workers"] == self.workers
            and first["batch_size"] == self.cfg.batch_size and first["shuffle_buffer"] == self.cfg.shuffle_buffer
            and bool(first["drop_last"]) == self.drop_last
        )
        if same:
            mine = states[self.rank]
            self._errors_before = int(mine.get("decode_errors", 0))
            self._step, self._base = int(mine["step"]), mine["base"]
            self._cursors, self._batches = list(mine["cursors"]), list(mine["batches"])
            return
        self._step, self._cursors, self._batches = 0, [0] * self.workers, [0] * self.workers
        if first["step"] == 0 and first["base"] is None:
            self._base = None
            return
        self._base = {
            "world_size": first["world_size"], "workers": first["num_workers"],
            "shuffle_buffer": first["shuffle_buffer"],
            "cursors": [int(c) for s in states for c in s["cursors"]], "base": first["base"],
        }
        log.info("loader: resuming epoch %d (was %d ranks x %d workers, now %d x %d): %d batches left",
                 self._epoch, first["world_size"], first["num_workers"], self.world_size, self.workers,
                 self.steps_this_epoch)

    def _validate(self, states: list[dict]) -> dict:
        if not states or not isinstance(states, list):
            raise SatfuseError("loader state: empty; pass the list of every saving rank's state_dict()")
        first = states[0]
        if first.get("version") != STATE_VERSION:
            raise SatfuseError(f"loader state version {first.get('version')} is not {STATE_VERSION}; resume with the same satfuse")
        if len(states) != first["world_size"]:
            raise SatfuseError(f"loader state: got {len(states)} rank states for a world size of {first['world_size']}")
        if first["shards"] != self.shards.fingerprint():
            raise SatfuseError(f"loader state was written for another shard set than {self.shards.spec}; "
                               "resume with the same data.shards (or checkpoint.resume=none)")
        if first["seed"] != self.seed:
            raise SatfuseError(f"loader state seed {first['seed']} != train.seed {self.seed}; resume with the same seed")
        for r, s in enumerate(states):
            if s["rank"] != r or s["epoch"] != first["epoch"] or s["step"] != first["step"]:
                raise SatfuseError(f"loader state of rank {r} is at epoch {s['epoch']} step {s['step']} (rank "
                                   f"{s['rank']}), rank 0 at {first['epoch']}/{first['step']}: inconsistent checkpoint")
        return first


# --------------------------------------------------------------------------------------------
# Held-out evaluation
# --------------------------------------------------------------------------------------------


class EvalLoader:
    """Finite, deterministic pass over a shard set: each sample exactly once across ranks.

    Rank r reads the r-th contiguous block of the samples (shard order), so it opens only the
    shards it needs. Every rank yields the same number of batches; rows past a rank's block,
    and undecodable samples with on_decode_error=skip, are zero rows with mask False.
    """

    def __init__(
        self, shards: ShardSet, cfg: DataConfig, *, rank: int, world_size: int, batch_size: int, crop: int = 0,
    ) -> None:
        if not 0 <= rank < world_size:
            raise SatfuseError(f"rank {rank} is outside world size {world_size}")
        if batch_size < 1:
            raise SatfuseError(f"eval batch_size={batch_size}; it must be >= 1")
        self.shards, self.cfg, self.batch_size = shards, cfg, batch_size
        s1 = BandStats.from_manifest(shards.stats, "s1", cfg.s1_clip)
        s2 = BandStats.from_manifest(shards.stats, "s2", cfg.s2_clip)
        self.transform = SampleTransform(s1, s2, 0, crop, center=True, labels=True)
        all_runs: list[Run] = [(s, 0, c) for s, c in enumerate(shards.counts) if c > 0]
        self.runs = split_runs(all_runs, world_size)[rank]
        longest = -(-shards.total // world_size)
        self.n_batches = -(-longest // batch_size)
        self.decode_errors = 0

    def __len__(self) -> int:
        return self.n_batches

    def __iter__(self) -> Iterator[dict[str, Any]]:
        rows: list[dict[str, Any] | None] = []
        template: dict[str, Any] | None = None
        emitted = 0
        for raw in self._samples():
            item = self._decode(raw)
            template = template or item
            rows.append(item)
            if len(rows) == self.batch_size:
                yield self._batch(rows, template)
                rows, emitted = [], emitted + 1
        while emitted < self.n_batches:
            rows += [None] * (self.batch_size - len(rows))
            yield self._batch(rows, template)
            rows, emitted = [], emitted + 1

    def _samples(self) -> Iterator[RawSample]:
        for shard, lo, hi in self.runs:
            yield from read_shard(self.shards.urls[shard], shard, set(range(lo, hi)), hi - 1)

    def _decode(self, raw: RawSample) -> dict[str, Any] | None:
        url = self.shards.urls[raw.shard]
        try:
            return self.transform(raw, 0)
        except FatalDataError as exc:
            raise SatfuseError(f"{url}: {exc}") from exc
        except Exception as exc:  # noqa: BLE001 - untrusted bytes
            if self.cfg.on_decode_error == "fatal":
                raise SatfuseError(f"{url}: sample {raw.key} failed to decode ({exc}); fix the shard "
                                   "or set data.on_decode_error=skip") from exc
            self.decode_errors += 1
            log.warning("%s: skipping sample %s: %s", url, raw.key, exc)
            return None

    def _template(self) -> dict[str, Any]:
        """Shapes for an all-padding rank: decode the first readable sample of the set."""
        for shard, count in enumerate(self.shards.counts):
            if count:
                for raw in read_shard(self.shards.urls[shard], shard, {0}, 0):
                    item = self._decode(raw)
                    if item is not None:
                        return item
        raise SatfuseError(f"{self.shards.spec}: no readable sample to evaluate on")

    def _batch(self, rows: list[dict[str, Any] | None], template: dict[str, Any] | None) -> dict[str, Any]:
        if template is None or any(r is None for r in rows):
            template = template or next((r for r in rows if r is not None), None) or self._template()
        filled = [r if r is not None else {**template, "key": ""} for r in rows]
        batch = collate(filled)
        mask = torch.tensor([r is not None for r in rows], dtype=torch.bool)
        for value in batch.values():
            if isinstance(value, torch.Tensor):
                value[~mask] = 0
        batch["mask"] = mask
        return batch

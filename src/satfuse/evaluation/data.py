"""A benchmark's labelled shards in memory, the early-stopping split, and nested label-fraction sampling.

Why in memory: the downstream sets are small (986 train / 5,128 test patches on the real
data) and every run of a sweep reads them again; reading the tars once per process and
keeping the raw arrays (S1 float32, S2 uint16, label maps uint8) is far cheaper than
streaming. The test split is centre-cropped at load time, so only what is scored is kept.
Members are decoded with `np.load` on the member bytes (4x faster than webdataset's
`.decode()`, see lessons-from-anchors.md), and `allow_pickle=False`.

Label fractions are stratified by each patch's single label and NESTED across fractions:
per class a seeded permutation, of which the first ceil(f * n_c) are taken, so the 5 % set
is contained in the 10 % set for the same seed. With `keep_every_class` (default) ceil keeps
at least one example of every class the training pool has; switched off, floor is used and
the classes that vanish are reported (log + result.json `classes_missing_in_train`).

Scene-label benchmarks (`Benchmark.label_source == "vector"`: BigEarthNet-19, SEN12MS-IGBP)
keep one class-fraction vector per patch instead of a map (`labels` is (N, C)); their shard
sets are checked against the benchmark's datasets and splits first. S2 of other band sets
(BigEarthNet's 12 L2A bands, no B10) is placed in the 13-band order the models take, the
missing bands zero-filled and listed (`s2_missing`): the batcher sets them to 0 after
normalising, i.e. to the band mean, and the manifest statistics get a neutral entry for them.
"""

from __future__ import annotations

import json
import logging
import math
import tarfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from satfuse.data.format.bands import manifest_bands
from satfuse.data.format.codecs import declared_shape, find_member, from_manifest, load_array
from satfuse.data.format.manifest import MANIFEST_NAME, load
from satfuse.data.packing.normalize import S2_BANDS
from satfuse.data.sources.layout import EXPECTED_BANDS
from satfuse.evaluation.benchmark import DEFAULT_BENCHMARK, Benchmark, benchmark_class
from satfuse.evaluation.targets import IGNORE, single_label
from satfuse.utils import SatfuseError

log = logging.getLogger(__name__)

@dataclass
class LabeledSplit:
    """Raw arrays of one split: s1 (N,2,H,W) f32, s2 (N,13,H,W) u16, labels (N,H,W) class maps
    of `benchmark`'s `n_classes` classes, or (N, n_classes) f32 class fractions for a scene-label
    benchmark; `s2_missing`: the S2 channels the shards lack (zero-filled)."""

    keys: list[str]
    s1: np.ndarray
    s2: np.ndarray
    labels: np.ndarray
    manifest: dict
    source: str
    n_classes: int
    s2_missing: tuple[int, ...] = ()

    @property
    def per_sample(self) -> bool:
        """Whether labels are per-sample vectors (not maps that crops cut)."""
        return self.labels.ndim == 2

    def __len__(self) -> int:
        return len(self.keys)

    def patch_labels(self) -> np.ndarray:
        """Single label of every whole map (IGNORE where no pixel is valid); used to stratify."""
        out = np.full(len(self), IGNORE, dtype=np.int64)
        if self.per_sample:
            has = self.labels.sum(axis=1) > 0
            out[has] = self.labels[has].argmax(axis=1)
            return out
        for i, m in enumerate(self.labels):
            lab = single_label(m, self.n_classes)
            if lab is not None:
                out[i] = lab
        return out


def read_manifest(shard_dir: Path) -> dict:
    """The shard set's manifest.json, or a SatfuseError naming the directory and the fix."""
    shard_dir = Path(shard_dir)
    path = shard_dir / MANIFEST_NAME
    if not shard_dir.is_dir():
        raise SatfuseError(f"{shard_dir}: shard directory not found; write it with `satfuse shard` "
                           "(or fix data.train_shards / data.test_shards)")
    return load(path, "the fine-tuning pipeline", stats=False)


def shard_paths(shard_dir: Path, manifest: dict) -> list[Path]:
    """Tar paths in manifest order; a listed tar that is missing is an error, not a skip.

    An empty list is refused, not filled from `*.tar` in the folder: the manifest is the
    authority on what the set holds (every tar is read with its count and sha256 from it, and
    pretraining refuses an empty manifest the same way), so tars it does not list are never
    read unchecked."""
    names = [s["name"] for s in manifest.get("shards", [])]
    if not names:
        tars = sorted(p.name for p in Path(shard_dir).glob("*.tar"))
        beside = f" ({len(tars)} .tar file(s) beside it, e.g. {tars[0]}, are not read without an entry)" if tars else ""
        raise SatfuseError(f"{Path(shard_dir) / MANIFEST_NAME}: manifest lists no shards{beside}; re-shard with "
                           "`satfuse shard`")
    paths = [Path(shard_dir) / n for n in names]
    missing = [str(p) for p in paths if not p.is_file()]
    if missing:
        raise SatfuseError(f"{missing[0]}: listed in manifest.json but missing; re-run `satfuse shard`")
    return paths


def iter_tar_samples(path: Path) -> Iterator[dict[str, bytes]]:
    """Group a WebDataset tar's members by key (name up to the first dot), in file order."""
    current: dict[str, bytes] = {}
    key = None
    with tarfile.open(path, "r") as tar:
        for member in tar:
            if not member.isfile():
                continue
            name = Path(member.name).name
            k, _, ext = name.partition(".")
            if key is not None and k != key:
                yield {"__key__": key.encode(), **current}
                current = {}
            key = k
            fh = tar.extractfile(member)
            current[ext] = fh.read() if fh else b""
    if key is not None:
        yield {"__key__": key.encode(), **current}


def _npy(sample: dict[str, bytes], ext: str, where: str, bands: int) -> np.ndarray:
    """Member `ext` (`s1.npy`), stored plain or compressed (`s1.npy.zst`: satfuse.data.format.codecs);
    a compressed one is bounded by (`bands`, the H, W of the sample's json) before it is read."""
    tar_ext, codec = find_member(sample, ext) or (ext, None)
    try:
        shape = declared_shape(sample["json"], bands) if codec and "json" in sample else None
        return load_array(sample[tar_ext], codec, shape)
    except Exception as exc:  # noqa: BLE001 - any decode failure is the same user error
        raise SatfuseError(f"{where}: member {ext} does not decode ({exc}); re-run `satfuse shard`") from exc


def _center(a: np.ndarray, crop: int) -> np.ndarray:
    if crop <= 0:
        return a
    h, w = a.shape[-2:]
    if crop > min(h, w):
        raise SatfuseError(f"crop {crop} is larger than the {h}x{w} patches; set data.crop <= {min(h, w)}")
    top, left = (h - crop) // 2, (w - crop) // 2
    return a[..., top : top + crop, left : left + crop]


def check_shard_set(bench: type[Benchmark], manifest: dict, where: Path, role: str) -> None:
    """Refuse a shard set the benchmark cannot read: another dataset, or (where the benchmark
    names splits and the manifest records one) another split than `role`'s."""
    dataset = manifest.get("dataset")
    if bench.datasets and dataset not in bench.datasets:
        raise SatfuseError(f"{where}: a {dataset} shard set, but benchmark {bench.name} reads "
                           f"{'|'.join(bench.datasets)} shards with its labels; write them with `{bench.labels_hint()}`")
    allowed, split = bench.shard_splits.get(role), manifest.get("split")
    if allowed and split is not None and split not in allowed:
        raise SatfuseError(f"{where}: holds the {split!r} split, but is given as benchmark {bench.name}'s {role} set "
                           f"(needs --split {allowed[0]}); write it with `{bench.labels_hint()}`")


def check_same_dataset(bench: type[Benchmark], sets: dict[str, LabeledSplit | None]) -> None:
    """Refuse train/val/test sets of different datasets (a BigEarthNet v1 set beside v2 ones:
    other patches, other label sources), naming each set's."""
    kinds = {role: sp.manifest.get("dataset") for role, sp in sets.items() if sp is not None}
    if len(set(kinds.values())) > 1:
        said = ", ".join(f"{role} {sets[role].source} is {kind}" for role, kind in kinds.items())  # type: ignore[union-attr]
        raise SatfuseError(f"benchmark {bench.name}: its shard sets mix datasets ({said}); write every split of one "
                           f"dataset with `{bench.labels_hint()}`")


def _aligned_s2(bands: list[str]) -> tuple[list[int], tuple[int, ...]]:
    """Where each shard S2 band goes in the 13-band order, and the channels no band fills. Band
    names outside the 13 (a user's own rasters) are read as they are, in their order."""
    if any(b not in S2_BANDS for b in bands) or len(set(bands)) != len(bands):
        return list(range(len(bands))), ()
    dest = [S2_BANDS.index(b) for b in bands]
    return dest, tuple(i for i in range(len(S2_BANDS)) if i not in dest)


def _align_stats(manifest: dict, dest: list[int]) -> dict:
    """The manifest with its S2 statistics in the 13-band order (missing bands: mean 0, std 1:
    their zero fill stays 0)."""
    stats = manifest.get("stats") or {}
    s2 = stats.get("s2")
    if not s2 or len(s2.get("mean", [])) != len(dest):
        return manifest
    mean, std = [0.0] * len(S2_BANDS), [1.0] * len(S2_BANDS)
    for j, i in enumerate(dest):
        mean[i], std[i] = s2["mean"][j], s2["std"][j]
    return {**manifest, "stats": {**stats, "s2": {**s2, "mean": mean, "std": std}}}


def _vector_label(bench: type[Benchmark], sample: dict[str, bytes], where: str) -> np.ndarray:
    try:
        meta = json.loads(sample.get("json", b"{}"))
    except ValueError as exc:
        raise SatfuseError(f"{where}: the sample's json member does not parse ({exc}); re-run `satfuse shard`") from None
    vec = bench.label_vector(meta) if isinstance(meta, dict) else None
    if vec is None:
        raise SatfuseError(f"{where}: has no {bench.title} label in its json (benchmark {bench.name}); "
                           f"write labelled shards with `{bench.labels_hint()}`")
    return vec


def load_split(shard_dir: str | Path, center_crop: int = 0, benchmark: str = DEFAULT_BENCHMARK,
               role: str = "train") -> LabeledSplit:
    """Read every labelled sample of a shard set into memory (optionally centre-cropped), its
    label maps turned into `benchmark`'s classes (or its per-sample label vectors read); `role`
    (train/val/test) is the part the set plays, checked against the split it records."""
    bench: type[Benchmark] = benchmark_class(benchmark)
    shard_dir = Path(shard_dir)
    manifest = read_manifest(shard_dir)
    if not from_manifest(manifest, str(shard_dir / MANIFEST_NAME)).labels:
        raise SatfuseError(f"{shard_dir}: packed with --no-labels (pretraining only), so it has no label members; "
                           "re-shard it without --no-labels for fine-tuning and evaluation"
                           + (f": `{bench.shard_command}`" if bench.shard_command else ""))
    check_shard_set(bench, manifest, shard_dir, role)
    bands = manifest_bands(manifest, str(shard_dir / MANIFEST_NAME))
    dest, s2_missing = _aligned_s2(bands["s2"])
    vector = bench.label_source == "vector"
    keys, s1s, s2s, labs = [], [], [], []
    for tar in shard_paths(shard_dir, manifest):
        for sample in iter_tar_samples(tar):
            key = sample["__key__"].decode()
            where = f"{tar}:{key}"
            member = next((m for m in bench.label_members if find_member(sample, f"{m}.npy")), None)
            if (member is None and not vector) or not find_member(sample, "s1.npy") or not find_member(sample, "s2.npy"):
                labels = " or ".join(f"{m}.npy" for m in bench.label_members) or "its json label"
                raise SatfuseError(f"{where}: needs s1.npy, s2.npy and {labels} (benchmark {bench.name}); "
                                   f"{bench.labels_hint()}")
            keys.append(key)
            s1s.append(_center(_npy(sample, "s1.npy", where, len(bands["s1"])).astype(np.float32, copy=False),
                               center_crop))
            s2 = _center(_npy(sample, "s2.npy", where, len(bands["s2"])), center_crop)
            if s2_missing:
                full = np.zeros((len(S2_BANDS), *s2.shape[1:]), dtype=s2.dtype)
                full[dest] = s2
                s2 = full
            s2s.append(s2)
            if vector:
                labs.append(_vector_label(bench, sample, where))
            else:
                lab = bench.label_map(member, _npy(sample, f"{member}.npy", where, EXPECTED_BANDS[member][0]))
                labs.append(_center(lab, center_crop))
    if not keys:
        raise SatfuseError(f"{shard_dir}: the shard set holds no samples; it cannot be used for "
                           "training or testing (check the split file given to `satfuse shard`)")
    shapes = {a.shape for a in s1s} | {(2, *a.shape[-2:]) for a in s2s}
    if len(shapes) != 1:
        raise SatfuseError(f"{shard_dir}: patches of different sizes {sorted(shapes)}; "
                           "crop them to one size when sharding")
    log.info("loaded %d labelled patches from %s", len(keys), shard_dir)
    if s2_missing:
        log.info("%s: S2 lacks %s; zero-filled (the band mean after normalising)", shard_dir,
                 ", ".join(S2_BANDS[i] for i in s2_missing))
        manifest = _align_stats(manifest, dest)
    return LabeledSplit(keys, np.stack(s1s), np.stack(s2s), np.stack(labs), manifest, str(shard_dir),
                        bench.n_classes(), s2_missing)


_CACHE: dict[tuple, LabeledSplit] = {}


def load_split_cached(shard_dir: str | Path, center_crop: int = 0, benchmark: str = DEFAULT_BENCHMARK,
                      role: str = "train") -> LabeledSplit:
    """`load_split`, memoised per process on (path, manifest mtime, crop, benchmark, role): sweeps read once."""
    p = Path(shard_dir).resolve()
    mtime = (p / MANIFEST_NAME).stat().st_mtime_ns if (p / MANIFEST_NAME).exists() else 0
    key = (str(p), mtime, center_crop, benchmark, role)
    if key not in _CACHE:
        if len(_CACHE) >= 4:
            _CACHE.pop(next(iter(_CACHE)))
        _CACHE[key] = load_split(p, center_crop, benchmark, role)
    return _CACHE[key]


def _per_class_permutations(labels: np.ndarray, seed: int) -> dict[int, np.ndarray]:
    """Indices of each valid class (any label but IGNORE), in a seeded order that only depends
    on (seed, class)."""
    out = {}
    for c in (int(v) for v in np.unique(labels) if v != IGNORE):
        idx = np.flatnonzero(labels == c)
        rng = np.random.default_rng([seed, c])
        out[c] = idx[rng.permutation(idx.size)]
    return out


def train_val_split(labels: np.ndarray, val_fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Stratified hold-out for early stopping: round(val_fraction * n_c) per class to val.

    A class with a single example stays in train (it cannot be both learned and validated).
    Patches without a valid label are dropped from both.
    """
    if not 0.0 <= val_fraction < 1.0:
        raise SatfuseError(f"data.val_fraction={val_fraction} must be in [0, 1)")
    train, val = [], []
    for _, idx in _per_class_permutations(labels, seed + 1_000_003).items():
        n_val = int(round(val_fraction * idx.size)) if idx.size > 1 else 0
        n_val = min(n_val, idx.size - 1)
        val.append(idx[:n_val])
        train.append(idx[n_val:])
    cat = lambda parts: np.sort(np.concatenate(parts)) if parts else np.zeros(0, np.int64)  # noqa: E731
    return cat(train), cat(val)


def fraction_counts(n_per_class: dict[int, int], fraction: float, keep_every_class: bool) -> dict[int, int]:
    """How many of each class a fraction keeps: ceil (>= 1 each) or floor (classes may vanish)."""
    if not 0.0 < fraction <= 1.0:
        raise SatfuseError(f"label fraction {fraction} must be in (0, 1] (e.g. 0.1 for 10 %)")
    rnd = math.ceil if keep_every_class else math.floor
    return {c: min(n, rnd(fraction * n - 1e-9) if keep_every_class else rnd(fraction * n + 1e-9))
            for c, n in n_per_class.items()}


def label_fraction_subset(labels: np.ndarray, pool: np.ndarray, fraction: float, seed: int,
                          keep_every_class: bool = True) -> np.ndarray:
    """Stratified, seeded, nested subset of `pool` (indices into `labels`), sorted."""
    pool = np.asarray(pool, dtype=np.int64)
    perms = _per_class_permutations(np.where(np.isin(np.arange(labels.size), pool), labels, IGNORE), seed)
    counts = fraction_counts({c: p.size for c, p in perms.items()}, fraction, keep_every_class)
    chosen = [perms[c][: counts[c]] for c in perms]
    return np.sort(np.concatenate(chosen)) if chosen else np.zeros(0, np.int64)


def epoch_order(idx: np.ndarray, labels: np.ndarray, rng: np.random.Generator, balanced: bool,
                min_samples: int) -> np.ndarray:
    """Sample order of one epoch: max(len(idx), min_samples) draws.

    `balanced` draws classes equally often (the authors oversample to balance the DFC
    classes); otherwise a shuffled pass (repeated if min_samples asks for more).
    """
    n = max(idx.size, min_samples)
    if balanced:
        lab = labels[idx]
        classes, inverse, counts = np.unique(lab, return_inverse=True, return_counts=True)
        w = 1.0 / counts[inverse]
        return rng.choice(idx, size=n, replace=True, p=w / w.sum())
    reps = math.ceil(n / max(idx.size, 1))
    return np.concatenate([rng.permutation(idx) for _ in range(reps)])[:n]


def crop_batch(arrays: list[np.ndarray], idx: np.ndarray, crop: int,
               rng: np.random.Generator | None) -> list[np.ndarray]:
    """Gather `idx` from each (N, ..., H, W) array with one crop window per sample.

    rng None: centre crop; else a random window shared by the sample's S1, S2 and label map.
    """
    h, w = arrays[0].shape[-2:]
    if crop <= 0 or crop >= min(h, w):
        return [a[idx] for a in arrays]
    if rng is None:
        tops = np.full(idx.size, (h - crop) // 2)
        lefts = np.full(idx.size, (w - crop) // 2)
    else:
        tops = rng.integers(0, h - crop + 1, size=idx.size)
        lefts = rng.integers(0, w - crop + 1, size=idx.size)
    out = []
    for a in arrays:
        out.append(np.stack([a[i, ..., t : t + crop, s : s + crop] for i, t, s in zip(idx, tops, lefts, strict=True)]))
    return out

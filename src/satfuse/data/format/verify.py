"""`satfuse shard verify`: re-read a shard set and report everything that is wrong.

Why a separate check: shards get copied between filesystems, truncated by full disks and
edited by hand; a training job should not be the first to find out. This reads every tar
in full, checks size and sha256 against the manifest, parses the tar, decodes every array
with `np.load(allow_pickle=False)` (what webdataset's decoder does) and checks the format's
dtypes, shapes, keys and counts.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import sys
import tarfile
from pathlib import Path
from typing import Any

import numpy as np
from tqdm import tqdm

from satfuse.data.format.bands import manifest_bands
from satfuse.data.format.codecs import (
    CODECS,
    Encoding,
    declared_shape,
    from_manifest,
    load_array,
    split_codec,
)
from satfuse.data.format.manifest import MANIFEST_NAME, load_dir
from satfuse.data.sources.layout import EXPECTED_BANDS, SOURCE_RULES
from satfuse.utils import SatfuseError

log = logging.getLogger(__name__)


def verify(shard_dir: Path) -> list[str]:
    """Every problem of the shard set in `shard_dir`, one line each (empty list = all good)."""
    shard_dir = Path(shard_dir)
    try:
        manifest = load_dir(shard_dir, f"`satfuse shard verify {shard_dir}`")
    except SatfuseError as exc:
        return [str(exc)]
    problems: list[str] = []
    listed = {s["name"] for s in manifest["shards"]}
    for stray in sorted(p.name for p in shard_dir.glob("*.tar") if p.name not in listed):
        problems.append(f"{shard_dir / stray}: tar not listed in manifest.json; remove it or re-shard")
    total = 0
    bands = manifest_bands(manifest, str(shard_dir / MANIFEST_NAME))  # 12 S2 bands for BigEarthNet / L2A
    try:
        enc = from_manifest(manifest, str(shard_dir / MANIFEST_NAME))  # compressed members, float16 S1
    except SatfuseError as exc:
        return [str(exc)]
    problems += _check_encoding(shard_dir, manifest, enc)
    bar = tqdm(manifest["shards"], desc="verify", unit="shard", disable=not sys.stderr.isatty())
    for entry in bar:
        count, found = _verify_shard(shard_dir / entry["name"], entry, manifest.get("label"), bands, manifest.get("aux", []), enc)
        problems += found
        total += count
    if total != manifest.get("total_samples"):
        problems.append(f"{shard_dir / MANIFEST_NAME}: total_samples {manifest.get('total_samples')} but the shards hold {total}; re-shard")
    return problems


def _check_encoding(shard_dir: Path, manifest: dict[str, Any], enc: Encoding) -> list[str]:
    """The manifest's `encoding` is complete: a float16 set records its measured error."""
    if enc.s1_dtype == "float16" and not isinstance(manifest["encoding"].get("s1_max_abs_error_db"), (int, float)):
        return [f"{shard_dir / MANIFEST_NAME}: float16 set without encoding.s1_max_abs_error_db; re-shard"]
    return []


def _verify_shard(tar: Path, entry: dict[str, Any], label: str | None, bands: dict[str, list[str]], aux: list[str] | None = None,
                  enc: Encoding | None = None) -> tuple[int, list[str]]:
    """Check one tar against its manifest entry; returns (samples decoded, problems)."""
    if not tar.is_file():
        return 0, [f"{tar}: listed in manifest.json but missing; restore it or re-shard"]
    data = tar.read_bytes()
    problems = []
    if len(data) != entry.get("bytes"):
        problems.append(f"{tar}: {len(data)} bytes, manifest says {entry.get('bytes')} (truncated or replaced); restore it or re-shard")
    if hashlib.sha256(data).hexdigest() != entry.get("sha256"):
        problems.append(f"{tar}: sha256 differs from manifest.json (damaged or tampered); restore it or re-shard")
    samples, read_problems = _read_samples(tar, data)
    problems += read_problems
    for key, members in samples.items():
        problems += [f"{tar}: sample {key}: {p}" for p in _check_sample(key, members, label, bands, aux, enc or Encoding())]
    if len(samples) != entry.get("count"):
        problems.append(f"{tar}: {len(samples)} samples, manifest says {entry.get('count')}; restore it or re-shard")
    return len(samples), problems


def _read_samples(tar: Path, data: bytes) -> tuple[dict[str, dict[str, bytes]], list[str]]:
    """Group tar members by WebDataset key (name up to the first dot)."""
    samples: dict[str, dict[str, bytes]] = {}
    try:
        with tarfile.open(fileobj=io.BytesIO(data), mode="r:") as tf:
            for member in tf:
                if not member.isfile():
                    continue
                key, _, ext = member.name.partition(".")
                fh = tf.extractfile(member)
                samples.setdefault(key, {})[ext] = fh.read() if fh else b""
    except (tarfile.TarError, OSError, EOFError) as exc:
        return samples, [f"{tar}: not a readable tar after {len(samples)} sample(s) ({exc}); restore it or re-shard"]
    return samples, []


def _check_sample(key: str, members: dict[str, bytes], label: str | None, bands: dict[str, list[str]], aux: list[str] | None = None,
                  enc: Encoding | None = None) -> list[str]:
    enc = enc or Encoding()
    npys = ["s1.npy", "s2.npy"] + ([f"{label}.npy"] if label else []) + [f"{a}.npy" for a in aux or []]
    want = {"json"} | {enc.member(ext) for ext in npys}  # `s1.npy.zst` when compressed
    problems = []
    if set(members) != want:
        problems.append(f"members {sorted(members)}, expected {sorted(want)}")
    meta: dict[str, Any] = {}
    if "json" in members:
        try:
            meta = json.loads(members["json"])
        except ValueError:
            problems.append("json member is not valid JSON")
        if meta and meta.get("key") != key:
            problems.append(f"json key {meta.get('key')!r} != tar key")
        if meta and "bands" in meta and meta["bands"] != bands:
            problems.append(f"json bands {meta['bands']} differ from the manifest's {bands}")
    for ext, blob in members.items():
        base, codec = split_codec(ext)
        if base.endswith(".npy"):
            sensor = base[:-4]
            problems += _check_array(sensor, blob, meta, len(bands[sensor]) if sensor in bands else None, codec, enc)
    return problems


def _check_array(sensor: str, blob: bytes, meta: dict[str, Any], count: int | None = None, codec: str | None = None,
                 enc: Encoding | None = None) -> list[str]:
    bands, dtype = EXPECTED_BANDS.get(sensor, (0, None))
    bands = count if count is not None else bands  # s1/s2: the manifest's band count
    try:  # bounded by the shape the sample's json declares, not by the member's own header
        array = load_array(blob, codec, declared_shape(meta, bands))
    except (ValueError, OSError, EOFError) as exc:
        return [f"{sensor}.npy{CODECS.get(codec or '', '')} does not decode ({exc})"]
    if sensor not in EXPECTED_BANDS:
        return [f"unexpected member {sensor}.npy"]
    if sensor == "s1" and enc is not None:
        dtype = enc.s1_dtype  # float16 when packed with --s1-dtype float16
    shape = (bands, meta.get("height"), meta.get("width"))
    problems = []
    if array.dtype != np.dtype(dtype) or array.shape != shape:
        problems.append(f"{sensor}.npy is {array.dtype}{array.shape}, expected {dtype}{shape}")
    if sensor == "s1" and array.dtype.kind == "f" and not np.isfinite(array).all():
        problems.append("s1.npy holds NaN/Inf")
    rule = SOURCE_RULES.get(sensor)
    if sensor != "s2" and rule is not None and rule.max_values and not problems and array.size:
        problems += _label_range(sensor, array, rule.max_values)
    return problems


def _label_range(sensor: str, array: np.ndarray, max_values: tuple[int, ...]) -> list[str]:
    """Label values within the classes the packer allows (`layout.SOURCE_RULES`): a DFC2020
    `dfc` above 10 is not a class, whatever wrote the shard."""
    tops = array.reshape(array.shape[0], -1).max(axis=1)
    return [f"{sensor}.npy band {b + 1} holds values up to {int(top)}, a {sensor} label allows 0..{limit}; re-shard from fixed label files"
            for b, (top, limit) in enumerate(zip(tops, max_values, strict=False)) if int(top) > limit]

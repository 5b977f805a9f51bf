"""Pack co-located S1/S2 GeoTIFF pairs into WebDataset shards (see shards/FORMAT.md).

Why shards: per-file datasets are slow on cluster filesystems (opening 540k GeoTIFFs per
epoch); a few hundred tars stream at disk speed. Why this much care: a shard set is the
input of every 100-GPU job after it, so it must be exactly reproducible, resumable after a
kill, splittable over a job array, and never half-written.

This module is the entry point and the SEN12MS/DFC2020/pairs sample (`shard_dataset`); the
steps live beside it, one job each: `raster` (reading and co-location checks), `tar_writer`
(one atomic, hashed tar + its resume record), `shard_plan` (plan, pool, errors),
`shard_dir` (claiming the output directory), `normalize` (the exact stats sums) and
`manifest` (the format: names, building, loading, merging job-array parts).

How, in short:
- the plan is a pure function of (sorted pairs, seed, per-shard count): a seeded global
  permutation cut into runs of `maxcount`; shard j = perm[j*maxcount:(j+1)*maxcount]. So a
  job-array part i that writes shards j % n == i produces exactly the single-run shards;
- each shard is written to `NAME-jjjjjj.tar.tmp`, fsynced, renamed, and then a sidecar
  record (`.satfuse/NAME-jjjjjj.tar.json`: plan digest, sha256, count, bytes, exact stats
  sums, exclusions) is written atomically. A rerun keeps a shard whose sidecar matches its
  plan and whose tar matches the sha256, and redoes the rest;
- the per-band stats are kept as sums: S2 (uint16) sums and sums of squares as exact
  integers, S1 (float32) as float64 sums combined in shard order, so a merge of job-array
  parts gives bit for bit the manifest of a single run;
- `manifest.json` is written last and atomically (a stale one is removed first), so its
  presence means "complete".

Bad input policy (documented in FORMAT.md): lone files and pairs that are not co-located
(CRS, transform, shape) are excluded and listed (exit 0). Data that cannot be trusted (an
unreadable/truncated .tif, wrong band count or dtype, NaN/Inf in S1) fails the run with
every bad file named and no manifest; `exclude_bad=True` lists those as excluded instead.
"""

from __future__ import annotations

import json
import logging
import math
import sys
from collections.abc import Iterator
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import rasterio
from rasterio.errors import RasterioError

from satfuse.data.format import manifest as mf
from satfuse.data.format.codecs import Encoding, add_encoding
from satfuse.data.packing.label_file import check_label_file_use, label_file_record, pair_vectors
from satfuse.data.packing.multiband import shard_bands
from satfuse.data.packing.raster import Prefetcher, Raster
from satfuse.data.packing.shard_dir import (
    check_paths,
    holding_out_lease,
    named_out,
    prepare_out,
    publish_or_discard,
    remove_stale,
)
from satfuse.data.packing.shard_plan import (
    MAX_ERRORS_SHOWN,
    check_args,
    plan_digest,
    plan_shards,
    raise_on_errors,
    run_tasks,
)
from satfuse.data.packing.tar_writer import (
    TAR_RECORD,
    Item,
    Packed,
    file_stamps,
    rel_path,
    write_tar,
)
from satfuse.data.sources.dataset import PER_BAND, ScanOptions, dataset_entry, names_of_kind
from satfuse.data.sources.layout import MAX_SHOWN, Pair, ScanResult
from satfuse.diskspace import is_no_space, no_space_error
from satfuse.utils import SatfuseError

log = logging.getLogger(__name__)



# --------------------------------------------------------------------------------------------
# Plan
# --------------------------------------------------------------------------------------------


def _pair_files(pair: Pair) -> list[Path]:
    return [f for f in (pair.s1, pair.s2, pair.label, *(a for _, a in pair.aux)) if f is not None]


def _shard_plan_digest(pairs: list[Pair], src: Path, dataset: str, label: str | None,
                       igbp: dict[str, list[float]] | None = None) -> str:
    """What a shard's bytes depend on: the pairs, their files' sizes and mtimes, the format
    (and, with --labels, each pair's IGBP vector)."""
    items = [[p.key, file_stamps(_pair_files(p), src)] + ([igbp[p.key]] if igbp else []) for p in pairs]
    return plan_digest([mf.FORMAT, dataset, label, items])


def per_sample_bytes(pair: Pair) -> int:
    """Tar bytes of one sample, from the raster headers (all patches share the shape)."""
    total = 2 * 512 + 1024  # json member: header + (generous) body
    for path in (pair.s1, pair.s2, pair.label, *(a for _, a in pair.aux)):
        if path is None:
            continue
        with rasterio.open(path) as ds:
            data = 128 + ds.count * ds.height * ds.width * np.dtype(ds.dtypes[0]).itemsize
        total += 512 + math.ceil(data / 512) * 512
    return total


def count_limit(pairs: list[Pair], maxcount: int, maxsize: int | None) -> int:
    """`--maxsize` as a per-shard count: floor((maxsize - tar padding) / per-sample bytes).

    Why a count: shard boundaries must be a pure function of the plan for job arrays to
    equal a single run; the per-sample size is fixed by the (common) patch shape.
    """
    if maxsize is None:
        return maxcount
    for pair in pairs:
        try:
            size = per_sample_bytes(pair)
        except (RasterioError, OSError):
            continue
        fit = (maxsize - TAR_RECORD) // size
        if fit < 1:
            raise SatfuseError(f"--maxsize {maxsize} is smaller than one sample ({size + TAR_RECORD} bytes with tar padding, from {pair.s1}); raise --maxsize")
        return min(maxcount, int(fit))
    return maxcount


# --------------------------------------------------------------------------------------------
# Reading and checking one pair
# --------------------------------------------------------------------------------------------


# --------------------------------------------------------------------------------------------
# Writing one shard (runs in a worker process)
# --------------------------------------------------------------------------------------------


def sample_dict(pair: Pair, rasters: dict[str, Raster], dataset: str, src: Path,
                igbp: list[float] | None = None) -> dict[str, Any]:
    """One WebDataset sample of the format: arrays as .npy, metadata as .json (with `igbp`, the
    pair's 17 IGBP fractions from `--labels`, as the JSON's `igbp`)."""
    s1 = rasters["s1"]
    meta = {
        "key": pair.key, "dataset": dataset, "roi": pair.roi, "season": pair.season,
        "scene": pair.scene, "patch": pair.patch, "crs": s1.crs.to_string(), "transform": list(s1.transform),
        "height": int(s1.array.shape[1]), "width": int(s1.array.shape[2]),
        "sources": {sensor: rel_path(_source(pair, sensor), src) for sensor in rasters},
    }  # fmt: skip
    if igbp is not None:
        meta["igbp"] = igbp
    sample: dict[str, Any] = {"__key__": pair.key, "json": json.dumps(meta).encode()}
    for sensor, r in rasters.items():
        sample[f"{sensor}.npy"] = r.npy
    return sample


def _source(pair: Pair, sensor: str) -> Path | None:
    if sensor in ("s1", "s2"):
        return getattr(pair, sensor)
    return dict(pair.aux).get(sensor, pair.label)




@dataclass
class ShardTask:
    """Everything a worker needs to write (or keep) one shard."""

    index: int
    name: str
    out: Path
    src: Path
    dataset: str
    label: str | None
    pairs: list[Pair]
    exclude_bad: bool
    encoding: Encoding = field(default_factory=Encoding)
    igbp: dict[str, list[float]] | None = None  # --labels: pair key -> 17 IGBP fractions


def _items(task: ShardTask) -> Iterator[Item]:
    """The task's pairs read ahead (`Prefetcher`), as the tar writer's items."""
    labels = task.encoding.labels  # --no-labels: label files are not even read
    pairs = task.pairs if labels else [replace(p, label=None, aux=()) for p in task.pairs]
    for pair, rasters in Prefetcher(pairs, task.label if labels else None):
        if isinstance(rasters, Exception):
            yield pair.key, [str(p) for p in _pair_files(pair)], rasters
            continue
        sample = sample_dict(pair, rasters, task.dataset, task.src, task.igbp[pair.key] if task.igbp else None)
        yield pair.key, [], Packed(sample, {"s1": rasters["s1"].array, "s2": rasters["s2"].array}, (str(pair.s1),))


def write_shard(task: ShardTask) -> dict[str, Any]:
    """Write one shard atomically (or keep a verified one); return its record (`tar_writer.write_tar`)."""
    digest = _shard_plan_digest(task.pairs, task.src, task.dataset, task.label, task.igbp)
    return write_tar(task.out, task.name, task.index, digest, _items(task), {"s1": 2, "s2": 13}, task.exclude_bad,
                     task.encoding)


# --------------------------------------------------------------------------------------------
# Entry point
# --------------------------------------------------------------------------------------------


@holding_out_lease  # one writer per --out (job-array parts: one per part)
def shard_dataset(
    src: Path,
    dataset: str,
    out: Path,
    maxcount: int = 1000,
    maxsize: int | None = None,
    workers: int = 1,
    seed: int = 0,
    split_file: Path | None = None,
    shard_index: int | None = None,
    num_shards: int | None = None,
    overwrite: bool = False,
    exclude_bad: bool = False,
    command: list[str] | None = None,
    exclude_scenes: Path | None = None,
    pairs_file: Path | None = None,
    strict_split: bool = False,
    encoding: Encoding | None = None,
    igbp_labels: Path | None = None,
    **band_options: Any,
) -> dict[str, Any]:
    """Pack `src` into `out` (see module doc). Returns the manifest (or, for a job-array
    part, the part manifest). `num_shards` is the number of job-array parts, not of tars.
    `strict_split` makes split-list entries without files fatal (they are listed otherwise).
    `band_options` are the scan's `split`, `s2_level`, `max_gap_days` (`dataset.ScanOptions`) and,
    for `PER_BAND` datasets, `resample` and `tol_m`. `encoding` (`satfuse.data.format.codecs`:
    --compress, --s1-dtype, --no-labels) defaults to the original format. The dataset entry
    (`satfuse.registry.DATASETS`) refuses the scan flags it does not read, then its kind picks
    the packer: this module's pairs, or `multiband` for one file per band. `igbp_labels`
    (`--labels`, SEN12MS only): the label file whose 17-vector of each pair goes into its JSON."""
    src, out = Path(src), named_out(out)
    encoding = encoding or Encoding()
    if igbp_labels is not None:
        check_label_file_use(dataset, encoding)
    spec = dataset_entry(dataset)
    scan_keys = ("split", "s2_level", "max_gap_days")
    options = ScanOptions(split_file=split_file, exclude_scenes=exclude_scenes, pairs_file=pairs_file,
                          **{k: band_options.pop(k) for k in scan_keys if k in band_options})
    spec.check_options(options)
    if spec.kind == PER_BAND:  # one file per band: SSL4EO-S12, BigEarthNet (satfuse.data.packing.multiband)
        if strict_split:
            raise SatfuseError(f"--strict-split: not used by --dataset {dataset} "
                               f"(per-band datasets list no missing patches); drop it")
        return shard_bands(src, spec, out, options, maxcount=maxcount, maxsize=maxsize, workers=workers, seed=seed,
                           shard_index=shard_index, num_shards=num_shards, overwrite=overwrite,
                           exclude_bad=exclude_bad, command=command, encoding=encoding, **band_options)
    given = [k for k, v in band_options.items() if v is not None]
    if given:
        raise SatfuseError(f"{', '.join(given)}: only for --dataset {'|'.join(names_of_kind(PER_BAND))}; drop them")
    part = check_args(maxcount, maxsize, workers, shard_index, num_shards)
    check_paths(src, out)
    result = spec.scan(src, options)
    if not isinstance(result, ScanResult):
        raise SatfuseError(f"dataset {dataset!r}: a {spec.kind} entry's scan must return a ScanResult, got {type(result).__name__}")
    _report_scan(result, src, split_file, strict_split)
    if not result.pairs:
        reasons = "; ".join(e.reason for e in result.excluded[:MAX_ERRORS_SHOWN])
        raise SatfuseError(f"{src}: no complete {dataset} pair to pack ({len(result.excluded)} excluded: {reasons}); fix the layout or --split-file")
    igbp = pair_vectors(igbp_labels, result.pairs) if igbp_labels is not None else None
    count = count_limit(result.pairs, maxcount, maxsize)
    plan = plan_shards(result.pairs, seed, count)
    header = {
        "name": out.name, "dataset": dataset, "seed": seed, "maxcount": count, "label": result.label,
        "split_file": str(split_file) if split_file else None, "planned_shards": len(plan),
        "planned_pairs": len(result.pairs),
    }  # fmt: skip
    if result.aux:
        header["aux"] = list(result.aux)  # further members of every sample (DFC2020 lc)
    if exclude_scenes is not None:
        header["exclude_scenes"] = str(exclude_scenes)
    if pairs_file is not None:
        header["pairs_file"] = str(pairs_file)
    if igbp_labels is not None:
        header["igbp_labels"] = label_file_record(igbp_labels)
    add_encoding(header, encoding)
    header["plan"] = plan_digest([header, [[p.key for p in shard] for shard in plan]])
    claim = prepare_out(out, overwrite, {"dataset": dataset})
    remove_stale(out, out.name, len(plan), part[0] if part else None)
    mine = [j for j in range(len(plan)) if part is None or j % part[1] == part[0]]
    tasks = [ShardTask(j, out.name, out, src, dataset, result.label, plan[j], exclude_bad, encoding,
                       {p.key: igbp[p.key] for p in plan[j]} if igbp else None) for j in mine]
    try:
        records = run_tasks(write_shard, tasks, [len(t.pairs) for t in tasks], workers)
        raise_on_errors(records, out)
        scan_excluded = [e.to_dict() for e in result.excluded]
        ignored = [i.to_dict() for i in result.ignored]
        command = command if command is not None else sys.argv
        if part is not None:
            return mf.write_part(out, header, part, records, scan_excluded, command, ignored)
        manifest = mf.build(header, records, scan_excluded, command, ignored)
        publish_or_discard(out, manifest, records, claim)
    except OSError as exc:
        if not is_no_space(exc):
            raise
        # what the unfinished shards still need (finished ones are kept and reused on rerun)
        needed = sum(_shard_bytes(t) for t in tasks if not (out / mf.tar_name(t.name, t.index)).is_file())
        raise no_space_error(out, needed, "writing shards",
                             "free space there (or pass another --out) and rerun the same command: "
                             "finished shards are kept, no manifest was written") from None
    return manifest


def _shard_bytes(task: ShardTask) -> int:
    """Estimated tar size of one shard (the rasters' headers; 0 when unreadable)."""
    try:
        return TAR_RECORD + sum(per_sample_bytes(p) for p in task.pairs[:1]) * len(task.pairs)
    except (RasterioError, OSError):
        return 0


def _report_scan(result: Any, src: Path, split_file: Path | None, strict_split: bool) -> None:
    """Say what the scan will not pack: split entries without files, unused files/folders."""
    if result.missing:
        first = ", ".join(result.missing[:MAX_SHOWN])
        more = f" (+{len(result.missing) - MAX_SHOWN} more)" if len(result.missing) > MAX_SHOWN else ""
        msg = f"{split_file}: {len(result.missing)} listed patch(es) have no files under {src}: {first}{more}"
        if strict_split:
            raise SatfuseError(f"{msg}; --strict-split makes this fatal: fix --src or the list, or drop --strict-split to pack the rest")
        log.warning("%s; the full list will be in %s beside manifest.json; --strict-split makes this fatal", msg, mf.MISSING_NAME)
    if result.not_listed:
        log.info("%s: %d patch(es) on disk are not in %s and are not packed (the split's choice)", src, result.not_listed, split_file)
    if result.ignored:
        first = ", ".join(i.path for i in result.ignored[:MAX_SHOWN])
        log.info("%s: %d file(s)/folder(s) not used (%s%s); listed with reasons in manifest.json `ignored`", src, len(result.ignored), first, " ..." if len(result.ignored) > MAX_SHOWN else "")

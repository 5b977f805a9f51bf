"""The shard format's one owner: names, manifest building, loading + validating, merging.

Everything that says what a `satfuse-shards/1` set looks like on disk lives here (see
shards/FORMAT.md): the format strings, the tar and bookkeeping file names, building the
manifest from per-shard records, loading and validating it for every reader (the loaders,
`shard verify`, the DFC2020 pipeline), and joining the part manifests of a job-array run.
Writers (`shard_writer`, `multiband`) and readers import these names instead of spelling them.
"""

from __future__ import annotations

import json
import os
import platform
import re
import sys
import time
from pathlib import Path
from typing import Any

from satfuse.data.normalize import add_sums, empty_sums, finish_stats
from satfuse.utils import SatfuseError, atomic_write_text

FORMAT = "satfuse-shards/1"
PART_FORMAT = "satfuse-shards-part/1"
MANIFEST_NAME = "manifest.json"  # written last, atomically: present = complete
PART_GLOB = "manifest.part-*-of-*.json"
STATE_DIR = ".satfuse"  # sidecar records and the ownership marker
OWNER_FILE = "owner.json"

_URL_TAR = re.compile(r"([^/\s'\"]+\.tar)")


# --------------------------------------------------------------------------------------------
# Names
# --------------------------------------------------------------------------------------------


def tar_name(set_name: str, index: int) -> str:
    """`NAME-000003.tar`: the file name of shard `index` of set `set_name` (6 digits)."""
    return f"{set_name}-{index:06d}.tar"


def tar_name_pattern(set_name: str) -> re.Pattern[str]:
    """Matches the tar names of set `set_name` (and their `.tmp` while being written)."""
    return re.compile(rf"^{re.escape(set_name)}-\d{{6}}\.tar(\.tmp)?$")


def url_tar_name(url: str) -> str:
    """The tar's file name inside a path or a pipe: command (`pipe:aws s3 cp s3://b/x.tar -`):
    the key under which the manifest lists that shard."""
    found = _URL_TAR.findall(url)
    return found[-1] if found else Path(url).name


def part_path(out: Path, index: int, num: int) -> Path:
    """Where part `index` of an `num`-part job-array run records its shards."""
    return out / f"manifest.part-{index}-of-{num}.json"


def sidecar_path(out: Path, name: str) -> Path:
    """The per-shard record of tar `name` (plan digest, sha256, exact stats sums) used by resume."""
    return out / STATE_DIR / f"{name}.json"


def is_own_file(out: Path, name: str) -> bool:
    """True for a name that `satfuse shard` writes into `out` (and nothing else)."""
    ours = re.compile(rf"^({re.escape(STATE_DIR)}|{re.escape(MANIFEST_NAME)}|manifest\.part-\d+-of-\d+\.json|"
                      rf"{re.escape(out.name)}-\d{{6}}\.tar(\.tmp)?)$")
    return bool(ours.match(name))


# --------------------------------------------------------------------------------------------
# Building and publishing
# --------------------------------------------------------------------------------------------


def publish_text(path: Path, text: str) -> None:
    """Atomic write, then world-readable: a shard set is shared by every job of a cluster
    (atomic_write_text's temp file is created 0600)."""
    atomic_write_text(path, text)
    os.chmod(path, 0o644)


def publish(out: Path, manifest: dict[str, Any]) -> None:
    """Write `out/manifest.json` (the last step of a run: its presence means complete)."""
    publish_text(out / MANIFEST_NAME, json.dumps(manifest, indent=1) + "\n")


def versions() -> dict[str, str]:
    """Library versions recorded in every manifest (what produced these bytes)."""
    import numpy as np
    import rasterio
    import webdataset as wds

    from satfuse import __version__

    return {
        "satfuse": __version__, "python": platform.python_version(), "numpy": np.__version__,
        "rasterio": rasterio.__version__, "gdal": rasterio.__gdal_version__,
        "webdataset": getattr(wds, "__version__", "unknown"),
    }  # fmt: skip


def build(header: dict[str, Any], records: list[dict[str, Any]], scan_excluded: list[dict[str, Any]], command: list[str], ignored: list[dict[str, Any]] | None = None) -> dict[str, Any]:
    """The manifest of a complete shard set, from records in shard-index order.

    Single runs and merges both come through here with records sorted by index, so their
    manifests are equal except for `created` and `command`.
    """
    records = sorted(records, key=lambda r: r["index"])
    bands = header.get("bands") or {"s1": [None] * 2, "s2": [None] * 13}  # per-band datasets record names
    sums = {sensor: empty_sums(len(names)) for sensor, names in bands.items()}
    excluded = list(scan_excluded)
    for r in records:
        for sensor in sums:
            sums[sensor] = add_sums(sums[sensor], r["sums"][sensor])
        excluded.extend(r["excluded"])
    excluded.sort(key=lambda e: (e["key"], e["reason"]))
    manifest = {
        "format": FORMAT,
        **header,
        "shards": [{"name": r["name"], "count": r["count"], "bytes": r["bytes"], "sha256": r["sha256"]} for r in records],
        "total_samples": sum(r["count"] for r in records),
        "excluded": excluded,
        "ignored": list(ignored if ignored is not None else header.get("ignored", [])),
        "stats": {sensor: finish_stats(s) for sensor, s in sums.items()},
        "command": command,
        "versions": versions(),
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }
    if (header.get("encoding") or {}).get("s1_dtype") == "float16":
        manifest["encoding"] = {**header["encoding"], "s1_max_abs_error_db": _max_error(records)}
    return manifest


def _max_error(records: list[dict[str, Any]]) -> float:
    """The largest S1 float16 error (dB) over every shard: exact, so merges equal single runs."""
    missing = [r["name"] for r in records if "s1_max_abs_error_db" not in r]
    if missing:
        raise SatfuseError(f"{missing[0]}: its record has no s1_max_abs_error_db although the set is float16; "
                           "remove .satfuse/ and rerun `satfuse shard` with the same flags")
    return max((float(r["s1_max_abs_error_db"]) for r in records), default=0.0)


def summary(manifest: dict[str, Any]) -> str:
    """One line for the log: packed, shards, exclusions by kind."""
    kinds: dict[str, int] = {}
    for e in manifest["excluded"]:
        kind = e["reason"].split(":", 1)[0]
        kinds[kind] = kinds.get(kind, 0) + 1
    by_kind = ", ".join(f"{n} {k}" for k, n in sorted(kinds.items())) or "none"
    ignored = len(manifest.get("ignored", []))
    return f"packed {manifest['total_samples']} pairs into {len(manifest['shards'])} shards; excluded {len(manifest['excluded'])} ({by_kind}); ignored {ignored} file(s)/folder(s) not in the layout"


# --------------------------------------------------------------------------------------------
# Loading and validating
# --------------------------------------------------------------------------------------------


def load(path: Path, what: str = "", stats: bool = True) -> dict[str, Any]:
    """The manifest at `path`, validated, or a one-line SatfuseError naming the file and the fix.

    `what` says who asked (e.g. "shard spec 'shards/x'") for the message; `stats=False`
    accepts a manifest without band statistics (label-only readers do not need them).
    """
    path = Path(path)
    asked = f" for {what}" if what else ""
    if not path.is_file():
        raise SatfuseError(
            f"{path}: missing, so there is no manifest.json{asked}; the shard set is incomplete (the manifest is "
            f"written last: the run did not finish, or job-array parts were not merged) or the path is wrong: re-run "
            f"`satfuse shard`, `satfuse shard merge {path.parent}`, or pass data.manifest=PATH"
        )
    try:
        manifest = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise SatfuseError(f"{path}: manifest is not valid JSON ({exc.__class__.__name__}: {exc}); re-run `satfuse shard`") from None
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        raise SatfuseError(f"{path}: not a {FORMAT} manifest; re-shard with `satfuse shard`")
    shards = manifest.get("shards")
    if not isinstance(shards, list) or not all(isinstance(s, dict) and "name" in s and "count" in s for s in shards):
        raise SatfuseError(f"{path}: manifest has no 'shards' list of {{name, count}}; re-shard with `satfuse shard`")
    if "encoding" in manifest:  # --compress / --s1-dtype / --no-labels: one this satfuse can read
        from satfuse.data.codecs import from_manifest

        from_manifest(manifest, str(path))
    if stats:
        if "stats" not in manifest:
            raise SatfuseError(f"{path}: manifest has no 'stats'; re-shard with `satfuse shard`")
        for sensor in ("s1", "s2"):
            if sensor not in manifest["stats"]:
                raise SatfuseError(f"{path}: manifest stats lack {sensor!r}; re-shard with `satfuse shard`")
    return manifest


def shard_digests(path: str | Path) -> dict[str, tuple[str, int]]:
    """{tar name: (sha256, bytes)} of the manifest at `path`; {} when absent or unreadable.

    Lenient on purpose: the loaders check each shard's bytes against this on first open,
    and the manifest itself was validated by `load` when the shard set was resolved (a
    `pipe:` set or a bare tar has nothing to compare with, which is not an error)."""
    try:
        with open(path) as fh:
            shards = json.load(fh).get("shards", [])
        return {s["name"]: (s["sha256"], int(s.get("bytes", -1))) for s in shards
                if isinstance(s, dict) and s.get("sha256")}
    except (OSError, ValueError, AttributeError, KeyError, TypeError):
        return {}


def load_dir(shard_dir: Path, what: str = "", stats: bool = True) -> dict[str, Any]:
    """`load(shard_dir/manifest.json)`, with a clear error when the directory itself is missing."""
    shard_dir = Path(shard_dir)
    if not shard_dir.is_dir():
        raise SatfuseError(f"{shard_dir}: not a directory; pass a shard directory (shards/NAME) written by `satfuse shard`")
    return load(shard_dir / MANIFEST_NAME, what, stats)


# --------------------------------------------------------------------------------------------
# Job-array parts
# --------------------------------------------------------------------------------------------


def write_part(out: Path, header: dict[str, Any], part: tuple[int, int], records: list[dict[str, Any]], scan_excluded: list[dict[str, Any]], command: list[str], ignored: list[dict[str, Any]] | None = None) -> dict[str, Any]:
    """Record what part `part[0]` of `part[1]` wrote, for `merge` (returns the part document)."""
    doc = {
        "format": PART_FORMAT, "header": header, "part": part[0], "num_parts": part[1],
        "records": [{k: v for k, v in r.items() if k != "reused"} for r in records],
        "scan_excluded": scan_excluded, "scan_ignored": list(ignored or []), "command": command,
    }  # fmt: skip
    publish_text(part_path(out, *part), json.dumps(doc) + "\n")
    return doc


def merge(out: Path, command: list[str] | None = None) -> dict[str, Any]:
    """Join the part manifests of a job-array run into `manifest.json` (all parts needed),
    holding the shard directory's lease (`satfuse.data.shard_dir.out_lease`, as a whole run):
    refused while a part, a whole run or another merge writes `out`."""
    from satfuse.data.shard_dir import out_lease  # shard_dir imports this module

    with out_lease(None, Path(out), None):
        return _merge(Path(out), command)


def _merge(out: Path, command: list[str] | None) -> dict[str, Any]:
    parts = sorted(out.glob(PART_GLOB))
    if not parts:
        raise SatfuseError(f"{out}: no manifest.part-*-of-*.json found; run `satfuse shard ... --shard-index i --num-shards n` for every part first")
    docs = [_read_part(p) for p in parts]
    nums = {d["num_parts"] for d in docs}
    if len(nums) != 1:
        raise SatfuseError(f"{out}: part manifests of different job arrays ({sorted(nums)} parts); remove the stale ones and rerun the missing parts")
    num = nums.pop()
    have = {d["part"]: d for d in docs}
    for i in range(num):
        if i not in have:
            raise SatfuseError(f"{out}: part {i} of {num} is missing ({part_path(out, i, num).name}); rerun `satfuse shard ... --shard-index {i} --num-shards {num}`")
    header = have[0]["header"]
    for i, d in have.items():
        if d["header"].get("encoding") != header.get("encoding"):
            raise SatfuseError(f"{part_path(out, i, num)}: packed with other encoding flags ({d['header'].get('encoding')}) than "
                               f"part 0 ({header.get('encoding')}); rerun every part with the same --compress/--compress-level/"
                               "--s1-dtype/--no-labels")
        if d["header"] != header:
            raise SatfuseError(f"{part_path(out, i, num)}: written with other settings or source than part 0; rerun every part with the same arguments")
    records = sorted((r for d in have.values() for r in d["records"]), key=lambda r: r["index"])
    _check_records(out, records, header["planned_shards"])
    manifest = build(header, records, have[0]["scan_excluded"], command if command is not None else sys.argv, have[0].get("scan_ignored", []))
    manifest["part_commands"] = [have[i]["command"] for i in range(num)]
    publish(out, manifest)
    return manifest


def _read_part(path: Path) -> dict[str, Any]:
    try:
        doc = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise SatfuseError(f"{path}: unreadable part manifest ({exc.__class__.__name__}); rerun that part") from None
    if doc.get("format") != PART_FORMAT:
        raise SatfuseError(f"{path}: not a satfuse part manifest (format {doc.get('format')!r}); remove it")
    return doc


def _check_records(out: Path, records: list[dict[str, Any]], planned: int) -> None:
    indices = [r["index"] for r in records]
    if indices != list(range(planned)):
        raise SatfuseError(f"{out}: parts cover shards {indices[:10]}..., the plan has {planned}; rerun every part with the same arguments")
    for r in records:
        tar = out / r["name"]
        if not tar.is_file() or tar.stat().st_size != r["bytes"]:
            raise SatfuseError(f"{tar}: missing or of the wrong size for its part record; rerun the part that wrote it")

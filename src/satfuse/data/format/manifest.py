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

import numpy as np

from satfuse import __version__
from satfuse.data.format.codecs import from_manifest
from satfuse.data.packing.normalize import add_sums, empty_sums, finish_stats
from satfuse.utils import SatfuseError, atomic_write_text

FORMAT = "satfuse-shards/1"
PART_FORMAT = "satfuse-shards-part/1"
MANIFEST_NAME = "manifest.json"  # written last, atomically: present = complete
# Set to true in the manifest of a staged copy (`data.stage_dir`): every tar beside it was
# sha256-checked against this manifest while it was copied (or reused), so the loader does not
# hash it again on first open (the size is still compared).
STAGED_KEY = "staged_sha256_checked"
MISSING_NAME = "missing.jsonl"  # every exclusion of kind `missing`, one JSON object a line (the manifest keeps a count)
MISSING_SHOWN = 5  # `missing` entries the manifest itself shows
PART_GLOB = "manifest.part-*-of-*.json"
MISSING_PART_GLOB = "missing.part-*-of-*.jsonl"  # a job-array part's share of the `missing` list, joined by `merge`
STATE_DIR = ".satfuse"  # sidecar records and the ownership marker
OWNER_FILE = "owner.json"

_URL_TAR = re.compile(r"([^/\s'\"]+\.tar)")
_SCHEME = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]*:")  # pipe:, http:, file:, s3:, C: ...
_SHA256 = re.compile(r"^[0-9a-f]{64}$")


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
    if not url.startswith("pipe:") and "://" not in url:
        return Path(url).name  # a local path: its name, spaces and all (`my set-000000.tar`)
    found = _URL_TAR.findall(url)
    return found[-1] if found else Path(url).name


def part_path(out: Path, index: int, num: int) -> Path:
    """Where part `index` of an `num`-part job-array run records its shards."""
    return out / f"manifest.part-{index}-of-{num}.json"


def missing_part_path(out: Path, index: int, num: int) -> Path:
    """Where part `index` of `num` writes its share of the `missing` exclusions (for `merge`)."""
    return out / f"missing.part-{index}-of-{num}.jsonl"


def sidecar_path(out: Path, name: str) -> Path:
    """The per-shard record of tar `name` (plan digest, sha256, exact stats sums) used by resume."""
    return out / STATE_DIR / f"{name}.json"


def is_own_file(out: Path, name: str) -> bool:
    """True for a name that `satfuse shard` writes into `out` (and nothing else)."""
    ours = re.compile(rf"^({re.escape(STATE_DIR)}|{re.escape(MANIFEST_NAME)}|{re.escape(MISSING_NAME)}|manifest\.part-\d+-of-\d+\.json|"
                      rf"missing\.part-\d+-of-\d+\.jsonl|"
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
    """Write `out/manifest.json` (the last step of a run: its presence means complete).

    A set of 0 samples is refused here, the one step every writer and `merge` share: an
    empty set is never what a user asked for, and training on it fails far from the cause.
    The full list of `missing` exclusions (`build` puts it under `missing.entries`) goes to
    `missing.jsonl` first, so the manifest stays small when a split list names many patches
    the tree lacks (a published list over a partial download: 180,659 entries, 30 MB)."""
    refuse_empty(out, manifest)
    entries = manifest.get("missing", {}).pop("entries", None)
    if entries:
        publish_text(out / MISSING_NAME, _jsonl(entries))
    publish_text(out / MANIFEST_NAME, json.dumps(manifest, indent=1) + "\n")


class EmptySetError(SatfuseError):
    """A run or merge packed 0 pairs (raised by `refuse_empty`): the writers catch it to
    remove what the refused run wrote before passing it on."""


def _jsonl(entries: list[dict[str, Any]]) -> str:
    """One JSON object a line: the format of MISSING_NAME and of the parts' shares of it."""
    return "".join(json.dumps(e) + "\n" for e in entries)


def _is_missing(entry: dict[str, Any]) -> bool:
    """An exclusion of kind `missing` (listed, no files): kept out of manifests, in MISSING_NAME."""
    return entry["reason"].split(":", 1)[0] == "missing"


def refuse_empty(out: Path, manifest: dict[str, Any]) -> None:
    """EmptySetError naming the commonest exclusion reasons when nothing was packed."""
    if manifest.get("total_samples", 0) > 0:
        return
    excluded = manifest.get("excluded", []) + (manifest.get("missing") or {}).get("entries", [])
    kinds: dict[str, list[str]] = {}
    for e in excluded:
        kind, _, detail = e["reason"].partition(":")
        kinds.setdefault(kind, []).append(f"{e['key']}: {detail.strip() or kind}")
    common = sorted(kinds.items(), key=lambda kv: (-len(kv[1]), kv[0]))[:3]
    why = "; ".join(f"{len(reasons)} {kind} (e.g. {reasons[0]})" for kind, reasons in common) or "nothing was excluded"
    raise EmptySetError(f"{out}: packed 0 pairs, so no manifest was written: all {len(excluded)} excluded, commonest: {why}; "
                       "fix those files or the options named there and rerun")


def versions() -> dict[str, str]:
    """Library versions recorded in every manifest (what produced these bytes)."""
    import rasterio  # lazy: --help stays fast (GDAL)
    import webdataset as wds  # lazy: --help stays fast

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
    missing = [e for e in excluded if _is_missing(e)]
    excluded = [e for e in excluded if not _is_missing(e)]
    manifest = {
        "format": FORMAT,
        **header,
        "shards": [{"name": r["name"], "count": r["count"], "bytes": r["bytes"], "sha256": r["sha256"]} for r in records],
        "total_samples": sum(r["count"] for r in records),
        "excluded": excluded,
        "missing": {"count": len(missing), "first": missing[:MISSING_SHOWN], "file": MISSING_NAME if missing else None,
                    "entries": missing},  # `publish` writes the entries to MISSING_NAME
        "ignored": list(ignored if ignored is not None else header.get("ignored", [])),
        "stats": {sensor: finish_stats(s) for sensor, s in sums.items()},
        "command": command,
        "versions": versions(),
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }
    if (header.get("encoding") or {}).get("s1_dtype") == "float16":
        manifest["encoding"] = {**header["encoding"], "s1_max_abs_error_db": _max_error(records)}
    if any("offsets_m" in r for r in records):
        manifest["colocation_offset_m"] = offset_summary(records)
    return manifest


def offset_summary(records: list[dict[str, Any]]) -> dict[str, Any]:
    """What the per-band writers measured: every packed sample's largest footprint offset per
    sensor (metres, `json.colocation_offset_m`), summarised over the set.

    Why: the co-location tolerance is a judgement of how a dataset was published; the
    summary shows how much of it the data used. Pure function of the records in index
    order, so a merge of job-array parts gives the single run's summary."""
    rows = [(key, off) for r in sorted(records, key=lambda r: r["index"]) for key, off in r.get("offsets_m", [])]
    out: dict[str, Any] = {"samples": len(rows)}
    for sensor in ("s1", "s2"):
        values = [(float(off[sensor]), key) for key, off in rows if sensor in off]
        if not values:
            continue
        ordered = sorted(v for v, _ in values)
        top, top_key = min(values, key=lambda v: (-v[0], v[1]))  # the largest; ties: the first key
        bins = [0] * 6  # 10 m bins: [0,10) .. [40,50), >= 50
        for v in ordered:
            bins[min(int(v // 10), 5)] += 1
        out[sensor] = {
            "median": ordered[len(ordered) // 2], "p95": ordered[min(len(ordered) - 1, int(0.95 * len(ordered)))],
            "max": top, "max_key": top_key, "histogram_10m": bins,
        }  # fmt: skip
    return out


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
    missing = int((manifest.get("missing") or {}).get("count", 0))
    if missing:
        kinds["missing"] = missing
    by_kind = ", ".join(f"{n} {k}" for k, n in sorted(kinds.items())) or "none"
    ignored = len(manifest.get("ignored", []))
    return (f"packed {manifest['total_samples']} pairs into {len(manifest['shards'])} shards; excluded "
            f"{len(manifest['excluded']) + missing} ({by_kind}{f'; missing listed in {MISSING_NAME}' if missing else ''}); "
            f"ignored {ignored} file(s)/folder(s) not in the layout")


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
        raise SatfuseError(_format_message(path, manifest.get("format") if isinstance(manifest, dict) else None))
    shards = manifest.get("shards")
    if not isinstance(shards, list) or not all(isinstance(s, dict) and "name" in s and "count" in s for s in shards):
        raise SatfuseError(f"{path}: manifest has no 'shards' list of {{name, count}}; re-shard with `satfuse shard`")
    _check_entries(path, shards)
    if "encoding" in manifest:  # --compress / --s1-dtype / --no-labels: one this satfuse can read
        from_manifest(manifest, str(path))
    if stats:
        if "stats" not in manifest:
            raise SatfuseError(f"{path}: manifest has no 'stats'; re-shard with `satfuse shard`")
        for sensor in ("s1", "s2"):
            if sensor not in manifest["stats"]:
                raise SatfuseError(f"{path}: manifest stats lack {sensor!r}; re-shard with `satfuse shard`")
    return manifest


def _format_message(path: Path, found: Any) -> str:
    """Why a manifest's format is refused, naming both versions (a newer satfuse's set asks for an upgrade)."""
    m = re.fullmatch(r"satfuse-shards/(\d+)", found) if isinstance(found, str) else None
    if m and int(m[1]) > int(FORMAT.rsplit("/", 1)[1]):
        return (f"{path}: not a {FORMAT} manifest: it is {found}, written by a newer satfuse than this one ({__version__}, "
                f"which reads {FORMAT}); upgrade satfuse to read it, or re-shard with `satfuse shard` of this version")
    what = f"its format is {found!r}" if found is not None else "it has no format field"
    return f"{path}: not a {FORMAT} manifest ({what}, this satfuse {__version__} reads {FORMAT}); re-shard with `satfuse shard`"


def shard_name_problem(name: object) -> str:
    """'' when `name` is a plain tar file name inside the set's directory, else what is wrong.

    Why so strict: the loader joins a manifest's names to the set's directory and opens them,
    and webdataset treats `pipe:CMD` (or `http://...`) as something to run or fetch. A
    manifest is data: only what the user typed in `data.shards` may be a pipe:/URL set."""
    if not isinstance(name, str) or not name:
        return "is not a file name"
    if "/" in name or "\\" in name or "\0" in name:
        return "holds a path separator (a shard must lie in the set's own directory)"
    if name in (".", "..") or name.startswith(".."):
        return "points outside the set's directory"
    if _SCHEME.match(name):
        return "starts with a URL scheme or pipe: (a manifest names files, never commands or URLs)"
    if not name.endswith(".tar"):
        return "is not a .tar file name"
    return ""


def _check_entries(path: Path, shards: list[dict[str, Any]]) -> None:
    """Every shard entry is a plain tar name, listed once, with a count, byte size and sha256.

    Why refuse rather than skip: a name could make the loader run a command or read another
    folder, a repeated name would be read twice per epoch, and an entry without sha256/bytes
    would silently turn off the loader's integrity check."""
    seen: dict[str, int] = {}
    for i, s in enumerate(shards):
        name = s["name"]
        problem = shard_name_problem(name)
        if problem:
            raise SatfuseError(f"{path}: shard entry {i} name {name!r} {problem}; a manifest lists plain tar names "
                               "beside it: re-shard with `satfuse shard` (pipe:/remote sets go in data.shards, with "
                               "data.manifest=PATH)")
        if name in seen:
            raise SatfuseError(f"{path}: shard {name!r} is listed twice (entries {seen[name]} and {i}), so it would "
                               "be read twice per epoch; re-shard with `satfuse shard` (or remove the repeated entry)")
        seen[name] = i
        for key in ("count", "bytes"):
            value = s.get(key)
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise SatfuseError(f"{path}: shard {name!r} has {key}={value!r}, not a whole number >= 0; "
                                   "re-shard with `satfuse shard`")
        if not isinstance(s.get("sha256"), str) or not _SHA256.match(s["sha256"]):
            raise SatfuseError(f"{path}: shard {name!r} has no valid sha256 (got {s.get('sha256')!r}), so its bytes "
                               "could not be checked; re-shard with `satfuse shard` (it records every shard's sha256)")


def shard_digests(path: str | Path) -> dict[str, tuple[str, int, int]]:
    """{tar name: (sha256, bytes, count)} of the manifest at `path`; {} when absent or unreadable.

    Lenient on purpose: the loaders check each shard's bytes and sample count against this on
    first open, and the manifest itself was validated by `load` when the shard set was
    resolved (a `pipe:` set or a bare tar has nothing to compare with, which is not an error)."""
    try:
        with open(path) as fh:
            shards = json.load(fh).get("shards", [])
        return {s["name"]: (s["sha256"], int(s.get("bytes", -1)), int(s.get("count", -1))) for s in shards
                if isinstance(s, dict) and s.get("sha256")}
    except (OSError, ValueError, AttributeError, KeyError, TypeError):
        return {}


def shared_shards(a: dict[str, Any], b: dict[str, Any]) -> set[str]:
    """The sha256s of the shards two loaded manifests have in common (same bytes = same data,
    whatever the paths): non-empty when a "held-out" set holds training shards."""
    return {s["sha256"] for s in a.get("shards", [])} & {s["sha256"] for s in b.get("shards", [])}


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
    """Record what part `part[0]` of `part[1]` wrote, for `merge` (returns the part document).

    Every part scans the same tree, so each holds the whole `missing` list (180,659 entries
    for a published list over a partial tree). Like the manifest, the part document keeps a
    count and the first few; part i writes the i-th contiguous share of the list to
    `missing_part_path`, and `merge` concatenates the shares in part order: the list in scan
    order, as a single run has it."""
    index, num = part
    missing = [e for e in scan_excluded if _is_missing(e)]
    share = missing[index * len(missing) // num : (index + 1) * len(missing) // num]
    side = missing_part_path(out, index, num)
    if share:
        publish_text(side, _jsonl(share))
    else:
        side.unlink(missing_ok=True)  # a rerun's share may be empty now
    doc = {
        "format": PART_FORMAT, "header": header, "part": index, "num_parts": num,
        "records": [{k: v for k, v in r.items() if k != "reused"} for r in records],
        "scan_excluded": [e for e in scan_excluded if not _is_missing(e)],
        "missing": {"count": len(share), "of": len(missing), "first": share[:MISSING_SHOWN], "file": side.name if share else None},
        "scan_ignored": list(ignored or []), "command": command,
    }  # fmt: skip
    publish_text(part_path(out, *part), json.dumps(doc) + "\n")
    return doc


def merge_parts(out: Path, command: list[str] | None) -> dict[str, Any]:
    """Join the part manifests of a job-array run into `manifest.json` (all parts needed); the
    caller holds the directory's lease (`satfuse.data.packing.shard_dir.merge`)."""
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
    scan_excluded = have[0]["scan_excluded"] + _read_missing_shares(out, [have[i] for i in range(num)])
    manifest = build(header, records, scan_excluded, command if command is not None else sys.argv, have[0].get("scan_ignored", []))
    manifest["part_commands"] = [have[i]["command"] for i in range(num)]
    try:
        publish(out, manifest)
    except EmptySetError as exc:  # the parts' files are theirs, and may predate this job array: kept, and said
        raise EmptySetError(f"{exc} (the parts' {len(records)} empty tar(s), their records and part manifests are left in {out}: "
                            "merge cannot tell them from an earlier run's; remove them, or rerun every part with --overwrite)") from None
    return manifest


def _read_missing_shares(out: Path, docs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The `missing` entries of a job array: the parts' shares (`write_part`) in part order,
    each checked against the count its part recorded (a part document without the `missing`
    key holds its entries in `scan_excluded`, as part 0's is used)."""
    totals = {d["missing"]["of"] for d in docs if "missing" in d}
    if len(totals) > 1:
        raise SatfuseError(f"{out}: the parts found different numbers of missing patches ({sorted(totals)}): they scanned "
                           "different trees or lists; rerun every part with the same --src and --split-file")
    entries: list[dict[str, Any]] = []
    for d in docs:
        info = d.get("missing") or {}
        if not info.get("count"):
            continue
        path = missing_part_path(out, d["part"], d["num_parts"])
        try:
            share = [json.loads(line) for line in path.read_text().splitlines()]
        except (OSError, ValueError) as exc:
            raise SatfuseError(f"{path}: unreadable ({exc.__class__.__name__}); rerun part {d['part']}") from None
        if len(share) != info["count"]:
            raise SatfuseError(f"{path}: holds {len(share)} entries, its part recorded {info['count']}; rerun part {d['part']}")
        entries += share
    if totals and len(entries) != next(iter(totals)):
        raise SatfuseError(f"{out}: the parts' missing lists hold {len(entries)} of {next(iter(totals))} entries; rerun every part")
    return entries


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

"""SSL4EO-S12 v1 (GeoTIFF release) as published, and how its S1 and S2 are paired.

Layout (the release, read by torchgeo's SSL4EOS12 and the authors' loader):

    {root}/{s1,s2c,s2a}/{location: 7 digits, 0000200}/{timestamp dir}/{band}.tif (+ metadata.json)
    s1  timestamp dir: S1A_IW_GRDH_1SDV_20200607T010800_20200607T010825_032904_03CFBA_D457
    s2* timestamp dir: 20200604T054639_20200604T054831_T43RCP   (<sensing>_<datastrip>_<tile>)

- s1: VV.tif, VH.tif, float32 dB, 264x264 at 10 m; s2c (L1C): 13 bands B1..B12 with B8A and
  B10; s2a (L2A): the same 12 without B10; uint16; 10 m bands 264 px, 20 m 132, 60 m 44;
  every file single-band EPSG:4326 (degree pixels). Band files are unpadded (`B1.tif`); the
  authors' downloader code would write zero-padded names, so `B01.tif` is accepted too, as
  are 6-digit location folders (the downloader's `{idx:06d}`).
- 4 timestamps per location (one per season, each the newest image of a 30-day window);
  S1, L1C and L2A were searched independently, so their folder names (dates) differ. The
  folder names carry no season index: order comes from the dates.

Pairing (`satfuse shard --dataset ssl4eo-s12 --s2-level l1c|l2a`): one sample per (location,
S2 timestamp). S2 timestamps are taken in date order (season index t0..t3); each takes the
S1 timestamp of the same location nearest in date that no earlier S2 timestamp took, if
the gap is at most `max_gap_days` (default 30: the two searches share a 30-day window);
the gap in days is recorded. S2 timestamps without such an S1 and S1 timestamps left over
are listed as exclusions with the reason. metadata.json is not read (dates come from the
folder names); any other file or folder is listed in the manifest's `ignored`.
"""

from __future__ import annotations

import os
import re
from datetime import datetime
from pathlib import Path

from satfuse.data.sources.band_scan import BandSample, BandScan
from satfuse.data.sources.layout import Excluded
from satfuse.utils import SatfuseError

S1_BANDS = ["VV", "VH"]
S2_L1C = ["B1", "B2", "B3", "B4", "B5", "B6", "B7", "B8", "B8A", "B9", "B10", "B11", "B12"]
S2_L2A = [b for b in S2_L1C if b != "B10"]
LEVELS = {"l1c": ("s2c", S2_L1C), "l2a": ("s2a", S2_L2A)}
MODALITY_DIRS = ("s1", "s2c", "s2a")

_LOCATION_RE = re.compile(r"^\d{6,7}$")
_S1_DATE_RE = re.compile(r"^S1[ABCD]_[A-Z0-9]{2}_[A-Z0-9]{4}_[A-Z0-9]{4}_(\d{8}T\d{6})")
_S2_DATE_RE = re.compile(r"^(\d{8}T\d{6})")


def parse_date(name: str, sensor: str) -> datetime | None:
    """The sensing time of a timestamp folder name (None when the name is not one)."""
    m = (_S1_DATE_RE if sensor == "s1" else _S2_DATE_RE).match(name)
    return datetime.strptime(m[1], "%Y%m%dT%H%M%S") if m else None


def band_file(folder: Path, band: str, names: set[str]) -> Path | None:
    """`B1.tif` (the release) or `B01.tif` (zero-padded); None when neither exists."""
    for candidate in (f"{band}.tif", f"B{int(band[1:]):02d}.tif" if band[1:].isdigit() else None):
        if candidate and candidate in names:
            return folder / candidate
    return None


def scan_ssl4eo(root: Path, s2_level: str = "l1c", max_gap_days: float = 30.0) -> BandScan:
    """Every (location, S2 timestamp) with its matched S1 timestamp; exclusions with reasons."""
    root = Path(root)
    if s2_level not in LEVELS:
        raise SatfuseError(f"--s2-level {s2_level!r}: use one of {list(LEVELS)}")
    s2_dir, s2_bands = LEVELS[s2_level]
    if not root.is_dir():
        raise SatfuseError(f"{root}: source directory does not exist; pass the SSL4EO-S12 root (holding s1/ and {s2_dir}/)")
    for sub in ("s1", s2_dir):
        if not (root / sub).is_dir():
            raise SatfuseError(f"{root}: no {sub}/ folder; an SSL4EO-S12 root holds s1/, s2c/ (L1C) and/or s2a/ (L2A) - extract the archives there or check --s2-level")
    ignored: list[dict[str, str]] = []
    for entry in sorted(os.scandir(root), key=lambda e: e.name):
        if entry.name not in ("s1", s2_dir):
            why = f"not used with --s2-level {s2_level}" if entry.name in MODALITY_DIRS else "not part of the SSL4EO-S12 layout (s1/, s2c/, s2a/)"
            ignored.append({"path": entry.name, "reason": why})
    excluded: list[Excluded] = []
    samples: list[BandSample] = []
    locations = sorted(set(_locations(root / "s1", ignored, root)) | set(_locations(root / s2_dir, ignored, root)))
    if not locations:
        raise SatfuseError(f"{root}: no location folders (7-digit names) under s1/ or {s2_dir}/; check --src")
    for loc in locations:
        s1_ts = _timestamps(root, "s1", loc, S1_BANDS, ignored, excluded)
        s2_ts = _timestamps(root, s2_dir, loc, s2_bands, ignored, excluded)
        samples += _match(loc, s1_ts, s2_ts, s2_level, max_gap_days, excluded)
    extras = {
        "s2_level": s2_level,
        "pairing": f"per (location, S2 timestamp in date order t0..t3): nearest unused S1 timestamp of the location within {max_gap_days:g} days",
        "max_gap_days": max_gap_days,
        "source_crs": "EPSG:4326 (degree grids; S1 and S2 exported separately); each sample's crs/transform is in its JSON",
    }
    excluded.sort(key=lambda e: (e.key, e.reason))
    return BandScan("ssl4eo-s12", samples, excluded, ignored, {"s1": list(S1_BANDS), "s2": list(s2_bands)}, extras)


def _locations(folder: Path, ignored: list[dict[str, str]], root: Path) -> list[str]:
    out = []
    for entry in os.scandir(folder):
        if entry.is_dir() and _LOCATION_RE.match(entry.name):
            out.append(entry.name)
        else:
            ignored.append({"path": str(Path(entry.path).relative_to(root)), "reason": "not a location folder (6-7 digits)"})
    return out


def _timestamps(root: Path, sensor: str, loc: str, bands: list[str], ignored: list[dict[str, str]], excluded: list[Excluded]) -> list[tuple[datetime, str, list[tuple[str, Path]]]]:
    """(date, folder name, band files) of the complete timestamp folders of one location."""
    folder = root / sensor / loc
    if not folder.is_dir():
        return []
    out = []
    for entry in sorted(os.scandir(folder), key=lambda e: e.name):
        rel = f"{sensor}/{loc}/{entry.name}"
        date = parse_date(entry.name, sensor) if entry.is_dir() else None
        if date is None:
            ignored.append({"path": rel, "reason": f"not a {sensor} timestamp folder (no sensing time in its name)"})
            continue
        names = {e.name for e in os.scandir(entry.path)}
        files = {b: band_file(Path(entry.path), b, names) for b in bands}
        missing = [b for b, p in files.items() if p is None]
        if missing:
            excluded.append(Excluded(f"{loc}/{sensor}/{entry.name}", f"missing bands: {', '.join(missing)} not in {rel}; re-extract the archive", [rel]))
            continue
        used = {p.name for p in files.values() if p is not None} | {"metadata.json"}
        ignored += [{"path": f"{rel}/{n}", "reason": "not a band file of this modality"} for n in sorted(names - used)]
        out.append((date, entry.name, [(b, p) for b, p in files.items() if p is not None]))
    out.sort(key=lambda t: (t[0], t[1]))
    return out


def _match(loc: str, s1_ts: list, s2_ts: list, level: str, max_gap: float, excluded: list[Excluded]) -> list[BandSample]:
    samples = []
    used: set[int] = set()
    for season, (date, name, files) in enumerate(s2_ts):
        gaps = [(abs((d - date).total_seconds()) / 86400.0, i) for i, (d, _, _) in enumerate(s1_ts) if i not in used]
        gap, best = min(gaps, default=(None, None))
        if best is None or gap > max_gap:
            why = "no S1 timestamp left for this location" if best is None else f"nearest S1 timestamp is {gap:.1f} days away (> {max_gap:g})"
            excluded.append(Excluded(f"{loc}_t{season}", f"lone s2 timestamp: {why}; pass --max-gap-days to widen", [f"{LEVELS[level][0]}/{loc}/{name}"]))
            continue
        used.add(best)
        s1_date, s1_name, s1_files = s1_ts[best]
        meta = {
            "location": loc, "season": season, "s2_level": level, "s1_timestamp": s1_name, "s2_timestamp": name,
            "s1_date": s1_date.isoformat(), "s2_date": date.isoformat(), "gap_days": round(gap, 3),
        }  # fmt: skip
        samples.append(BandSample(f"{loc}_t{season}", s1_files, files, meta))
    for i, (_, name, _) in enumerate(s1_ts):
        if i not in used:
            excluded.append(Excluded(f"{loc}/s1/{name}", f"lone s1 timestamp: no {level.upper()} timestamp of location {loc} was matched to it", [f"s1/{loc}/{name}"]))
    return samples

"""`--dataset pairs`: a user's own list of co-located S1/S2 (and label) files, read from a CSV."""

from __future__ import annotations

import csv
import logging
import os
import re
from pathlib import Path

from satfuse.data.sources.layout import (
    Excluded,
    Ignored,
    Pair,
    ScanResult,
)
from satfuse.data.sources.split_lists import text_lines
from satfuse.utils import SatfuseError

log = logging.getLogger(__name__)


def pair_key(rel_s2: str) -> str:
    """Sample key of a user's pair: the S2 path without suffix, every non-[A-Za-z0-9_-] as '_'."""
    stem = rel_s2[: -len(Path(rel_s2).suffix)] if Path(rel_s2).suffix else rel_s2
    return re.sub(r"[^A-Za-z0-9_-]", "_", stem)


def scan_pairs(root: Path, pairs_file: Path) -> ScanResult:
    """Pairs listed in a CSV (s1,s2[,label]; paths relative to `root`), any folder layout.

    Rows whose files are missing, rows listed twice and keys that collide are excluded with
    their reason; every file under `root` that no row uses is returned as ignored.
    """
    root, pairs_file = Path(root), Path(pairs_file)
    if not root.is_dir():
        raise SatfuseError(f"{root}: source directory does not exist; pass the folder the paths of {pairs_file} are relative to")
    lines = text_lines(pairs_file, "pairs file")
    rows = list(csv.reader(lines))
    rows = [(i + 1, r) for i, r in enumerate(rows) if any(c.strip() for c in r)]
    if not rows:
        raise SatfuseError(f"{pairs_file}: empty; it needs a header s1,s2[,label] and one row per pair")
    header = [c.strip().lower() for c in rows[0][1]]
    if "s1" not in header or "s2" not in header:
        raise SatfuseError(f"{pairs_file}: header {rows[0][1]} needs the columns s1,s2 (and optionally label)")
    if not rows[1:]:
        raise SatfuseError(f"{pairs_file}: the list is empty (a header and no rows); add one row per pair")
    i1, i2 = header.index("s1"), header.index("s2")
    il = header.index("label") if "label" in header else None
    pairs: dict[str, Pair] = {}
    excluded: list[Excluded] = []
    used: set[str] = set()
    dup: set[str] = set()
    for lineno, row in rows[1:]:
        cells = [c.strip() for c in row]
        need = max(i1, i2, il if il is not None else 0)
        if len(cells) <= need or not cells[i1] or not cells[i2] or (il is not None and not cells[il]):
            raise SatfuseError(f"{pairs_file}:{lineno}: needs a value in each of the columns {', '.join(header)}; got {row}")
        rels = {"s1": cells[i1], "s2": cells[i2]} | ({"label": cells[il]} if il is not None else {})
        paths = {k: root / v for k, v in rels.items()}
        key = pair_key(rels["s2"])
        gone = [f"{k} {v}" for k, v in rels.items() if not paths[k].is_file()]
        used.update(os.path.normpath(v) for v in rels.values())
        if gone:
            excluded.append(Excluded(key, f"missing: {pairs_file}:{lineno} lists {', '.join(gone)}, not found under {root}", [str(p) for p in paths.values()]))
            continue
        if key in pairs or key in dup:
            dup.add(key)
            excluded.append(Excluded(key, f"duplicate: {pairs_file}:{lineno} lists S2 {rels['s2']} (or one with the same key) again; list each pair once", [str(p) for p in paths.values()]))
            continue
        pairs[key] = Pair(key, "pairs", "", 0, lineno, paths["s1"], paths["s2"], paths.get("label"))
    for key in dup:  # the first row of a duplicated key is ambiguous too
        first = pairs.pop(key, None)
        if first is not None:
            excluded.append(Excluded(key, f"duplicate: {pairs_file}:{first.patch} and later rows name the same pair; list each pair once", [str(first.s1), str(first.s2)]))
    ignored = _unused_files(root, used, pairs_file)
    excluded.sort(key=lambda e: (e.key, e.reason))
    return ScanResult(sorted(pairs.values(), key=lambda p: p.key), excluded, "label" if il is not None else None, ignored)


def _unused_files(root: Path, used: set[str], pairs_file: Path) -> list[Ignored]:
    """Every file under `root` no pair uses (symlink loops reported, never followed)."""
    out: list[Ignored] = []
    used_dirs = {str(parent) for u in used for parent in Path(u).parents if str(parent) != "."}
    try:
        own = os.path.normpath(os.path.relpath(pairs_file, root))
    except ValueError:
        own = ""
    for dirpath, dirnames, filenames in os.walk(root, followlinks=False):
        dirnames.sort()
        for name in sorted(filenames) + [d for d in dirnames if os.path.islink(os.path.join(dirpath, d))]:
            rel = os.path.normpath(os.path.relpath(os.path.join(dirpath, name), root))
            if rel in used or rel in used_dirs:  # used, or a (linked) folder holding used files
                continue
            reason = "the pairs file itself" if rel == own else f"not listed in {pairs_file}"
            out.append(Ignored(rel, reason))
    return out

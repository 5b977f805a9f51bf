"""Published split lists and scene lists: reading (safely) and writing them.

Split lists (`--split-file`), all as published:
- the seed paper's `{sen12ms,validation,test}_observations.csv`: `Seasons.X,scene,id`, no
  header (a `Season,Scene,ID` header is accepted too), X in SPRING SUMMER FALL WINTER
  (SEN12MS) or VALSET TESTSET (DFC2020; VALIDATION / TEST also read); LF or CRLF; a UTF-8 BOM;
- SEN12MS's `{train,test}_list.txt`: one file name per line (S2 names), CRLF;
- SEN12MS's `{train,test}_list.pkl`: a pickled list of those names, read by an unpickler
  that refuses every global, so a hostile pickle cannot run code;
- scene lists such as `SEN12MS_holdOutScenes.txt` (`ROIs1158_spring/s1_63`) are for
  `--exclude-scenes`.
"""
from __future__ import annotations

import csv
import io
import logging
import pickle
import pickletools
import re
from collections.abc import Hashable, Sequence
from pathlib import Path
from typing import TypeVar

from satfuse.data.sources.layout import FILE_RE, ROI_TOKEN, ROIS, SEASON_TOKENS
from satfuse.utils import SatfuseError, atomic_write_text

K = TypeVar("K", bound=Hashable)  # a patch id as a reader spells it (SEN12MS: (roi, scene, id); BigEarthNet: a name)

log = logging.getLogger(__name__)

_SCENE_LINE_RE = re.compile(r"^(?P<roi>ROIs[0-9]{4}_[a-z]+)/(?P<sensor>s1|s2|lc|dfc)_(?P<scene>[0-9]+)$")


class _NoGlobals(pickle.Unpickler):
    """Unpickles plain data only: every class or function lookup is refused, so a pickle
    cannot construct objects or call anything (os.system, eval, ...)."""

    def find_class(self, module: str, name: str) -> object:
        raise pickle.UnpicklingError(f"refers to {module}.{name}")


# The opcodes a pickled list of str is made of (any protocol); everything else is refused
# before unpickling, so no class is looked up and no claimed length is allocated unchecked.
_LIST_OPCODES = frozenset({
    "PROTO", "FRAME", "STOP", "MARK", "EMPTY_LIST", "LIST", "APPEND", "APPENDS",
    "UNICODE", "SHORT_BINUNICODE", "BINUNICODE", "BINUNICODE8",
    "PUT", "BINPUT", "LONG_BINPUT", "MEMOIZE", "GET", "BINGET", "LONG_BINGET",
})  # fmt: skip
MAX_PICKLE_BYTES = 256 << 20  # the full SEN12MS list is ~6 MB


def read_pickle_list(path: Path) -> list[str]:
    """A pickled `list[str]` (SEN12MS's *_list.pkl); anything else is refused naming the file.

    Two gates: the opcode stream is walked without executing it (pickletools) and must hold
    only list/str opcodes; then an unpickler that refuses every global loads it.
    """
    path = Path(path)
    if path.stat().st_size > MAX_PICKLE_BYTES:
        raise SatfuseError(f"{path}: refused: {path.stat().st_size} bytes is far more than a list of file names; pass the *_list.txt instead")
    blob = path.read_bytes()
    try:
        for op, _, pos in pickletools.genops(blob):
            if op.name not in _LIST_OPCODES:
                raise pickle.UnpicklingError(f"opcode {op.name} at byte {pos}")
        data = _NoGlobals(io.BytesIO(blob)).load()
    except Exception as exc:  # any failure of the gates: not a plain list (fuzzed: also Overflow/MemoryError)
        raise SatfuseError(f"{path}: refused: not a plain pickled list of file names ({exc}); satfuse never runs code from a pickle, pass the *_list.txt instead") from None
    if not isinstance(data, list) or not all(isinstance(x, str) for x in data):
        raise SatfuseError(f"{path}: refused: the pickle holds a {type(data).__name__}, not a list of file names; pass the *_list.txt instead")
    return data


def text_lines(path: Path, what: str) -> list[str]:
    path = Path(path)
    if not path.is_file():
        raise SatfuseError(f"{path}: {what} not found; pass an existing file")
    try:
        text = path.read_bytes().decode("utf-8-sig")  # a BOM (Excel's CSVs) is not part of the first field
    except UnicodeDecodeError as exc:
        raise SatfuseError(f"{path}: not UTF-8 text ({exc.reason} at byte {exc.start}); save it as UTF-8") from None
    return text.splitlines()  # LF and CRLF alike


def read_split(split_file: Path, dataset: str) -> set[tuple[str, int, int]]:
    """Read a split list in any published format (module doc) into (roi, scene, patch) ids."""
    split_file = Path(split_file)
    if split_file.suffix.lower() == ".pkl":
        if not split_file.is_file():
            raise SatfuseError(f"{split_file}: split file not found; pass an existing *_list.pkl")
        ids = [_name_id(name, dataset, split_file, i + 1) for i, name in enumerate(read_pickle_list(split_file))]
        say_duplicates(split_file, list(enumerate(ids, start=1)))
        return _nonempty(set(ids), split_file)
    lines = text_lines(split_file, "split file")
    content = [(i + 1, line.strip()) for i, line in enumerate(lines) if line.strip()]
    if not content:
        raise SatfuseError(f"{split_file}: the list is empty; pass a split list with at least one patch")
    first = content[0][1]
    if _SCENE_LINE_RE.match(first):
        raise SatfuseError(f"{split_file}: a scene list (`{first}`), not a patch list; pass it as --exclude-scenes {split_file}")
    if "," in first:
        return _nonempty(_read_csv(split_file, content, dataset), split_file)
    numbered = [(n, _name_id(line, dataset, split_file, n)) for n, line in content]
    say_duplicates(split_file, numbered)
    return _nonempty({ident for _, ident in numbered}, split_file)


def say_duplicates(split_file: Path, numbered: Sequence[tuple[int, K]], unit: str = "line") -> dict[K, int]:
    """Warn when rows repeat a patch: each patch is packed once, so a list that repeats rows to
    balance classes (oversampling) loses its weights; nothing is merged without a word. The
    one copy of this rule for every split reader (SEN12MS/DFC2020 here, BigEarthNet's lists
    and metadata.parquet); `numbered` is (line or row number, patch id). Returns each patch's
    first line, in list order, for readers that keep the first row of a repeated patch."""
    first: dict[K, int] = {}
    repeats: list[tuple[int, int]] = []
    for lineno, ident in numbered:
        if ident in first:
            repeats.append((lineno, first[ident]))
        else:
            first[ident] = lineno
    if repeats:
        shown = ", ".join(f"{unit} {n} repeats {unit} {f}" for n, f in repeats[:3])
        log.warning("%s: %d rows name %d patches: %d duplicate row(s) (%s%s) are packed once; a list that repeats rows "
                    "to balance classes loses that weighting here (weight samples at training time instead)",
                    split_file, len(numbered), len(first), len(repeats), shown, " ..." if len(repeats) > 3 else "")
    return first


def _nonempty(ids: set[tuple[str, int, int]], path: Path) -> set[tuple[str, int, int]]:
    if not ids:
        raise SatfuseError(f"{path}: the list is empty (a header and no rows); pass a split list with at least one patch")
    return ids


def _read_csv(split_file: Path, content: list[tuple[int, str]], dataset: str) -> set[tuple[str, int, int]]:
    rows = list(csv.reader([line for _, line in content]))
    header = [c.strip().lower() for c in rows[0]]
    cols = (0, 1, 2)
    head_row: list[str] = []
    if header and header[0] in ("season", "seasons"):
        head_row = rows[0]
        try:
            cols = (header.index(header[0]), header.index("scene"), header.index("id"))
        except ValueError:
            raise SatfuseError(f"{split_file}: header {rows[0]} needs the columns Season,Scene,ID (or no header: Seasons.X,scene,id rows)") from None
        rows, content = rows[1:], content[1:]
    numbered: list[tuple[int, tuple[str, int, int]]] = []
    extra: list[int] = []  # lines with columns beyond the three read
    for (lineno, _), row in zip(content, rows, strict=True):
        if len(row) <= max(cols):
            raise SatfuseError(f"{split_file}:{lineno}: {len(row)} column(s), need Season,Scene,ID (e.g. Seasons.SPRING,26,475)")
        if any(c.strip() for i, c in enumerate(row) if i not in cols):
            extra.append(lineno)
        numbered.append((lineno, _split_row(row[cols[0]], row[cols[1]], row[cols[2]], dataset, split_file, lineno)))
    if extra:
        names = [c.strip() for i, c in enumerate(head_row) if i not in cols and c.strip()]
        what = f" ({', '.join(names)})" if names else ""
        log.warning("%s: %d row(s) have columns beyond Season,Scene,ID%s (first: line %d); they are not used: only the "
                    "listed patches are packed", split_file, len(extra), what, extra[0])
    say_duplicates(split_file, numbered)
    return {ident for _, ident in numbered}


def _roi_of_token(text: str, dataset: str, where: str) -> str:
    token = text.strip()
    name = token.split(".", 1)[1] if token.startswith("Seasons.") else token
    roi = SEASON_TOKENS.get(name.upper())
    if roi is None and name in SEASON_TOKENS.values():
        roi = name
    if roi is None:
        valid = [f"Seasons.{ROI_TOKEN[r]}" for r in ROIS[dataset]]
        raise SatfuseError(f"{where}: unknown Season {token!r}; use one of {valid}")
    if roi not in ROIS[dataset]:
        other = next(d for d, rois in ROIS.items() if roi in rois)
        raise SatfuseError(f"{where}: Season {token!r} is a {other} token, but --dataset is {dataset}; pass --dataset {other} or the right split list")
    return roi


def _split_row(season: str, scene: str, patch: str, dataset: str, split_file: Path, lineno: int) -> tuple[str, int, int]:
    where = f"{split_file}:{lineno}"
    roi = _roi_of_token(season, dataset, where)
    scene, patch = scene.strip(), patch.strip()
    if not (scene.isascii() and scene.isdigit() and patch.isascii() and patch.isdigit()):
        raise SatfuseError(f"{where}: Scene and ID must be integers (ASCII digits), got {scene!r}, {patch!r}")
    return roi, int(scene), int(patch)


def _name_id(name: str, dataset: str, split_file: Path, lineno: int) -> tuple[str, int, int]:
    """A list entry `ROIs1158_spring_s2_124_p100.tif` (optionally with folders) -> id."""
    base = name.strip().replace("\\", "/").rsplit("/", 1)[-1]
    m = FILE_RE.match(base)
    if not m:
        raise SatfuseError(f"{split_file}:{lineno}: {name.strip()!r} is not a patch file name like ROIs1158_spring_s2_124_p100.tif")
    roi = m["roi"]
    if roi not in ROIS[dataset]:
        other = next((d for d, rois in ROIS.items() if roi in rois), None)
        hint = f"pass --dataset {other}" if other else f"{dataset} has {', '.join(ROIS[dataset])}"
        raise SatfuseError(f"{split_file}:{lineno}: {base} is not a {dataset} patch; {hint}")
    return roi, int(m["scene"]), int(m["patch"])


def read_scene_list(path: Path, dataset: str) -> set[tuple[str, int]]:
    """A scene list such as SEN12MS_holdOutScenes.txt (`ROIs1158_spring/s1_63` per line)."""
    path = Path(path)
    out: set[tuple[str, int]] = set()
    for lineno, line in enumerate(text_lines(path, "scene list"), start=1):
        text = line.strip()
        if not text:
            continue
        m = _SCENE_LINE_RE.match(text)
        if not m:
            raise SatfuseError(f"{path}:{lineno}: {text!r} is not a scene like ROIs1158_spring/s1_63; pass a scene list (SEN12MS_holdOutScenes.txt)")
        if m["roi"] not in ROIS[dataset]:
            raise SatfuseError(f"{path}:{lineno}: {m['roi']} is not a {dataset} ROI ({', '.join(ROIS[dataset])})")
        out.add((m["roi"], int(m["scene"])))
    if not out:
        raise SatfuseError(f"{path}: the scene list is empty; pass a list with at least one scene")
    return out


def write_split(path: Path, ids: list[tuple[str, int, int]]) -> None:
    """Write a split list as the seed paper's authors publish it: no header, `Seasons.X,scene,id`
    with X = SPRING..WINTER for SEN12MS and VALSET / TESTSET for DFC2020; atomically."""
    lines = [f"Seasons.{ROI_TOKEN[roi]},{scene},{patch}" for roi, scene, patch in ids]
    atomic_write_text(Path(path), "".join(line + "\n" for line in lines))


def write_list_txt(path: Path, ids: list[tuple[str, int, int]]) -> None:
    """Write a SEN12MS `*_list.txt`: one S2 file name per line, CRLF line ends (as published)."""
    atomic_write_text(Path(path), "".join(f"{roi}_s2_{scene}_p{patch}.tif\r\n" for roi, scene, patch in ids))


def write_list_pkl(path: Path, ids: list[tuple[str, int, int]]) -> None:
    """Write a SEN12MS `*_list.pkl`: a pickled list of S2 file names (protocol 3), atomically."""
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_bytes(pickle.dumps([f"{roi}_s2_{scene}_p{patch}.tif" for roi, scene, patch in ids], protocol=3))
    tmp.replace(path)


def write_scene_list(path: Path, scenes: list[tuple[str, int]]) -> None:
    """Write a scene list like SEN12MS_holdOutScenes.txt (`ROIs1158_spring/s1_63`, LF)."""
    atomic_write_text(Path(path), "".join(f"{roi}/s1_{scene}\n" for roi, scene in scenes))

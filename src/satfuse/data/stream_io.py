"""Reading samples out of WebDataset shard tars, and decoding them, for the streaming loader.

Why not `webdataset.WebDataset(...).decode()`: exact resume needs to address samples by
their index inside a shard and to skip what was consumed without decoding it, and stock
`.decode()` of our `.npy` members is ~4x slower than `np.frombuffer` on the member bytes.
URLs are opened with `webdataset.gopen` (local paths, `pipe:` commands, http...), members are
grouped into samples by WebDataset's rule (key = the name up to the first dot), so any
stock WebDataset tar of the shard contract reads here and vice versa.

Local tars are opened seekable: skipping a sample is a header read and a seek, no data.
"""

from __future__ import annotations

import functools
import io
import logging
import os
import tarfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import numpy as np
import webdataset as wds

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class MemberRef:
    """Where a member's bytes lie in a local tar. A shuffle buffer of refs holds no pixel
    data; the bytes are read just before decoding (cache-hot), and never for skipped samples."""

    path: str
    offset: int
    size: int

    def read(self) -> bytes:
        with open(self.path, "rb", buffering=0) as fh:
            fh.seek(self.offset)
            data = fh.read(self.size)
        if len(data) != self.size:
            raise ValueError(f"member cut short at byte {self.offset + len(data)} (truncated tar)")
        return data


@dataclass
class RawSample:
    """Members of one sample (bytes, or refs into a local tar), or why it could not be read."""

    shard: int
    index: int
    key: str
    members: dict[str, bytes | MemberRef]
    error: str = ""

    def member(self, ext: str) -> bytes:
        value = self.members[ext]
        return value.read() if isinstance(value, MemberRef) else value


def split_name(name: str) -> tuple[str, str]:
    """WebDataset's key/extension rule: key = path up to the first dot of the basename."""
    slash = name.rfind("/")
    dot = name.find(".", slash + 1)
    if dot < 0:
        return name, ""
    return name[:dot], name[dot + 1 :]


def open_tar(url: str) -> tuple[tarfile.TarFile, object | None]:
    """Seekable for local files, streaming for pipe:/remote URLs (then also the stream,
    which the caller must close: tarfile leaves a passed-in stream open)."""
    if url.startswith("pipe:") or "://" in url:
        stream = wds.gopen(url, "rb")
        return tarfile.open(fileobj=stream, mode="r|"), stream
    return tarfile.open(url, mode="r:"), None


def close_stream(stream: object | None, complete: bool) -> None:
    """Close a pipe; a command killed by SIGPIPE because we stopped early is not an error."""
    if stream is None:
        return
    try:
        stream.close()  # type: ignore[attr-defined]
    except Exception as exc:  # noqa: BLE001 - webdataset raises a bare Exception on exit status
        if complete:
            raise OSError(f"shard command failed: {exc}") from exc


def read_shard(url: str, shard: int, wanted: set[int], last: int) -> Iterator[RawSample]:
    """Yield the wanted samples of one shard in tar order; stop after index `last`.

    Every wanted index <= last is yielded exactly once: read, or with `error` set when the
    tar is truncated/corrupt or ends early. Never raises for bad data, never blocks forever.
    """
    done: set[int] = set()
    try:
        for sample in _iter_groups(url, shard, wanted, last):
            done.add(sample.index)
            yield sample
        reason = "shard ended before the manifest's count (truncated or mismatched manifest)"
    except (tarfile.TarError, OSError, EOFError, ValueError) as exc:
        reason = f"unreadable tar ({exc.__class__.__name__}: {exc})"
    for idx in sorted(i for i in wanted if i not in done and i <= last):
        yield RawSample(shard, idx, f"<{url}#{idx}>", {}, error=reason)


def _iter_groups(url: str, shard: int, wanted: set[int], last: int) -> Iterator[RawSample]:
    """Group consecutive members by key; read data only of wanted samples."""
    tf, stream = open_tar(url)
    complete = False
    try:
        index, key, members = -1, None, {}
        for info in tf:
            if not info.isfile():
                continue
            k, ext = split_name(info.name)
            if k != key:
                if key is not None and index in wanted:
                    yield RawSample(shard, index, key, members)
                index, key, members = index + 1, k, {}
                if index > last:
                    return
            if index in wanted:
                if stream is None:
                    members[ext] = MemberRef(url, info.offset_data, info.size)
                else:
                    fh = tf.extractfile(info)
                    members[ext] = fh.read() if fh is not None else b""
        complete = True
        if key is not None and index in wanted and index <= last:
            yield RawSample(shard, index, key, members)
    finally:
        tf.close()
        close_stream(stream, complete)


def decode_npy(data: bytes) -> np.ndarray:
    """np.save bytes -> array without copying (no pickle: object arrays are refused)."""
    shape, fortran, dtype, off = npy_layout(data[:4096])
    count = int(np.prod(shape)) if shape else 1
    arr = np.frombuffer(data, dtype=dtype, count=count, offset=off)
    return arr.reshape(shape, order="F" if fortran else "C")


def npy_layout(prefix: bytes) -> tuple[tuple[int, ...], bool, np.dtype, int]:
    """(shape, fortran_order, dtype, data offset) from the first bytes of an .npy member.

    numpy parses the header dict with `ast` (~0.2 ms); every sample of a shard set has the
    same few headers, so the parse is cached by the header's bytes."""
    if len(prefix) < 10 or prefix[:6] != b"\x93NUMPY":
        raise ValueError("not an .npy member (bad magic)")
    if prefix[6] == 1:
        end = 10 + int.from_bytes(prefix[8:10], "little")
    else:
        end = 12 + int.from_bytes(prefix[8:12], "little")
    if end > len(prefix):
        raise ValueError(".npy header longer than the member")
    return _parse_header(bytes(prefix[:end]))


@functools.lru_cache(maxsize=256)
def _parse_header(header: bytes) -> tuple[tuple[int, ...], bool, np.dtype, int]:
    fh = io.BytesIO(header)
    version = np.lib.format.read_magic(fh)
    if version == (1, 0):
        shape, fortran, dtype = np.lib.format.read_array_header_1_0(fh)
    else:
        shape, fortran, dtype = np.lib.format.read_array_header_2_0(fh)
    if dtype.hasobject:
        raise ValueError("object arrays are not allowed in shards")
    return tuple(shape), bool(fortran), dtype, fh.tell()


RowChooser = Callable[[int, int], "tuple[int, int] | None"]


def load_npy(value: bytes | MemberRef, want: tuple[int, ...], rows: RowChooser | None = None) -> np.ndarray:
    """A (C, H, W) .npy member with shape (want[0], H, W) [+ want H, W if given], restricted to
    the rows `rows(H, W)` returns. From a local tar only those rows are read (one pread per band),
    so a 128-crop of a 256 patch reads half the bytes. ValueError for any malformed member."""
    if not isinstance(value, MemberRef):
        arr = decode_npy(value)
        _check_shape(arr.shape, want)
        sel = rows(arr.shape[1], arr.shape[2]) if rows else None
        return arr if sel is None else arr[:, sel[0] : sel[1]]
    with open(value.path, "rb", buffering=0) as fh:
        fd = fh.fileno()
        prefix = os.pread(fd, min(value.size, 4096), value.offset)
        shape, fortran, dtype, off = npy_layout(prefix)
        _check_shape(shape, want)
        nbytes = int(np.prod(shape)) * dtype.itemsize
        if off + nbytes > value.size:
            raise ValueError(f".npy header says {shape} {dtype} but the member has {value.size} bytes")
        sel = rows(shape[1], shape[2]) if rows else None
        if fortran or sel is None:
            sel = (0, shape[1]) if not fortran else None
        if sel is None:
            return decode_npy(value.read())
        c, h, w = shape
        out = np.empty((c, sel[1] - sel[0], w), dtype=dtype)
        for band in range(c):
            start = value.offset + off + (band * h + sel[0]) * w * dtype.itemsize
            got = os.preadv(fd, [memoryview(out[band]).cast("B")], start)
            if got != out[band].nbytes:
                raise ValueError(f"member cut short at byte {start + got} (truncated tar)")
        return out


def _check_shape(shape: tuple[int, ...], want: tuple[int, ...]) -> None:
    if len(shape) != 3 or shape[0] != want[0] or (len(want) == 3 and tuple(shape[1:]) != tuple(want[1:])):
        raise ValueError(f"unexpected shape {tuple(shape)} (want ({want[0]}, H, W) matching the other sensor)")


def decode_pair(sample: RawSample, rows: RowChooser | None = None) -> tuple[np.ndarray, np.ndarray]:
    """S1 (2,H,W) and S2 (13,H,W) of a sample, restricted to `rows(H, W)` (all rows if None
    or no chooser); ValueError naming what is wrong."""
    if sample.error:
        raise ValueError(sample.error)
    for ext in ("s1.npy", "s2.npy"):
        if ext not in sample.members:
            raise ValueError(f"member {ext} missing (has {sorted(sample.members)})")
    size: list[int] = []

    def remember(h: int, w: int) -> tuple[int, int] | None:
        size[:] = [h, w]
        return rows(h, w) if rows else None

    s1 = load_npy(sample.members["s1.npy"], (2,), remember)
    s2 = load_npy(sample.members["s2.npy"], (13, *size), lambda h, w: rows(h, w) if rows else None)
    return s1, s2


def decode_label(sample: RawSample) -> tuple[str, np.ndarray] | None:
    for ext, name in (("lc.npy", "lc"), ("dfc.npy", "dfc")):
        if ext in sample.members:
            return name, decode_npy(sample.member(ext))
    return None

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

import io
import logging
import tarfile
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
import webdataset as wds

log = logging.getLogger(__name__)


@dataclass
class RawSample:
    """Member bytes of one sample, or why it could not be read (`error`)."""

    shard: int
    index: int
    key: str
    members: dict[str, bytes]
    error: str = ""


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
    fh = io.BytesIO(data)
    version = np.lib.format.read_magic(fh)
    if version == (1, 0):
        shape, fortran, dtype = np.lib.format.read_array_header_1_0(fh)
    else:
        shape, fortran, dtype = np.lib.format.read_array_header_2_0(fh)
    if dtype.hasobject:
        raise ValueError("object arrays are not allowed in shards")
    count = int(np.prod(shape)) if shape else 1
    arr = np.frombuffer(data, dtype=dtype, count=count, offset=fh.tell())
    return arr.reshape(shape, order="F" if fortran else "C")


def decode_pair(sample: RawSample) -> tuple[np.ndarray, np.ndarray]:
    """S1 (2,H,W) and S2 (13,H,W) of a sample; ValueError naming what is wrong."""
    if sample.error:
        raise ValueError(sample.error)
    for ext in ("s1.npy", "s2.npy"):
        if ext not in sample.members:
            raise ValueError(f"member {ext} missing (has {sorted(sample.members)})")
    s1 = decode_npy(sample.members["s1.npy"])
    s2 = decode_npy(sample.members["s2.npy"])
    if s1.ndim != 3 or s1.shape[0] != 2 or s2.ndim != 3 or s2.shape[0] != 13 or s1.shape[1:] != s2.shape[1:]:
        raise ValueError(f"unexpected shapes s1 {s1.shape}, s2 {s2.shape} (want (2,H,W), (13,H,W))")
    return s1, s2


def decode_label(sample: RawSample) -> tuple[str, np.ndarray] | None:
    for ext, name in (("lc.npy", "lc"), ("dfc.npy", "dfc")):
        if ext in sample.members:
            return name, decode_npy(sample.members[ext])
    return None

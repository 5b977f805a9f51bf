"""Reading samples out of WebDataset shard tars, and decoding them, for the streaming loader.

One job (index, map, read and decode shard members); it is long because it parses USTAR
headers itself and keeps a tarfile fallback with the same errors.

Why not `webdataset.WebDataset(...).decode()`: exact resume needs to address samples by
their index inside a shard and to skip what was consumed without decoding it, and stock
`.decode()` of our `.npy` members is ~4x slower than `np.frombuffer` on the member bytes.
URLs are opened with `webdataset.gopen` (local paths, `pipe:` commands, http...), members are
grouped into samples by WebDataset's rule (key = the name up to the first dot), so any
stock WebDataset tar of the shard contract reads here and vice versa.

Local tars are memory-mapped and indexed once (`ShardIndex`: every sample's member offsets,
from the 512-byte headers alone); a `ShardCache` keeps the index and the map for the life of
a loader iterator, so later epochs parse no tar header at all and skipping a sample costs
nothing. Decoding a member is `np.frombuffer` on the map: zero-copy, so a crop touches only
its own pixels (at crop 128 of 256, a quarter of the bytes) when the batch is built. Plain
USTAR headers (what `tarfile`, and so webdataset's TarWriter, writes for short names) are
parsed here; a tar with anything else (pax or GNU long names, links, odd checksums) is
indexed by `tarfile` itself, with the same grouping and the same errors.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import io
import json
import logging
import mmap
import os
import tarfile
from collections import OrderedDict
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

import numpy as np
import webdataset as wds

from satfuse.data.format import blocks
from satfuse.data.format.codecs import (
    BLOCK_CODECS,
    declared_shape,
    decompress_npy,
    find_member,
    from_manifest,
)
from satfuse.data.format.manifest import MANIFEST_NAME, STAGED_KEY, shard_digests
from satfuse.utils import SatfuseError

log = logging.getLogger(__name__)

BLOCK = 512
USTAR_MAGIC = b"ustar\x0000"  # POSIX ustar: what tarfile's PAX and USTAR formats write
READ_ERRORS = (tarfile.TarError, OSError, EOFError, ValueError)


# --------------------------------------------------------------------------------------------
# Local shards: memory map + member index
# --------------------------------------------------------------------------------------------


class MappedTar:
    """A local tar, memory-mapped read-only.

    Why a map and not reads: a decoded member is a view of the page cache (no copy until the
    batch is built), and a crop touches only its own pixels. Shards are immutable once written
    (the writer renames finished tars into place), which mapping relies on: a file truncated
    *while* mapped would fault (SIGBUS) instead of raising."""

    def __init__(self, path: str) -> None:
        self.path = path
        with open(path, "rb") as fh:
            st = os.fstat(fh.fileno())
            self.stamp = (st.st_ino, st.st_size, st.st_mtime_ns)
            self.data: mmap.mmap | bytes = mmap.mmap(fh.fileno(), 0, access=mmap.ACCESS_READ) if st.st_size else b""

    @property
    def size(self) -> int:
        return len(self.data)


@dataclass(frozen=True, slots=True)
class MemberRef:
    """Where a member's bytes lie in a mapped local tar. A shuffle buffer of refs holds no
    pixel data; the bytes are touched only when the sample is decoded into a batch."""

    tar: MappedTar
    offset: int
    size: int

    def check(self) -> None:
        if self.offset + self.size > self.tar.size:
            raise ValueError(f"member cut short at byte {self.tar.size} (truncated tar)")

    def read(self) -> bytes:
        self.check()
        return bytes(self.tar.data[self.offset : self.offset + self.size])


@dataclass
class ShardIndex:
    """The samples of one local tar in tar order, and why indexing stopped early, if it did.

    `error` is empty when the tar ended as `tarfile` ends it (end-of-archive block, or a short
    or invalid header after the first); otherwise it is the read error ("ReadError: ..."),
    and the sample being grouped when it happened is not in `samples`, as with a sequential
    read that raises mid-sample."""

    stamp: tuple[int, int, int]
    samples: list[tuple[str, dict[str, MemberRef]]] = field(default_factory=list)
    error: str = ""


# Check each local shard's sha256 against its manifest the first time a worker indexes it.
# Why on by default: bytes altered after packing (same size) decode as plausible pixels, and
# only this check notices; its cost is one sha256 pass per shard and worker iterator
# (`satfuse bench loader` measures it as `verify_overhead`).
VERIFY_SHARDS = True


def index_shard(path: str) -> ShardIndex:
    """Map the tar and group its members into samples, reading headers only. Never raises
    for bad data or a missing file: the reason is in `error`."""
    try:
        tar = MappedTar(path)
    except (OSError, ValueError) as exc:
        return ShardIndex((0, 0, 0), error=f"{exc.__class__.__name__}: {exc}")
    blocked, staged = set_flags(path)
    if blocked and isinstance(tar.data, mmap.mmap):
        tar.data.madvise(mmap.MADV_RANDOM)  # no read-around: a crop faults in only its own blocks' pages
    problem = verify_digest(path, tar, whole=not (blocked or staged))
    if problem:
        return ShardIndex(tar.stamp, error=problem)
    try:
        index = group_members(tar, _ustar_members(tar.data))
    except _NotPlainUstar:
        index = group_members(tar, _tarfile_members(path))
    return _check_count(path, index)


def _manifest_entry(path: str) -> tuple[str, int, int]:
    """(sha256, bytes, count) of the shard at `path` in the manifest.json beside it ("", -1, -1: none)."""
    return manifest_digests(os.path.dirname(os.path.abspath(path))).get(os.path.basename(path), ("", -1, -1))


def _check_count(path: str, index: ShardIndex) -> ShardIndex:
    """An intact tar holding another number of samples than its manifest entry says is refused
    as a whole. Why: the plan deals samples 0..count-1, so extra samples would be dropped
    without a word (and a shorter tar is reported sample by sample anyway)."""
    if index.error or not VERIFY_SHARDS:
        return index
    count = _manifest_entry(path)[2]
    if count < 0 or count == len(index.samples):
        return index
    return ShardIndex(index.stamp, error=(
        f"IntegrityError: the tar holds {len(index.samples)} samples, manifest.json says {count} (a manifest "
        "edited by hand or of another packing); re-shard (`satfuse shard verify` lists every mismatch)"))


def verify_digest(path: str, tar: MappedTar, whole: bool = True) -> str:
    """'' when the shard's bytes hash to the sha256 of the manifest.json beside it (or there
    is nothing to compare with), else why not. `whole=False` (blocked sets: every block the
    loader uses is checked by its own crc32) checks the size only, reading no byte."""
    if not VERIFY_SHARDS:
        return ""
    expected, size, _ = _manifest_entry(path)
    if not expected:
        return ""
    if size >= 0 and size != tar.size:
        return (f"IntegrityError: {tar.size} bytes, manifest.json says {size} (truncated or replaced); "
                "restore the shard or re-shard (`satfuse shard verify` lists every damaged one)")
    if whole and hashlib.sha256(tar.data).hexdigest() != expected:
        return ("IntegrityError: sha256 differs from manifest.json (bytes altered after packing); "
                "restore the shard or re-shard (`satfuse shard verify` lists every damaged one)")
    return ""


def manifest_digests(folder: str) -> dict[str, tuple[str, int, int]]:
    """{tar name: (sha256, bytes, count)} from `folder/manifest.json` ({} when absent or unreadable)."""
    path = os.path.join(folder, MANIFEST_NAME)
    try:
        mtime = os.stat(path).st_mtime_ns
    except OSError:
        return {}
    return _digests(path, mtime)


def set_flags(path: str) -> tuple[bool, bool]:
    """(blocked, staged) of the shard at `path`, from the manifest.json beside it: packed in
    checksummed row blocks (`--compress zstd-blocks|blocks`), and a staged copy whose tars were
    sha256-checked while copied (`STAGED_KEY`). (False, False) without a manifest."""
    folder = os.path.dirname(os.path.abspath(path))
    try:
        mtime = os.stat(os.path.join(folder, MANIFEST_NAME)).st_mtime_ns
    except OSError:
        return False, False
    return _flags(os.path.join(folder, MANIFEST_NAME), mtime)


@functools.lru_cache(maxsize=16)
def _flags(path: str, mtime_ns: int) -> tuple[bool, bool]:
    try:
        with open(path) as fh:
            doc = json.load(fh)
        return from_manifest(doc, path).blocked, doc.get(STAGED_KEY) is True
    except (OSError, ValueError, AttributeError, SatfuseError):
        return False, False  # the loader validated the manifest when it resolved the set; lenient here


@functools.lru_cache(maxsize=16)
def _digests(path: str, mtime_ns: int) -> dict[str, tuple[str, int, int]]:
    return shard_digests(path)  # cached per (path, mtime): a rewritten manifest is read again


def group_members(tar: MappedTar, members: Iterator[tuple[str, int, int]]) -> ShardIndex:
    """Consecutive members with one key form a sample (WebDataset's rule)."""
    index = ShardIndex(tar.stamp)
    key, group = None, {}
    try:
        for name, offset, size in members:
            k, ext = split_name(name)
            if k != key:
                if key is not None:
                    index.samples.append((key, group))
                key, group = k, {}
            group[ext] = MemberRef(tar, offset, size)
    except READ_ERRORS as exc:
        index.error = f"{exc.__class__.__name__}: {exc}"
        return index
    if key is not None:
        index.samples.append((key, group))
    return index


class ShardCache:
    """Indexed shards of one loader iterator; the least recently used go beyond `capacity`.

    Why per iterator and not per process: DataLoader workers start with each `iter(loader)`,
    so an index lives as long as the worker that built it and serves it whenever that worker
    reads the shard again (every epoch with one slot; with many slots a shard usually goes
    to another worker next epoch and is indexed there, ~10 us a member). An index costs
    ~1 kB a sample, hence the bound. A path that now holds another file is noticed by its
    (inode, size, mtime) stamp, checked on every use. Dropping an entry only drops
    references: arrays still viewing a map keep it alive."""

    def __init__(self, capacity: int = 16) -> None:
        self.capacity = capacity
        self._index: OrderedDict[str, ShardIndex] = OrderedDict()

    def get(self, path: str) -> ShardIndex:
        cached = self._index.pop(path, None)
        if cached is None or cached.stamp != _stamp(path):
            cached = index_shard(path)
        self._index[path] = cached
        while len(self._index) > self.capacity:
            self._index.popitem(last=False)
        return cached


def _stamp(path: str) -> tuple[int, int, int]:
    try:
        st = os.stat(path)
    except OSError:
        return (0, 0, 0)
    return (st.st_ino, st.st_size, st.st_mtime_ns)


class _NotPlainUstar(Exception):
    """A header the fast parser leaves to `tarfile` (pax/GNU extensions, non-files, oddities)."""


def _ustar_members(data: mmap.mmap | bytes) -> Iterator[tuple[str, int, int]]:
    """(name, data offset, size) of each regular file, reading headers only.

    Mirrors `tarfile.open(path, "r:")` iteration: at offset 0 an empty or short header is a
    ReadError; later an empty or short header, or an end-of-archive block, ends the archive
    quietly; a member whose data (with padding) runs past the end of the file is yielded,
    then the next step raises "unexpected end of data"."""
    total, offset = len(data), 0
    while True:
        header = data[offset : offset + BLOCK]
        if len(header) < BLOCK:
            if offset == 0:
                raise tarfile.ReadError("truncated header" if header else "empty file")
            return
        if header.count(0) == BLOCK:
            return
        name, size = _plain_header(header)
        start = offset + BLOCK
        offset = start + -(-size // BLOCK) * BLOCK
        yield name, start, size
        if offset > total:
            raise tarfile.ReadError("unexpected end of data")


def _plain_header(header: bytes) -> tuple[str, int]:
    """(name, size) of a valid POSIX USTAR regular-file header, else _NotPlainUstar."""
    if header[257:265] != USTAR_MAGIC or header[156:157] not in (b"0", b"\0") or header[124] & 0x80:
        raise _NotPlainUstar
    try:
        size = int(header[124:136].split(b"\0", 1)[0].strip() or b"0", 8)
        chksum = int(header[148:156].split(b"\0", 1)[0].strip() or b"0", 8)
    except ValueError:
        raise _NotPlainUstar from None
    if chksum != sum(header) - sum(header[148:156]) + 8 * 32:  # the field counts as 8 spaces
        raise _NotPlainUstar
    name = header[:100].split(b"\0", 1)[0]
    prefix = header[345:500].split(b"\0", 1)[0]
    text = (prefix + b"/" + name if prefix else name).decode("utf-8", "surrogateescape")
    if text.endswith("/"):
        raise _NotPlainUstar  # an old-style directory entry
    return text, size


def _tarfile_members(path: str) -> Iterator[tuple[str, int, int]]:
    """(name, data offset, size) of each regular file, as `tarfile` sees them."""
    with tarfile.open(path, mode="r:") as tf:
        for info in tf:
            if info.isfile():
                yield info.name, info.offset_data, info.size


# --------------------------------------------------------------------------------------------
# Samples
# --------------------------------------------------------------------------------------------


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


def is_streamed(url: str) -> bool:
    """pipe: commands and remote URLs are read sequentially; everything else is a local file."""
    return url.startswith("pipe:") or "://" in url


def open_tar(url: str) -> tuple[tarfile.TarFile, object | None]:
    """Seekable for local files, streaming for pipe:/remote URLs (then also the stream,
    which the caller must close: tarfile leaves a passed-in stream open)."""
    if is_streamed(url):
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


ENDED_EARLY = "shard ended before the manifest's count (truncated or mismatched manifest)"


def read_shard(
    url: str, shard: int, wanted: set[int], last: int, cache: ShardCache | None = None,
) -> Iterator[RawSample]:
    """Yield the wanted samples of one shard in tar order; stop after index `last`.

    Every wanted index <= last is yielded exactly once: read, or with `error` set when the
    tar is truncated/corrupt or ends early. Never raises for bad data, never blocks forever.
    Local tars are looked up in `cache` (indexed afresh when None).
    """
    if not is_streamed(url):
        yield from _read_local(cache.get(url) if cache else index_shard(url), url, shard, wanted, last)
        return
    done: set[int] = set()
    try:
        for sample in _stream_groups(url, shard, wanted, last):
            done.add(sample.index)
            yield sample
        reason = ENDED_EARLY
    except READ_ERRORS as exc:
        reason = f"unreadable tar ({exc.__class__.__name__}: {exc})"
    yield from _missing(url, shard, (i for i in wanted if i not in done and i <= last), reason)


def _read_local(index: ShardIndex, url: str, shard: int, wanted: set[int], last: int) -> Iterator[RawSample]:
    """The wanted samples from the shard's index: no header parsed again, no data read."""
    samples = index.samples
    chosen = sorted(i for i in wanted if i <= last)
    for idx in chosen:
        if idx >= len(samples):
            break
        key, members = samples[idx]
        yield RawSample(shard, idx, key, dict(members))
    reason = f"unreadable tar ({index.error})" if index.error else ENDED_EARLY
    yield from _missing(url, shard, (i for i in chosen if i >= len(samples)), reason)


def _missing(url: str, shard: int, indices: Iterator[int], reason: str) -> Iterator[RawSample]:
    for idx in sorted(indices):
        yield RawSample(shard, idx, f"<{url}#{idx}>", {}, error=reason)


def _stream_groups(url: str, shard: int, wanted: set[int], last: int) -> Iterator[RawSample]:
    """Sequential read of a pipe:/remote tar: group members by key, keep wanted samples' bytes."""
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


# --------------------------------------------------------------------------------------------
# Decoding
# --------------------------------------------------------------------------------------------


def decode_npy(data: bytes) -> np.ndarray:
    """np.save bytes -> array without copying (no pickle: object arrays are refused)."""
    shape, fortran, dtype, off = npy_layout(data[:4096])
    return _view(data, 0, len(data), (shape, fortran, dtype, off))


NpyLayout = tuple[tuple[int, ...], bool, np.dtype, int]


def _view(buf: bytes | mmap.mmap, at: int, size: int, layout: NpyLayout) -> np.ndarray:
    """A read-only view of the .npy member of `size` bytes at `at` in `buf`."""
    shape, fortran, dtype, off = layout
    count = int(np.prod(shape)) if shape else 1
    if off + count * dtype.itemsize > size:
        raise ValueError(f".npy header says {shape} {dtype} but the member has {size} bytes")
    arr = np.frombuffer(buf, dtype=dtype, count=count, offset=at + off)
    return arr.reshape(shape, order="F" if fortran else "C")


def npy_layout(prefix: bytes) -> NpyLayout:
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
def _parse_header(header: bytes) -> NpyLayout:
    fh = io.BytesIO(header)
    version = np.lib.format.read_magic(fh)
    if version == (1, 0):
        shape, fortran, dtype = np.lib.format.read_array_header_1_0(fh)
    else:
        shape, fortran, dtype = np.lib.format.read_array_header_2_0(fh)
    if dtype.hasobject:
        raise ValueError("object arrays are not allowed in shards")
    return tuple(shape), bool(fortran), dtype, fh.tell()


def load_npy(value: bytes | MemberRef, want: tuple[int, ...]) -> np.ndarray:
    """A (C, H, W) .npy member with shape (want[0], H, W) [+ want H, W if given], as a
    read-only view of the member bytes or of the shard's map: no pixel is copied (or, from
    a map, even read) here. ValueError for any malformed member."""
    if isinstance(value, MemberRef):
        value.check()
        data, at = value.tar.data, value.offset
        arr = _view(data, at, value.size, npy_layout(data[at : at + min(value.size, 4096)]))
    else:
        arr = decode_npy(value)
    _check_shape(arr.shape, want)
    return arr


def _check_shape(shape: tuple[int, ...], want: tuple[int, ...]) -> None:
    if len(shape) != 3 or shape[0] != want[0] or (len(want) == 3 and tuple(shape[1:]) != tuple(want[1:])):
        raise ValueError(f"unexpected shape {tuple(shape)} (want ({want[0]}, H, W) matching the other sensor and "
                         "the H, W of the sample's json)")


Window = Callable[[int, int], "tuple[int, int, int]"]  # (H, W) -> (top, left, size); size 0 = all


def decode_pair(sample: RawSample, window: Window | None = None, s2_bands: int = 13) -> tuple[np.ndarray, np.ndarray]:
    """S1 (2,H,W) and S2 (s2_bands,H,W) of a sample as read-only views, cut to `window(H, W)`.

    `s2_bands` comes from the manifest (13 for SEN12MS, 12 for BigEarthNet / SSL4EO L2A).

    The window is chosen from S1's shape before S2 is decoded, so a crop larger than the
    patch is reported as such even when S2 is broken too. ValueError naming what is wrong."""
    if sample.error:
        raise ValueError(sample.error)
    found = {ext: find_member(sample.members, ext) for ext in ("s1.npy", "s2.npy")}
    for ext, where in found.items():
        if where is None:
            raise ValueError(f"member {ext} missing (has {sorted(sample.members)})")
    if found["s1.npy"][1] in BLOCK_CODECS and found["s2.npy"][1] in BLOCK_CODECS:
        return _decode_blocked(sample, found["s1.npy"][0], found["s2.npy"][0], window, s2_bands)
    declared = None
    if "json" in sample.members and (found["s1.npy"][1] or found["s2.npy"][1]):  # compressed: bound it
        declared = declared_shape(sample.member("json"), 2)  # the sample's own (2, H, W), None if absent
    s1 = load_member(sample, *found["s1.npy"], declared or (2,))  # type: ignore[misc]
    top, left, size = window(s1.shape[1], s1.shape[2]) if window else (0, 0, 0)
    s2 = load_member(sample, *found["s2.npy"], (s2_bands, *s1.shape[1:]))  # type: ignore[misc]
    if not size:
        return s1, s2
    rows, cols = slice(top, top + size), slice(left, left + size)
    return s1[:, rows, cols], s2[:, rows, cols]


def _decode_blocked(sample: RawSample, s1_ext: str, s2_ext: str, window: Window | None,
                    s2_bands: int) -> tuple[np.ndarray, np.ndarray]:
    """decode_pair of row-blocked members: both block tables first (the shapes, from one page
    each), then only the blocks of the window's rows, each checked against its crc32."""
    s1_buf, s1_at, s1_index = _block_index(sample, s1_ext)
    _check_shape(s1_index.shape, (2,))
    h, w = s1_index.shape[1:]
    s2_buf, s2_at, s2_index = _block_index(sample, s2_ext)
    _check_shape(s2_index.shape, (s2_bands, h, w))
    top, left, size = window(h, w) if window else (0, 0, 0)
    bottom, right = (top + size, left + size) if size else (h, w)
    if not h or not w:
        return np.empty(s1_index.shape, s1_index.dtype), np.empty(s2_index.shape, s2_index.dtype)
    out = []
    for ext, buf, at, index in ((s1_ext, s1_buf, s1_at, s1_index), (s2_ext, s2_buf, s2_at, s2_index)):
        if isinstance(buf, mmap.mmap):
            _prefetch(buf, at, index, top, bottom)
        try:
            out.append(blocks.read_rows(buf, at, index, top, bottom)[:, :, left:right])
        except ValueError as exc:
            raise ValueError(f"member {ext}: {exc}") from None
    return out[0], out[1]


def _prefetch(buf: mmap.mmap, at: int, index: blocks.BlockIndex, top: int, bottom: int) -> None:
    """Ask the kernel for the crop's blocks (one contiguous range of the member) in one go.

    Why: the map is advised random access (no read-around), so without this each 4 KiB page
    would be its own read when touched: measured 24 pairs/s cold against 50 for whole members
    (`satfuse bench io`, 2-core VM); MADV_WILLNEED reads the range as one request."""
    first, last = top // index.rows, (bottom - 1) // index.rows
    start, end = at + int(index.starts[first]), at + int(index.starts[last + 1])
    aligned = start - start % mmap.PAGESIZE
    with contextlib.suppress(OSError, ValueError):  # advice only: the read below still faults pages in
        buf.madvise(mmap.MADV_WILLNEED, aligned, end - aligned)


def _block_index(sample: RawSample, ext: str) -> tuple[bytes | mmap.mmap, int, blocks.BlockIndex]:
    """(buffer, member offset in it, block table) of a blocked member; ValueError naming it."""
    value = sample.members[ext]
    try:
        if isinstance(value, MemberRef):
            value.check()
            return value.tar.data, value.offset, blocks.read_index(value.tar.data, value.offset, value.size)
        return value, 0, blocks.read_index(value, 0, len(value))
    except ValueError as exc:
        raise ValueError(f"member {ext}: {exc}") from None


def load_member(sample: RawSample, ext: str, codec: str | None, want: tuple[int, ...]) -> np.ndarray:
    """Member `ext` as a (C, H, W) array: a zero-copy view when stored plain, else the
    decompressed bytes (`satfuse.data.format.codecs`: the member's suffix names its codec)."""
    value = sample.members[ext]
    if codec is None:
        return load_npy(value, want)
    def check(shape: tuple[int, ...], dtype: np.dtype) -> None:  # before the body is decompressed
        _check_shape(shape, want)

    # (bands, H, W) known (S1 from the sample's json, S2 from S1): bounded without a header peek
    full = want if len(want) == 3 else None
    if isinstance(value, MemberRef):  # decompressed straight from the map: no copy of the member
        value.check()
        with memoryview(value.tar.data)[value.offset : value.offset + value.size] as view:
            data = decompress_npy(view, codec, check, full)
    else:
        data = decompress_npy(value, codec, check, full)
    arr = decode_npy(data)
    _check_shape(arr.shape, want)
    return arr


def decode_label(sample: RawSample) -> tuple[str, np.ndarray] | None:
    for ext, name in (("dfc.npy", "dfc"), ("lc.npy", "lc")):  # DFC2020 samples carry both: dfc is the label
        found = find_member(sample.members, ext)
        if found is not None:
            data = sample.member(found[0])
            return name, decode_npy(decompress_npy(data, found[1]) if found[1] else data)
    return None

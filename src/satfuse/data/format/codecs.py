"""How a shard set's members are encoded: compression, S1 dtype, label members (one owner).

Why: at cluster scale pretraining is bound by bytes per pair, not by the model (a SEN12MS
pair is ~2.5 MB as float32/uint16 `.npy`). `satfuse shard --compress zstd|lz4
[--compress-level N] --s1-dtype float16 --no-labels` make members smaller; this module is
the one place that knows what those flags do, used by the writers (`tar_writer`), the
readers (`stream_io`, `evaluation.data`) and `shard verify`, so they can never disagree.

The contract (shards/FORMAT.md):
- a compressed member keeps its `.npy` name and gains the codec's suffix (`s1.npy.zst`,
  `s2.npy.lz4`): stock webdataset still groups it into the sample (key = name up to the
  first dot), and `webdataset_handler` below is the few-line decoder to pass to
  `.decode(...)`. The `json` member stays plain text. The suffix alone says how to decode
  a member, so no reader needs configuration;
- `--s1-dtype float16` stores S1 (dB) as float16: lossy, the largest absolute error over
  the whole set is measured while packing and recorded in the manifest;
- `--no-labels` leaves out label and auxiliary members (pretraining sets).
The manifest records all of it under `encoding`; a manifest without that key is the
original format (uncompressed, S1 float32, labels present).
"""

from __future__ import annotations

import io
import json
import threading
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np

from satfuse.data.format import blocks
from satfuse.utils import SatfuseError

CODECS = {"zstd": ".zst", "lz4": ".lz4", "zstd-blocks": ".zsb", "blocks": ".blk"}  # codec -> member-name suffix
SUFFIX_CODEC = {suffix: codec for codec, suffix in CODECS.items()}
# Row-blocked members (`satfuse.data.format.blocks`): a crop reads and checksums only its row
# blocks, so the loader needs no whole-shard sha256 for these sets. codec -> block compression
BLOCK_CODECS = {"zstd-blocks": "zstd", "blocks": None}
DEFAULT_LEVEL = {"zstd": 3, "lz4": 0, "zstd-blocks": 3, "blocks": None}
LEVELS = {"zstd": (1, 22), "lz4": (0, 16), "zstd-blocks": (1, 22), "blocks": (0, 0)}  # zstandard's levels; lz4.frame's
S1_DTYPES = ("float32", "float16")
FLOAT16_MAX = float(np.finfo(np.float16).max)  # 65504
IMAGE_MEMBERS = ("s1.npy", "s2.npy")  # what every sample keeps (with `json`)
INSTALL = "pip install zstandard lz4 (both are dependencies of satfuse)"


@dataclass(frozen=True)
class Encoding:
    """The encoding flags of one shard set (defaults = the original format)."""

    compress: str | None = None  # None | "zstd" | "lz4"
    level: int | None = None  # the codec's level (None without compression)
    s1_dtype: str = "float32"  # "float32" | "float16" (lossy)
    labels: bool = True  # False: label and aux members left out (--no-labels)

    @property
    def is_default(self) -> bool:
        return self == Encoding()

    @property
    def suffix(self) -> str:
        """What compressed members append to their `.npy` name ('' when uncompressed)."""
        return CODECS[self.compress] if self.compress else ""

    @property
    def blocked(self) -> bool:
        """Members in row blocks with crc32s: the loader reads and checks only a crop's blocks."""
        return self.compress in BLOCK_CODECS

    def to_manifest(self) -> dict[str, Any]:
        """The manifest's `encoding` (the writer adds the measured `s1_max_abs_error_db`)."""
        return {"compress": self.compress, "level": self.level, "s1_dtype": self.s1_dtype, "labels": self.labels}

    def member(self, ext: str) -> str:
        """The tar extension of member `ext` (`s1.npy` -> `s1.npy.zst`; `json` stays)."""
        return ext + self.suffix if ext.endswith(".npy") else ext


def make_encoding(compress: str | None = None, level: int | None = None, s1_dtype: str | None = None,
                  no_labels: bool = False) -> Encoding:
    """The encoding of the `satfuse shard` flags, or a one-line SatfuseError naming the flag."""
    if compress is not None and compress not in CODECS:
        raise SatfuseError(f"--compress {compress!r}: use one of {list(CODECS)}")
    if level is not None:
        if compress is None or compress == "blocks":
            raise SatfuseError(f"--compress-level {level} needs --compress zstd|lz4|zstd-blocks")
        lo, hi = LEVELS[compress]
        if not lo <= level <= hi:
            raise SatfuseError(f"--compress-level {level}: {compress} levels are {lo}..{hi}")
    if compress is not None:
        level = DEFAULT_LEVEL[compress] if level is None else level
        _codec_module("lz4" if compress == "lz4" else "zstd")  # fail before packing when the package is missing
    s1_dtype = s1_dtype or "float32"
    if s1_dtype not in S1_DTYPES:
        raise SatfuseError(f"--s1-dtype {s1_dtype!r}: use one of {list(S1_DTYPES)}")
    return Encoding(compress, level, s1_dtype, not no_labels)


def from_manifest(manifest: dict[str, Any], where: str = "manifest.json") -> Encoding:
    """The set's encoding; a manifest without `encoding` is the original format."""
    enc = manifest.get("encoding")
    if enc is None:
        return Encoding()
    try:
        compress, level = enc.get("compress"), enc.get("level")
        if compress is not None and compress not in CODECS:
            raise ValueError(f"unknown codec {compress!r}")
        if enc.get("s1_dtype", "float32") not in S1_DTYPES:
            raise ValueError(f"unknown s1_dtype {enc.get('s1_dtype')!r}")
        return Encoding(compress, level, enc.get("s1_dtype", "float32"), bool(enc.get("labels", True)))
    except (AttributeError, ValueError) as exc:
        raise SatfuseError(f"{where}: unreadable `encoding` ({exc}); re-shard with `satfuse shard` "
                           "(or upgrade satfuse if a newer one wrote it)") from None


# --------------------------------------------------------------------------------------------
# Bytes
# --------------------------------------------------------------------------------------------


def _codec_module(codec: str) -> Any:
    try:
        if codec == "zstd":
            import zstandard  # optional: a missing codec package is a one-line error below

            return zstandard
        import lz4.frame  # optional: a missing codec package is a one-line error below

        return lz4.frame
    except ImportError:
        raise SatfuseError(f"{codec} shards need the {'zstandard' if codec == 'zstd' else 'lz4'} package; {INSTALL}") from None


_local = threading.local()  # zstd (de)compressor contexts are not for concurrent use: one per thread


def compress(data: Any, codec: str, level: int | None) -> bytes:
    """One member's bytes compressed (the frame records the decompressed size); a block codec
    takes the member's `.npy` bytes and stores its array in checksummed row blocks."""
    if codec in BLOCK_CODECS:
        return blocks.encode(np.load(io.BytesIO(data), allow_pickle=False), BLOCK_CODECS[codec], level)
    if codec == "zstd":
        key = f"zc{level}"
        ctx = getattr(_local, key, None)
        if ctx is None:
            ctx = _codec_module("zstd").ZstdCompressor(level=level, write_content_size=True)
            setattr(_local, key, ctx)
        return ctx.compress(memoryview(data).cast("B"))
    return _codec_module("lz4").compress(memoryview(data).cast("B"), compression_level=level, store_size=True)


def decompress(data: Any, codec: str, limit: int | None = None) -> bytes:
    """A compressed member's original bytes; ValueError when they do not decode, or (with
    `limit`) when they would be more than `limit` bytes: refused from the frame's declared size
    before decompressing, or cut off at `limit` + 1 bytes when the frame declares none."""
    if codec in BLOCK_CODECS:  # the block table declares the shape: bounded before any block is decoded
        return npy_bytes(blocks.decode(data, None if limit is None else max(0, limit - NPY_HEAD)))
    try:
        if codec == "zstd":
            zstd = _codec_module("zstd")
            ctx = getattr(_local, "zd", None)
            if ctx is None:
                ctx = _local.zd = zstd.ZstdDecompressor()
            if limit is None:
                return ctx.decompress(data)
            declared = zstd.frame_content_size(data)
            if declared > limit:
                raise _TooLarge(declared, limit)
            if declared < 0:  # no size in the frame: read at most limit + 1 bytes of it
                with ctx.stream_reader(data) as reader:
                    out = reader.read(limit + 1)
            else:
                out = ctx.decompress(data)
        else:
            lz4 = _codec_module("lz4")
            if limit is None:
                return lz4.decompress(data)
            declared = lz4.get_frame_info(data).get("content_size") or 0
            if declared > limit:
                raise _TooLarge(declared, limit)
            # capped at the declared size + 1 when there is one (measured: a cap far above the
            # output made python-lz4 up to 20x slower); one byte more means the frame lied
            out = lz4.LZ4FrameDecompressor().decompress(data, max_length=(declared or limit) + 1)
            if declared and len(out) > declared:
                raise ValueError(f"lz4 member holds more than the {declared} bytes its frame declares (damaged)")
    except (SatfuseError, _TooLarge):
        raise
    except Exception as exc:  # noqa: BLE001 - each library has its own error type
        raise ValueError(f"{codec} member does not decompress ({exc.__class__.__name__}: {exc})") from None
    if len(out) > limit:
        raise _TooLarge(len(out), limit)
    return out


class _TooLarge(ValueError):
    def __init__(self, size: int, limit: int) -> None:
        super().__init__(f"member decompresses to {'more than ' if size == limit + 1 else ''}{size} bytes, but its "
                         f"expected shape allows {limit} (a decompression bomb or a damaged member); re-shard or restore it")


NPY_HEAD = 4096  # enough for any .npy header: read before the body is decompressed


def _peek(data: Any, codec: str, size: int) -> bytes:
    """The first `size` decompressed bytes of a member, decompressing no more than its first
    block: only a prefix holding the frame header and that block is handed over (measured:
    handing lz4 the whole member made it copy the rest aside, 0.2 ms per 512 KB S1 member;
    the prefix costs 0.01 ms; zstd pays one 128 KiB block, ~0.4 ms on a busy 2-core VM)."""
    try:
        if codec == "zstd":
            ctx = getattr(_local, "zd", None)
            if ctx is None:
                ctx = _local.zd = _codec_module("zstd").ZstdDecompressor()
            with ctx.stream_reader(memoryview(data).cast("B")[: (128 << 10) + 64]) as reader:  # blocks <= 128 KiB
                return reader.read(size)
        lz4 = _codec_module("lz4")
        first = memoryview(data).cast("B")[: int(lz4.get_frame_info(data)["block_size"]) + 64]
        return lz4.LZ4FrameDecompressor().decompress(first, max_length=size)
    except SatfuseError:
        raise
    except Exception as exc:  # noqa: BLE001 - each library has its own error type
        raise ValueError(f"{codec} member does not decompress ({exc.__class__.__name__}: {exc})") from None


def npy_header(prefix: bytes) -> tuple[tuple[int, ...], np.dtype, int]:
    """(shape, dtype, data offset) of an .npy from its first bytes; ValueError if not one."""
    fh = io.BytesIO(prefix)
    try:
        version = np.lib.format.read_magic(fh)
        read = np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0
        shape, _, dtype = read(fh)
    except (ValueError, OSError, EOFError) as exc:
        raise ValueError(f"not an .npy member ({exc})") from None
    return tuple(shape), dtype, fh.tell()


def decompress_npy(data: Any, codec: str, check: Callable[[tuple[int, ...], np.dtype], None] | None = None,
                   shape: tuple[int, ...] | None = None) -> bytes:
    """A compressed `.npy` member's bytes, never more than its expected shape can hold.

    Why: a 31 KB zstd member can expand to 1 GB. With the caller's full `shape` (e.g. S2 =
    (bands, S1's H, W)) the limit is that shape at 8 bytes a value plus a header; without, the
    header alone is decompressed first and passed to `check` (e.g. S1's band count), and the
    body is then decompressed with the exact size the header's shape and dtype take."""
    if shape is not None:
        return decompress(data, codec, limit=NPY_HEAD + int(np.prod(shape, dtype=np.int64)) * 8)
    if codec in BLOCK_CODECS:
        index = blocks.read_index(data, 0, len(data))
        if check is not None:
            check(index.shape, index.dtype)
        return npy_bytes(blocks.read_rows(data, 0, index, 0, index.shape[1]) if index.shape[1] else
                         np.empty(index.shape, index.dtype))
    shape, dtype, offset = npy_header(_peek(data, codec, NPY_HEAD))
    if dtype.hasobject or dtype.kind not in "biuf" or dtype.itemsize > 8:
        raise ValueError(f"member dtype {dtype} is not a numeric array dtype")
    if check is not None:
        check(shape, dtype)
    return decompress(data, codec, limit=offset + int(np.prod(shape, dtype=np.int64)) * dtype.itemsize)


def declared_shape(meta: Any, bands: int) -> tuple[int, int, int] | None:
    """(bands, H, W) of a sample's arrays as its `json` member declares them (the shard writer
    records `height`/`width`; `bands` comes from the manifest), or None when it declares none.

    Why: this is the bound every reader passes to `decompress_npy(shape=...)`, known before any
    member is decompressed, so the bomb check costs no second (header) decompression; and a
    header claiming a larger shape cannot raise it. `meta`: the member's bytes or parsed dict."""
    if not isinstance(meta, dict):
        try:
            meta = json.loads(bytes(meta))
        except (ValueError, TypeError):
            return None
    if not isinstance(meta, dict):
        return None
    h, w = meta.get("height"), meta.get("width")
    if type(h) is int and type(w) is int and h > 0 and w > 0 and bands > 0:
        return bands, h, w
    return None


def split_codec(ext: str) -> tuple[str, str | None]:
    """(`s1.npy`, "zstd") for `s1.npy.zst`; (ext, None) for an uncompressed member."""
    for suffix, codec in SUFFIX_CODEC.items():
        if ext.endswith(suffix):
            return ext[: -len(suffix)], codec
    return ext, None


def find_member(members: dict[str, Any], ext: str) -> tuple[str, str | None] | None:
    """(tar extension, codec) of member `ext` (`s1.npy`) in a sample, compressed or not."""
    if ext in members:
        return ext, None
    for codec, suffix in CODECS.items():
        if ext + suffix in members:
            return ext + suffix, codec
    return None


def load_array(data: Any, codec: str | None, shape: tuple[int, ...] | None = None) -> np.ndarray:
    """A member's array (decompressed first when `codec`, bounded by the declared `shape` when
    given, see `declared_shape`); np.load without pickle."""
    if codec is not None:
        data = decompress_npy(data, codec, shape=shape)
    return np.load(io.BytesIO(data), allow_pickle=False)


def webdataset_handler(key: str, data: bytes) -> Any:
    """The decoder for stock webdataset, as documented in shards/FORMAT.md:
    `webdataset.WebDataset(urls).decode(webdataset_handler)`. Returns None for members it
    does not handle, so webdataset's own handlers decode the rest (`.npy`, `json`)."""
    import lz4.frame  # optional: only compressed sets need the codec packages
    import zstandard  # optional: only compressed sets need the codec packages

    if key.endswith(".npy.zst"):
        return np.load(io.BytesIO(zstandard.ZstdDecompressor().decompress(data)), allow_pickle=False)
    if key.endswith(".npy.lz4"):
        return np.load(io.BytesIO(lz4.frame.decompress(data)), allow_pickle=False)
    if key.endswith((".npy.zsb", ".npy.blk")):
        return blocks.decode(data)
    return None


# --------------------------------------------------------------------------------------------
# Encoding a sample (the writers)
# --------------------------------------------------------------------------------------------


class OutOfRange(ValueError):
    """S1 values that float16 cannot hold (they would become inf)."""


def s1_to_float16(s1: np.ndarray, where: str) -> tuple[np.ndarray, float]:
    """S1 as float16 and the largest absolute rounding error in dB (exact, float64).

    OutOfRange naming `where` when a value would overflow to inf: an error, never inf."""
    lo, hi = float(s1.min()), float(s1.max())
    if max(-lo, hi) > FLOAT16_MAX:
        raise OutOfRange(f"out of range: {where} holds S1 values {lo:g}..{hi:g}, float16 holds "
                         f"-{FLOAT16_MAX:g}..{FLOAT16_MAX:g} (S1 should be dB); fix the file or pack with --s1-dtype float32")
    half = s1.astype(np.float16)
    if not np.isfinite(half).all():  # values just past the max round to inf
        raise OutOfRange(f"out of range: {where} holds S1 values {lo:g}..{hi:g} that overflow float16; "
                         "fix the file or pack with --s1-dtype float32")
    err = float(np.max(np.abs(half.astype(np.float64) - s1.astype(np.float64)))) if s1.size else 0.0
    return half, err


def npy_bytes(array: np.ndarray) -> bytes:
    """`np.save` bytes of `array` (format 1.0, C order), as the writers store members."""
    buf = io.BytesIO()
    np.save(buf, np.ascontiguousarray(array), allow_pickle=False)
    return buf.getvalue()


def encode_sample(sample: dict[str, Any], s1: np.ndarray, enc: Encoding, where: str) -> tuple[dict[str, Any], float | None]:
    """A packed sample as `enc` stores it, and its S1 float16 error in dB (None for float32).

    `s1` is the sample's float32 S1 array (the stats are summed from it, before rounding).
    OutOfRange when S1 does not fit float16."""
    out: dict[str, Any] = {}
    err = None
    for ext, value in sample.items():
        if ext == "json" and enc.s1_dtype != "float32":
            out[ext] = _json_dtype(value, enc.s1_dtype)
            continue
        if ext.startswith("_") or ext == "json":
            out[ext] = value
            continue
        if not enc.labels and ext not in IMAGE_MEMBERS:
            continue  # --no-labels: label and aux members stay out
        if ext == "s1.npy" and enc.s1_dtype == "float16":
            half, err = s1_to_float16(s1, where)
            value = npy_bytes(half)
        out[enc.member(ext)] = compress(value, enc.compress, enc.level) if enc.compress else value
    return out, err


def _json_dtype(value: Any, s1_dtype: str) -> bytes:
    """The sample JSON with its `dtype.s1` (per-band datasets record it) made true."""
    meta = json.loads(bytes(value))
    if isinstance(meta.get("dtype"), dict) and "s1" in meta["dtype"]:
        meta["dtype"]["s1"] = s1_dtype
        return json.dumps(meta).encode()
    return bytes(value)


def add_encoding(header: dict[str, Any], enc: Encoding) -> None:
    """Record `enc` in a manifest header (nothing for the original format).

    With --no-labels the header's `label` becomes null and `aux` goes (no such members: any
    reader of the format sees a set without labels); `labels_dropped` says what was left out.
    The header is compared between job-array parts, so parts with other flags never merge."""
    if enc.is_default:
        return
    doc = enc.to_manifest()
    if not enc.labels:
        doc["labels_dropped"] = [m for m in (header.get("label"), *header.get("aux", [])) if m]
        header["label"] = None
        header.pop("aux", None)
    header["encoding"] = doc

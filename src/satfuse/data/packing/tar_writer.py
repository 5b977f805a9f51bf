"""Writing one shard tar atomically, hashed on the fly, with its resume record.

One job, shared by both writers (`shard_writer` for SEN12MS/DFC2020/pairs, `multiband` for
per-band datasets): given the samples of one planned shard, write `NAME-jjjjjj.tar.tmp`
(USTAR, fixed mtime and owner: same input = same bytes), hash it while writing, fsync,
rename, then write the sidecar record (`.satfuse/NAME-jjjjjj.tar.json`: plan digest,
sha256, count, bytes, exact stats sums, exclusions). A rerun keeps a shard whose record
matches its plan and whose bytes match the sha256 (`reusable`).
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import os
import queue
import tarfile
import threading
import time
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import webdataset as wds

from satfuse.data.format.codecs import Encoding, OutOfRange, encode_sample
from satfuse.data.format.manifest import sidecar_path, tar_name
from satfuse.data.packing.normalize import add_sums, empty_sums, sample_sums
from satfuse.data.packing.raster import BadData, NotColocated
from satfuse.data.sources.layout import Excluded
from satfuse.utils import atomic_write_text, sha256_file

log = logging.getLogger(__name__)

TAR_MTIME = 0.0  # fixed member mtime: identical input + seed -> identical bytes
TAR_RECORD = 10240  # tarfile pads the archive to a multiple of this


def rel_path(path: Path | None, src: Path) -> str | None:
    """`path` relative to the source root `src` (as recorded in sample JSON and plan digests)."""
    if path is None:
        return None
    try:
        return str(Path(path).relative_to(src))
    except ValueError:
        return str(path)


def file_stamps(files: Iterable[Path], src: Path) -> list[list[Any]]:
    """[relative path, size, mtime_ns] per file (None, None when unreadable): what a shard's
    bytes depend on besides the plan, so a changed source file invalidates its shard."""
    stamps = []
    for f in files:
        try:
            st = f.stat()
            stamps.append([rel_path(f, src), st.st_size, st.st_mtime_ns])
        except OSError:
            stamps.append([rel_path(f, src), None, None])
    return stamps


class AsyncHashingSink(io.RawIOBase):
    """A write-only file that hashes and writes on a background thread.

    Why: sha256 of a 2.4 MB sample costs ~2 ms here (no SHA extensions), as much as half of
    reading it; hashlib and file writes release the GIL, so doing both on a thread overlaps
    them with reading and encoding the next pair. The hash is of exactly the bytes written
    (no second read of the tar). `finish()` drains, fsyncs and re-raises any write error.
    """

    def __init__(self, fh: Any, depth: int = 64) -> None:
        super().__init__()
        self.fh, self.sha, self.size = fh, hashlib.sha256(), 0
        self._queue: queue.Queue[bytes | memoryview | None] = queue.Queue(depth)
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._drain, name="shard-sink", daemon=True)
        self._thread.start()

    def writable(self) -> bool:
        return True

    def tell(self) -> int:
        return self.size

    def write(self, data: Any) -> int:
        if self._error is not None:
            raise self._error
        block = data if isinstance(data, (bytes, memoryview)) else bytes(data)
        self._queue.put(block)  # memoryviews are of per-sample buffers that are never reused
        self.size += len(block)
        return len(block)

    def _drain(self) -> None:
        while (block := self._queue.get()) is not None:
            if self._error is None:
                try:
                    self.sha.update(block)
                    self.fh.write(block)
                except BaseException as exc:  # re-raised in the writing thread
                    self._error = exc

    def abort(self) -> None:
        """Stop the thread without fsync (the caller is discarding the file)."""
        self._error = self._error or RuntimeError("aborted")
        self._queue.put(None)
        self._thread.join()

    def finish(self) -> str:
        """Wait for every block, fsync, and return the sha256 hex digest."""
        self._queue.put(None)
        self._thread.join()
        if self._error is not None:
            raise self._error
        self.fh.flush()
        os.fsync(self.fh.fileno())
        return self.sha.hexdigest()


class _ViewReader:
    """A read()-able view of a buffer that hands out memoryviews instead of copies."""

    def __init__(self, data: bytes | bytearray | np.ndarray) -> None:
        self.view, self.pos = memoryview(data), 0

    def read(self, size: int = -1) -> memoryview:
        end = len(self.view) if size < 0 else self.pos + size
        chunk = self.view[self.pos : end]
        self.pos += len(chunk)
        return chunk


class ShardTarWriter(wds.TarWriter):
    """webdataset's TarWriter, minus two copies per member.

    Why: TarWriter opens the tar in stream mode ('w|'), which pushes every member through
    10 KiB Python-level chunks, and wraps each value in a BytesIO (a copy for a bytearray).
    Here the tar is a regular USTAR TarFile that writes each member in one call from a
    memoryview. Members, names, order and TarInfo fields are exactly TarWriter's.
    """

    def __init__(self, fileobj: Any, **kwargs: Any) -> None:
        super().__init__(fileobj, **kwargs)  # its stream-mode TarFile has written nothing yet
        self.tarstream = tarfile.TarFile(fileobj=fileobj, mode="w", format=tarfile.USTAR_FORMAT, copybufsize=1 << 26)

    def write(self, obj: dict[str, Any]) -> int:
        """TarWriter.write for a sample whose values are bytes-like (encoder=False)."""
        key, total = obj["__key__"], 0
        for ext in sorted(k for k in obj if not k.startswith("_")):
            data = obj[ext]
            info = tarfile.TarInfo(f"{key}.{ext}")
            info.size, info.mode = len(data), self.mode
            info.mtime = self.mtime if self.mtime is not None else time.time()
            info.uname, info.gname = self.user, self.group
            self.tarstream.addfile(info, _ViewReader(data))
            total += info.size
        return total



@dataclass
class Packed:
    """One sample ready for the tar: its members, and the arrays whose stats the manifest sums."""

    sample: dict[str, Any]  # `__key__`, `json` and `{sensor}.npy` members (bytes-like values)
    arrays: dict[str, np.ndarray]  # "s1"/"s2" -> (C, H, W) as read (float32 S1: stats are of these)
    s1_files: tuple[str, ...] = ()  # the S1 source file(s), named when S1 does not fit float16
    offsets_m: dict[str, float] | None = None  # per-band datasets: measured co-location offset per sensor


# (key, source paths, the packed sample or why it cannot be packed: BadData / NotColocated)
Item = tuple[str, list[str], "Packed | Exception"]


def reusable(out: Path, tar: Path, digest: str) -> dict[str, Any] | None:
    """The sidecar record if the shard on disk is exactly what this plan would write."""
    side = sidecar_path(out, tar.name)
    if not (side.is_file() and tar.is_file()):
        return None
    try:
        record = json.loads(side.read_text())
    except (OSError, ValueError):
        return None
    if record.get("plan") != digest or record.get("bytes") != tar.stat().st_size:
        return None
    if sha256_file(tar) != record.get("sha256"):
        log.warning("%s: checksum differs from its record; rewriting it", tar)
        return None
    return record


def write_tar(out: Path, name: str, index: int, digest: str, items: Iterable[Item], bands: dict[str, int],
              exclude_bad: bool, encoding: Encoding | None = None) -> dict[str, Any]:
    """Write shard `index` of set `name` atomically (or keep a verified one); return its record.

    `items` are read lazily, in plan order. Co-location problems are exclusions; bad data is
    an error unless `exclude_bad`. A record with `errors` means data that cannot be trusted
    was found (strict mode): the temporary tar is removed and no sidecar is written, so
    nothing half-done looks complete. `bands` gives the band count per summed sensor.
    `encoding` (`satfuse.data.format.codecs`) is part of the digest: a shard written with other
    flags is never reused. With float16 S1 the record holds the shard's largest error in dB.
    """
    encoding = encoding or Encoding()
    if not encoding.is_default:  # default digests unchanged: shards of earlier runs stay reusable
        digest = hashlib.sha256(json.dumps([digest, encoding.to_manifest()], sort_keys=True).encode()).hexdigest()
    tar = out / tar_name(name, index)
    kept = reusable(out, tar, digest)
    if kept is not None:
        return {**kept, "reused": True}
    tmp = tar.with_name(tar.name + ".tmp")
    sums = {sensor: empty_sums(n) for sensor, n in bands.items()}
    excluded: list[dict[str, Any]] = []
    errors: list[str] = []
    count = 0
    s1_err: float | None = 0.0 if encoding.s1_dtype == "float16" else None
    offsets: list[list[Any]] = []  # [key, {sensor: metres}] of the packed samples that measured one
    try:
        with open(tmp, "wb") as raw:
            sink = AsyncHashingSink(raw)
            try:
                writer = ShardTarWriter(sink, encoder=False, mtime=TAR_MTIME)
                for key, paths, packed in items:
                    sample = packed.sample if not isinstance(packed, Exception) else None
                    if sample is not None and not encoding.is_default:
                        try:
                            sample, err = encode_sample(sample, packed.arrays["s1"], encoding,
                                                        ", ".join(packed.s1_files) or f"sample {key}")
                        except OutOfRange as exc:
                            packed, paths = BadData(str(exc)), list(packed.s1_files)
                        else:
                            s1_err = max(s1_err, err) if err is not None and s1_err is not None else s1_err
                    if isinstance(packed, Exception):
                        if isinstance(packed, NotColocated) or exclude_bad:
                            excluded.append(Excluded(key, str(packed), paths).to_dict())
                        else:
                            errors.append(f"{key}: {packed}")
                        continue
                    writer.write(sample)
                    if packed.offsets_m is not None:
                        offsets.append([key, packed.offsets_m])
                    for sensor in sums:
                        sums[sensor] = add_sums(sums[sensor], sample_sums(packed.arrays[sensor]))
                    count += 1
                writer.close()
            except BaseException:
                sink.abort()
                raise
            sha = sink.finish()
        if errors:
            tmp.unlink(missing_ok=True)
            return {"index": index, "name": tar.name, "errors": errors}
        os.replace(tmp, tar)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    record = {
        "index": index, "name": tar.name, "plan": digest, "count": count,
        "bytes": sink.size, "sha256": sha, "sums": sums, "excluded": excluded,
    }  # fmt: skip
    if s1_err is not None:
        record["s1_max_abs_error_db"] = s1_err
    if offsets:
        record["offsets_m"] = offsets  # summarised by manifest.build (colocation_offset_m)
    try:
        atomic_write_text(sidecar_path(out, tar.name), json.dumps(record))
    except OSError:
        tar.unlink(missing_ok=True)  # a tar without its record would only look finished
        raise
    return {**record, "reused": False}

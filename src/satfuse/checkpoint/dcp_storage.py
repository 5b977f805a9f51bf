"""DCP storage: a writer and a reader of DCP's stock on-disk format, each one pass over the
data (one job: moving bytes between the state dict and the files; the commit protocol, in
`satfuse.checkpoint.protocol`, decides where and when).

- `Crc32Writer` writes each rank's file in one pass: the stock format, but each tensor's zip
  record without its crc32 (torch.load never checks it), the file's crc32 taken from the
  bytes while writing instead of a second pass over the written file, one fsync.
- `MmapReader` maps each file once and copies straight into the model (same format, same
  resharding). Measured ratios against plain torch.save/torch.load are printed by
  `satfuse bench ckpt` (README, "Performance").
"""

from __future__ import annotations

import io
import logging
import mmap
import os
import pickle
import sys
from pathlib import Path
from typing import Any

import torch
from torch.distributed._shard._utils import narrow_tensor_by_index
from torch.distributed.checkpoint import FileSystemWriter
from torch.distributed.checkpoint.filesystem import DEFAULT_SUFFIX, _StorageInfo
from torch.distributed.checkpoint.planner import (
    LoadItemType,
    LoadPlan,
    LoadPlanner,
    SavePlan,
    SavePlanner,
    WriteItem,
    WriteItemType,
)
from torch.distributed.checkpoint.storage import WriteResult

from satfuse.checkpoint.layout import crc32
from satfuse.checkpoint.trust import SafeFileSystemReader
from satfuse.models.legacy import upgrade_metadata

log = logging.getLogger(__name__)

DCP_METADATA = ".metadata"  # DCP's index of a checkpoint, written by the coordinator rank (0)


class Crc32File:
    """One output file that counts its bytes and crc32s them on the way out.

    Why: the commit needs every file's size and crc32; hashing the bytes while they are in
    memory anyway replaces a second pass over the written file (measured 0.12 s of a 0.5 s
    save for 228 MiB: a crc pass plus page faults of mapping the fresh file).
    """

    def __init__(self, path: Path) -> None:
        self.path = path
        self._fh = open(path, "wb")  # noqa: SIM115 - closed by close(), also on errors
        self.size = 0
        self.crc = 0

    def write(self, data: Any) -> int:
        view = memoryview(data).cast("B")
        self.crc = crc32(view, self.crc)
        self._fh.write(view)
        self.size += view.nbytes
        return view.nbytes

    def tell(self) -> int:
        return self.size

    def flush(self) -> None:
        self._fh.flush()

    def sync(self) -> dict[str, Any]:
        """Flush and fsync; returns the file's size + crc32 record (checked against fstat)."""
        self._fh.flush()
        os.fsync(self._fh.fileno())
        on_disk = os.fstat(self._fh.fileno()).st_size
        if on_disk != self.size:
            raise OSError(f"{self.path}: {on_disk} bytes on disk, {self.size} written")
        return {"size": self.size, "crc32": f"{self.crc & 0xFFFFFFFF:08x}"}

    def close(self) -> None:
        self._fh.close()


def _save_tensor(tensor: torch.Tensor, out: Crc32File) -> None:
    """`torch.save(tensor, out)` without the zip format's per-record crc32.

    Same archive as torch.save (torch.load and DCP's stock reader read it; they never check
    that crc), but the bytes are hashed once, by `Crc32File`, not twice. Falls back to a
    plain torch.save where the private writer API differs.
    """
    try:
        writer = torch._C.PyTorchFileWriter(out, False, torch.serialization._get_storage_alignment())
    except (AttributeError, TypeError):  # another torch: its own torch.save, crc and all
        torch.save(tensor, out)
        return
    try:
        torch.serialization._save(tensor, writer, pickle, torch.serialization.DEFAULT_PROTOCOL, False)
    finally:
        writer.write_end_of_file()


def _write_item(out: Crc32File, file_name: str, item: WriteItem, planner: SavePlanner) -> WriteResult:
    """Append one DCP item to `out` exactly as DCP's FileSystemWriter lays it out."""
    offset = out.tell()
    data = planner.resolve_data(item)
    if item.type == WriteItemType.BYTE_IO:
        out.write(data.getbuffer())
    else:
        tensor = data.detach().cpu()
        if tensor.untyped_storage().nbytes() != tensor.nbytes:
            tensor = tensor.clone()  # a view: torch.save would write its whole storage
        _save_tensor(tensor, out)
    length = out.tell() - offset
    return WriteResult(index=item.index, size_in_bytes=length,
                       storage_data=_StorageInfo(file_name, offset, length))


class Crc32Writer(FileSystemWriter):
    """DCP's FileSystemWriter (one file per rank, stock on-disk format, stock `.metadata`),
    writing each rank's file in one pass: tensor items without torch.save's zip crc32,
    the whole file crc32'd while written, fsync'd once. `records` holds
    {file name: size + crc32} of what this rank wrote, for the commit.

    Why: the stock writer crc32s every tensor (zip records) and we then read the file back
    for our own crc32; both passes cost as much as the write itself (`satfuse bench ckpt` measures the result).
    """

    def __init__(self, path: Path) -> None:
        super().__init__(path, single_file_per_rank=True, sync_files=True, thread_count=1)
        self.records: dict[str, dict[str, Any]] = {}

    def write_data(self, plan: SavePlan, planner: SavePlanner) -> torch.futures.Future[list[WriteResult]]:
        file_name = f"{plan.storage_data.prefix}0{DEFAULT_SUFFIX}"
        out = Crc32File(Path(self.path) / file_name)
        try:
            results = [_write_item(out, file_name, item, planner) for item in plan.items]
            self.records[file_name] = out.sync()
        finally:
            out.close()
        fut: Any = torch.futures.Future()
        fut.set_result(results)
        return fut


# -------------------------------------------------------------------------------------------
# fast DCP reader
# -------------------------------------------------------------------------------------------


class _MemFile(io.RawIOBase):
    """A seekable read-only file over a memoryview: lets torch's zip reader parse one
    DCP item's small headers without copying the item (its tensor bytes are never read)."""

    def __init__(self, view: memoryview) -> None:
        super().__init__()
        self._view = view
        self._pos = 0

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def readinto(self, buf: Any) -> int:
        n = max(0, min(len(buf), len(self._view) - self._pos))
        buf[:n] = self._view[self._pos:self._pos + n]
        self._pos += n
        return n

    def seek(self, offset: int, whence: int = io.SEEK_SET) -> int:
        base = {io.SEEK_SET: 0, io.SEEK_CUR: self._pos, io.SEEK_END: len(self._view)}[whence]
        self._pos = base + offset
        return self._pos

    def tell(self) -> int:
        return self._pos


class MmapReader(SafeFileSystemReader):
    """DCP's FileSystemReader, reading each data file through one mmap.

    Why: the stock reader `torch.load`s every tensor from a buffered stream (a copy into a
    fresh tensor) and then copies it into the target (measured 2.2-6x a plain torch.load
    of the same state). Here each tensor is a zero-copy view of the mapped file, as
    `torch.load(mmap=True)` does for a single-archive file, so the only pass over the data
    is the copy into the model/optimizer. Same on-disk format, same planner, same
    resharding (`narrow_tensor_by_index`); a file with an item this cannot parse (ValueError,
    RuntimeError, UnpicklingError; any other exception propagates) goes to the stock code path,
    with a warning. `.metadata` is read by `SafeFileSystemReader` (no full unpickling unless
    `trust`). The files were verified (size, crc32) before loading.
    """

    def read_metadata(self, *args: Any, **kwargs: Any) -> Any:
        """The checkpoint's metadata with pre-torchvision-name tensors renamed (models.legacy)."""
        return upgrade_metadata(super().read_metadata(*args, **kwargs))

    def read_data(self, plan: LoadPlan, planner: LoadPlanner) -> Any:
        # data.pkl (+ byteorder) -> (dtype, size, stride, storage offset, bytes): items with the
        # same pickle (same shape and dtype, as AdamW's moments and repeated layers have) skip
        # the weights-only unpickler, which cost about as much as copying the tensors
        self._layouts: dict[tuple[bytes, bytes | None], tuple[Any, ...]] = {}
        per_file: dict[str, list[Any]] = {}
        for item in plan.items:
            per_file.setdefault(self.storage_data[item.storage_index].relative_path, []).append(item)
        leftovers = [item for rel, items in per_file.items() if not self._read_file(rel, items, planner)
                     for item in items]
        if leftovers:
            return super().read_data(LoadPlan(leftovers, plan.storage_data, plan.planner_data), planner)
        fut: Any = torch.futures.Future()
        fut.set_result(None)
        return fut

    def _read_file(self, relative_path: str, items: list[Any], planner: LoadPlanner) -> bool:
        """Load every item of one file from a mapping; False: nothing loaded, use the stock path."""
        path = Path(self.path) / relative_path
        size = path.stat().st_size
        needed = max((self.storage_data[i.storage_index].offset + self.storage_data[i.storage_index].length
                      for i in items), default=0)
        if size == 0 or needed > size:  # a mapping past the end would SIGBUS: let DCP raise
            return False
        with open(path, "rb") as fh, mmap.mmap(fh.fileno(), 0, access=mmap.ACCESS_READ) as mm:
            view = memoryview(mm)
            storage = torch.UntypedStorage.from_file(str(path), False, size)
            try:
                tensors = [self._item_tensor(storage, view, i) for i in items]
            except (ValueError, RuntimeError, pickle.UnpicklingError) as exc:
                # a layout this parser does not know (transformed items, another torch's zip
                # records): DCP's own reader reads the file (also weights-only) and decides
                log.warning("%s: fast read not possible (%s: %s), reading it with DCP's reader",
                            path, type(exc).__name__, str(exc).splitlines()[0][:200] if str(exc) else "")
                view.release()
                return False
            except BaseException:
                view.release()  # else closing the mapping raises BufferError over the real error
                raise
            for item, tensor in zip(items, tensors, strict=True):
                if item.type == LoadItemType.BYTE_IO:
                    planner.load_bytes(item, io.BytesIO(tensor))
                    continue
                target = planner.resolve_tensor(item).detach()
                if target.size() != tensor.size():
                    raise AssertionError(f"{path}: item {item.storage_index} has size {tensor.size()}, "
                                         f"expected {target.size()}")
                target.copy_(tensor)
                planner.commit_tensor(item, target)
            del tensors
            view.release()
        return True

    def _item_tensor(self, storage: torch.UntypedStorage, view: memoryview, item: Any) -> Any:
        """The tensor (a view into `storage`) or bytes of one read item."""
        info = self.storage_data[item.storage_index]
        if getattr(info, "transform_descriptors", None):
            raise ValueError("transformed (e.g. compressed) items are not mapped")
        start, end = info.offset, info.offset + info.length
        if item.type == LoadItemType.BYTE_IO:
            return bytes(view[start:end])
        zip_reader = torch._C.PyTorchFileReader(_MemFile(view[start:end]))
        key = (zip_reader.get_record("data.pkl"),
               zip_reader.get_record("byteorder") if zip_reader.has_record("byteorder") else None)
        layout = self._layouts.get(key)
        if layout is None:
            tensor = torch.serialization._load(zip_reader, "cpu", torch._weights_only_unpickler,
                                               overall_storage=storage[start:end])
            if not isinstance(tensor, torch.Tensor):
                raise ValueError(f"item {item.storage_index} is not a tensor")
            if (zip_reader.has_record("data/0") and key[1] in (None, sys.byteorder.encode())
                    and not [r for r in zip_reader.get_all_records() if r.startswith("data/") and r != "data/0"]):
                self._layouts[key] = (tensor.dtype, tuple(tensor.size()), tuple(tensor.stride()),
                                      tensor.storage_offset(), tensor.untyped_storage().nbytes())
        else:  # the same data.pkl as an item the weights-only unpickler read: the same tensor layout
            dtype, size, stride, offset, nbytes = layout
            if zip_reader.get_record_size("data/0") != nbytes:
                raise ValueError(f"item {item.storage_index}: data/0 has {zip_reader.get_record_size('data/0')} bytes, its pickle says {nbytes}")
            at = start + zip_reader.get_record_offset("data/0")
            tensor = torch.empty(0, dtype=dtype).set_(storage[at:at + nbytes], offset, size, stride)
        return narrow_tensor_by_index(tensor, item.storage_offsets, item.lengths)


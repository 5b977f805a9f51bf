"""The page cache of a file, for `satfuse bench io`: which pages are resident (mincore(2)),
dropping them (posix_fadvise DONTNEED) and this process's storage reads (/proc/self/io).

Why mincore: it counts per file, whichever process faulted a page in (DataLoader workers
too), read-ahead included, which is the storage traffic a run caused."""

from __future__ import annotations

import ctypes
import mmap
import os
from pathlib import Path

import numpy as np

PAGE = mmap.PAGESIZE

_libc = ctypes.CDLL(None, use_errno=True)
_libc.mincore.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_void_p]
_libc.mincore.restype = ctypes.c_int


def resident_pages(path: str | Path) -> int:
    """Pages of `path` now in the page cache (mincore on a fresh, untouched map)."""
    with open(path, "rb") as fh:
        size = os.fstat(fh.fileno()).st_size
        if not size:
            return 0
        mm = mmap.mmap(fh.fileno(), size, access=mmap.ACCESS_READ)
    try:
        view = np.frombuffer(mm, dtype=np.uint8)  # only for its address: no page is touched
        vec = np.zeros(-(-size // PAGE), dtype=np.uint8)
        if _libc.mincore(ctypes.c_void_p(view.ctypes.data), size, ctypes.c_void_p(vec.ctypes.data)):
            err = ctypes.get_errno()
            raise OSError(err, f"mincore({path}): {os.strerror(err)}")
        del view
        return int((vec & 1).sum())
    finally:
        mm.close()


def drop_cache(path: str | Path) -> None:
    """Ask the kernel to drop `path` from the page cache (flushed first: dirty pages stay)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)


def read_bytes() -> int | None:
    """This process's bytes fetched from storage (/proc/self/io), None where unavailable."""
    try:
        for line in Path("/proc/self/io").read_text().splitlines():
            if line.startswith("read_bytes:"):
                return int(line.split()[1])
    except OSError:
        pass
    return None

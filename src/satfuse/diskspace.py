"""Full disks, said plainly: one line naming ENOSPC, the path, the free and the needed bytes.

Why a module: a full filesystem surfaces in many shapes (a raw `OSError: [Errno 28]`, DCP's
`CheckpointException ranks:...`, torch.save's `unexpected pos 128 vs 0`), and each writer
(sharding, metrics.jsonl, config.yaml, checkpoints) must turn it into the same message the
user can act on. "Needed" is the writer's own estimate (what it was about to write). An
output that cannot be written at all (read-only mount, /proc) is said the same way
(`writable_output`).
"""

from __future__ import annotations

import contextlib
import errno
import os
import shutil
from collections.abc import Iterator
from pathlib import Path

from satfuse.utils import SatfuseError

NO_SPACE = (errno.ENOSPC, errno.EDQUOT)


def free_bytes(path: Path) -> int:
    """Bytes free for an unprivileged writer on the filesystem of `path` (or its nearest existing parent)."""
    p = Path(path).absolute()
    while not p.exists() and p != p.parent:
        p = p.parent
    try:
        st = os.statvfs(p)
        return int(st.f_bavail * st.f_frsize)
    except OSError:
        return int(shutil.disk_usage(p).free)


def is_no_space(exc: BaseException) -> bool:
    """Whether an exception (or its text, for wrapped ones such as DCP's) is a full disk or quota."""
    seen: set[int] = set()
    cur: BaseException | None = exc
    while cur is not None and id(cur) not in seen:
        seen.add(id(cur))
        if isinstance(cur, OSError) and cur.errno in NO_SPACE:
            return True
        text = str(cur)
        if "No space left on device" in text or "Errno 28" in text or "Disk quota exceeded" in text:
            return True
        cur = cur.__cause__ or cur.__context__
    return False


def human(n: int) -> str:
    """Bytes with a readable unit next to the exact count."""
    value = float(n)
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if value < 1024 or unit == "TiB":
            return f"{n} bytes" if unit == "B" else f"{n} bytes ({value:.1f} {unit})"
        value /= 1024
    return f"{n} bytes"


def no_space_message(path: Path, needed: int | None, doing: str, fix: str) -> str:
    """`PATH: no space left on device (ENOSPC) DOING: F free, about N needed; FIX`."""
    need = f", about {human(int(needed))} needed" if needed else ""
    return (f"{path}: no space left on device (ENOSPC) {doing}: {human(free_bytes(path))} free{need}; {fix}")


def no_space_error(path: Path, needed: int | None, doing: str, fix: str) -> SatfuseError:
    return SatfuseError(no_space_message(path, needed, doing, fix))


@contextlib.contextmanager
def writable_output(out: Path, option: str = "--out") -> Iterator[None]:
    """Turn a failure to create or write under `out` into one line naming the path.

    Why: an output on a read-only mount, a virtual filesystem (/proc, /sys) or a missing
    device otherwise ends a command with a Python traceback from deep inside mkdir or open.
    Only errors about `out`, a file under it or a parent being created are translated; a full
    disk keeps its own message (`no_space_error`) and other errors (reading the source) pass."""
    try:
        yield
    except OSError as exc:
        if is_no_space(exc) or exc.filename is None or not _concerns(Path(os.fsdecode(exc.filename)), Path(out)):
            raise
        why = exc.strerror or exc.__class__.__name__
        raise SatfuseError(f"{exc.filename}: cannot write the output there ({why}); pass a {option} on a writable "
                           "filesystem (not /proc, /sys or a read-only mount)") from None


def _concerns(path: Path, out: Path) -> bool:
    """`path` is `out`, inside it, or one of the parents being created for it."""
    p, o = path.absolute(), out.absolute()
    return p == o or o in p.parents or p in o.parents

"""Small helpers every module needs: atomic writes, checksums, logging set-up.

Atomic writes are the rule in satfuse: a file is written under a temporary name in the
same directory and renamed into place, so a kill never leaves a half-written manifest,
config or pointer that a later run would trust.
"""

from __future__ import annotations

import hashlib
import importlib
import logging
import os
import sys
import tempfile
from pathlib import Path
from types import ModuleType

LOG_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"


def setup_logging(level: int | str = logging.INFO, rank: int = 0) -> None:
    """Console logging; on ranks other than 0 only warnings and errors (one voice per job).

    `rank` comes from the caller (`satfuse.distributed.launcher_env.process_rank()` for a
    launched process): the launcher's variables have one reader."""
    if isinstance(level, str):
        level = getattr(logging, level.upper())
    if rank != 0:
        level = max(level, logging.WARNING)
    fmt = LOG_FORMAT if rank == 0 else f"[rank {rank}] {LOG_FORMAT}"
    logging.basicConfig(level=level, format=fmt, stream=sys.stderr, force=True)


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write `data` to `path` via temp file + fsync + rename (same directory)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes 0600: others on a cluster must read it
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def atomic_write_text(path: Path, text: str) -> None:
    atomic_write_bytes(path, text.encode("utf-8"))


def file_in_the_way(path: Path) -> str:
    """'' when `path` is, or can be created as, a directory; else why not ("is an existing file",
    "is inside X, which is a file"), for a one-line error before anything is written."""
    for p in (path, *path.parents):  # the nearest existing ancestor decides
        if p.exists():
            if p.is_dir():
                return ""
            return "is an existing file" if p == path else f"is inside {p}, which is a file"
    return ""


def sha256_file(path: Path, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        while block := fh.read(chunk):
            h.update(block)
    return h.hexdigest()


class SatfuseError(RuntimeError):
    """An error meant for the user: one line, naming the file and the fix. The CLI prints
    it without a traceback and exits non-zero."""


class ConfigError(ValueError):
    """A config file or override that cannot be trusted; the message names the key and the fix.

    Defined here, below both `satfuse.config` (which raises it and is where callers import it
    from) and `satfuse.resources` (whose name lookups raise it): so neither imports the other
    back, and config.py <-> resources.py is no cycle."""


# Third-party packages satfuse runs without: pyproject's optional extras (the `dev` tools
# aside). Only a command or benchmark module whose import fails because one of these is missing
# is left out (with a warning); any other ImportError there is a bug (a typo, a broken install)
# and must surface, not turn into a missing command and a "reinstall" hint.
OPTIONAL_DEPENDENCIES = frozenset({"deepspeed", "timm"})


def import_unless_optional_missing(path: str, what: str) -> ModuleType | None:
    """Import `path`; None (after a warning naming `what` and the install fix) only when the
    module that is missing is one of `OPTIONAL_DEPENDENCIES`. Every other error propagates."""
    try:
        return importlib.import_module(path)
    except ModuleNotFoundError as exc:
        if exc.name not in OPTIONAL_DEPENDENCIES:
            raise
        logging.getLogger("satfuse").warning(
            "%s unavailable: %s needs %s, which is not installed; install it with "
            "`pip install 'satfuse[%s]'` (or `make setup`)", what, path, exc.name, exc.name)
        return None

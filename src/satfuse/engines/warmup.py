"""Compile DeepSpeed's JIT C++ ops once, at set-up time: `python -m satfuse.engines.warmup`.

Why: on the CPU accelerator every `deepspeed.initialize` loads the shared-memory comm op
(`ShareMemCommBuilder`), and the first load compiles it with g++/ninja (~25 s). Without this
step the first test or the first rank of the first run pays that, and two ranks racing to
compile into the same cache directory can time out the rendezvous. The build lands in
`$TORCH_EXTENSIONS_DIR` (default `~/.cache/torch_extensions/py3X_cpu`) and is reused.

FusedAdam is not built: satfuse passes `"torch_adam": true`, which is the same update rule
without a compile (measured ~55 s). On a CUDA machine DeepSpeed builds its CUDA ops lazily
on first use; nothing is warmed here.
"""

from __future__ import annotations

import argparse
import fcntl
import logging
import os
import sys
import time
from pathlib import Path

import torch
from torch.utils.cpp_extension import get_default_build_root

from satfuse.utils import SatfuseError

log = logging.getLogger(__name__)

# Ops a satfuse run loads on the CPU accelerator (see module doc for why not FusedAdam).
CPU_OPS = ("ShareMemCommBuilder",)

# A JIT build of one op takes ~25 s here (minutes for CUDA ops); a build lock this old was
# left by a build that was killed.
STALE_LOCK_S = 600.0


def extensions_root() -> Path:
    """Where torch's JIT builds go: `$TORCH_EXTENSIONS_DIR`, else
    `~/.cache/torch_extensions/py3X_{cpu|cuXYZ}` (torch's own rule, restated here so that
    no private torch function is needed)."""
    env = os.environ.get("TORCH_EXTENSIONS_DIR")
    if env:
        return Path(env)
    accel = (f"rocm{torch.version.hip.replace('.', '')}" if torch.version.hip
             else f"cu{torch.version.cuda.replace('.', '')}" if torch.version.cuda else "cpu")
    return Path(get_default_build_root()) / f"py{sys.version_info.major}{sys.version_info.minor}_{accel}"


def torch_locks_with_flock() -> bool:
    """True when torch guards its JIT builds with `filelock.FileLock` (torch 2.14 does): an OS
    lock the kernel drops when its process dies, on a file that stays behind after every build
    or load. Older torch used a `FileBaton`, where the file itself is the lock."""
    from torch.utils import cpp_extension  # lazy: only DeepSpeed runs ask

    return hasattr(cpp_extension, "FileLock")


def _held(lock: Path) -> bool:
    """Whether another process holds the OS lock on `lock` right now (a build or load running)."""
    try:
        fd = os.open(lock, os.O_RDONLY)
    except OSError:  # gone while we looked
        return False
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return True
    finally:
        os.close(fd)  # closing drops a lock we took
    return False


def check_build_locks(max_age_s: float = STALE_LOCK_S, root: Path | None = None,
                      flock: bool | None = None) -> None:
    """Refuse to start when a JIT build lock was left behind.

    Why: with torch's `FileBaton` (before torch 2.14) the build lock (`<op>/lock`) is a plain
    file; a build killed by Ctrl-C, `scancel` or the OOM killer leaves it, and every later
    `deepspeed.initialize` then polls it forever without a word. A lock older than `max_age_s`
    is such a leftover: a one-line error names it and the fix. A younger one may be a build in
    progress (another rank or job): logged, then DeepSpeed waits for it as usual. With torch's
    `FileLock` (`flock`, default: what the installed torch uses) the file stays after every
    build and a killed holder releases it, so only a lock held right now is reported (waited for).
    """
    root = root or extensions_root()
    flock = torch_locks_with_flock() if flock is None else flock
    for lock in sorted(root.glob("*/lock")):
        if flock:
            if _held(lock):
                log.warning("%s: a DeepSpeed op build is in progress; waiting for it", lock)
            continue
        try:
            age = time.time() - lock.stat().st_mtime
        except OSError:  # released while we looked
            continue
        if age > max_age_s:
            raise SatfuseError(
                f"{lock}: a DeepSpeed op build lock left by a killed build ({age / 60:.0f} min old); "
                f"DeepSpeed would wait on it forever. Remove it (rm {lock}) and start again")
        log.warning("%s: a DeepSpeed op build is in progress (%.0f s); waiting for it. If no "
                    "build is running, remove the file", lock, age)


def warm_ops(names: tuple[str, ...] = CPU_OPS) -> dict[str, float]:
    """Build/load each op and return the seconds it took (near 0 when already cached)."""
    os.environ.setdefault("DS_ACCELERATOR", "cpu")
    from deepspeed.accelerator import get_accelerator  # optional: deepspeed

    accel = get_accelerator()
    timings: dict[str, float] = {}
    for name in names:
        builder = accel.create_op_builder(name)
        if builder is None:
            log.info("accelerator %s has no op %s: nothing to build", accel.device_name(), name)
            continue
        if not builder.is_compatible(verbose=False):
            log.warning("op %s is not compatible with this machine; DeepSpeed will fall back", name)
            continue
        t0 = time.perf_counter()
        builder.load(verbose=False)
        timings[name] = round(time.perf_counter() - t0, 2)
        log.info("op %s ready in %.1f s", name, timings[name])
    return timings


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--ops", nargs="*", default=list(CPU_OPS), help="op builder names")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    try:
        warm_ops(tuple(args.ops))
    except Exception as exc:  # set-up must say what failed; DeepSpeed can still build later
        log.error("could not build DeepSpeed ops (%s: %s); the first run will try again",
                  type(exc).__name__, exc)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())

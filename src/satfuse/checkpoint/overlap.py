"""Verifying a checkpoint's crc32s while it loads, with the verify-then-trust contract kept.

Why: `find_resume("auto")` reads every byte of a checkpoint to check its crc32s and the load
then reads them all again: verification alone cost about one `torch.load` (README,
"Performance"). For a checkpoint chosen with `find_resume("auto", checksums=False)` (every
check but the crc32s: meta, complete mark, listed files, sizes) the DCP backend instead
starts a `Verifier` thread over this rank's share of the files (zlib.crc32 releases the
GIL) and loads at the same time. The contract is unchanged: after the load, every rank
contributes its findings to one all-gather (`agree`), so all ranks learn the same verdict
before any of them returns the state; a damaged checkpoint makes all of them load the
newest intact one instead (the manager's `load`), never use the damaged state.
"""

from __future__ import annotations

import threading
from pathlib import Path
from typing import Any

from satfuse.checkpoint.layout import crc32_file
from satfuse.distributed.collectives import all_gather_object


def crc_problems(path: Path, files: dict[str, dict[str, Any]]) -> list[str]:
    """One line per file of `files` (name -> meta.json record) whose bytes do not match."""
    problems = []
    for name, rec in files.items():
        if "crc32" not in rec:
            continue
        try:
            got = crc32_file(path / name)
        except OSError as exc:
            problems.append(f"{name} is unreadable ({exc.strerror})")
            continue
        if got != rec["crc32"]:
            problems.append(f"{name} crc32 {got} != {rec['crc32']} (corrupted)")
    return problems


class Verifier:
    """Checks rank `rank`'s share of a checkpoint's files (every `world`-th, largest first) on
    a thread; `result()` joins it and returns the problems found (an error is a problem)."""

    def __init__(self, path: Path, meta: dict[str, Any], rank: int, world: int) -> None:
        files: dict[str, dict[str, Any]] = meta.get("files") or {}
        names = sorted(files, key=lambda n: (-int(files[n].get("size") or 0), n))
        self._mine = {n: files[n] for n in names[rank::world]}
        self._path = path
        self._problems: list[str] = []
        self._thread = threading.Thread(target=self._run, name="ckpt-verify", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        try:
            self._problems = crc_problems(self._path, self._mine)
        except Exception as exc:  # noqa: BLE001 - reported as a problem of this checkpoint
            self._problems = [f"verification failed ({type(exc).__name__}: {exc})"]

    def result(self) -> list[str]:
        self._thread.join()
        return self._problems


def agree(problems: list[str], group: Any) -> list[str]:
    """Every rank's problems, the same list on every rank (collective on `group`)."""
    return [p for ranks in all_gather_object(problems, group) for p in ranks]

"""Guards of the suite itself: a hang fails the one test that hangs, with every thread's stack,
instead of stalling CI until its limit; no multi-rank code destroys its process group."""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

# Where `destroy_process_group()` may be called: groups of one rank only (see
# `satfuse.distributed.env.teardown` for the deadlock a multi-rank gloo group's destruction hits).
DESTROY_ALLOWED = {
    "src/satfuse/distributed/env.py",  # teardown: only when this process is the whole world
    "src/satfuse/bench/gpu.py",  # its DDP check's own 1-rank group
}


def test_no_multi_rank_code_destroys_its_process_group() -> None:
    """Multi-rank code ends with `exit_cleanly` (the OS frees the group); a call to
    `destroy_process_group()` anywhere else is a possible hang of 2 ranks."""
    call = re.compile(r"\bdestroy_process_group\(")
    found = sorted(str(p.relative_to(ROOT)) for top in ("src", "tests") for p in (ROOT / top).rglob("*.py")
                   if p != Path(__file__).resolve() and call.search(p.read_text(errors="replace")))
    assert set(found) <= DESTROY_ALLOWED, f"destroy_process_group() called in {sorted(set(found) - DESTROY_ALLOWED)}"

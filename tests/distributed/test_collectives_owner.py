"""Process-group helpers have one owner, `satfuse.distributed.collectives` (issue 26)."""

from __future__ import annotations

import re
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[2] / "src" / "satfuse"
HELPER = re.compile(r"\bdist\.(get_rank|get_world_size|is_initialized|is_available|barrier|new_group|"
                    r"broadcast_object_list|all_gather_object)\(")
# collectives.py owns them; env.py joins and leaves the process group; bench/ times the raw calls
ALLOWED = {"distributed/collectives.py", "distributed/env.py"}


def offenders(root: Path) -> list[str]:
    return [f"{p.relative_to(root).as_posix()}:{n}" for p in sorted(root.rglob("*.py"))
            for n, line in enumerate(p.read_text().splitlines(), 1)
            if HELPER.search(line) and p.relative_to(root).as_posix() not in ALLOWED
            and not p.relative_to(root).as_posix().startswith("bench/")]


def test_only_collectives_asks_the_process_group(tmp_path: Path) -> None:
    (tmp_path / "engines").mkdir()
    (tmp_path / "engines" / "x.py").write_text("world = dist.get_world_size() if dist.is_initialized() else 1\n")
    assert offenders(tmp_path) == ["engines/x.py:1"]  # the scan sees a hand-rolled helper
    assert offenders(PACKAGE) == [], "use satfuse.distributed.collectives (rank, world, is_distributed, ...)"

"""docs/architecture.md matches the tree: every module is named there, and every module it names exists."""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "src" / "satfuse"
DOC = ROOT / "docs" / "architecture.md"


def test_every_module_is_named_and_every_named_module_exists() -> None:
    text = DOC.read_text()
    named = set(re.findall(r"`(?:[\w/]+/)?(\w+\.py)`|(\w+\.py)", text))
    named = {a or b for a, b in named}
    modules = {p.name for p in PACKAGE.rglob("*.py") if p.name != "__init__.py"}
    assert sorted(modules - named) == [], "name these modules, with their one job, in docs/architecture.md"
    # every `x/y.py` path the doc spells out is a module of the tree (tests/ paths aside)
    paths = {m for m in re.findall(r"`([\w/]+\.py)`", text) if "/" in m and not m.startswith("tests/")}
    missing = sorted(p for p in paths if not any(q.as_posix().endswith(p) for q in PACKAGE.rglob("*.py")))
    assert missing == [], f"docs/architecture.md names modules that do not exist: {missing}"
    bare = set(re.findall(r"`(\w+\.py)`", text))
    assert sorted(bare - modules) == [], "docs/architecture.md names modules that do not exist"

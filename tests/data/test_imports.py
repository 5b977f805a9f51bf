"""Structure rules of `satfuse.data`: an import inside a function says why, and no import cycle."""

from __future__ import annotations

import ast
from pathlib import Path

import satfuse.data

DATA = Path(satfuse.data.__file__).parent
REASONS = ("# lazy:", "# optional:")


def _modules() -> dict[str, tuple[list[str], ast.Module]]:
    """Every module of the package: dotted name -> (source lines, syntax tree)."""
    out = {}
    for path in sorted(DATA.rglob("*.py")):
        rel = path.relative_to(DATA.parent.parent).with_suffix("")
        text = path.read_text()
        out[".".join(rel.parts).removesuffix(".__init__")] = (text.splitlines(), ast.parse(text, str(path)))
    return out


def test_data_imports_inside_functions_say_why_and_form_no_cycle() -> None:
    modules = _modules()
    unexplained, edges = [], {m: set() for m in modules}
    for name, (lines, tree) in modules.items():
        for fn in (n for n in ast.walk(tree) if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef))):
            for node in ast.walk(fn):
                if isinstance(node, (ast.Import, ast.ImportFrom)) and not any(r in lines[node.lineno - 1] for r in REASONS):
                    unexplained.append(f"{name}:{node.lineno}: {lines[node.lineno - 1].strip()}")
        for node in ast.walk(tree):  # every import, lazy or not, is an edge
            targets = []
            if isinstance(node, ast.ImportFrom) and node.module:
                targets = [f"{node.module}.{a.name}" for a in node.names] + [node.module]
            elif isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            edges[name] |= {t for t in targets if t in modules and t != name and not name.startswith(t + ".")}
    assert not unexplained, "imports inside functions need a trailing `# lazy: ...` or `# optional: ...` reason:\n" + "\n".join(unexplained)

    def cycle_from(start: str, node: str, path: list[str]) -> list[str] | None:
        for nxt in sorted(edges[node]):
            if nxt == start:
                return [*path, nxt]
            if nxt not in path and nxt > start:  # each cycle once, from its smallest module
                found = cycle_from(start, nxt, [*path, nxt])
                if found:
                    return found
        return None

    cycles = [c for m in sorted(modules) if (c := cycle_from(m, m, [m]))]
    assert not cycles, f"import cycles in satfuse.data: {cycles}"

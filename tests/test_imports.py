"""How satfuse's modules import each other (an AST scan of src/satfuse, nothing imported):

- an import inside a function is there for a reason, said in a trailing comment on its line:
  `# lazy: <why>` (it keeps `satfuse --help` fast or the launcher side torch-free) or
  `# optional: <dependency>` (it guards an optional dependency such as deepspeed);
- the modules form no import cycle, counting those function-level imports too: a cycle that
  only a lazy import hides still breaks whoever imports the pair in the other order.
"""

from __future__ import annotations

import ast
from pathlib import Path

SRC = Path(__file__).resolve().parents[1] / "src"
PACKAGE = SRC / "satfuse"
REASONS = ("# lazy:", "# optional:")



def module_name(path: Path) -> str:
    parts = list(path.relative_to(SRC).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _resolve(node: ast.ImportFrom, module: str, is_package: bool) -> str:
    """The absolute module an ImportFrom names (relative imports resolved against `module`)."""
    if not node.level:
        return node.module or ""
    base = module.split(".") if is_package else module.split(".")[:-1]
    base = base[: len(base) - (node.level - 1)]
    return ".".join(base + ([node.module] if node.module else []))


def function_imports(tree: ast.AST) -> list[ast.Import | ast.ImportFrom]:
    """Every import statement inside a function or method body (at any depth)."""
    found: dict[int, ast.Import | ast.ImportFrom] = {}
    for fn in ast.walk(tree):
        if isinstance(fn, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda)):
            for node in ast.walk(fn):
                if isinstance(node, (ast.Import, ast.ImportFrom)):
                    found[id(node)] = node
    return sorted(found.values(), key=lambda n: n.lineno)


def unexplained(path: Path) -> list[str]:
    """`line: statement` of each function-level import without a `# lazy:`/`# optional:` reason."""
    lines = path.read_text().splitlines()
    out = []
    for node in function_imports(ast.parse("\n".join(lines))):
        text = " ".join(lines[node.lineno - 1: node.end_lineno])
        if not any(reason in text for reason in REASONS):
            out.append(f"{node.lineno}: {lines[node.lineno - 1].strip()}")
    return out


def import_graph() -> dict[str, set[str]]:
    """satfuse module -> the satfuse modules it imports anywhere (top level or in a function)."""
    files = {module_name(p): p for p in PACKAGE.rglob("*.py")}
    graph: dict[str, set[str]] = {}
    for name, path in files.items():
        deps: set[str] = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = _resolve(node, name, path.name == "__init__.py")
                # `from satfuse.x import y`: y is a module when x/y.py exists, else a name in x
                targets = [f"{base}.{a.name}" if f"{base}.{a.name}" in files else base for a in node.names]
            else:
                continue
            for target in targets:
                while target and target not in files:  # `import satfuse.a.b` names a module or a name in one
                    target = target.rpartition(".")[0]
                if target and target != name:
                    deps.add(target)
        graph[name] = deps
    return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Each strongly connected component of more than one module (Tarjan), as a sorted list."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph.get(v, ())):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                found.append(sorted(comp))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return sorted(found)


def test_every_function_level_import_says_why() -> None:
    snippet = ("def f():\n    import torch  # lazy: --help stays torch-free\n"
               "def g():\n    import deepspeed  # optional: deepspeed\n"
               "def h():\n    from satfuse.config import (\n        load_config,\n    )  # lazy: keeps --help fast\n"
               "def k():\n    def inner():\n        import yaml\n")
    planted = PACKAGE.parent / "_planted_imports.py"
    try:
        planted.write_text(snippet)
        assert unexplained(planted) == ["11: import yaml"]
    finally:
        planted.unlink(missing_ok=True)
    bad = {p.relative_to(SRC).as_posix(): unexplained(p) for p in sorted(PACKAGE.rglob("*.py"))}
    bad = {path: lines for path, lines in bad.items() if lines}
    assert bad == {}, (
        "an import inside a function needs `# lazy: <why>` (it keeps `satfuse --help` fast or the "
        "launcher side torch-free) or `# optional: <dependency>`; otherwise import it at the top")


def test_satfuse_modules_import_each_other_without_a_cycle() -> None:
    toy = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}, "e": set()}
    assert cycles(toy) == [["a", "b", "c"]]
    graph = import_graph()
    assert "satfuse.resources" in graph["satfuse.config"]  # the graph sees top-level imports ...
    assert "satfuse.distributed.collectives" in graph["satfuse.distributed.env"]  # ... and function-level ones
    found = cycles(graph)
    assert found == [], "break the cycle: move the shared piece below both modules"

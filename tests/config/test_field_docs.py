"""Every config section says what it is for and every key has a one-line doc (issue 15, item
5): a comment on the field's own line, where a reader of the schema sees it next to the key."""

from __future__ import annotations

import ast
import dataclasses
import inspect
import textwrap
import typing

import pytest

from satfuse.config import PretrainConfig
from satfuse.demo import DemoConfig
from satfuse.evaluation.finetune import FinetuneConfig
from satfuse.evaluation.sweep import SweepConfig
from satfuse.launch.cluster import ClusterProfile

ROOTS = (PretrainConfig, FinetuneConfig, SweepConfig, DemoConfig, ClusterProfile)  # what load_config/from_dict build


def sections(schema: type) -> list[type]:
    """`schema` and every dataclass reachable through its fields' types (lists included)."""
    seen: list[type] = []
    todo = [schema]
    while todo:
        cls = todo.pop()
        if cls in seen:
            continue
        seen.append(cls)
        for tp in typing.get_type_hints(cls).values():
            for arg in (tp, *typing.get_args(tp)):
                if dataclasses.is_dataclass(arg):
                    todo.append(arg)
    return seen


ALL = sorted({cls for root in ROOTS for cls in sections(root)}, key=lambda c: c.__qualname__)


@pytest.mark.parametrize("cls", ALL, ids=lambda c: c.__qualname__)
def test_every_config_key_has_a_one_line_doc(cls: type) -> None:
    source = textwrap.dedent(inspect.getsource(cls))
    lines = source.splitlines()
    node = ast.parse(source).body[0]
    assert isinstance(node, ast.ClassDef) and ast.get_docstring(node), f"{cls.__qualname__}: no class docstring"
    undocumented = []
    for stmt in node.body:
        if isinstance(stmt, ast.AnnAssign):
            line = lines[stmt.lineno - 1]
            if "  # " not in line or not line.split("  # ", 1)[1].strip():
                undocumented.append(stmt.target.id)  # type: ignore[union-attr]
    assert not undocumented, f"{cls.__qualname__}: give these keys a comment on their line: {undocumented}"

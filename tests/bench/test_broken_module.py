"""A subcommand or benchmark module is left out only when an optional dependency it imports is
missing (with a warning that names it and the install command); any other import error in it is
a bug and propagates, from `satfuse` and from `satfuse bench` alike."""

from __future__ import annotations

import logging
import sys
import tomllib
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from satfuse import cli, utils
from satfuse.bench import commands as bench_commands

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture()
def area(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Callable[[str], str]]:
    """Writes an importable module with the given body; returns its name."""
    monkeypatch.syspath_prepend(str(tmp_path))
    names: list[str] = []

    def make(body: str) -> str:
        name = f"satfuse_test_area_{len(names)}"
        (tmp_path / f"{name}.py").write_text(body)
        names.append(name)
        return name

    yield make
    for name in names:
        sys.modules.pop(name, None)


def both_wirings(name: str, monkeypatch: pytest.MonkeyPatch) -> tuple[Callable[[], object], Callable[[], dict]]:
    """`satfuse`'s parser and `satfuse bench`'s benchmark list, each with `name` added."""
    monkeypatch.setattr(cli, "COMMAND_MODULES", [*cli.COMMAND_MODULES, name])
    monkeypatch.setitem(bench_commands.BENCHES, "extra", name)
    return cli.build_parser, bench_commands.available


def test_a_missing_optional_dependency_leaves_the_module_out_with_a_warning(
        area: Callable[[str], str], monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture) -> None:
    name = area("import deepspeed  # noqa: F401\n")
    monkeypatch.setitem(sys.modules, "deepspeed", None)  # as if not installed: ModuleNotFoundError
    build_parser, available = both_wirings(name, monkeypatch)
    with caplog.at_level(logging.WARNING):
        parser = build_parser()
        mods = available()
    fix = "needs deepspeed, which is not installed; install it with `pip install 'satfuse[deepspeed]'`"
    assert f"satfuse: the commands of {name} are unavailable: {name} {fix}" in caplog.text
    assert f"bench extra is unavailable: {name} {fix}" in caplog.text
    assert parser.parse_args(["ckpt", "ls", "x"]).command == "ckpt"  # the others still work
    assert "extra" not in mods and "shard" in mods


@pytest.mark.parametrize("body", [
    "import satfuse_no_such_dependency  # noqa: F401\n",  # a package satfuse cannot run without
    "from satfuse.utils import atomic_write_byts  # noqa: F401\n",  # a typo in a name
    "import satfuse.data.no_such_module  # noqa: F401\n",  # a typo in one of satfuse's own modules
    "raise ValueError('a bug, not a missing package')\n",
])
def test_any_other_import_error_propagates(body: str, area: Callable[[str], str],
                                           monkeypatch: pytest.MonkeyPatch) -> None:
    build_parser, available = both_wirings(area(body), monkeypatch)
    for wiring in (build_parser, available):
        with pytest.raises((ImportError, ValueError)):
            wiring()


def test_optional_dependencies_are_pyprojects_extras() -> None:
    extras = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["optional-dependencies"]
    assert set(extras) - {"dev"} == utils.OPTIONAL_DEPENDENCIES

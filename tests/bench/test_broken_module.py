"""A subcommand or benchmark module that fails to import is reported, not silently dropped."""

from __future__ import annotations

import logging
import sys
from pathlib import Path

import pytest

from satfuse import cli
from satfuse.bench import commands as bench_commands


@pytest.fixture()
def broken(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> str:
    (tmp_path / "satfuse_broken_area.py").write_text("import satfuse_no_such_dependency  # noqa: F401\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    yield "satfuse_broken_area"
    sys.modules.pop("satfuse_broken_area", None)


def test_cli_reports_a_module_that_does_not_import(broken: str, monkeypatch: pytest.MonkeyPatch,
                                                   caplog: pytest.LogCaptureFixture) -> None:
    monkeypatch.setattr(cli, "COMMAND_MODULES", [*cli.COMMAND_MODULES, broken, "satfuse.no_such_area"])
    with caplog.at_level(logging.WARNING):
        parser = cli.build_parser()
    assert (f"the commands of {broken} are unavailable (ModuleNotFoundError: No module named "
            "'satfuse_no_such_dependency')") in caplog.text
    assert "the commands of satfuse.no_such_area are unavailable" in caplog.text
    assert parser.parse_args(["ckpt", "ls", "x"]).command == "ckpt"  # the others still work


def test_bench_reports_a_benchmark_that_does_not_import(broken: str, monkeypatch: pytest.MonkeyPatch,
                                                        caplog: pytest.LogCaptureFixture) -> None:
    monkeypatch.setitem(bench_commands.BENCHES, "broken", broken)
    with caplog.at_level(logging.WARNING):
        mods = bench_commands.available()
    assert "broken" not in mods and "shard" in mods
    assert f"bench broken is unavailable: {broken} does not import (ModuleNotFoundError" in caplog.text


def test_other_import_time_errors_are_not_swallowed(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / "satfuse_buggy_area.py").write_text("raise ValueError('a bug, not a missing package')\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.setattr(cli, "COMMAND_MODULES", ["satfuse_buggy_area"])
    with pytest.raises(ValueError, match="a bug"):
        cli.build_parser()

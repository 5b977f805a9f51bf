"""The command line as users type it (issue 21 item 4, issue 19 item 11).

Every command and sub-command takes --help (also `finetune sweep`), and key=value overrides
may come before, between or after the flags.
"""

from __future__ import annotations

import argparse

import pytest

from satfuse.cli import build_parser, main, parse_args


def _commands(parser: argparse.ArgumentParser, prefix: tuple[str, ...] = ()) -> list[tuple[str, ...]]:
    out = []
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                out.append((*prefix, name))
                out.extend(_commands(sub, (*prefix, name)))
    return out


def test_every_command_takes_help(capsys):
    commands = _commands(build_parser()) + [("finetune", "sweep")]
    assert ("ckpt", "inspect") in commands and ("bench", "loader") in commands
    for cmd in commands:
        with pytest.raises(SystemExit) as exc:
            if main([*cmd, "--help"]) == 0:  # finetune dispatches `sweep` itself
                raise SystemExit(0)
        assert exc.value.code == 0, cmd
        assert "usage: satfuse " + " ".join(cmd) in capsys.readouterr().out, cmd


def test_finetune_sweep_help_names_its_flags(capsys):
    assert main(["finetune", "sweep", "--help"]) == 0
    out = capsys.readouterr().out
    assert "--dry-run" in out and "--config" in out and "checkpoint=" in out


@pytest.mark.parametrize("argv,overrides", [
    (["pretrain", "--config", "c.yaml", "a=1", "--nproc-per-node", "2", "b=2"], ["a=1", "b=2"]),
    (["pretrain", "a=1", "--config", "c.yaml", "b=2", "a=3"], ["a=1", "b=2", "a=3"]),
    (["submit", "pretrain", "a=1", "--cluster", "local", "b=2", "--dry-run"], ["a=1", "b=2"]),
    (["pretrain", "--nproc-per-node", "2", "a=1", "--config", "c.yaml"], ["a=1"]),
])
def test_flags_after_overrides_are_accepted_in_order(argv, overrides):
    args = parse_args(build_parser(), argv)
    assert args.overrides == overrides


def test_unknown_flag_after_overrides_is_still_an_error(capsys):
    with pytest.raises(SystemExit) as exc:
        parse_args(build_parser(), ["pretrain", "a=1", "--nproc-per-node", "2", "--bogus", "b=2"])
    assert exc.value.code == 2 and "unrecognized arguments: --bogus b=2" in capsys.readouterr().err

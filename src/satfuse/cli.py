"""The `satfuse` command. Each area registers its own subcommands; this file only wires them.

Subcommand modules expose `register(subparsers)` and set `func` on their parsers; a
`SatfuseError` or `ConfigError` raised by a command is printed as one line (no traceback)
and turns into exit status 2.
"""

from __future__ import annotations

import argparse
import logging
import sys

from satfuse import __version__
from satfuse.config import ConfigError
from satfuse.distributed.launcher_env import process_rank
from satfuse.utils import SatfuseError, import_unless_optional_missing, setup_logging

log = logging.getLogger("satfuse")

# Modules that add subcommands, in the order they appear in --help.
COMMAND_MODULES = [
    "satfuse.data.commands",  # synth, shard, shard verify/merge
    "satfuse.engines.commands",  # pretrain
    "satfuse.checkpoint.commands",  # ckpt ls/inspect/export
    "satfuse.launch.commands",  # submit, jobs
    "satfuse.evaluation.commands",  # finetune, report
    "satfuse.bench.commands",  # bench
    "satfuse.demo",  # demo (the README's main command)
    "satfuse.resources",  # configs, init (packaged configs and templates)
]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="satfuse",
        description="Self-supervised Sentinel-1 + Sentinel-2 pretraining at cluster scale "
        "(Dual-SimCLR, SimCLR, MMA): data -> shards -> pretraining -> DFC2020 evaluation.",
    )
    parser.add_argument("--version", action="version", version=f"satfuse {__version__}")
    parser.add_argument("--log-level", default="INFO")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name in COMMAND_MODULES:
        module = import_unless_optional_missing(name, f"satfuse: the commands of {name} are")
        if module is not None:  # None: an optional dependency is missing; the others still work
            module.register(sub)
    return parser


def _looks_like_override(word: str) -> bool:
    return "=" in word and not word.startswith("-")


def parse_args(parser: argparse.ArgumentParser, argv: list[str] | None) -> argparse.Namespace:
    """`parse_args`, but flags and key=value overrides may come in any order.

    argparse gives a `nargs="*"` positional only the first run of words; overrides typed after
    a flag (`pretrain a=1 --nproc-per-node 2 b=2`) come back as extras. Those join the
    command's `overrides` in the order typed (later wins); anything else is still an error.
    """
    args, extra = parser.parse_known_args(argv)
    if extra and isinstance(getattr(args, "overrides", None), list) and all(map(_looks_like_override, extra)):
        args.overrides = [*args.overrides, *extra]
    elif extra:
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    return args


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parse_args(parser, argv)
    setup_logging(args.log_level, process_rank())
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    try:
        rc = args.func(args)
    except (SatfuseError, ConfigError) as exc:
        log.error("%s", exc)
        return 2
    except KeyboardInterrupt:
        log.error("interrupted")
        return 130
    return int(rc or 0)


if __name__ == "__main__":
    sys.exit(main())

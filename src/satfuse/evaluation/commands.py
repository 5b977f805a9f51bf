"""`satfuse finetune`, `satfuse finetune sweep` and `satfuse report`.

`finetune` takes a YAML (`--config hpc/finetune/X.yaml`), then the issue's flags, then
`key=value` overrides, in that order of precedence. A first positional word `sweep` turns it
into the grid runner (argparse sub-parsers cannot coexist with positional overrides, so the
word is dispatched here).
"""

from __future__ import annotations

import argparse
import json
import logging
from pathlib import Path
from typing import Any

from satfuse.config import ConfigError, apply_override, from_dict, read_yaml, set_dotted
from satfuse.utils import SatfuseError

log = logging.getLogger(__name__)

# flag dest -> dotted config key
FLAG_KEYS = {
    "checkpoint": "model.checkpoint", "mode": "model.mode", "task": "train.task",
    "label_fraction": "data.label_fraction", "modalities": "model.modalities",
    "fusion": "model.fusion", "seed": "train.seed", "backbone": "model.backbone",
    "run_dir": "run_dir", "label": "label", "train_shards": "data.train_shards",
    "test_shards": "data.test_shards", "val_shards": "data.val_shards", "epochs": "train.epochs",
    "checkpoint_modality": "model.checkpoint_modality",
    "trust_checkpoint": "model.trust_checkpoint", "benchmark": "data.benchmark",
    "decoder": "model.decoder",
}


def register(subparsers: argparse._SubParsersAction) -> None:
    ft = subparsers.add_parser(
        "finetune", help="fine-tune / linear-probe on a downstream benchmark, DFC2020 by default "
                         "(or `finetune sweep` for a grid)",
        description="Train a classifier on a benchmark (--benchmark, default dfc2020) with early stopping "
                    "and score it on its test split. `satfuse finetune sweep --config hpc/finetune/demo_sweep.yaml` runs a grid.")
    _add_finetune_flags(ft)
    # REMAINDER: `sweep`, key=value and flags may come in any order; cmd_finetune re-parses them.
    ft.add_argument("words", nargs=argparse.REMAINDER, metavar="[sweep] KEY=VALUE ...",
                    help="`sweep` to run a grid; then config overrides such as train.epochs=5")
    ft.set_defaults(func=cmd_finetune)

    rp = subparsers.add_parser("report", help="paper-style table + label-fraction plot (+ pretraining curves) from runs",
                               description="Aggregate result.json files (run dirs or sweep roots).")
    rp.add_argument("runs", nargs="+", help="run directories, sweep roots or result.json files; "
                    "pretraining run dirs (metrics.jsonl) are drawn into pretrain_curves.png")
    rp.add_argument("--out", required=True, help="report directory, e.g. reports/demo")
    rp.set_defaults(func=cmd_report)


def _add_finetune_flags(ft: argparse.ArgumentParser) -> None:
    ft.add_argument("--config", help="finetune YAML (or sweep YAML with `sweep`)")
    ft.add_argument("--checkpoint", help="exported backbones file, checkpoint dir, or none")
    ft.add_argument("--checkpoint-modality", choices=["s1", "s2", "s2_rgb", "s1s2"],
                    help="the input a plain single-modality state dict takes (default: by its conv1 bands)")
    ft.add_argument("--trust-checkpoint", action="store_true", default=None,
                    help="read checkpoint-dir files that are not plain data (they may run code); "
                         "same as model.trust_checkpoint=true")
    ft.add_argument("--mode", choices=["finetune", "linear"])
    ft.add_argument("--task", choices=["single", "multi", "seg"],
                    help="single-/multi-label classification, or seg (per-pixel; --benchmark dfc2020-seg)")
    ft.add_argument("--decoder", help="segmentation decoder (model.decoder: unet, upernet; default auto)")
    ft.add_argument("--label-fraction", type=float)
    ft.add_argument("--modalities", choices=["s1", "s2", "s1s2"])
    ft.add_argument("--fusion", choices=["early", "late"])
    ft.add_argument("--seed", type=int)
    ft.add_argument("--backbone", help="trunk per branch: a registered backbone (model.backbone)")
    ft.add_argument("--epochs", type=int)
    ft.add_argument("--run-dir", help="where result.json goes (default: runs/finetune/<method>/<task>/"
                    "frac<F>/seed<S>, as a sweep lays out runs)")
    ft.add_argument("--overwrite", action="store_true", default=None,
                    help="replace the result.json of a finished run in the same directory (sweep: "
                         "rerun the finished runs whose recorded config differs from the sweep's)")
    ft.add_argument("--label", help="method name in reports")
    ft.add_argument("--benchmark", help="the downstream benchmark: a registered name (data.benchmark, "
                    "default dfc2020)")
    ft.add_argument("--train-shards", help="the benchmark's training shard dir (DFC2020: its validation split)")
    ft.add_argument("--test-shards", help="the benchmark's test-split shard dir")
    ft.add_argument("--val-shards", help="an early-stopping shard dir of its own (BigEarthNet: --split val); "
                    "default: hold data.val_fraction of the training shards out")
    ft.add_argument("--out", help="sweep only: output root (overrides the sweep's `out`)")
    ft.add_argument("--dry-run", action="store_true", default=None,
                    help="sweep only: list the runs, run nothing")


def _reparse(args: argparse.Namespace) -> argparse.Namespace:
    """Parse flags that came after `sweep` or after a key=value (left in `words` by REMAINDER)."""
    inner = argparse.ArgumentParser(prog="satfuse finetune", add_help=False)
    _add_finetune_flags(inner)
    inner.add_argument("words", nargs="*")
    words = list(args.words or [])
    delattr(args, "words")  # parse_intermixed_args refuses a pre-set positional
    try:
        return inner.parse_intermixed_args(words, namespace=args)
    except SystemExit as exc:  # argparse already printed the reason
        raise SatfuseError(f"bad arguments to `satfuse finetune`: {' '.join(words)}") from exc


def _split_words(words: list[str]) -> tuple[bool, list[str]]:
    is_sweep = bool(words) and words[0] == "sweep"
    rest = words[1:] if is_sweep else words
    bad = [w for w in rest if "=" not in w]
    if bad:
        raise SatfuseError(f"unexpected argument {bad[0]!r}: give overrides as key=value "
                           "(or `sweep` as the first word)")
    return is_sweep, rest


def finetune_config_from_args(args: argparse.Namespace, overrides: list[str]):
    """YAML, then flags, then key=value: the precedence the issue asks for."""
    from satfuse.evaluation.finetune import FinetuneConfig  # lazy: `satfuse --help` stays fast

    raw: dict[str, Any] = read_yaml(args.config, kind="finetune") if args.config else {}
    for dest, key in FLAG_KEYS.items():
        value = getattr(args, dest, None)
        if value is not None:
            set_dotted(raw, key, value)
    for item in overrides:
        apply_override(FinetuneConfig, raw, item)
    return from_dict(FinetuneConfig, raw, where=args.config or "command line")


def _help_parser(is_sweep: bool) -> argparse.ArgumentParser:
    """The --help text of `satfuse finetune sweep` (or of finetune, for a --help after words)."""
    if not is_sweep:
        p = argparse.ArgumentParser(prog="satfuse finetune", description="One DFC2020 run: "
                                    "fine-tune or linear-probe, early-stop, score on the test split.")
        _add_finetune_flags(p)
        p.add_argument("words", nargs="*", metavar="KEY=VALUE", help="config overrides, e.g. train.epochs=5")
        return p
    p = argparse.ArgumentParser(
        prog="satfuse finetune sweep",
        description="Run a grid of downstream runs (methods x label fractions x seeds x tasks) from a "
                    "sweep YAML, each in OUT/<method>/<task>/frac<F>/seed<S>/; finished runs are skipped.")
    p.add_argument("--config", required=True, help="sweep YAML, e.g. hpc/finetune/demo_sweep.yaml")
    p.add_argument("--out", help="output root (overrides the sweep's `out`)")
    p.add_argument("--dry-run", action="store_true", help="list the runs (todo/done/changed), run nothing")
    p.add_argument("--overwrite", action="store_true",
                   help="rerun finished runs whose recorded config differs from the sweep's "
                        "(without it such a sweep is refused, naming the keys)")
    p.add_argument("words", nargs="*", metavar="KEY=VALUE",
                   help="sweep overrides, e.g. checkpoint=backbone.pt seeds=[40] base.train.epochs=3")
    return p


def cmd_finetune(args: argparse.Namespace) -> int:
    words = list(args.words or [])
    if "-h" in words or "--help" in words:
        _help_parser(bool(words) and words[0] == "sweep").print_help()
        return 0
    args = _reparse(args)
    is_sweep, overrides = _split_words(args.words)
    if is_sweep:
        return _cmd_sweep(args, overrides)
    if args.out or args.dry_run:
        raise SatfuseError("--out and --dry-run belong to `satfuse finetune sweep`; use --run-dir for one run")
    from satfuse.evaluation.finetune import run_finetune  # lazy: `satfuse --help` stays fast

    try:
        cfg = finetune_config_from_args(args, overrides)
    except ConfigError as exc:
        raise SatfuseError(str(exc)) from exc
    result = run_finetune(cfg, overwrite=bool(args.overwrite))
    print(json.dumps({"method": result["method"], "run_dir": cfg.run_dir, "metrics": result["metrics"]},
                     indent=1))
    return 0


def _cmd_sweep(args: argparse.Namespace, overrides: list[str]) -> int:
    from satfuse.evaluation.sweep import (  # lazy: `satfuse --help` stays fast
        config_changes,
        load_sweep_config,
        plan_sweep,
        run_sweep,
    )

    used = [f"--{d.replace('_', '-')}" for d in FLAG_KEYS if getattr(args, d, None) is not None]
    if used:
        raise SatfuseError(f"{', '.join(used)} apply to one run; in a sweep set them in the sweep YAML "
                           "or as key=value (e.g. checkpoint=PATH, base.train.epochs=3)")
    if not args.config:
        raise SatfuseError("`satfuse finetune sweep` needs --config (e.g. hpc/finetune/demo_sweep.yaml)")
    if args.out:
        overrides = [*overrides, f"out={args.out}"]
    cfg = load_sweep_config(args.config, overrides)
    if args.dry_run:
        for r in plan_sweep(cfg):
            diffs = config_changes(r)
            state = "todo" if diffs is None else "changed" if diffs else "done"
            keys = f"\t{','.join(k for k, _, _ in diffs)}" if diffs else ""
            print(f"{state}\t{r.run_dir}{keys}")
        return 0
    dirs = run_sweep(cfg, progress=True, overwrite=bool(args.overwrite))
    print(json.dumps({"out": cfg.out, "runs": len(dirs)}))
    return 0


def cmd_report(args: argparse.Namespace) -> int:
    from satfuse.evaluation.curves import make_full_report  # lazy: `satfuse --help` stays fast

    summary = make_full_report(args.runs, Path(args.out))
    print(json.dumps({"n_runs": summary["n_runs"], "files": summary["files"]}, indent=1))
    return 0

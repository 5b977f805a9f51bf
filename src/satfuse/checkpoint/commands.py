"""`satfuse ckpt ls | inspect | export`: look at checkpoints without starting a job.

Why verification is part of `ls`/`inspect`: the question after a preemption or a full disk
is "which checkpoint will resume=auto take, and what is wrong with the others" — these
commands answer it with the same checks resume uses.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import json
from pathlib import Path
from typing import Any

from satfuse.checkpoint.layout import (
    CKPT_SUBDIR,
    LATEST,
    META_NAME,
    STEP_RE,
    TMP_PREFIX,
    checkpoint_problems,
    checkpoints_dir,
    dir_size,
    list_checkpoints,
    list_partial,
    parse_step,
    read_latest,
    recorded_kind,
)
from satfuse.checkpoint.resolve import resolve_checkpoint
from satfuse.registry import CHECKPOINT_BACKENDS
from satfuse.utils import SatfuseError

TRUST_HELP = ("read checkpoint files that are not plain data (they may run code when loaded); "
              "only for checkpoints whose author you trust")


def register(subparsers: Any) -> None:
    p = subparsers.add_parser("ckpt", help="list, inspect and export checkpoints")
    sub = p.add_subparsers(dest="ckpt_command", metavar="ACTION", required=True)

    ls = sub.add_parser("ls", help="table of a run's checkpoints (marks latest and broken ones)")
    ls.add_argument("run_dir", type=Path, help="the run directory (train.run_dir)")
    ls.add_argument("--quick", action="store_true", help="sizes only, skip crc32 verification")
    ls.set_defaults(func=cmd_ls)

    ins = sub.add_parser("inspect", help="details of one checkpoint; exit 1 if incomplete")
    ins.add_argument("path", type=Path, help="a step_XXXXXXXX directory, its `latest` pointer, "
                     "`checkpoints/` or the run dir (both: the latest step)")
    ins.add_argument("--quick", action="store_true", help="sizes only, skip crc32 verification")
    ins.add_argument("--trust-checkpoint", action="store_true", help=TRUST_HELP)
    ins.set_defaults(func=cmd_inspect)

    ex = sub.add_parser("export", help="consolidated backbones file for fine-tuning")
    ex.add_argument("path", type=Path, help="a step_XXXXXXXX directory, its `latest` pointer, "
                    "`checkpoints/` or the run dir (both: the latest step)")
    ex.add_argument("--out", type=Path, required=True, help="output file, e.g. backbone.pt")
    ex.add_argument("--builder", default="",
                    help="MODULE:FUNCTION(meta) -> model, for models not built from the "
                         "checkpoint's config (default: satfuse.models.build_pretrain_model)")
    ex.add_argument("--format", default="satfuse", choices=["satfuse", "torchvision", "timm", "safetensors"],
                    help="satfuse: one file for `satfuse finetune` (default); torchvision / timm: "
                         "{modality: state dict in that library's names} + normalisation JSON "
                         "(and, for timm, the create_model call and img_size) beside it; "
                         "safetensors: the same tensors as .safetensors, normalisation in its metadata")
    ex.add_argument("--trust-checkpoint", action="store_true", help=TRUST_HELP)
    ex.add_argument("--overwrite", action="store_true",
                    help="replace an existing --out (and the normalisation JSON beside it); never "
                         "allowed inside the run's checkpoints/ directory")
    ex.set_defaults(func=cmd_export)


def _row(path: Path, latest: Path | None, quick: bool) -> dict[str, Any]:
    problems = checkpoint_problems(path, checksums=not quick)
    meta: dict[str, Any] = {}
    if (path / "meta.json").is_file():
        try:
            meta = json.loads((path / "meta.json").read_text())
        except (OSError, json.JSONDecodeError):
            meta = {}
    return {
        "step": parse_step(path),
        "complete": not problems,
        "world_size": meta.get("world_size", "?"),
        "size_mib": dir_size(path) / 2**20,
        "created": meta.get("created", "?"),
        "latest": latest is not None and latest.name == path.name,
        "path": path,
        "problems": problems,
    }


def cmd_ls(args: argparse.Namespace) -> int:
    run_dir: Path = args.run_dir
    root = checkpoints_dir(run_dir)
    if not root.is_dir():
        raise SatfuseError(f"{run_dir}: no checkpoints/ directory; pass the run directory (train.run_dir) of a pretraining run")
    latest = read_latest(run_dir)
    rows = [_row(p, latest, args.quick) for p in list_checkpoints(run_dir)]
    print(f"{'step':>10}  {'complete':<8}  {'world':>5}  {'size MiB':>9}  {'created':<24}  latest")
    for r in rows:
        print(f"{r['step']:>10}  {'yes' if r['complete'] else 'NO':<8}  {r['world_size']!s:>5}  "
              f"{r['size_mib']:>9.2f}  {r['created']!s:<24}  {'<- latest' if r['latest'] else ''}")
    for r in rows:
        if r["problems"]:
            print(f"  {r['path'].name}: {'; '.join(r['problems'])}")
    for p in list_partial(run_dir):
        print(f"  {p.name}: interrupted save/delete (ignored by resume, removed by the next save)")
    if not rows:
        print("  (no checkpoints)")
    return 0


def cmd_inspect(args: argparse.Namespace) -> int:
    path: Path = resolve_checkpoint(args.path)  # the same forms `ckpt export` takes
    if not path.exists():
        raise SatfuseError(f"{path}: not found; list checkpoints with `satfuse ckpt ls RUN_DIR`")
    _refuse_non_checkpoint(path)
    problems = checkpoint_problems(path, checksums=not args.quick)
    meta: dict[str, Any] = {}
    with contextlib.suppress(OSError, json.JSONDecodeError):
        meta = json.loads((path / "meta.json").read_text())
    files = meta.get("files") or {}
    fp = (meta.get("model") or {}).get("fingerprint") or {}
    ranks = _rank_summaries(path, meta, args.trust_checkpoint, problems)
    report = {
        "path": str(path),
        "complete": not problems,
        "problems": problems,
        "step": meta.get("step"),
        "epoch": meta.get("epoch"),
        "world_size": meta.get("world_size"),
        "kind": meta.get("kind"),
        "created": meta.get("created"),
        "satfuse_version": meta.get("satfuse_version"),
        "parameters": (meta.get("model") or {}).get("parameters"),
        "model_tensors": len(fp),
        "total_bytes": meta.get("total_bytes"),
        "files": {name: rec.get("size") for name, rec in files.items()},
        "ranks": ranks,
        "model_config": (meta.get("config") or {}).get("model"),
    }
    print(json.dumps(report, indent=2, default=str))
    return 0 if not problems else 1


def _rank_summaries(path: Path, meta: dict[str, Any], trusted: bool, problems: list[str]) -> list[dict[str, Any]]:
    """Step and loader position of every rank file, each read as data only (a file that is
    not, and backend files its backend refuses (`CheckpointBackend.check_files`: DeepSpeed
    files holding more than DeepSpeed's inert records), become a problem
    naming the file: inspecting a checkpoint never runs code from it without --trust-checkpoint)."""
    from satfuse.checkpoint import trust  # lazy: --help stays torch-free

    if not meta or problems:  # a damaged checkpoint is reported as such, its files not read
        return []
    try:
        kind = recorded_kind(meta)
        if kind in CHECKPOINT_BACKENDS:
            CHECKPOINT_BACKENDS.get(kind).check_files(path, trusted)
        states = trust.load_rank_files(path, int(meta.get("world_size") or 0), trusted)
    except SatfuseError as exc:
        problems.append(str(exc))
        return []
    except (RuntimeError, OSError, EOFError, ValueError) as exc:  # e.g. cut short under --quick
        problems.append(f"rank files unreadable ({type(exc).__name__}: {str(exc).splitlines()[0][:200]})")
        return []
    out = []
    for st in states:
        loader = st.get("loader") if isinstance(st, dict) else None
        loader = loader if isinstance(loader, dict) else {}
        out.append({"step": st.get("step") if isinstance(st, dict) else None,
                    "epoch": loader.get("epoch"), "samples_consumed": loader.get("samples_consumed")})
    return out


def _refuse_non_checkpoint(path: Path) -> None:
    """A directory that is neither a step directory (finished or not) nor holds checkpoint
    files: say so, instead of reporting a save that "never finished" where none began (e.g.
    a run dir with no checkpoint yet)."""
    name = path.name.removeprefix(TMP_PREFIX)
    if not path.is_dir() or STEP_RE.match(name) or (path / META_NAME).exists():
        return
    if any(backend.claims(path) for _, backend in CHECKPOINT_BACKENDS.items()):
        return  # written without satfuse: inspect names what it lacks
    steps = sorted(f"{folder.name}/{d.name}" if folder != path else d.name
                   for folder in (path / CKPT_SUBDIR, path) if folder.is_dir()
                   for d in folder.iterdir() if STEP_RE.match(d.name))
    if steps:
        found = f"it holds {', '.join(steps[:3])}{' ...' if len(steps) > 3 else ''} but no {LATEST}: pass one of them"
    else:
        found = "nothing was saved here yet, or it is not a run directory"
    raise SatfuseError(f"{path}: not a checkpoint (no {META_NAME}, no step_XXXXXXXX directory, no {LATEST}); "
                       f"{found}; list checkpoints with `satfuse ckpt ls RUN_DIR`")


def _resolve_builder(spec: str) -> Any:
    if not spec:
        return None
    if ":" not in spec:
        raise SatfuseError(f"--builder {spec!r}: expected MODULE:FUNCTION, e.g. mypkg.models:build")
    mod, _, name = spec.partition(":")
    try:
        return getattr(importlib.import_module(mod), name)
    except (ImportError, AttributeError) as exc:
        raise SatfuseError(f"--builder {spec!r}: cannot import ({exc}); check the module path") from None


def cmd_export(args: argparse.Namespace) -> int:
    from satfuse.checkpoint.formats import export  # lazy: --help stays torch-free

    summary = export(args.path, args.out, getattr(args, "format", "satfuse"),
                     builder=_resolve_builder(args.builder), trust=args.trust_checkpoint,
                     overwrite=bool(getattr(args, "overwrite", False)))
    print(json.dumps(summary, indent=2))
    return 0

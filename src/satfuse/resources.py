"""Packaged configs and templates: where `hpc/` and `slurm/` live, and what a config name means.

Why: a cluster user installs a wheel and runs from a project directory, not from a clone of
this repository. The top-level `hpc/` (pretrain, finetune, DeepSpeed and cluster configs) and
`slurm/*.sbatch` stay the source of truth; the build hook in `setup.py` copies them into the
wheel as `satfuse/_packaged/`, and an editable install (or `PYTHONPATH=src`) reads them from
the checkout. This module is the only place that decides which file a `--config`,
`--cluster` or `deepspeed.config` value names:

1. an existing file, as given (relative to the working directory);
2. a bare name (`tiny`, `zero1_bf16`, `example`, or `pretrain/tiny`): the project copy
   `./hpc/<kind>/<name>.yaml|.json` that `satfuse init` writes, else the packaged one;
3. a repository path such as `hpc/deepspeed/zero1_fp32.json` that is absent here: the packaged
   copy of that path (the defaults and the configs that refer to each other use this form).

A value that is none of these fails with one line saying both the path and the names were tried.
`satfuse configs` lists the names and where each lives; `satfuse init DIR` writes editable
copies.
"""

from __future__ import annotations

import argparse
import importlib.util
import logging
import sys
from dataclasses import dataclass
from pathlib import Path

from satfuse.utils import ConfigError, SatfuseError, atomic_write_bytes, file_in_the_way

log = logging.getLogger(__name__)

#: Kinds of packaged config -> their folder (relative to the packaged root and to a project).
KINDS: dict[str, str] = {
    "pretrain": "hpc/pretrain",
    "finetune": "hpc/finetune",
    "deepspeed": "hpc/deepspeed",
    "clusters": "hpc/clusters",
}
#: Which kind a schema's `--config` names (used by `config.load_config`).
SCHEMA_KINDS: dict[str, str] = {
    "PretrainConfig": "pretrain",
    "FinetuneConfig": "finetune",
    "SweepConfig": "finetune",
    "ClusterProfile": "clusters",
}
CONFIG_SUFFIXES = (".yaml", ".yml", ".json")
TEMPLATES = "slurm"  # sbatch templates: slurm/*.sbatch (+ README.md)
PACKAGED_DIR = "_packaged"  # inside the installed package (written by setup.py's build hook)


class ConfigNotFound(ConfigError, SatfuseError):
    """A config value that is neither an existing file nor a known name (both were tried)."""


# --------------------------------------------------------------------------------------------
# Where the packaged files are
# --------------------------------------------------------------------------------------------


def packaged_root() -> Path:
    """The folder holding `hpc/` and `slurm/`: the wheel's copy, else the source checkout."""
    here = Path(__file__).resolve().parent
    installed = here / PACKAGED_DIR
    if (installed / "hpc").is_dir():
        return installed
    checkout = here.parents[1]  # src/satfuse/resources.py -> the repository root
    if (checkout / "hpc").is_dir() and (checkout / "pyproject.toml").is_file():
        return checkout
    raise SatfuseError(
        f"satfuse's packaged configs are missing (looked in {installed} and {checkout / 'hpc'}); "
        "reinstall satfuse from a wheel built by `pip wheel .` (or `pip install -e .` in a clone)"
    )


def _config_files(folder: Path) -> dict[str, Path]:
    """name -> file for the configs directly in `folder` (first suffix wins on a clash)."""
    found: dict[str, Path] = {}
    if folder.is_dir():
        for suffix in CONFIG_SUFFIXES:
            for f in sorted(folder.glob(f"*{suffix}")):
                found.setdefault(f.stem, f)
    return found


def packaged_names(kind: str) -> dict[str, Path]:
    """The packaged configs of one kind, name -> file."""
    return _config_files(packaged_root() / KINDS[kind])


def project_names(kind: str, base: Path | None = None) -> dict[str, Path]:
    """Project copies (`satfuse init`) of one kind in `base` (default: the working directory)."""
    return _config_files((base or Path.cwd()) / KINDS[kind])


def template_files() -> list[Path]:
    """The packaged sbatch templates and their README."""
    root = packaged_root() / TEMPLATES
    return sorted(root.glob("*.sbatch")) + ([root / "README.md"] if (root / "README.md").is_file() else [])


# --------------------------------------------------------------------------------------------
# Resolution: the one place that turns a --config value into a file
# --------------------------------------------------------------------------------------------


def _split_name(spec: str) -> tuple[list[str], str] | None:
    """(`kinds`, name) when `spec` reads as a name (`tiny`, `tiny.yaml`, `pretrain/tiny`)."""
    parts = spec.split("/")
    if len(parts) == 2 and parts[0] in KINDS:
        kind_part, name = [parts[0]], parts[1]
    elif len(parts) == 1:
        kind_part, name = [], parts[0]
    else:
        return None
    stem = Path(name).stem if Path(name).suffix in CONFIG_SUFFIXES else name
    return kind_part, stem


def resolve_config(spec: str | Path, kind: str | None = None) -> Path:
    """The file a config value names (see the module doc for the order); fails naming both tries.

    `kind` ("pretrain", "finetune", "deepspeed", "clusters") says where a bare name is looked up;
    None looks in every kind and refuses a name that several kinds share.
    """
    text = str(spec)
    given = Path(text).expanduser()
    if given.is_file():
        return given
    tried = [f"no file {given if given.is_absolute() else Path.cwd() / given}"]
    split = _split_name(text) if not given.is_absolute() else None
    if split is not None:
        kinds = split[0] or ([kind] if kind else list(KINDS))
        name = split[1]
        hits = []
        for k in kinds:
            for source in (project_names(k), packaged_names(k)):
                if name in source:
                    hits.append((k, source[name]))
                    break
        if len({k for k, _ in hits}) > 1:
            options = ", ".join(f"{k}/{name}" for k, _ in hits)
            raise ConfigError(f"{text}: names configs of several kinds ({options}); say which, e.g. {hits[-1][0]}/{name}")
        if hits:
            log.debug("%s -> %s", text, hits[0][1])
            return hits[0][1]
        where = "/".join(kinds) if len(kinds) < len(KINDS) else "any"
        known = sorted({n for k in kinds for n in [*packaged_names(k), *project_names(k)]})
        tried.append(f"no {where} config named {name!r} in ./hpc or the package (known: {', '.join(known)})")
    elif not given.is_absolute():
        packaged = packaged_root() / given
        if packaged.is_file():
            return packaged
        tried.append(f"no packaged {given}")
    raise ConfigNotFound(f"{text}: config not found: {'; '.join(tried)}; pass an existing file or "
                         "a name from `satfuse configs`")


def require_deepspeed(where: str) -> None:
    """Refuse `train.engine=deepspeed` up front when DeepSpeed is not installed (it is an extra)."""
    if importlib.util.find_spec("deepspeed") is None:
        raise SatfuseError(
            f"{where}: train.engine=deepspeed needs DeepSpeed, which is not installed in {sys.prefix}; "
            "install it with `pip install 'satfuse[deepspeed]'` (or use train.engine=ddp)"
        )


# --------------------------------------------------------------------------------------------
# satfuse configs / satfuse init
# --------------------------------------------------------------------------------------------


@dataclass
class Entry:
    """One listed config: its kind, name and the file a bare name resolves to here."""

    kind: str
    name: str
    path: Path
    source: str  # "project" (./hpc, from `satfuse init`) or "packaged"


def list_configs() -> list[Entry]:
    """Every config name with the file it resolves to from the working directory."""
    out = []
    for kind in KINDS:
        project = project_names(kind)
        for name, path in sorted(packaged_names(kind).items()):
            mine = project.get(name)
            out.append(Entry(kind, name, mine or path, "project" if mine else "packaged"))
        for name, path in sorted(project.items()):
            if name not in packaged_names(kind):
                out.append(Entry(kind, name, path, "project"))
    return out


def init_files() -> list[tuple[Path, Path]]:
    """(packaged source, relative target) of everything `satfuse init` copies."""
    root = packaged_root()
    pairs = []
    for folder in KINDS.values():
        for f in sorted((root / folder).iterdir()):
            if f.is_file() and f.suffix in (*CONFIG_SUFFIXES, ".md"):
                pairs.append((f, f.relative_to(root)))
    pairs += [(f, f.relative_to(root)) for f in template_files()]
    return pairs


def init_project(dest: Path, force: bool = False) -> list[Path]:
    """Copy the configs, cluster profiles and sbatch templates into `dest` (atomic writes).

    Nothing is written when any target exists and `force` is not set: a user's edited profile
    must never be replaced by a template unasked.
    """
    where = file_in_the_way(dest)
    if where:
        raise SatfuseError(f"{dest}: {where}, not a directory; nothing written. Pass a directory "
                           "to `satfuse init` (it is created if missing)")
    pairs = init_files()
    clashes = [dest / rel for _, rel in pairs if (dest / rel).exists()]
    if clashes and not force:
        shown = ", ".join(str(c) for c in clashes[:3]) + (f" and {len(clashes) - 3} more" if len(clashes) > 3 else "")
        raise SatfuseError(f"{dest}: {len(clashes)} file(s) exist ({shown}); nothing written. "
                           "Pass --force to overwrite them, or choose another directory")
    written = []
    for src, rel in pairs:
        target = dest / rel
        try:
            atomic_write_bytes(target, src.read_bytes())
        except (NotADirectoryError, IsADirectoryError, PermissionError) as exc:
            raise SatfuseError(f"{target}: cannot be written ({exc.strerror}); {len(written)} file(s) written before "
                               "it. Fix the directory (or choose another) and rerun with --force") from None
        if src.suffix == ".sbatch":
            target.chmod(0o755)
        written.append(target)
    return written


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("configs", help="list the packaged configs, profiles and templates (names for --config)",
                       description="Names usable as --config NAME, --cluster NAME and deepspeed.config=NAME, "
                       "and the file each resolves to from here (a project copy in ./hpc wins).")
    p.set_defaults(func=cmd_configs)
    p = sub.add_parser("init", help="write editable copies of the configs, cluster profiles and sbatch templates",
                       description="Copy hpc/{pretrain,finetune,deepspeed,clusters} and the slurm/ sbatch "
                       "templates into DIR; run satfuse from DIR and names pick these copies first.")
    p.add_argument("dir", type=Path, help="project directory (created if missing)")
    p.add_argument("--force", action="store_true", help="overwrite files that exist")
    p.set_defaults(func=cmd_init)


def cmd_configs(args: argparse.Namespace) -> int:
    entries, templates = list_configs(), template_files()
    width = max(len(n) for n in [*(e.name for e in entries), *(f.name for f in templates)])
    root = packaged_root()
    print(f"packaged with satfuse: {root}{'' if root.name == PACKAGED_DIR else ' (source checkout)'}")
    for kind in KINDS:
        flag = {"pretrain": "--config NAME", "finetune": "--config NAME", "deepspeed": "deepspeed.config=NAME",
                "clusters": "--cluster NAME"}[kind]
        print(f"\n{kind} ({flag}):")
        for e in (e for e in entries if e.kind == kind):
            print(f"  {e.name:<{width}}  {e.path}{'  (project copy)' if e.source == 'project' else ''}")
    print("\nsbatch templates:")
    for f in templates:
        print(f"  {f.name:<{width}}  {f}")
    return 0


def cmd_init(args: argparse.Namespace) -> int:
    dest: Path = args.dir
    written = init_project(dest, force=args.force)
    log.info("wrote %d files under %s", len(written), dest)
    profile = dest / KINDS["clusters"] / "example.yaml"
    print(f"""wrote {len(written)} editable files under {dest}/ (hpc/ configs, hpc/clusters/ profiles, slurm/ templates)

Edit first: {profile}
  partition   your GPU partition (checked with sinfo before submitting)
  account     your SLURM account (and qos, if your site uses one)
  env.SATFUSE_IFNAME   the network interface that connects the nodes (e.g. ib0; see `ip -br addr`)
  setup       the lines that load CUDA and activate the environment satfuse is installed in
Then, from {dest}: names pick your copies first (`satfuse configs` shows which file each name uses):
  satfuse submit pretrain --config dual_simclr --cluster example --dry-run""")
    return 0

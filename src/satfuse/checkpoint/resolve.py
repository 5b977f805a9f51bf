"""Which checkpoint the user meant: `checkpoint.resume` parsed once into a `ResumeSpec`, and
the forms of a path users type (a step directory, its `latest` pointer, `checkpoints/`, the
run directory) turned into a step directory. Torch-free: the config and the CLI use it.

`checkpoint.resume` takes:

- `none` (also empty or `false`): a fresh start;
- `auto`: the newest checkpoint of the run that verifies (broken ones skipped, named);
- `latest`: the one the run's `checkpoints/latest` pointer names, verified;
- a step: `step_00000100` or `100`, the run's `checkpoints/step_00000100`, verified;
- anything else: a path (`resolve_checkpoint` forms), verified; a run directory means its
  newest complete checkpoint, as `auto` does for this run.

Why one parser: the config check (`force_new_run` needs `none`), the run-dir claim, the
resume search and the "died before its first checkpoint" clean-up each compared lower-cased
strings of their own, with differing sets of words for "none".
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from satfuse.checkpoint.layout import (
    LATEST,
    META_NAME,
    STEP_RE,
    checkpoints_dir,
    latest_target,
    read_latest,
    step_name,
)
from satfuse.registry import CHECKPOINT_BACKENDS
from satfuse.run_layout import RunLayout
from satfuse.utils import SatfuseError

ResumeKind = Literal["none", "auto", "latest", "path", "step"]

_NONE_WORDS = ("none", "", "false")


@dataclass(frozen=True)
class ResumeSpec:
    """`checkpoint.resume`, typed: `kind` says how to find the checkpoint, `path` is set for
    kind "path", `step` for kind "step"; `text` is what the user wrote (for messages)."""

    kind: ResumeKind
    text: str = ""
    path: Path | None = None
    step: int | None = None

    def __str__(self) -> str:
        return self.text or self.kind


def parse_resume(value: str | Path | ResumeSpec | None) -> ResumeSpec:
    """The typed value of a `checkpoint.resume` setting (see the module doc)."""
    if isinstance(value, ResumeSpec):
        return value
    text = "none" if value is None else str(value).strip()
    word = text.lower()
    if word in _NONE_WORDS:
        return ResumeSpec("none", text)
    if word in ("auto", LATEST):
        return ResumeSpec(word, text)  # type: ignore[arg-type]  # the two words are kinds
    if text.isdigit():
        return ResumeSpec("step", text, step=int(text))
    match = STEP_RE.match(text)
    if match:
        return ResumeSpec("step", text, step=int(match.group(1)))
    return ResumeSpec("path", text, path=Path(text))


def run_checkpoint(spec: ResumeSpec, run_dir: Path) -> Path:
    """The run's step directory that a "latest" or "step" spec names (not yet verified)."""
    if spec.kind == LATEST:
        target = read_latest(run_dir)
        if target is None:
            raise SatfuseError(f"{checkpoints_dir(run_dir) / LATEST}: no `latest` pointer (no checkpoint "
                               "committed yet); use checkpoint.resume=auto or a step directory")
        return target
    if spec.kind == "step" and spec.step is not None:
        path = checkpoints_dir(run_dir) / step_name(spec.step)
        if not path.is_dir():
            raise SatfuseError(f"checkpoint.resume={spec}: {path} does not exist; list the run's "
                               f"checkpoints with `satfuse ckpt ls {run_dir}`")
        return path
    raise SatfuseError(f"checkpoint.resume={spec}: names no checkpoint of the run (kind {spec.kind})")


def is_run_dir(path: Path) -> bool:
    """A run directory (holds `checkpoints/`) rather than a step directory."""
    path = Path(path)
    return path.is_dir() and RunLayout(path).checkpoints.is_dir() and not (path / META_NAME).exists()


def resolve_checkpoint(path: Path) -> Path:
    """A step directory from what users type: the step dir itself, a `latest` pointer file,
    a `checkpoints/` dir or a run dir (both: where `latest` points). A directory a backend
    claims as its own (written without satfuse) is taken as it is."""
    path = Path(path)
    if path.is_file() and path.name == LATEST:
        return latest_target(path) or path
    if not path.is_dir() or (path / META_NAME).exists():
        return path
    if any(backend.claims(path) for _, backend in CHECKPOINT_BACKENDS.items()):
        return path
    for run_dir in (path, path.parent):
        target = read_latest(run_dir)
        if target is not None:
            return target
    return path

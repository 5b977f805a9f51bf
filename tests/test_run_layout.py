"""One owner for a run directory's layout: `satfuse.run_layout` names every file and folder a run
writes, and no other module spells those names (an AST scan: a name as a whole string constant
counts, the same word inside a message or docstring does not)."""

from __future__ import annotations

import ast
from pathlib import Path

from satfuse import run_layout
from satfuse.run_layout import RunLayout

SRC = Path(__file__).resolve().parents[1] / "src" / "satfuse"

RUN_NAMES = {run_layout.CHECKPOINTS, run_layout.CONFIG, run_layout.METRICS, run_layout.OVERRIDES,
             run_layout.TENSORBOARD, run_layout.RESULT, run_layout.JOBS_INDEX, run_layout.JOBS_LOCK,
             run_layout.SUBMIT_LOCK, run_layout.SUBMITIT}
# The same words meaning something else, by module.
OTHER_MEANING = {
    "engines/ds_keys.py": {"tensorboard"},  # a key of DeepSpeed's JSON config, not a folder
}


def spelled_names(source: str) -> list[tuple[int, str]]:
    return sorted((n.lineno, n.value) for n in ast.walk(ast.parse(source))
                  if isinstance(n, ast.Constant) and isinstance(n.value, str) and n.value in RUN_NAMES)


def test_run_dir_names_are_spelled_only_in_run_layout() -> None:
    planted = 'p = run_dir / "metrics.jsonl"\nmsg = f"see {run_dir}/checkpoints and config.yaml"\n'
    assert spelled_names(planted) == [(1, "metrics.jsonl")]
    strays = [f"{rel}:{line} {name!r}" for path in sorted(SRC.rglob("*.py"))
              if (rel := path.relative_to(SRC).as_posix()) != "run_layout.py"
              for line, name in spelled_names(path.read_text()) if name not in OTHER_MEANING.get(rel, set())]
    assert strays == [], "use satfuse.run_layout.RunLayout(run_dir) for these paths"


def test_layout_paths(tmp_path: Path) -> None:
    run = RunLayout(str(tmp_path))  # a str is taken as a path
    assert run.root == tmp_path and not any(tmp_path.iterdir())  # building one touches nothing
    assert (run.checkpoints, run.config, run.metrics, run.overrides, run.tensorboard, run.lease) == (
        tmp_path / "checkpoints", tmp_path / "config.yaml", tmp_path / "metrics.jsonl",
        tmp_path / "overrides.jsonl", tmp_path / "tensorboard", tmp_path / ".lock")
    assert (run.result, run.jobs_index, run.submitit) == (tmp_path / "result.json", tmp_path / "jobs.json",
                                                          tmp_path / "submitit")
    assert [p.name for p in run.pretrain_files] == ["checkpoints", "config.yaml", "metrics.jsonl", "overrides.jsonl"]
    assert run.previous("20261207T2300-2") == tmp_path / "previous-20261207T2300-2"
    assert run_layout.outcome_record(run.submitit, "12_3", 1) == tmp_path / "submitit" / "12_3_1_outcome.json"
    assert run_layout.restart_counter(run.submitit, "12") == tmp_path / "submitit" / ".restarts_12"

"""`satfuse ckpt export` takes what users type: a step dir, the run dir, checkpoints/ or latest."""

from __future__ import annotations

from pathlib import Path

from satfuse.checkpoint.export import resolve_checkpoint


def test_resolve_checkpoint_paths(tmp_path: Path) -> None:
    step = tmp_path / "run" / "checkpoints" / "step_00000007"
    step.mkdir(parents=True)
    (step / "meta.json").write_text("{}")
    (step.parent / "latest").write_text("step_00000007\n")
    assert resolve_checkpoint(step) == step
    assert resolve_checkpoint(tmp_path / "run") == step
    assert resolve_checkpoint(tmp_path / "run" / "checkpoints") == step
    assert resolve_checkpoint(step.parent / "latest") == step
    lone = tmp_path / "elsewhere"
    lone.mkdir()
    assert resolve_checkpoint(lone) == lone  # nothing to resolve: detect_kind reports it

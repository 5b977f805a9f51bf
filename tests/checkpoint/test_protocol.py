"""The commit protocol as a seam: the cadence, a backend built on its public API only, and
the structure rules of `satfuse.checkpoint` (no private names across modules, no cycle)."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest
from torch import nn

from satfuse.checkpoint.layout import checkpoint_problems, rank_file, read_latest, read_meta
from satfuse.checkpoint.manager import CheckpointManager
from satfuse.checkpoint.protocol import CommitProtocol, rank
from satfuse.checkpoint.resolve import parse_resume
from satfuse.checkpoint.state import ModelOptimState, write_rank_state
from satfuse.config import CheckpointConfig
from satfuse.utils import SatfuseError

SRC = Path(__file__).resolve().parents[2] / "src" / "satfuse"


class TextBackend(CommitProtocol):
    """A third backend in a few lines: one text file per rank, committed by the protocol."""

    kind = "text"

    def save(self, step: int, text: str) -> Path:
        staged = self.begin(step, {"epoch": 0}, {"w": [2]}, 2)
        (staged.tmp / f"part_{rank()}.txt").write_text(text)
        write_rank_state(staged.tmp / rank_file(rank()), {"step": step})  # every rank has one
        return self.finish(staged, None)


def test_a_backend_on_the_public_protocol_commits_resumes_and_prunes(tmp_path: Path) -> None:
    backend = TextBackend(tmp_path, keep_last=2)
    for step in (1, 2, 3):
        path = backend.save(step, f"step {step}")
    assert path.name == "step_00000003" and read_latest(tmp_path) == path
    assert read_meta(path)["kind"] == "text" and checkpoint_problems(path, checksums=True) == []
    assert sorted(p.name for p in backend.ckpt_dir.iterdir() if p.name.startswith("step_")) == [
        "step_00000002", "step_00000003"]
    fresh = TextBackend(tmp_path)
    assert fresh.find_resume("auto") == path and fresh.is_verified(path)
    (path / "part_0.txt").write_text("changed")  # same size, other crc32
    assert TextBackend(tmp_path).find_resume("auto").name == "step_00000002"
    with pytest.raises(SatfuseError, match="model mismatch .*shape changed: w"):
        fresh.check_model(path, read_meta(path), {"w": [3]})


def test_the_checkpointer_decides_the_cadence(tmp_path: Path) -> None:
    section = CheckpointConfig(every_steps=4, keep_last=1, keep_every=0)
    mgr = CheckpointManager.from_config(tmp_path, section, timeout_s=60)
    assert (mgr.keep_last, mgr.every_steps, mgr.timeout_s) == (1, 4, 60)
    assert [s for s in range(1, 11) if mgr.due(s)] == [4, 8]
    assert mgr.due(10, last_step=True)  # the last step of a run, also a stopped one
    mgr.save(8, {"model": ModelOptimState(nn.Linear(2, 2))}, {"step": 8}, {})
    assert not mgr.due(8) and not mgr.due(8, last_step=True)  # just saved: not twice
    assert CheckpointManager(tmp_path).due(8, last_step=True)  # a resumed run re-saves at the end
    assert not CheckpointManager(tmp_path, every_steps=0).due(4)


def _imports(path: Path) -> list[ast.ImportFrom]:
    return [n for n in ast.walk(ast.parse(path.read_text())) if isinstance(n, ast.ImportFrom)]


def test_no_private_name_of_one_module_is_used_by_another() -> None:
    files = [*sorted((SRC / "checkpoint").glob("*.py")), SRC / "engines" / "deepspeed_engine.py",
             SRC / "engines" / "ddp.py", SRC / "engines" / "trainer.py"]
    used = [f"{f.relative_to(SRC)}: {node.module}.{alias.name}" for f in files for node in _imports(f)
            if (node.module or "").startswith("satfuse") for alias in node.names
            if alias.name.startswith("_")]
    assert used == []


def test_checkpoint_modules_import_each_other_without_a_cycle() -> None:
    graph: dict[str, set[str]] = {}
    for f in (SRC / "checkpoint").glob("*.py"):
        deps = {n.module.rsplit(".", 1)[-1] for n in _imports(f)
                if (n.module or "").startswith("satfuse.checkpoint.")}
        deps |= {a.name for n in _imports(f) if n.module == "satfuse.checkpoint" for a in n.names}
        graph[f.stem] = deps - {f.stem}

    def reaches(start: str, node: str, seen: set[str]) -> bool:
        for dep in graph.get(node, ()):
            if dep == start or (dep not in seen and reaches(start, dep, seen | {dep})):
                return True
        return False

    assert [m for m in graph if reaches(m, m, {m})] == []


def test_the_protocol_names_no_backend_file_and_resume_is_parsed_once() -> None:
    """The seam: the protocol's modules name no backend's files or kinds (backends report
    theirs), and `checkpoint.resume` has one parser that every reader uses."""
    for name in ("protocol.py", "layout.py", "resolve.py", "backend.py"):
        text = (SRC / "checkpoint" / name).read_text()
        leaks = [w for w in (".distcp", "DCP_METADATA", '".metadata"', "model_states", "zero_pp_rank",
                             '"dcp"', '"deepspeed"') if w in text and not (name == "layout.py" and w == '"dcp"')]
        assert leaks == [], name  # layout's LEGACY_KIND (meta.json without a kind) is the one "dcp"
    values = ["auto", " None ", "", "false", "latest", "step_00000100", "100", "runs/a/checkpoints/step_00000100", None]
    assert [parse_resume(v).kind for v in values] == [
        "auto", "none", "none", "none", "latest", "step", "step", "path", "none"]
    assert parse_resume("step_00000100").step == 100 == parse_resume("100").step
    assert parse_resume("runs/a").path == Path("runs/a") and CheckpointConfig(resume="False").resume_spec.kind == "none"
    for reader in (SRC / "engines" / "trainer.py", SRC / "config.py", SRC / "engines" / "commands.py"):
        assert "resume).strip()" not in reader.read_text() and '.strip() != "none"' not in reader.read_text()

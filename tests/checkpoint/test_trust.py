"""What satfuse trusts: a checkpoint file that is not plain data never runs code unless the
user passed --trust-checkpoint (resume, `ckpt inspect`, `ckpt export`, `finetune`), and
`pipe:` shard URLs are never taken from a checkpoint's recorded config.

The crafted object's `__reduce__` opens a marker file for writing: if anything unpickles it,
the marker appears.
"""

from __future__ import annotations

import argparse
import io
import json
import logging
import pickle
import shutil
from pathlib import Path

import pytest
import torch

from satfuse.checkpoint import commands
from satfuse.checkpoint.dcp_storage import DCP_METADATA
from satfuse.checkpoint.layout import META_NAME
from satfuse.checkpoint.state import load_rank_state
from satfuse.checkpoint.trust import TRUST_FLAG, read_dcp_metadata
from satfuse.evaluation.pretrained import load_pretrained
from satfuse.utils import SatfuseError
from tests.checkpoint.planted import Planted, rerecord
from tests.engines.ranks import logs, run_ranks

STEP = "checkpoints/step_00000004"


def plant_rank_file(ckpt: Path, marker: Path) -> None:
    state = torch.load(ckpt / "rank_00000.pt", weights_only=True)
    state["extra"] = Planted(marker)
    torch.save(state, ckpt / "rank_00000.pt")
    rerecord(ckpt, "rank_00000.pt")


def plant_metadata(ckpt: Path, marker: Path) -> None:
    with open(ckpt / DCP_METADATA, "rb") as fh:
        md = pickle.load(fh)  # noqa: S301 - our own test file
    md.planner_data = {"extra": Planted(marker)}
    (ckpt / DCP_METADATA).write_bytes(pickle.dumps(md))
    rerecord(ckpt, DCP_METADATA)


@pytest.fixture(scope="module")
def run(sen12ms_shards: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A 4-step, 1-rank DDP run with checkpoints at steps 2 and 4."""
    base = tmp_path_factory.mktemp("trust")
    codes = run_ranks(1, [f"data.shards={sen12ms_shards}", f"train.run_dir={base / 'run'}", "train.steps=4",
                          "checkpoint.every_steps=2", "train.log_every=1"], base)
    assert codes == [0], logs(base)
    return base / "run"


@pytest.fixture()
def crafted(run: Path, tmp_path: Path) -> tuple[Path, Path]:
    """(a copy of the run whose step-4 rank file holds a Planted object, its marker path)."""
    dst = tmp_path / "run"
    shutil.copytree(run, dst)
    marker = tmp_path / "MARKER"
    plant_rank_file(dst / STEP, marker)
    return dst, marker


def ckpt_cli(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="satfuse")
    commands.register(parser.add_subparsers(dest="command"))
    args = parser.parse_args(["ckpt", *map(str, argv)])
    return args.func(args)


def test_rank_state_of_a_real_run_loads_weights_only(run: Path) -> None:
    """What satfuse writes is plain data: nothing to trust for its own files."""
    state = load_rank_state(run / STEP / "rank_00000.pt")
    assert state["step"] == 4 and set(state) >= {"loader", "rng", "engine"}
    assert read_dcp_metadata(run / STEP / DCP_METADATA).state_dict_metadata


def test_resume_refuses_a_crafted_rank_file_and_trust_lifts_it(
        crafted: tuple[Path, Path], sen12ms_shards: Path, tmp_path: Path) -> None:
    run_dir, marker = crafted
    # the recorded config carries a shell command: resume must never run it
    pipe_marker = tmp_path / "PIPE_MARKER"
    meta = json.loads((run_dir / STEP / META_NAME).read_text())
    meta["config"]["data"]["shards"] = f"pipe:touch {pipe_marker}"
    (run_dir / STEP / META_NAME).write_text(json.dumps(meta))
    base = [f"data.shards={sen12ms_shards}", f"train.run_dir={run_dir}", "train.steps=6",
            "checkpoint.every_steps=2", "train.log_every=1"]
    (tmp_path / "refused").mkdir()
    assert run_ranks(1, base, tmp_path / "refused") == [2]
    text = logs(tmp_path / "refused")
    assert f"{run_dir / STEP / 'rank_00000.pt'}: refused: it holds Python objects" in text
    assert TRUST_FLAG in text and "checkpoint.trust_checkpoint=true" in text
    assert not marker.exists()
    (tmp_path / "trusted").mkdir()
    assert run_ranks(1, [*base, TRUST_FLAG], tmp_path / "trusted") == [0], logs(tmp_path / "trusted")
    assert marker.exists()  # knowingly: the user said they trust it
    text = logs(tmp_path / "trusted")
    assert "loading with full unpickling because of --trust-checkpoint" in text
    assert f"resumed from {run_dir / STEP} at step 4" in text
    assert not pipe_marker.exists()


def test_inspect_refuses_a_crafted_rank_file(crafted: tuple[Path, Path],
                                             capsys: pytest.CaptureFixture[str]) -> None:
    run_dir, marker = crafted
    assert ckpt_cli(["inspect", run_dir / STEP]) == 1
    rep = json.loads(capsys.readouterr().out)
    assert not rep["complete"] and rep["ranks"] == []
    assert any(p.startswith(f"{run_dir / STEP / 'rank_00000.pt'}: refused") for p in rep["problems"])
    assert not marker.exists()
    assert ckpt_cli(["inspect", run_dir / STEP, TRUST_FLAG]) == 0
    rep = json.loads(capsys.readouterr().out)
    assert rep["complete"] and rep["ranks"][0]["step"] == 4
    assert marker.exists()


def test_export_refuses_a_crafted_rank_file(crafted: tuple[Path, Path], tmp_path: Path) -> None:
    run_dir, marker = crafted
    out = tmp_path / "backbones.pt"
    with pytest.raises(SatfuseError, match=r"rank_00000.pt: refused: .*--trust-checkpoint"):
        ckpt_cli(["export", run_dir / STEP, "--out", out])
    assert not marker.exists() and not out.exists()
    assert ckpt_cli(["export", run_dir / STEP, "--out", out, TRUST_FLAG]) == 0
    assert marker.exists() and out.is_file()


def test_finetune_refuses_a_crafted_checkpoint_dir(crafted: tuple[Path, Path]) -> None:
    run_dir, marker = crafted
    with pytest.raises(SatfuseError, match=r"rank_00000.pt: refused: .*--trust-checkpoint"):
        load_pretrained(run_dir / STEP)
    assert not marker.exists()
    pre = load_pretrained(run_dir / STEP, trust=True)
    assert pre.step == 4 and marker.exists()


def test_finetune_cli_flag_reaches_the_config() -> None:
    from satfuse.evaluation import commands as ev

    parser = argparse.ArgumentParser()
    ev.register(parser.add_subparsers(dest="command"))
    args = ev._reparse(parser.parse_args(["finetune", "--checkpoint", "x", TRUST_FLAG]))
    assert ev.finetune_config_from_args(args, []).model.trust_checkpoint is True


def test_crafted_dcp_metadata_is_refused_by_resume_and_export(run: Path, tmp_path: Path) -> None:
    from satfuse.checkpoint.export import export_backbones
    from satfuse.checkpoint.manager import CheckpointManager
    from satfuse.checkpoint.state import ModelOptimState
    from satfuse.config import ModelConfig
    from satfuse.models import build_pretrain_model

    dst = tmp_path / "run"
    shutil.copytree(run, dst)
    marker = tmp_path / "MARKER"
    plant_metadata(dst / STEP, marker)
    with pytest.raises(SatfuseError, match=r"\.metadata: refused: .*GLOBAL io.open"):
        export_backbones(dst / STEP, tmp_path / "b.pt")
    model = build_pretrain_model(ModelConfig(backbone="tiny", proj_hidden=64, proj_out=32))
    with pytest.raises(SatfuseError, match=r"\.metadata: refused"):
        CheckpointManager(dst).load(dst / STEP, {"model_optim": ModelOptimState(model)})
    assert not marker.exists()
    assert export_backbones(dst / STEP, tmp_path / "b.pt", trust=True)["step"] == 4
    assert marker.exists()


def test_foreign_checkpoint_dir_is_warned_about(run: Path, monkeypatch: pytest.MonkeyPatch,
                                                caplog: pytest.LogCaptureFixture) -> None:
    import os

    with caplog.at_level(logging.WARNING):
        load_pretrained(run / STEP)
    assert "another user" not in caplog.text
    monkeypatch.setattr(os, "geteuid", lambda: os.stat(run / STEP).st_uid + 1)
    with caplog.at_level(logging.WARNING):
        load_pretrained(run / STEP)
    assert f"{run / STEP}: a checkpoint directory of another user" in caplog.text
    assert "satfuse ckpt export" in caplog.text


def test_pipe_commands_are_shown_before_they_run(caplog: pytest.LogCaptureFixture) -> None:
    from satfuse.config import PretrainConfig, load_config
    from satfuse.engines.pretrain import show_shell_commands

    cfg = load_config(PretrainConfig, None, ["data.shards=pipe:cat a.tar,pipe:cat b.tar"])
    with caplog.at_level(logging.WARNING):
        cmds = show_shell_commands(cfg, "the command line")
    assert cmds == ["pipe:cat a.tar", "pipe:cat b.tar"]
    assert "from the command line run 2 shell command(s): cat a.tar; cat b.tar" in caplog.text


def test_crafted_rank_file_unit(tmp_path: Path) -> None:
    """The refusal without any run: a rank file with a pickled object, via the manager's loader."""
    marker = tmp_path / "M"
    buf = io.BytesIO()
    torch.save({"step": 1, "x": Planted(marker)}, buf)
    (tmp_path / "rank_00000.pt").write_bytes(buf.getvalue())
    with pytest.raises(SatfuseError, match=r"rank_00000.pt: refused: it holds Python objects, not only tensors and containers \(GLOBAL io.open\)"):
        load_rank_state(tmp_path / "rank_00000.pt")
    assert not marker.exists()


def _load_into_fresh_model(run: Path) -> dict:
    from satfuse.checkpoint.manager import CheckpointManager
    from satfuse.checkpoint.state import ModelOptimState
    from satfuse.config import ModelConfig
    from satfuse.models import build_pretrain_model

    model = build_pretrain_model(ModelConfig(backbone="tiny", proj_hidden=64, proj_out=32))
    CheckpointManager(run).load(run / STEP, {"model_optim": ModelOptimState(model)})
    return model.state_dict()


@pytest.mark.filterwarnings("ignore:torch.distributed is disabled")  # the stock reader's one-process load
def test_a_real_trainer_checkpoint_loads_through_the_fast_reader_alone(
        run: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture) -> None:
    """The fast reader's fallback takes RuntimeError: everything `satfuse pretrain` writes (model,
    BatchNorm counters, AdamW moments and step counts) must still be read without it, with the
    same values DCP's own reader gives."""
    import torch.distributed.checkpoint as dcp

    from satfuse.checkpoint import dcp_storage
    from satfuse.checkpoint.manager import CheckpointManager
    from satfuse.checkpoint.state import ModelOptimState
    from satfuse.config import PretrainConfig, load_config
    from satfuse.engines.optim import build_optimizer
    from satfuse.models import build_pretrain_model

    cfg = load_config(PretrainConfig, run / "config.yaml")

    def fresh() -> ModelOptimState:
        model = build_pretrain_model(cfg.model)
        return ModelOptimState(model, build_optimizer(model, cfg.optim))

    fast, stock = fresh(), fresh()
    with monkeypatch.context() as mp, caplog.at_level(logging.WARNING, logger="satfuse.checkpoint.dcp_storage"):
        mp.setattr(dcp_storage.SafeFileSystemReader, "read_data",
                   lambda *a: pytest.fail("the fast reader fell back to DCP's reader"))
        CheckpointManager(run).load(run / STEP, {"model_optim": fast})
    assert "fast read not possible" not in caplog.text
    dcp.load({"model_optim": stock}, storage_reader=dcp_storage.SafeFileSystemReader(run / STEP), no_dist=True)
    got, want = fast.state_dict(), stock.state_dict()
    assert got["optim"]["state"] and any(torch.is_tensor(v) and v.dim() == 0
                                         for st in got["optim"]["state"].values() for v in st.values())
    flat_got, flat_want = dict(_leaves(got)), dict(_leaves(want))
    assert flat_got.keys() == flat_want.keys()
    for key, value in flat_want.items():
        assert torch.equal(flat_got[key], value) if torch.is_tensor(value) else flat_got[key] == value, key


def _leaves(node: object, path: str = ""):
    if isinstance(node, dict):
        for k, v in node.items():
            yield from _leaves(v, f"{path}.{k}")
    elif isinstance(node, (list, tuple)):
        for i, v in enumerate(node):
            yield from _leaves(v, f"{path}[{i}]")
    else:
        yield path, node


def test_fast_reader_falls_back_on_parse_errors_only_and_says_so(
        run: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture) -> None:
    """A file the mmap reader cannot parse goes to DCP's own reader with a warning naming it
    (same weights); any other exception is a bug and propagates."""
    from satfuse.checkpoint import dcp_storage

    expected = _load_into_fresh_model(run)

    def unparsable(self, storage, view, item):
        raise ValueError("an item layout this parser does not know")

    monkeypatch.setattr(dcp_storage.MmapReader, "_item_tensor", unparsable)
    with caplog.at_level(logging.WARNING, logger="satfuse.checkpoint.dcp_storage"):
        got = _load_into_fresh_model(run)
    assert "fast read not possible (ValueError: an item layout this parser does not know), " \
           "reading it with DCP's reader" in caplog.text
    assert all(torch.equal(got[k], expected[k]) for k in expected)

    def bug(self, storage, view, item):
        raise KeyError("a bug")

    monkeypatch.setattr(dcp_storage.MmapReader, "_item_tensor", bug)
    with pytest.raises(SatfuseError, match="loading the checkpoint failed") as info:
        _load_into_fresh_model(run)
    failures = repr(info.value.__cause__.failures)  # DCP's per-rank errors: the bug itself
    assert "KeyError('a bug')" in failures and "BufferError" not in failures

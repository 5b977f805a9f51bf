"""A DeepSpeed checkpoint resumed with train.engine=ddp: one line naming the engine that wrote
it, not DCP's FileNotFoundError tracebacks followed by a wrong "different model config"."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.engines.ranks import logs, run_ranks

pytestmark = pytest.mark.deepspeed


def test_deepspeed_checkpoint_resumed_by_ddp_names_the_engine(sen12ms_shards: Path, tmp_path: Path) -> None:
    run = tmp_path / "run"
    (tmp_path / "ds").mkdir()
    (tmp_path / "ddp").mkdir()
    common = [f"data.shards={sen12ms_shards}", f"train.run_dir={run}", "checkpoint.every_steps=2"]
    assert run_ranks(1, [*common, "train.steps=2"], tmp_path / "ds",
                     config="hpc/pretrain/tiny_deepspeed.yaml") == [0], logs(tmp_path / "ds")
    codes = run_ranks(1, [*common, "train.steps=4", "train.engine=ddp"], tmp_path / "ddp",
                      config="hpc/pretrain/tiny.yaml")
    text = logs(tmp_path / "ddp")
    assert codes != [0]
    assert "step_00000002: written by the deepspeed engine, not DDP; resume it with train.engine=deepspeed" in text
    assert "FileNotFoundError" not in text and "Traceback" not in text and "different model config" not in text

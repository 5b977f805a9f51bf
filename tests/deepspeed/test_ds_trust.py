"""DeepSpeed's own files are read weights-only (its inert classes allowed): a crafted file in
a DeepSpeed checkpoint from outside the run dir is refused by resume and export, naming it;
--trust-checkpoint lifts the refusal knowingly. (The run's own checkpoints, read the same
weights-only way, resume in test_ds_train.py's kill-and-resume and world-size tests.)"""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch

from satfuse.checkpoint.export import export_backbones
from satfuse.checkpoint.trust import TRUST_FLAG
from satfuse.utils import SatfuseError
from tests.checkpoint.planted import Planted, rerecord
from tests.engines.ranks import logs, run_ranks

pytestmark = pytest.mark.deepspeed

CONFIG = "hpc/pretrain/tiny_deepspeed.yaml"
STEP = "checkpoints/step_00000004"


def overrides(shards: Path, run: Path, steps: int, *extra: str) -> list[str]:
    return [f"data.shards={shards}", f"train.run_dir={run}", f"train.steps={steps}",
            "checkpoint.every_steps=2", "train.log_every=1", *extra]


@pytest.fixture(scope="module")
def ds_run(sen12ms_shards: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A 4-step, 1-rank ZeRO-1 run: its optimizer file holds DeepSpeed's own classes."""
    base = tmp_path_factory.mktemp("ds_trust")
    assert run_ranks(1, overrides(sen12ms_shards, base / "run", 4), base, config=CONFIG) == [0], logs(base)
    return base / "run"


def plant(src: Path, dst: Path, name: str, marker: Path) -> Path:
    shutil.copytree(src, dst)
    state = torch.load(dst / name, weights_only=False)
    state["extra"] = Planted(marker)
    torch.save(state, dst / name)
    rerecord(dst, name)
    return dst


def test_crafted_deepspeed_checkpoint_from_outside_is_refused(ds_run: Path, sen12ms_shards: Path,
                                                              tmp_path: Path) -> None:
    marker = tmp_path / "MARKER"
    foreign = plant(ds_run / STEP, tmp_path / "download" / "step_00000004", "mp_rank_00_model_states.pt", marker)
    base = overrides(sen12ms_shards, tmp_path / "mine", 6, f"checkpoint.resume={foreign}")
    (tmp_path / "refused").mkdir()
    assert run_ranks(1, base, tmp_path / "refused", config=CONFIG) == [2]
    text = logs(tmp_path / "refused")
    assert f"{foreign / 'mp_rank_00_model_states.pt'}: refused: it holds Python objects" in text
    assert TRUST_FLAG in text and not marker.exists()
    (tmp_path / "trusted").mkdir()
    assert run_ranks(1, [*base, TRUST_FLAG], tmp_path / "trusted", config=CONFIG) == [0], logs(tmp_path / "trusted")
    assert marker.exists()
    assert f"resumed from {foreign} at step 4" in logs(tmp_path / "trusted")


def test_crafted_deepspeed_optimizer_file_is_refused_by_export(ds_run: Path, tmp_path: Path) -> None:
    marker = tmp_path / "MARKER"
    name = "zero_pp_rank_0_mp_rank_00_optim_states.pt"
    ckpt = plant(ds_run / STEP, tmp_path / "step_00000004", name, marker)
    out = tmp_path / "b.pt"
    with pytest.raises(SatfuseError, match=rf"{name}: refused: .*builtins.open|{name}: refused: .*io.open"):
        export_backbones(ckpt, out)
    assert not marker.exists() and not out.exists()
    export_backbones(ckpt, out, trust=True)
    assert marker.exists() and out.is_file()

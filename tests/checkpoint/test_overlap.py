"""Verifying crc32s while loading (`find_resume("auto", checksums=False)` + `load`): an intact
checkpoint loads as before; a damaged one is never used: every rank falls back to the newest
intact checkpoint together, also when the damaged file is in another rank's share.

Damage is applied to a private copy of the 2-rank reference run (steps 16, 20, 24).
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest
import torch

from satfuse.checkpoint.manager import CheckpointManager
from satfuse.checkpoint.state import ModelOptimState
from satfuse.utils import SatfuseError
from tests.checkpoint import launch
from tests.checkpoint.test_bad_input import STEP24, flip_bytes
from tests.checkpoint.toy_train import ToyModel, compare, dump_state

STEP20 = "checkpoints/step_00000020"


def toy_state(run: Path, step_dir: str | None, defer: bool) -> tuple[dict, CheckpointManager, Path]:
    """(dumped model+optimizer state, manager, loaded path) after one load in this process."""
    model = ToyModel()
    opt = torch.optim.AdamW(model.parameters(), lr=0.05, weight_decay=0.01)
    mgr = CheckpointManager(run)
    path = mgr.find_resume("auto", checksums=not defer) if step_dir is None else run / step_dir
    mgr.load(path, {"model_optim": ModelOptimState(model, opt)})
    return dump_state(model, opt), mgr, path


def distcp_files(run: Path) -> list[Path]:
    """Step 24's DCP data files, largest first (the order the verifier deals them to ranks)."""
    return sorted((run / STEP24).glob("__*_*.distcp"), key=lambda p: (-p.stat().st_size, p.name))


def test_intact_checkpoint_loads_the_same_state_and_counts_as_verified(ref_copy: Path) -> None:
    want, _, _ = toy_state(ref_copy, STEP24, defer=False)
    got, mgr, path = toy_state(ref_copy, None, defer=True)
    assert path.name == "step_00000024" and mgr.loaded_path == path
    assert mgr.is_verified(path) and not mgr.is_deferred(path)
    assert compare(want, got) == []


@pytest.mark.parametrize("target", ["tensor", "metadata"])
def test_damage_found_while_loading_falls_back_to_the_previous_checkpoint(
        target: str, ref_copy: Path, caplog: pytest.LogCaptureFixture) -> None:
    want, _, _ = toy_state(ref_copy, STEP20, defer=False)
    if target == "tensor":  # loads without an error: only the crc32 tells
        flip_bytes(distcp_files(ref_copy)[0], offset=4000)
    else:  # DCP's .metadata: the load itself fails, the crc32 says why
        flip_bytes(ref_copy / STEP24 / ".metadata", offset=50)
    with caplog.at_level(logging.WARNING):
        got, mgr, path = toy_state(ref_copy, None, defer=True)
    assert path.name == "step_00000024"  # chosen without crc32s ...
    assert mgr.loaded_path is not None and mgr.loaded_path.name == "step_00000020"  # ... not used
    assert compare(want, got) == []
    assert "step_00000024 is damaged" in caplog.text and "corrupted" in caplog.text
    assert not mgr.is_verified(path)


def test_damaged_and_nothing_to_fall_back_to_is_an_error(ref_copy: Path) -> None:
    for step in (16, 20):
        (ref_copy / f"checkpoints/step_{step:08d}/rank_00000.pt").unlink()
    flip_bytes(distcp_files(ref_copy)[0], offset=4000)
    with pytest.raises(SatfuseError, match="no complete checkpoint"):
        toy_state(ref_copy, None, defer=True)


def test_two_ranks_fall_back_together_when_the_other_ranks_share_is_damaged(ref_copy: Path, tmp_path: Path) -> None:
    want, _, _ = toy_state(ref_copy, STEP20, defer=False)
    ref_state = tmp_path / "at20.pt"
    torch.save(want, ref_state)
    flip_bytes(distcp_files(ref_copy)[1], offset=4000)  # dealt to rank 1's verifier, not rank 0's
    codes = launch.run(2, ["--run-dir", ref_copy, "--steps", 20, "--defer-checksums",
                           "--check-after-load", ref_state], tmp_path / "logs")
    assert codes == [0, 0], launch.logs(tmp_path / "logs")
    for r in range(2):
        verdict = json.loads(Path(f"{ref_state}.rank{r}.json").read_text())
        assert verdict["loaded"] == "step_00000020" and verdict["step"] == 20, (r, verdict)
        assert verdict["bad"] == [], f"rank {r}: state differs from step 20's"
    assert "step_00000024 is damaged" in launch.logs(tmp_path / "logs")


def test_checkpoint_crc32_is_isal_and_equals_zlib() -> None:
    import zlib

    from satfuse.checkpoint import layout

    assert layout.crc32.__module__.startswith("isal")  # the fast one is installed (pyproject)
    data = bytes(range(256)) * 4099
    assert layout.crc32(data) == zlib.crc32(data)
    assert layout.crc32(data[1000:], layout.crc32(data[:1000])) == zlib.crc32(data)  # streaming, as on save

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
    assert resolve_checkpoint(lone) == lone  # nothing to resolve: backend_of reports it


def test_export_never_replaces_a_file_unasked_nor_writes_among_checkpoints(tmp_path: Path) -> None:
    """`ckpt export --out`: an existing file (or the normalisation JSON beside it) is kept
    unless --overwrite; a path inside checkpoints/ (e.g. the step's own __0_0.distcp) is
    refused even with --overwrite; a `latest` leading out of the run is not followed."""
    import os
    import shutil

    import pytest
    import torch

    from satfuse.checkpoint.formats import export
    from satfuse.checkpoint.manager import CheckpointManager
    from satfuse.checkpoint.state import ModelOptimState
    from satfuse.cli import main
    from satfuse.config import ModelConfig, PretrainConfig, to_dict
    from satfuse.models import build_pretrain_model
    from satfuse.utils import SatfuseError

    cfg = PretrainConfig(model=ModelConfig(backbone="tiny", proj_hidden=32, proj_out=16))
    step = CheckpointManager(tmp_path / "run").save(
        7, {"model_optim": ModelOptimState(build_pretrain_model(cfg.model))}, {}, {"config": to_dict(cfg)})
    run = tmp_path / "run"
    out = tmp_path / "b.pt"
    assert main(["ckpt", "export", str(run), "--out", str(out)]) == 0
    out.write_bytes(b"mine")
    assert main(["ckpt", "export", str(run), "--out", str(out)]) == 2
    assert out.read_bytes() == b"mine"
    with pytest.raises(SatfuseError, match=r"b\.pt: exists; pass --overwrite to replace it, or another --out"):
        export(run, out)
    assert main(["ckpt", "export", str(run), "--out", str(out), "--overwrite"]) == 0
    assert torch.load(out, weights_only=True)["step"] == 7
    # the normalisation JSON written beside torchvision/safetensors weights is kept too
    (tmp_path / "w.normalization.json").write_text("{}")
    assert main(["ckpt", "export", str(run), "--out", str(tmp_path / "w.pt"), "--format", "torchvision"]) == 2
    assert (tmp_path / "w.normalization.json").read_text() == "{}" and not (tmp_path / "w.pt").exists()
    # inside the checkpoint being read, or beside it in checkpoints/: never, --overwrite or not
    shard = step / "__0_0.distcp"
    before = shard.read_bytes()
    for target in (shard, run / "checkpoints" / "backbone.pt"):
        assert main(["ckpt", "export", str(run), "--out", str(target), "--overwrite"]) == 2
    assert shard.read_bytes() == before and not (run / "checkpoints" / "backbone.pt").exists()
    # `latest` pointing out of the run: refused, not followed
    other = tmp_path / "other" / "checkpoints"
    shutil.copytree(run / "checkpoints", other)
    ptr = run / "checkpoints" / "latest"
    for name in (f"../../other/checkpoints/{step.name}", str(other / step.name)):
        ptr.write_text(name + "\n")
        with pytest.raises(SatfuseError, match=r"latest: names .*, not a step_XXXXXXXX directory in .*fix or delete it"):
            resolve_checkpoint(run)
        with pytest.raises(SatfuseError, match="not a step_XXXXXXXX directory"):
            resolve_checkpoint(ptr)
    os.symlink(other / step.name, run / "checkpoints" / "step_00000009")
    ptr.write_text("step_00000009\n")
    assert main(["ckpt", "export", str(run), "--out", str(tmp_path / "c.pt")]) == 2
    assert not (tmp_path / "c.pt").exists()

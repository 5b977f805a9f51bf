"""The backbone and benchmark seams are open (issue 26 item 2): a toy backbone and a toy
benchmark registered in tests/extensions/toy_models.py, with no edit under src/, run through
the real entry points: `satfuse pretrain` (2 ranks, 2 steps, crop 16) with the toy backbone,
then `satfuse finetune` of that checkpoint with the toy backbone on the toy benchmark, then the
export refusing a torchvision file for a backbone that declares none."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from tests.evaluation.helpers import write_dfc_shards

ROOT = Path(__file__).resolve().parents[2]


def _satfuse(args: list[str], env: dict[str, str]) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "satfuse.cli", *args], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=600)


def test_toy_backbone_pretrains_on_two_ranks_and_finetunes_on_the_toy_benchmark(sen12ms_shards, tmp_path):
    env = {**os.environ, "SATFUSE_PLUGINS": "tests.extensions.toy_models", "OMP_NUM_THREADS": "1",
           "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    run = tmp_path / "pre"
    pre = _satfuse(["pretrain", "--config", str(ROOT / "hpc/pretrain/tiny.yaml"), "--nproc-per-node", "2",
                    f"data.shards={sen12ms_shards}", f"train.run_dir={run}", "train.steps=2", "data.crop=16",
                    "model.backbone=toy_net", "train.log_every=1", "checkpoint.every_steps=0"], env)
    assert pre.returncode == 0, pre.stdout[-3000:] + pre.stderr[-3000:]
    ckpt = run / "checkpoints" / (run / "checkpoints" / "latest").read_text().strip()
    meta = json.loads((ckpt / "meta.json").read_text())
    assert meta["step"] == 2 and meta["config"]["model"]["backbone"] == "toy_net"
    shapes = meta["model"]["fingerprint"]
    # the toy's own parameters, with the toy's shapes (2 S1 bands, 13 S2 bands), and no ResNet's
    assert list(shapes["backbone_s1.toy_stem.weight"]) == [12, 2, 3, 3]
    assert list(shapes["backbone_s2.toy_stem.weight"]) == [12, 13, 3, 3]
    assert list(shapes["head_s1.net.0.weight"])[1] == 24  # the head sized by the toy's out_dim
    assert not any("conv1" in k or "layer1" in k for k in shapes)

    root = tmp_path / "dfc"
    train = write_dfc_shards(root / "train", 32, 32, seed=1)
    test = write_dfc_shards(root / "test", 16, 32, seed=2, roi="ROIs0000_test")
    ft_dir = tmp_path / "ft"
    ft = _satfuse(["finetune", "--checkpoint", str(ckpt), "--backbone", "toy_net", "--benchmark", "toy_water",
                   "--train-shards", str(train), "--test-shards", str(test), "--epochs", "1",
                   "--run-dir", str(ft_dir), "data.crop=16", "data.batch_size=8", "train.device=cpu"], env)
    assert ft.returncode == 0, ft.stdout[-3000:] + ft.stderr[-3000:]
    result = json.loads((ft_dir / "result.json").read_text())
    assert result["benchmark"]["name"] == "toy_water" and result["config"]["data"]["benchmark"] == "toy_water"
    assert result["benchmark"]["metrics"] == {"single": "oa"}
    assert result["per_class"]["names"] == ["water", "land"]  # the toy's classes scored the test split
    assert 0.0 <= result["metrics"]["oa"] <= 1.0 and result["checkpoint"]["method"] == "dual_simclr"
    assert result["checkpoint"]["step"] == 2  # the pretrained toy weights were loaded, not a fresh net
    # two toy trunks (S1: 2 bands, S2: 13) and a 2-way linear head on their 48 pooled features
    trunk = lambda c: 12 * c * 9 + 12 + 24 * 12 * 9 + 24  # noqa: E731
    assert result["n_params"] == trunk(2) + trunk(13) + 48 * 2 + 2

    exp = _satfuse(["ckpt", "export", str(ckpt), "--format", "torchvision", "--out", str(tmp_path / "t.pt")], env)
    assert exp.returncode != 0 and "'toy_net' has no torchvision counterpart (only resnet18, resnet50 do)" in exp.stderr

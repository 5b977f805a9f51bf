"""DFC2020 land-cover segmentation (`dfc2020-seg`): metrics, decoders, the run, the report, bad input.

Runs use the small pyramid backbone of `seg_toy` (strides 2/4/8) on the shared 32 px DFC
fixtures, a few epochs each.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from satfuse.config import from_dict
from satfuse.evaluation.curves import make_full_report
from satfuse.evaluation.finetune import FinetuneConfig, run_finetune
from satfuse.evaluation.seg_metrics import confusion, seg_metrics
from satfuse.evaluation.targets import IGNORE
from satfuse.models.decoders import UNetDecoder, UPerNetDecoder, decoder_for
from satfuse.registry import DECODERS
from satfuse.utils import SatfuseError
from tests.evaluation import seg_toy

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(autouse=True, scope="module")
def _toy_backbones():
    """seg_toy / seg_flat are registered while this module's tests run, and only then."""
    with seg_toy.registered():
        yield


def _cfg(shards: dict[str, Path], run_dir: Path, **over) -> FinetuneConfig:
    raw = {"data": {"benchmark": "dfc2020-seg", "train_shards": str(shards["train"]),
                    "test_shards": str(shards["test"]), "crop": 32, "batch_size": 16},
           "model": {"backbone": "seg_toy", "modalities": "s1s2"},
           "train": {"task": "seg", "epochs": 10, "lr": 1e-2, "backbone_lr": 1e-2, "device": "cpu", "patience": 0,
                     "lr_drop_at": 0.0},
           "run_dir": str(run_dir)}
    for key, value in over.items():
        section, _, name = key.partition("__")
        raw[section][name] = value
    return from_dict(FinetuneConfig, raw, where="test")


def test_seg_metrics_from_a_known_confusion():
    # 3 classes; class 2 absent from the targets; 255 pixels ignored whatever is predicted
    target = torch.tensor([[0, 0, 1, 1], [0, 1, IGNORE, IGNORE]])
    pred = torch.tensor([[0, 1, 1, 2], [0, 1, 0, 2]])
    conf = confusion(target, pred, 3)
    assert conf.tolist() == [[2, 1, 0], [0, 2, 1], [0, 0, 0]]
    m = seg_metrics(conf.numpy(), ("a", "b", "c"))
    assert m["oa"] == pytest.approx(4 / 6)
    assert m["per_class"]["iou"][:2] == [pytest.approx(2 / 3), pytest.approx(2 / 4)]  # TP/(TP+FP+FN)
    assert m["per_class"]["iou"][2] is None  # absent class: no IoU, never 0
    assert m["miou"] == pytest.approx((2 / 3 + 2 / 4) / 2)
    assert m["aa"] == pytest.approx((2 / 3 + 2 / 3) / 2)
    assert m["n_pixels"] == 6 and m["classes_scored"] == [0, 1]


@pytest.mark.parametrize("cls", [UNetDecoder, UPerNetDecoder])
def test_decoders_give_input_sized_logits_and_read_every_level(cls):
    channels, strides = (8, 16, 24), (2, 4, 8)
    dec = cls(channels, strides, n_classes=5)
    maps = [torch.randn(2, c, 32 // s, 32 // s, requires_grad=True) for c, s in zip(channels, strides, strict=True)]
    out = dec(maps, (32, 32))
    assert out.shape == (2, 5, 32, 32)
    out.square().mean().backward()
    assert all(m.grad is not None and m.grad.abs().sum() > 0 for m in maps)  # every scale feeds the output
    assert set(DECODERS.names()) >= {"unet", "upernet"}
    assert decoder_for("swin_tiny_patch4_window7", "auto") == "upernet"
    assert decoder_for("resnet50", "auto") == "unet" and decoder_for("resnet50", "upernet") == "upernet"


def test_segmentation_runs_learn_and_report(dfc_shards, tmp_path):
    """Supervised late fusion (fine-tune) and an early-fusion frozen-backbone run, then the report."""
    ft = run_finetune(_cfg(dfc_shards, tmp_path / "runs" / "late"))
    assert ft["task"] == "seg" and ft["benchmark"]["name"] == "dfc2020-seg" and ft["decoder"] == "unet"
    conf = np.asarray(ft["confusion"])
    # every labelled test pixel (64 patches x 32 x 32, none ignored in the fixtures) is scored once
    assert conf.sum() == ft["n_test_pixels"] == 64 * 32 * 32
    assert ft["metrics"]["miou"] == pytest.approx(seg_metrics(conf, tuple(ft["per_class"]["names"]))["miou"])
    # the fixtures' classes have their own spectra: after a few epochs the pixels are far above chance
    assert ft["metrics"]["oa"] > 0.5 and ft["metrics"]["miou"] > 0.3
    assert ft["curves"]["train_loss"][-1] < ft["curves"]["train_loss"][0]
    assert ft["n_train"] + ft["n_val"] == 96 and ft["n_val"] > 0  # early-stopping part held out
    with np.load(tmp_path / "runs" / "late" / "seg_samples.npz") as z:
        assert z["rgb"].shape == (4, 32, 32, 3) and z["rgb"].dtype == np.uint8
        assert z["label"].shape == z["pred"].shape == (4, 32, 32)
        assert set(np.unique(z["pred"])) <= set(range(8))

    frozen = run_finetune(_cfg(dfc_shards, tmp_path / "runs" / "early", model__mode="linear", model__fusion="early",
                               model__decoder="upernet", data__label_fraction=0.5, train__epochs=2))
    assert frozen["decoder"] == "upernet" and frozen["fusion"] == "early"
    assert frozen["n_trainable"] < frozen["n_params"]  # backbone frozen, decoder trained
    assert frozen["n_train"] < ft["n_train"]

    # beside a DFC2020 classification result (the demo's mix): each gets its own report, and
    # segmentation gets no classification-style table of its own
    (tmp_path / "runs" / "cls").mkdir()
    (tmp_path / "runs" / "cls" / "result.json").write_text(json.dumps(
        {"method": "Cls", "task": "single", "label_fraction": 1.0, "seed": 1, "n_train": 10,
         "metrics": {"oa": 0.6, "aa": 0.5, "f1_macro": 0.4}}))
    summary = make_full_report([tmp_path / "runs"], tmp_path / "report")
    files = summary["files"]
    assert "| Cls | 1 | 10 |" in (tmp_path / "report" / "table.md").read_text()
    assert summary["n_runs"] == 1 and not (tmp_path / "report" / "dfc2020-seg").exists()
    table = Path(files["seg_table"]).read_text()
    assert "## Segmentation, 100 % of the labels" in table and "## Segmentation, 50 % of the labels" in table
    assert f"{100 * ft['metrics']['miou']:.1f}" in table and "Per-class IoU" in table
    for key in ("seg_plot", "seg_examples"):
        assert Path(files[key]).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


@pytest.mark.parametrize(("over", "needle"), [
    ({"model__backbone": "seg_flat"}, "has no multi-scale feature maps, which segmentation needs; use one of: "),
    ({"data__crop": 28}, "use a multiple of 8 up to 32: 8, 16, 24, 32"),
    ({"train__task": "single"}, "benchmark 'dfc2020-seg' defines seg"),
])
def test_bad_segmentation_settings_are_one_line_errors(dfc_shards, tmp_path, over, needle):
    with pytest.raises(SatfuseError) as exc:
        run_finetune(_cfg(dfc_shards, tmp_path / "run", **over))
    msg = str(exc.value)
    assert needle in msg and "\n" not in msg
    if "model__backbone" in over:
        assert "seg_toy" in msg and "seg_flat" not in msg.split("use one of:")[1]
    assert not (tmp_path / "run").exists()  # refused before the run directory is made


def test_shards_without_dfc_maps_are_refused(sen12ms_shards, tmp_path):
    cfg = _cfg({"train": sen12ms_shards, "test": sen12ms_shards}, tmp_path / "run")
    with pytest.raises(SatfuseError, match=r"needs s1\.npy, s2\.npy and dfc\.npy \(benchmark dfc2020-seg\)"):
        run_finetune(cfg)


def test_decoder_key_is_refused_for_classification(dfc_shards, tmp_path):
    cfg = _cfg(dfc_shards, tmp_path / "run", data__benchmark="dfc2020", train__task="single", model__decoder="unet")
    with pytest.raises(SatfuseError, match="applies to segmentation benchmarks only"):
        run_finetune(cfg)


@pytest.mark.slow
def test_two_rank_ddp_run_scores_every_test_pixel_once(dfc_shards, tmp_path):
    """Two gloo ranks (torchrun): each trains on half of every batch and scores half of the test
    patches; the summed confusion matrix covers the whole test split exactly once."""
    code = ("import sys, tests.evaluation.seg_toy as t\nt.register()\nfrom satfuse.cli import main\nsys.exit(main(sys.argv[1:]))\n")
    script = tmp_path / "entry.py"
    script.write_text(code)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO / "src"), str(REPO)]), "OMP_NUM_THREADS": "1"}
    with socket.socket() as sock:  # a free port for torchrun's rendezvous
        sock.bind(("127.0.0.1", 0))
        port = str(sock.getsockname()[1])
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-port", port, str(script),
           "finetune", "--benchmark", "dfc2020-seg", "--task", "seg", "--backbone", "seg_toy",
           "--train-shards", str(dfc_shards["train"]), "--test-shards", str(dfc_shards["test"]),
           "--run-dir", str(tmp_path / "run"), "--epochs", "2", "data.crop=32", "train.device=cpu",
           "train.lr=1e-2", "data.batch_size=16"]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=240, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    res = json.loads((tmp_path / "run" / "result.json").read_text())
    assert res["world_size"] == 2
    assert np.asarray(res["confusion"]).sum() == res["n_test_pixels"] == 64 * 32 * 32
    assert len(res["curves"]["epoch"]) == 2

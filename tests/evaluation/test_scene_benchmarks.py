"""BigEarthNet-19 and SEN12MS scene classification (`--benchmark bigearthnet19|sen12ms-igbp`):
labels from per-sample vectors, the benchmark's own val split, their metrics, and refusals."""

from __future__ import annotations

import json
import pickle
from pathlib import Path

import numpy as np
import pytest
import torch

from satfuse.config import load_config
from satfuse.data.format.codecs import Encoding
from satfuse.data.packing.normalize import BandStats
from satfuse.data.packing.shard_writer import shard_dataset
from satfuse.data.sources.split_lists import text_lines
from satfuse.data.sources.synth import write_sen12ms
from satfuse.data.sources.synth_multiband import write_bigearthnet
from satfuse.evaluation import data as D
from satfuse.evaluation.finetune import Batcher, FinetuneConfig, run_finetune
from satfuse.evaluation.metrics import micro_average_precision
from satfuse.evaluation.report import make_report
from satfuse.evaluation.sen12ms_igbp import simplify_igbp
from satfuse.evaluation.targets import IGNORE, vector_targets
from satfuse.utils import SatfuseError


@pytest.fixture(scope="module")
def sets(tmp_path_factory) -> dict[str, Path]:
    """BigEarthNet v2 train/val/test, a v1 train set, SEN12MS train/test with and without labels."""
    root = tmp_path_factory.mktemp("scene")
    out: dict[str, Path] = {}
    write_bigearthnet(root / "ben2", version=2, patches=16, seed=0, size=24)
    for split in ("train", "val", "test"):
        out[f"ben_{split}"] = root / f"ben_{split}"
        shard_dataset(root / "ben2", "bigearthnet-v2", out[f"ben_{split}"], maxcount=8, split=split)
    out["ben_nolabels"] = root / "ben_nolabels"
    shard_dataset(root / "ben2", "bigearthnet-v2", out["ben_nolabels"], split="test", encoding=Encoding(labels=False))
    write_bigearthnet(root / "ben1", version=1, patches=8, seed=1, size=24)
    out["ben1_train"] = root / "ben1_train"
    shard_dataset(root / "ben1", "bigearthnet", out["ben1_train"], split="train")
    raw = root / "sen"
    write_sen12ms(raw, scenes=2, patches_per_scene=8, seed=0, size=32)
    out["sen_raw"] = raw
    for split in ("train", "test"):
        out[f"sen_{split}"] = root / f"sen_{split}"
        shard_dataset(raw, "sen12ms", out[f"sen_{split}"], maxcount=8, split_file=raw / f"{split}_list.txt",
                      igbp_labels=raw / "labels" / "IGBP_probability_labels.pkl")
    out["sen_plain"] = root / "sen_plain"
    shard_dataset(raw, "sen12ms", out["sen_plain"], split_file=raw / "test_list.txt")
    return out


def _cfg(tmp_path: Path, bench: str, task: str, train: Path, test: Path, *extra: str) -> FinetuneConfig:
    return load_config(FinetuneConfig, None, [
        f"data.benchmark={bench}", f"train.task={task}", f"data.train_shards={train}", f"data.test_shards={test}",
        "data.crop=16", "model.backbone=tiny", "train.epochs=1", "train.device=cpu", "data.batch_size=8",
        f"run_dir={tmp_path / (bench + task)}", *extra])


def test_igbp_simplification_targets_and_micro_map():
    rng = np.random.default_rng(0)
    lc = rng.dirichlet(np.ones(17), size=5)
    # the authors' classification/dataset.py, written out
    want = np.stack([lc[:, 0:5].sum(1), lc[:, 5:7].sum(1), lc[:, 7:9].sum(1), lc[:, 9], lc[:, 10],
                     lc[:, 11] + lc[:, 13], lc[:, 12], lc[:, 14], lc[:, 15], lc[:, 16]], axis=1)
    np.testing.assert_allclose(simplify_igbp(lc), want)
    frac = np.array([[0.05, 0.6, 0.35], [0.0, 0.0, 0.0], [0.1, 0.1, 0.8]], dtype=np.float32)
    single, multi = vector_targets(frac, 0.1)
    assert single.tolist() == [1, IGNORE, 2]
    assert multi.tolist() == [[0, 1, 1], [0, 0, 0], [1, 1, 1]]
    y = np.array([[1, 0], [0, 1], [1, 0]])
    assert micro_average_precision(y, y * 0.9 + 0.05) == pytest.approx(1.0)
    # pooled ranking: positives at scores .8 (rank 1), .6 (rank 3), .4 (rank 4) of 6 decisions
    s = np.array([[0.8, 0.7], [0.1, 0.6], [0.4, 0.2]])
    assert micro_average_precision(y, s) == pytest.approx((1 + 2 / 3 + 3 / 4) / 3)


def test_scene_benchmarks_run_with_their_labels_splits_and_metrics(sets, tmp_path):
    res = run_finetune(_cfg(tmp_path, "bigearthnet19", "multi", sets["ben_train"], sets["ben_test"],
                            f"data.val_shards={sets['ben_val']}"))
    assert res["benchmark"]["name"] == "bigearthnet19" and len(res["per_class"]["names"]) == 19
    assert {"map", "map_micro", "f1_macro", "f1_micro"} <= set(res["metrics"])
    assert 0.0 <= res["metrics"]["map_micro"] <= 1.0
    n_val = sum(r["count"] for r in json.loads((sets["ben_val"] / "manifest.json").read_text())["shards"])
    assert res["n_val"] == n_val > 0  # the val split itself, nothing held out of train
    assert res["n_pool"] == res["n_train"]
    # BigEarthNet's 12 S2 bands in the models' 13-band order: B10 (index 10) is the band mean, 0
    split = D.load_split(sets["ben_train"], 0, "bigearthnet19")
    assert split.s2.shape[1] == 13 and split.s2_missing == (10,) and split.labels.shape[1] == 19
    stats = {k: BandStats(tuple(np.full(c, 5.0)), tuple(np.ones(c)), (-1e9, 1e9)) for k, c in (("s1", 2), ("s2", 13))}
    _, s2, _, multi = Batcher(split, stats, 16, 0.1, torch.device("cpu"))(np.arange(3), None)
    assert float(s2[:, 10].abs().max()) == 0.0 and float(s2[:, 9].abs().max()) > 0
    np.testing.assert_array_equal(multi.numpy(), split.labels[:3])

    res = run_finetune(_cfg(tmp_path, "sen12ms-igbp", "single", sets["sen_train"], sets["sen_test"]))
    assert res["benchmark"]["classes"][2] == "Savanna" and len(res["per_class"]["names"]) == 10
    labels = pickle.loads((sets["sen_raw"] / "labels" / "IGBP_probability_labels.pkl").read_bytes())  # noqa: S301
    test_names = [n.strip() for n in text_lines(sets["sen_raw"] / "test_list.txt", "list") if n.strip()]
    want = np.bincount(simplify_igbp(np.stack([labels[n] for n in test_names])).argmax(1), minlength=10)
    assert res["class_counts_test"] == want.tolist()
    assert {"oa", "aa", "f1_macro"} <= set(res["metrics"]) and "map_micro" not in res["metrics"]

    # the report: one table (the benchmark's columns) and plot per benchmark
    summary = make_report([tmp_path / "bigearthnet19multi", tmp_path / "sen12ms-igbpsingle"], tmp_path / "rep")
    ben = (tmp_path / "rep" / "table.md").read_text()
    assert ben.startswith("# BigEarthNet-19 downstream results")
    assert "| Method | runs | n train | mAP (macro) | mAP (micro) | F1 (macro) | F1 (micro) |" in ben
    assert "## Multi-label: mAP vs label fraction" in ben and "Single-label" not in ben
    sen = (tmp_path / "rep" / "sen12ms-igbp" / "table.md").read_text()
    assert sen.startswith("# SEN12MS-IGBP downstream results") and "| OA | AA | F1 (macro) |" in sen
    assert (tmp_path / "rep" / "label_fractions.png").stat().st_size > 0
    assert (tmp_path / "rep" / "sen12ms-igbp" / "label_fractions.png").stat().st_size > 0
    assert summary["n_runs"] == 1 and summary["benchmarks"]["sen12ms-igbp"]["n_runs"] == 1


def test_scene_benchmark_refusals(sets, tmp_path):
    cases = [
        (("bigearthnet19", "single", sets["ben_train"], sets["ben_test"]), "benchmark 'bigearthnet19' defines multi"),
        (("bigearthnet19", "multi", sets["sen_train"], sets["ben_test"]),
         "a sen12ms shard set, but benchmark bigearthnet19 reads bigearthnet|bigearthnet-v2.*satfuse shard --dataset bigearthnet"),
        (("bigearthnet19", "multi", sets["ben1_train"], sets["ben_test"]), "mix datasets.*bigearthnet-v2"),
        (("bigearthnet19", "multi", sets["ben_train"], sets["ben_test"], f"data.val_shards={sets['ben_test']}"),
         "holds the 'test' split, but is given as benchmark bigearthnet19's val set"),
        (("bigearthnet19", "multi", sets["ben_train"], sets["ben_nolabels"]), "--no-labels.*--split train"),
        (("sen12ms-igbp", "single", sets["sen_train"], sets["sen_plain"]),
         "has no SEN12MS-IGBP label.*--labels SRC/labels/IGBP_probability_labels.pkl"),
    ]
    for args, pattern in cases:
        with pytest.raises(SatfuseError, match=pattern) as err:
            run_finetune(_cfg(tmp_path, *args), overwrite=True)
        assert "\n" not in str(err.value)

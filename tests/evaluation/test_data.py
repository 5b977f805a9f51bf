"""Loading DFC shards, the early-stopping hold-out, and nested stratified label fractions."""

from __future__ import annotations

import io
import math

import numpy as np
import pytest
import webdataset as wds

from satfuse.evaluation import data as D
from satfuse.evaluation.targets import IGNORE, dfc_to_classes
from satfuse.utils import SatfuseError
from tests.evaluation.helpers import write_dfc_shards

FRACTIONS = [0.01, 0.05, 0.1, 0.25, 0.5, 1.0]


def _labels(counts: dict[int, int]) -> np.ndarray:
    lab = np.concatenate([np.full(n, c) for c, n in counts.items()] + [np.full(5, IGNORE)])
    return np.random.default_rng(3).permutation(lab)


def test_fractions_are_stratified_seeded_and_nested():
    counts = {0: 300, 2: 120, 5: 40, 7: 7}
    labels = _labels(counts)
    pool = np.flatnonzero(labels != IGNORE)
    prev: set[int] = set()
    for f in FRACTIONS:
        sub = D.label_fraction_subset(labels, pool, f, seed=42)
        got = {c: int((labels[sub] == c).sum()) for c in counts}
        assert got == {c: math.ceil(f * n - 1e-9) for c, n in counts.items()}  # stratified, >= 1 each
        assert prev <= set(sub.tolist())  # nested: the 5 % set is inside the 10 % set
        prev = set(sub.tolist())
        again = D.label_fraction_subset(labels, pool, f, seed=42)
        assert np.array_equal(sub, again)  # seeded
    assert set(D.label_fraction_subset(labels, pool, 0.1, seed=43).tolist()) != set(
        D.label_fraction_subset(labels, pool, 0.1, seed=42).tolist())
    assert (labels[D.label_fraction_subset(labels, pool, 1.0, seed=0)] != IGNORE).all()


def test_fraction_without_keep_every_class_drops_rare_class():
    labels = _labels({0: 100, 3: 5})
    pool = np.flatnonzero(labels != IGNORE)
    sub = D.label_fraction_subset(labels, pool, 0.1, seed=0, keep_every_class=False)
    assert int((labels[sub] == 0).sum()) == 10
    assert int((labels[sub] == 3).sum()) == 0
    with pytest.raises(SatfuseError, match="label fraction"):
        D.label_fraction_subset(labels, pool, 0.0, seed=0)


def test_fraction_only_draws_from_pool():
    labels = _labels({1: 50, 4: 50})
    pool = np.flatnonzero(labels != IGNORE)[::2]
    sub = D.label_fraction_subset(labels, pool, 1.0, seed=0)
    assert set(sub.tolist()) == set(pool.tolist())


def test_train_val_split_is_stratified_and_disjoint():
    labels = _labels({0: 50, 2: 10, 6: 1})
    train, val = D.train_val_split(labels, 0.2, seed=5)
    assert not set(train.tolist()) & set(val.tolist())
    assert int((labels[val] == 0).sum()) == 10 and int((labels[val] == 2).sum()) == 2
    assert int((labels[val] == 6).sum()) == 0 and int((labels[train] == 6).sum()) == 1  # singleton stays
    assert (labels[np.concatenate([train, val])] != IGNORE).all()
    t2, v2 = D.train_val_split(labels, 0.2, seed=5)
    assert np.array_equal(train, t2) and np.array_equal(val, v2)
    with pytest.raises(SatfuseError):
        D.train_val_split(labels, 1.0, seed=0)


def test_load_split_is_bit_exact_with_webdataset(dfc_shards):
    split = D.load_split(dfc_shards["train"])
    assert len(split) == 96 and split.s1.dtype == np.float32 and split.s2.dtype == np.uint16
    assert split.s1.shape == (96, 2, 32, 32) and split.s2.shape == (96, 13, 32, 32)
    tars = sorted(str(p) for p in dfc_shards["train"].glob("*.tar"))
    ref = {s["__key__"]: s for s in wds.WebDataset(tars, shardshuffle=False)}
    for i, key in enumerate(split.keys):
        s = ref[key]
        assert np.array_equal(split.s1[i], np.load(io.BytesIO(s["s1.npy"])))
        assert np.array_equal(split.s2[i], np.load(io.BytesIO(s["s2.npy"])))
        assert np.array_equal(split.labels[i], dfc_to_classes(np.load(io.BytesIO(s["dfc.npy"]))[0]))
    centre = D.load_split(dfc_shards["train"], center_crop=16)
    assert np.array_equal(centre.s2, split.s2[..., 8:24, 8:24])
    with pytest.raises(SatfuseError, match="larger than"):
        D.load_split(dfc_shards["train"], center_crop=40)


def test_bad_shard_dirs_are_clear_errors(tmp_path):
    with pytest.raises(SatfuseError, match="not found"):
        D.load_split(tmp_path / "nope")
    (tmp_path / "nomanifest").mkdir()
    with pytest.raises(SatfuseError, match="manifest.json"):
        D.load_split(tmp_path / "nomanifest")
    empty = write_dfc_shards(tmp_path / "empty", 0, 16, seed=0)
    with pytest.raises(SatfuseError, match="manifest lists no shards; re-shard"):
        D.load_split(empty)


def test_crop_batch_shares_one_window_per_sample():
    rng = np.random.default_rng(0)
    a = rng.normal(size=(5, 2, 12, 12)).astype(np.float32)
    lab = np.arange(5 * 12 * 12).reshape(5, 12, 12)
    idx = np.array([4, 1])
    ca, cl = D.crop_batch([a, lab], idx, 6, np.random.default_rng(1))
    for j, i in enumerate(idx):
        hits = [(t, s) for t in range(7) for s in range(7) if np.array_equal(lab[i, t:t + 6, s:s + 6], cl[j])]
        assert len(hits) == 1
        t, s = hits[0]
        assert np.array_equal(a[i, :, t:t + 6, s:s + 6], ca[j])
    ca, cl = D.crop_batch([a, lab], idx, 6, None)
    assert np.array_equal(cl, lab[idx, 3:9, 3:9])


def test_balanced_epoch_draws_classes_evenly():
    labels = np.array([0] * 90 + [1] * 10)
    order = D.epoch_order(np.arange(100), labels, np.random.default_rng(0), True, 4000)
    assert order.size == 4000
    assert abs((labels[order] == 1).mean() - 0.5) < 0.05
    plain = D.epoch_order(np.arange(100), labels, np.random.default_rng(0), False, 0)
    assert sorted(plain.tolist()) == list(range(100))

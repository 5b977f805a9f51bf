"""Targets derived from hand-made label maps (the authors' definitions)."""

from __future__ import annotations

import numpy as np
import pytest

from satfuse.evaluation.targets import (
    IGNORE,
    batch_targets,
    dfc_to_classes,
    igbp_to_classes,
    label_map_from_member,
    multi_label,
    single_label,
)


def test_dfc_codes_map_to_eight_classes_with_savanna_snow_ignored():
    dfc = np.arange(11, dtype=np.uint8)
    assert dfc_to_classes(dfc).tolist() == [255, 0, 1, 255, 2, 3, 4, 5, 255, 6, 7]


def test_igbp_codes_go_through_dfc_to_the_same_classes():
    igbp = np.arange(18, dtype=np.uint8)
    # IGBP 1-5 forests, 6-7 shrub, 8-9 savanna (dropped), 10 grass, 11 wetland, 12/14 crop,
    # 13 urban, 15 snow (dropped), 16 barren, 17 water
    expected = [255, 0, 0, 0, 0, 0, 1, 1, 255, 255, 2, 3, 4, 5, 4, 255, 6, 7]
    assert igbp_to_classes(igbp).tolist() == expected
    lc = np.stack([igbp.reshape(1, 18), np.zeros((1, 18), np.uint8), np.ones((1, 18), np.uint8),
                   np.ones((1, 18), np.uint8)])
    assert label_map_from_member("lc", lc)[0].tolist() == expected


def test_single_label_is_most_frequent_valid_class():
    m = np.array([[7, 7, 7, 255],
                  [255, 255, 255, 255],
                  [2, 2, 255, 255],
                  [255, 255, 255, 255]], dtype=np.uint8)
    assert single_label(m) == 7  # 255 is the most frequent value but is ignored
    assert single_label(np.array([[3, 1], [1, 3]], np.uint8)) == 1  # tie -> lower index
    assert single_label(np.full((4, 4), IGNORE, np.uint8)) is None


def test_multi_label_threshold_counts_valid_pixels_only():
    m = np.full((10, 10), 0, dtype=np.uint8)  # 100 px: 80 Forest
    m[0, :] = 7  # 10 px Water = 10 %
    m[1, :9] = 4  # 9 px Cropland = 9 %
    m[2, 0] = 5  # 1 px Urban
    assert multi_label(m).tolist() == [1, 0, 0, 0, 0, 0, 0, 1]
    assert multi_label(m, min_fraction=0.09).tolist() == [1, 0, 0, 0, 1, 0, 0, 1]
    m2 = m.copy()
    m2[5:, :] = IGNORE  # 50 ignored px: Cropland is now 9/50 = 18 % of the valid pixels
    assert multi_label(m2).tolist() == [1, 0, 0, 0, 1, 0, 0, 1]
    assert multi_label(np.full((3, 3), IGNORE, np.uint8)).sum() == 0
    with pytest.raises(ValueError):
        multi_label(m, min_fraction=0.0)


def test_batch_targets_match_per_map_functions():
    rng = np.random.default_rng(0)
    maps = rng.choice([0, 3, 5, 7, IGNORE], size=(6, 9, 9), p=[0.5, 0.2, 0.1, 0.05, 0.15]).astype(np.uint8)
    maps[2] = IGNORE
    single, multi = batch_targets(maps, 0.1)
    for i, m in enumerate(maps):
        s = single_label(m)
        assert single[i] == (IGNORE if s is None else s)
        assert multi[i].tolist() == multi_label(m, 0.1).astype(np.float32).tolist()


def test_dfc2020_is_a_registered_benchmark_and_targets_take_its_class_count():
    from satfuse.evaluation.benchmark import benchmark_class, check_task
    from satfuse.utils import SatfuseError

    bench = benchmark_class("dfc2020")
    assert bench.n_classes() == 8 and bench.metrics == {"single": "aa", "multi": "f1_macro"}
    dfc = np.arange(11, dtype=np.uint8).reshape(1, 1, 11)
    assert bench.label_map("dfc", dfc).tolist() == dfc_to_classes(dfc[0]).tolist()
    with pytest.raises(SatfuseError, match="benchmark 'dfc2020' defines single, multi"):
        check_task(bench, "segmentation")
    # a 2-class benchmark's maps: class 2 is out of range (ignored), like 255
    single, multi = batch_targets(np.array([[[0, 1, 1, 2, 255, 1]]], np.uint8), 0.3, n_classes=2)
    assert single.tolist() == [1] and multi.tolist() == [[0.0, 1.0]]

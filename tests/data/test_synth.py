"""Synthetic data: real layout and formats, determinism, and a signal worth learning."""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np
import pytest
import rasterio

from satfuse.data.sources import synth
from satfuse.data.sources.layout import IGBP2DFC
from satfuse.data.sources.tree_scan import scan
from satfuse.utils import SatfuseError


def _digest(root: Path) -> dict[str, str]:
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(root.rglob("*")) if p.is_file()}


def test_files_have_the_real_formats(sen12ms_tree: Path) -> None:
    pair = scan(sen12ms_tree, "sen12ms").pairs[3]
    expect = {pair.s1: (2, "float32"), pair.s2: (13, "uint16"), pair.label: (4, "uint8")}
    geo = set()
    for path, (count, dtype) in expect.items():
        with rasterio.open(path) as ds:
            assert (ds.count, ds.dtypes[0], ds.shape) == (count, dtype, (32, 32))
            assert ds.crs.to_epsg() // 100 == 326 and ds.compression is None
            assert ds.transform.a == 10.0 and ds.transform.e == -10.0
            geo.add((ds.crs.to_string(), tuple(ds.transform)))
    assert len(geo) == 1  # one CRS and transform shared by the patch's three files


def test_same_seed_same_bytes_other_seed_differs(tmp_path: Path) -> None:
    a, b, c = (tmp_path / n for n in "abc")
    synth.write_dfc2020(a, 2, 1, seed=5, size=16)
    synth.write_dfc2020(b, 2, 1, seed=5, size=16)
    synth.write_dfc2020(c, 2, 1, seed=6, size=16)
    assert _digest(a) == _digest(b)
    assert _digest(a) != _digest(c) and _digest(a).keys() == _digest(c).keys()


def test_refuses_existing_dataset_without_overwrite(tmp_path: Path) -> None:
    assert synth.write_sen12ms(tmp_path, 1, 2, seed=0, size=16) == 2
    with pytest.raises(SatfuseError, match="--overwrite"):
        synth.write_sen12ms(tmp_path, 1, 1, seed=0, size=16)
    assert synth.write_sen12ms(tmp_path, 1, 1, seed=0, size=16, overwrite=True) == 1
    assert len(scan(tmp_path, "sen12ms").pairs) == 1
    with pytest.raises(SatfuseError, match="--scenes=0"):
        synth.write_sen12ms(tmp_path / "x", 0, 1, seed=0)


def test_signal_class_spectra_and_backscatter() -> None:
    """Water is dark in NIR and low in VV, urban bright in VV, vegetation has a red edge."""
    rng = np.random.default_rng(0)
    size = 64
    means = {}
    for igbp in (1, 13, 17):  # forest, urban, water
        cover = np.full((size, size), igbp, dtype=np.uint8)
        s2 = np.stack([synth.render_s2(rng, cover, "summer") for _ in range(4)]).astype(np.float64)
        s1 = synth.render_s1(rng, cover)
        assert np.isfinite(s1).all() and s1.dtype == np.float32
        means[igbp] = (s2[:, 7].min(axis=0).mean(), s2[:, 3].min(axis=0).mean(), np.median(s1[0]), np.median(s1[1]))
    nir, red, vv, vh = (dict((k, v[i]) for k, v in means.items()) for i in range(4))
    assert nir[1] > 2 * red[1] and nir[17] < 700  # red edge; water absorbs NIR
    assert vv[17] < -17 and vv[13] > -8 and vv[17] < vv[1] < vv[13]
    assert all(vh[k] < vv[k] for k in vv)


def test_land_cover_is_spatially_structured_and_labels_agree(dfc_tree: Path) -> None:
    rng = np.random.default_rng(1)
    cover = synth.land_cover(rng, 64, np.array([1, 10, 17]), np.array([0.4, 0.3, 0.3]))
    same_right = (cover[:, 1:] == cover[:, :-1]).mean()
    assert same_right > 0.9  # regions, not salt-and-pepper
    lc = synth.lc_bands(cover)
    assert lc.shape == (4, 64, 64) and (lc[0] == cover).all()
    assert (synth.dfc_band(cover)[0] == np.asarray(IGBP2DFC)[cover]).all()
    for pair in scan(dfc_tree, "dfc2020").pairs:
        with rasterio.open(pair.label) as ds:
            values = set(np.unique(ds.read()))
        assert values <= set(range(1, 11)) and ds.count == 1

"""SEN12MS's scene-classification label file: synth writes it as published, `satfuse shard
--labels` packs each patch's vector, and a pickle that is not plain data is refused unrun."""

from __future__ import annotations

import json
import pickle
import tarfile
from pathlib import Path

import numpy as np
import pytest
import rasterio

from satfuse.data.format.codecs import Encoding
from satfuse.data.packing.shard_writer import shard_dataset
from satfuse.data.sources.igbp_labels import LABELS_FILE, igbp_fractions, read_igbp_labels
from satfuse.utils import SatfuseError


class _Boom:
    """A pickle payload that would create a file if it were ever called."""

    def __init__(self, flag: Path) -> None:
        self.flag = flag

    def __reduce__(self):
        return (Path.touch, (self.flag,))


def test_synth_label_file_is_the_published_dict_and_shard_packs_it(sen12ms_tree: Path, tmp_path: Path):
    path = sen12ms_tree / LABELS_FILE
    plain = pickle.loads(path.read_bytes())  # noqa: S301 - our own file; the authors' reader does exactly this
    assert isinstance(plain, dict) and len(plain) == 12
    s2_names = sorted(p.name for p in sen12ms_tree.glob("ROIs*/s2_*/*.tif"))
    assert sorted(plain) == s2_names
    labels = read_igbp_labels(path)
    name = s2_names[0]
    lc = next(sen12ms_tree.glob(f"ROIs*/lc_*/{name.replace('_s2_', '_lc_')}"))
    with rasterio.open(lc) as src:
        igbp = src.read(1)
    expected = np.bincount(igbp.ravel() - 1, minlength=17) / igbp.size
    np.testing.assert_allclose(labels[name], expected)
    np.testing.assert_allclose(igbp_fractions(igbp), expected)
    assert all(abs(v.sum() - 1) < 1e-9 for v in labels.values())

    out = shard_dataset(sen12ms_tree, "sen12ms", tmp_path / "sh", maxcount=5, igbp_labels=path)
    assert out["igbp_labels"]["classes"] == 17 and len(out["igbp_labels"]["sha256"]) == 64
    seen = {}
    for rec in out["shards"]:
        with tarfile.open(tmp_path / "sh" / rec["name"]) as tar:
            for m in tar.getmembers():
                if m.name.endswith(".json"):
                    meta = json.loads(tar.extractfile(m).read())
                    seen[Path(meta["sources"]["s2"]).name] = meta["igbp"]
    assert sorted(seen) == s2_names
    for n, vec in seen.items():
        np.testing.assert_allclose(vec, labels[n])


def test_label_file_refusals(sen12ms_tree: Path, tmp_path: Path):
    flag = tmp_path / "ran"
    bad = {
        "code.pkl": pickle.dumps({"a.tif": _Boom(flag)}),
        "list.pkl": pickle.dumps([np.zeros(17)]),
        "short.pkl": pickle.dumps({"a.tif": np.zeros(16)}),
        "object.pkl": pickle.dumps({"a.tif": np.array([0.0] * 17, dtype=object)}),  # floats, but objects
        "nan.pkl": pickle.dumps({"a.tif": np.full(17, np.nan)}),
        "intkey.pkl": pickle.dumps({3: np.zeros(17)}),
    }
    for name, blob in bad.items():
        (tmp_path / name).write_bytes(blob)
        with pytest.raises(SatfuseError, match=f"{name}: refused") as err:
            read_igbp_labels(tmp_path / name)
        assert "\n" not in str(err.value)
    assert not flag.exists()
    for proto in (2, 4, 5):  # every protocol numpy arrays are pickled with reads back
        (tmp_path / "ok.pkl").write_bytes(pickle.dumps({"a.tif": np.arange(17) / 136.0, "b.tif": list(range(17))},
                                                       protocol=proto))
        got = read_igbp_labels(tmp_path / "ok.pkl")
        np.testing.assert_allclose(got["a.tif"], np.arange(17) / 136.0)

    path = sen12ms_tree / LABELS_FILE
    with pytest.raises(SatfuseError, match="--labels: only for --dataset sen12ms"):
        shard_dataset(sen12ms_tree, "dfc2020", tmp_path / "x", igbp_labels=path)
    with pytest.raises(SatfuseError, match="--labels with --no-labels"):
        shard_dataset(sen12ms_tree, "sen12ms", tmp_path / "y", igbp_labels=path, encoding=Encoding(labels=False))
    partial = read_igbp_labels(path)
    dropped = sorted(partial)[0]
    del partial[dropped]
    (tmp_path / "partial.pkl").write_bytes(pickle.dumps(partial))
    with pytest.raises(SatfuseError, match=f"no entry for 1 of the 12 patches.*{dropped}"):
        shard_dataset(sen12ms_tree, "sen12ms", tmp_path / "z", igbp_labels=tmp_path / "partial.pkl")
    assert not (tmp_path / "z" / "manifest.json").exists()

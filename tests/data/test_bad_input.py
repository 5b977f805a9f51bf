"""Every bad input of the issue: a clear message naming the file, the right exit, no
partial manifest or half-written tar left behind as if complete."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import rasterio
from rasterio.transform import Affine

from satfuse.cli import main
from satfuse.data.packing.shard_writer import shard_dataset
from satfuse.data.sources.layout import patch_path
from satfuse.utils import SatfuseError

SPRING = "ROIs1158_spring"


def _rewrite(path: Path, array: np.ndarray | None = None, **changes: object) -> None:
    """Rewrite a GeoTIFF with another array and/or profile entries (crs, transform...)."""
    with rasterio.open(path) as ds:
        profile, data = ds.profile, ds.read()
    data = data if array is None else array
    profile.update(count=data.shape[0], dtype=data.dtype.name, height=data.shape[1], width=data.shape[2], **changes)
    with rasterio.open(path, "w", **profile) as dst:
        dst.write(data)


def _assert_nothing_looks_complete(out: Path) -> None:
    assert not (out / "manifest.json").exists()
    assert not list(out.glob("*.tmp"))


def _shard(src: Path, out: Path, **kwargs: object) -> dict:
    return shard_dataset(src, "sen12ms", out, maxcount=4, seed=0, **kwargs)


def _corrupt(tree: Path) -> Path:
    path = patch_path(tree, SPRING, "s1", 1, 2)
    path.write_bytes(b"II*\x00 this is not a GeoTIFF" * 10)
    return path


def _truncate(tree: Path) -> Path:
    path = patch_path(tree, SPRING, "s2", 1, 3)
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    return path


def _wrong_bands(tree: Path) -> Path:
    path = patch_path(tree, SPRING, "s1", 1, 4)
    _rewrite(path, np.zeros((3, 32, 32), np.float32))
    return path


def _wrong_dtype(tree: Path) -> Path:
    path = patch_path(tree, SPRING, "s2", 1, 5)
    _rewrite(path, np.ones((13, 32, 32), np.float32))
    return path


def _nan(tree: Path) -> Path:
    path = patch_path(tree, SPRING, "s1", 1, 6)
    with rasterio.open(path) as ds:
        data = ds.read()
    data[0, 3, 4], data[1, 0, 0] = np.nan, np.inf
    _rewrite(path, data)
    return path


@pytest.mark.parametrize(
    ("damage", "kind"),
    [(_corrupt, "unreadable"), (_truncate, "unreadable"), (_wrong_bands, "wrong bands"),
     (_wrong_dtype, "wrong bands"), (_nan, "non-finite")],
)  # fmt: skip
def test_untrusted_data_fails_naming_the_file(tree: Path, tmp_path: Path, damage, kind: str) -> None:
    bad = damage(tree)
    out = tmp_path / "out"
    with pytest.raises(SatfuseError) as info:
        _shard(tree, out)
    msg = str(info.value)
    assert f"{kind}: {bad}" in msg and "--exclude-bad" in msg and "\n" not in msg
    _assert_nothing_looks_complete(out)
    manifest = _shard(tree, out, exclude_bad=True)  # the listed way out; good shards reused
    (entry,) = manifest["excluded"]
    assert entry["reason"].startswith(f"{kind}: {bad}") and str(bad) in entry["paths"]
    assert manifest["total_samples"] == 11


@pytest.mark.parametrize(
    ("change", "what"),
    [({"crs": "EPSG:32633"}, "CRS"), ({"transform": Affine(10, 0, 5.0, 0, -10, 0)}, "transform"), ({}, "shape")],
)  # fmt: skip
def test_not_colocated_pairs_are_excluded_and_listed(tree: Path, tmp_path: Path, change: dict, what: str) -> None:
    path = patch_path(tree, "ROIs1868_summer", "s2", 2, 1)
    if what == "shape":
        with rasterio.open(path) as ds:
            _rewrite(path, ds.read()[:, :16, :])
    else:
        _rewrite(path, **change)
    manifest = _shard(tree, tmp_path / "out")
    (entry,) = manifest["excluded"]
    assert entry["key"] == "ROIs1868_summer_2_p1" and entry["reason"].startswith("not co-located: s2 differs from s1 in " + what)
    assert manifest["total_samples"] == 11


def test_lone_s1_is_listed_and_summarised(tree: Path, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    """(The CLI's logging set-up replaces handlers, so its output is read from stderr.)"""
    patch_path(tree, SPRING, "s2", 1, 1).unlink()
    out = tmp_path / "out"
    assert main(["shard", "--src", str(tree), "--dataset", "sen12ms", "--out", str(out)]) == 0
    manifest = json.loads((out / "manifest.json").read_text())
    assert [e["key"] for e in manifest["excluded"]] == ["ROIs1158_spring_1_p1"]
    assert "packed 11 pairs into 1 shards; excluded 1 (1 lone file(s))" in capsys.readouterr().err


def test_untrusted_data_exits_2_from_the_cli(tree: Path, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    bad = _nan(tree)
    assert main(["shard", "--src", str(tree), "--dataset", "sen12ms", "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err
    assert f"non-finite: {bad} has 2 NaN/Inf pixel(s)" in err and "Traceback" not in err


def test_bad_sources_and_outputs_fail_before_any_write(tree: Path, tmp_path: Path) -> None:
    out = tmp_path / "never"
    with pytest.raises(SatfuseError, match="does not exist"):
        _shard(tmp_path / "missing", out)
    (tmp_path / "empty").mkdir()
    with pytest.raises(SatfuseError, match="is empty"):
        _shard(tmp_path / "empty", out)
    with pytest.raises(SatfuseError, match="output is inside the source"):
        _shard(tree, tree / "shards")
    with pytest.raises(SatfuseError, match="output contains the source"):
        _shard(tree, tree.parent)
    assert not out.exists() and not (tree / "shards").exists()


def test_refuses_foreign_output_unless_overwrite(tree: Path, tmp_path: Path) -> None:
    out = tmp_path / "busy"
    out.mkdir()
    (out / "notes.txt").write_text("someone else's")
    with pytest.raises(SatfuseError, match="not a satfuse shard directory.*--overwrite"):
        _shard(tree, out)
    assert (out / "notes.txt").exists() and not (out / "manifest.json").exists()
    assert _shard(tree, out, overwrite=True)["total_samples"] == 12
    assert not (out / "notes.txt").exists()
    assert _shard(tree, out)["total_samples"] == 12  # its own output: rerun is fine


def test_bad_arguments(tree: Path, tmp_path: Path) -> None:
    with pytest.raises(SatfuseError, match="--maxcount 0"):
        shard_dataset(tree, "sen12ms", tmp_path / "a", maxcount=0)
    with pytest.raises(SatfuseError, match="both --shard-index and --num-shards"):
        _shard(tree, tmp_path / "a", shard_index=1)
    with pytest.raises(SatfuseError, match="0 <= index < num-shards"):
        _shard(tree, tmp_path / "a", shard_index=3, num_shards=3)

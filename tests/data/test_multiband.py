"""SSL4EO-S12 and BigEarthNet v1/v2: synthetic trees in the published layouts, sharded,
verified and pretrained on (tiny model, 1 rank, 2 steps).

The layout assertions check the contracts third-party readers rely on (torchgeo's path
patterns and date regexes, the published side-file formats), not our own reader's view."""

from __future__ import annotations

import csv
import io
import json
import re
import shutil
import tarfile
from pathlib import Path

import numpy as np
import pytest
import rasterio
from rasterio.transform import Affine

from satfuse.data.format.bands import check_same_bands, manifest_bands, normalization_bands
from satfuse.data.format.verify import verify
from satfuse.data.packing.shard_writer import shard_dataset
from satfuse.data.sources.bigearthnet import CLASSES_19, CLASSES_43, to_19
from satfuse.data.sources.synth_multiband import CLC_CODES, write_bigearthnet, write_ssl4eo
from satfuse.utils import SatfuseError

L1C = ["B1", "B2", "B3", "B4", "B5", "B6", "B7", "B8", "B8A", "B9", "B10", "B11", "B12"]
L2A = [b for b in L1C if b != "B10"]


@pytest.fixture(scope="module")
def ssl_tree(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("ssl4eo") / "SSL4EO-S12"
    write_ssl4eo(root, locations=2, seed=1, size=36)
    return root


@pytest.fixture(scope="module")
def ben1_tree(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("ben1") / "BEN"
    write_bigearthnet(root, version=1, patches=8, seed=1, size=36)
    return root


@pytest.fixture(scope="module")
def ben2_tree(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("ben2") / "BEN2"
    write_bigearthnet(root, version=2, patches=8, seed=1, size=36)
    return root


def samples(shard_dir: Path) -> dict[str, dict]:
    """key -> {json meta, arrays} of every sample of a shard set."""
    out: dict[str, dict] = {}
    for tar in sorted(shard_dir.glob("*.tar")):
        with tarfile.open(tar) as tf:
            for m in tf:
                key, _, ext = m.name.partition(".")
                data = tf.extractfile(m).read()
                item = out.setdefault(key, {})
                item[ext.removesuffix(".npy")] = json.loads(data) if ext == "json" else np.load(io.BytesIO(data))
    return out


def header(path: Path) -> tuple:
    with rasterio.open(path) as ds:
        return ds.count, ds.height, ds.width, ds.dtypes[0], ds.crs.to_string(), ds.nodata


# ------------------------------------------------------------------------------------ SSL4EO


def test_ssl4eo_synth_writes_the_published_layout(ssl_tree):
    locs = sorted(p.name for p in (ssl_tree / "s1").iterdir())
    assert locs == ["0000000", "0000001"]
    # torchgeo's existence check and its date regexes for the folder names
    assert list(ssl_tree.glob("s2c/00000*/*/*.tif")) and list(ssl_tree.glob("s1/00000*/*/*.tif"))
    s1_dirs = sorted((ssl_tree / "s1" / "0000000").iterdir())
    s2_dirs = sorted((ssl_tree / "s2c" / "0000000").iterdir())
    a_dirs = sorted((ssl_tree / "s2a" / "0000000").iterdir())
    assert len(s1_dirs) == len(s2_dirs) == len(a_dirs) == 4
    assert all(re.match(r"^.{16}_(?P<date>\d{8}T\d{6})", d.name) for d in s1_dirs)
    assert all(re.match(r"^(?P<date>\d{8}T\d{6})_\d{8}T\d{6}_T\w{5}$", d.name) for d in s2_dirs + a_dirs)
    assert {d.name[:8] for d in s1_dirs} != {d.name[:8] for d in s2_dirs}  # independent searches
    assert sorted(p.stem for p in s2_dirs[0].glob("*.tif")) == sorted(L1C)
    assert sorted(p.stem for p in a_dirs[0].glob("*.tif")) == sorted(L2A)
    assert sorted(p.name for p in s1_dirs[0].iterdir()) == ["VH.tif", "VV.tif", "metadata.json"]
    assert json.loads((s2_dirs[0] / "metadata.json").read_text())["system:index"] == s2_dirs[0].name
    assert header(s2_dirs[0] / "B2.tif") == (1, 36, 36, "uint16", "EPSG:4326", None)
    assert header(s2_dirs[0] / "B5.tif")[1:3] == (18, 18)
    assert header(s2_dirs[0] / "B10.tif")[1:3] == (6, 6)
    assert header(s1_dirs[0] / "VV.tif") == (1, 36, 36, "float32", "EPSG:4326", None)


def test_ssl4eo_shards_verify_and_record_pairing(ssl_tree, tmp_path):
    m = shard_dataset(ssl_tree, "ssl4eo-s12", tmp_path / "l1c", maxcount=3, seed=0)
    assert m["total_samples"] == 8 and m["bands"] == {"s1": ["VV", "VH"], "s2": L1C}
    assert m["resample"]["method"] == "bilinear" and m["resample"]["tolerance_m"] == 50.0  # SSL4EO-S12's default
    assert m["s2_level"] == "l1c" and {"path": "s2a", "reason": "not used with --s2-level l1c"} in m["ignored"]
    assert len(m["stats"]["s2"]["mean"]) == 13 and m["patch_size"] == [36, 36]
    assert m["native_resolution_m"]["B5"] == 20 and m["source_crs"].startswith("EPSG:4326")
    assert verify(tmp_path / "l1c") == []
    got = samples(tmp_path / "l1c")
    meta = got["0000000_t0"]["json"]
    assert {got[f"0000000_t{i}"]["json"]["season"] for i in range(4)} == {0, 1, 2, 3}
    dates = [got[f"0000000_t{i}"]["json"]["s2_date"] for i in range(4)]
    assert dates == sorted(dates)
    assert 0 <= meta["gap_days"] <= 30 and meta["crs"] == "EPSG:4326" and meta["height"] == 36
    assert meta["sources"]["s2/B5"] == f"s2c/0000000/{meta['s2_timestamp']}/B5.tif"
    assert meta["sources"]["s1/VV"] == f"s1/0000000/{meta['s1_timestamp']}/VV.tif"
    assert got["0000000_t0"]["s2"].shape == (13, 36, 36) and got["0000000_t0"]["s1"].dtype == np.float32

    m2 = shard_dataset(ssl_tree, "ssl4eo-s12", tmp_path / "l2a", maxcount=3, s2_level="l2a", resample="nearest")
    assert m2["bands"]["s2"] == L2A and m2["resample"]["method"] == "nearest"
    assert verify(tmp_path / "l2a") == []
    s = samples(tmp_path / "l2a")["0000001_t2"]
    # nearest upsampling of a 20 m band = each pixel repeated 2x2; read back the source file
    with rasterio.open(ssl_tree / s["json"]["sources"]["s2/B5"]) as ds:
        b5 = ds.read(1)
    assert np.array_equal(s["s2"][L2A.index("B5")], np.repeat(np.repeat(b5, 2, 0), 2, 1))
    bil = samples(tmp_path / "l1c")["0000001_t2"]["s2"][L1C.index("B5")]
    assert not np.array_equal(bil, np.repeat(np.repeat(b5, 2, 0), 2, 1))  # bilinear does differ


def test_ssl4eo_date_matching_and_gap_limit(ssl_tree, tmp_path):
    src = tmp_path / "src"
    shutil.copytree(ssl_tree, src)
    # drop one S1 timestamp of a location: its S2 season gets no partner within 30 days
    s1_dirs = sorted((src / "s1" / "0000000").iterdir())
    shutil.rmtree(s1_dirs[1])
    (src / "s2c" / "0000001" / "notes.txt").write_text("x")
    m = shard_dataset(src, "ssl4eo-s12", tmp_path / "out", maxcount=4)
    assert m["total_samples"] == 7
    lone = [e for e in m["excluded"] if e["reason"].startswith("lone s2 timestamp")]
    assert len(lone) == 1 and ("days away" in lone[0]["reason"] or "no S1" in lone[0]["reason"])
    assert any(i["path"] == "s2c/0000001/notes.txt" for i in m["ignored"])
    with pytest.raises(SatfuseError, match="--s2-level/--max-gap-days apply to ssl4eo-s12 only"):
        shard_dataset(src, "bigearthnet", tmp_path / "x", s2_level="l2a")


def test_colocation_is_geographic_with_the_published_offsets(ssl_tree, tmp_path):
    """S1 and S2 of SSL4EO-S12 are separate exports a few 10 m pixels apart (38.5 m on the
    published location 0000200): the synthetic tree has such offsets, the default tolerance
    packs them (10 m bands bit-exact), records each sample's offset and summarises them;
    a 1 km misplacement is still excluded, and a 10 m tolerance excludes the published grids."""
    src = tmp_path / "src"
    shutil.copytree(ssl_tree, src)
    loc = src / "s1" / "0000000"
    first = sorted(loc.iterdir())[0] / "VV.tif"
    with rasterio.open(first, "r+") as ds:
        ds.transform = Affine.translation(1000.0 / 111_320.0, 0.0) @ ds.transform  # ~1 km east
    m = shard_dataset(src, "ssl4eo-s12", tmp_path / "out", maxcount=4)
    bad = [e for e in m["excluded"] if e["reason"].startswith("not co-located")]
    assert len(bad) == 1 and "VV.tif footprint is" in bad[0]["reason"] and "tolerance 50 m" in bad[0]["reason"]
    assert m["total_samples"] == 7  # every other S1 grid is a few pixels off S2 and packs
    got = samples(tmp_path / "out")
    offsets = {k: v["json"]["colocation_offset_m"]["s1"] for k, v in got.items()}
    assert 10.0 < max(offsets.values()) < 50.0 and len(set(offsets.values())) > 3  # a few pixels, not one constant
    summary = m["colocation_offset_m"]
    assert summary["samples"] == 7 and summary["s1"]["max"] == max(offsets.values())
    assert offsets[summary["s1"]["max_key"]] == summary["s1"]["max"] and sum(summary["s1"]["histogram_10m"]) == 7
    for key, sample in got.items():  # S1 is not resampled: bit-exact with its source
        with rasterio.open(src / sample["json"]["sources"]["s1/VV"]) as ds:
            assert np.array_equal(sample["s1"][0], ds.read(1)), key
    strict = shard_dataset(src, "ssl4eo-s12", tmp_path / "strict", maxcount=4, tol_m=10.0)
    assert strict["total_samples"] < 6 and "tolerance 10 m + half its" in json.dumps(strict["excluded"])


def test_nothing_packed_is_an_error_naming_the_commonest_reasons(ssl_tree, tmp_path, capsys):
    """Every pair excluded at read time: exit 2 with one line naming the reasons (shown even at
    --log-level WARNING), no manifest, and nothing of the run left behind (its empty tars and
    resume records would look like a partial set and be reused); what existed before the run
    stays. A job array's merge refuses the same way and says what the parts left."""
    from satfuse.cli import main
    from satfuse.data.packing.shard_dir import merge

    src = tmp_path / "src"
    shutil.copytree(ssl_tree, src)
    for vv in src.glob("s1/*/*/VV.tif"):
        with rasterio.open(vv, "r+") as ds:
            ds.transform = Affine.translation(1000.0 / 111_320.0, 0.0) @ ds.transform  # ~1 km east
    out = tmp_path / "made" / "out"  # neither exists: the run creates both
    rc = main(["--log-level", "WARNING", "shard", "--src", str(src), "--dataset", "ssl4eo-s12", "--out", str(out), "--maxcount", "4"])
    err = capsys.readouterr().err
    assert rc == 2 and "packed 0 pairs, so no manifest was written: all 8 excluded" in err
    assert "8 not co-located (e.g. 0000000_t0: VV.tif footprint is" in err and len([x for x in err.splitlines() if "ERROR" in x]) == 1
    assert "(the 2 empty tar(s) and records this run wrote were removed)" in err
    assert not (tmp_path / "made").exists() and sorted(p.name for p in tmp_path.iterdir()) == ["src"]
    kept = tmp_path / "kept"  # an empty directory the user made: it stays, empty
    kept.mkdir()
    with pytest.raises(SatfuseError, match="packed 0 pairs"):
        shard_dataset(src, "ssl4eo-s12", kept, maxcount=4)
    assert kept.is_dir() and list(kept.iterdir()) == []
    for i in range(2):
        shard_dataset(src, "ssl4eo-s12", tmp_path / "parts", maxcount=4, shard_index=i, num_shards=2)
    with pytest.raises(SatfuseError, match=r"packed 0 pairs.*the parts' 2 empty tar\(s\), their records and part manifests are left"):
        merge(tmp_path / "parts")
    assert not (tmp_path / "parts" / "manifest.json").exists()


# ------------------------------------------------------------------------------------ BigEarthNet v1


def test_bigearthnet_v1_synth_writes_the_published_layout(ben1_tree):
    s2_dirs = sorted((ben1_tree / "BigEarthNet-v1.0").iterdir())
    s1_dirs = sorted((ben1_tree / "BigEarthNet-S1-v1.0").iterdir())
    assert len(s2_dirs) == len(s1_dirs) == 8
    name = s2_dirs[0].name
    assert re.match(r"^S2[AB]_MSIL2A_\d{8}T\d{5,6}_\d+_\d+$", name)
    files = sorted(p.name[len(name) + 1 :] for p in s2_dirs[0].iterdir())
    want = [f"B{b:02d}.tif" for b in (1, 2, 3, 4, 5, 6, 7, 8, 9, 11, 12)] + ["B8A.tif", "labels_metadata.json"]
    assert files == sorted(want)
    assert header(s2_dirs[0] / f"{name}_B02.tif")[1:4] == (36, 36, "uint16")
    assert header(s2_dirs[0] / f"{name}_B05.tif")[1:3] == (18, 18)
    assert header(s2_dirs[0] / f"{name}_B01.tif")[1:3] == (6, 6)
    assert header(s2_dirs[0] / f"{name}_B02.tif")[4].startswith("EPSG:326")
    s1 = s1_dirs[0]
    s1_json = json.loads((s1 / f"{s1.name}_labels_metadata.json").read_text())
    assert set(s1_json["coordinates"]) == {"ulx", "uly", "lrx", "lly"}  # sic, as published
    assert header(s1 / f"{s1.name}_VV.tif")[3] == "float32"
    # mapping and split files: no header, S2,S1 (how torchgeo parses them)
    rows = list(csv.reader((ben1_tree / "s1s2_mapping.csv").open()))
    assert len(rows) == 8 and all(r[0].startswith("S2") and r[1].startswith("S1") for r in rows)
    for split in ("train", "val", "test"):
        for s2, s1n in csv.reader((ben1_tree / f"bigearthnet-{split}.csv").open()):
            assert (ben1_tree / "BigEarthNet-v1.0" / s2).is_dir() and (ben1_tree / "BigEarthNet-S1-v1.0" / s1n).is_dir()
    snow = (ben1_tree / "patches_with_seasonal_snow.csv").read_text().split()
    assert snow and all((ben1_tree / "BigEarthNet-v1.0" / n).is_dir() for n in snow)


def test_bigearthnet_v1_shards_labels_and_exclusions(ben1_tree, tmp_path):
    m = shard_dataset(ben1_tree, "bigearthnet", tmp_path / "all", maxcount=3)
    snow = (ben1_tree / "patches_with_seasonal_snow.csv").read_text().split()
    cloud = (ben1_tree / "patches_with_cloud_and_shadow.csv").read_text().split()
    excluded = {e["key"]: e["reason"] for e in m["excluded"]}
    assert set(excluded) == set(snow) | set(cloud) and m["total_samples"] == 8 - len(excluded)
    assert all(excluded[k].startswith("seasonal snow") for k in snow)
    assert m["bands"]["s2"] == L2A and m["pairs_from"] == "s1s2_mapping.csv" and m["ignored"] == []
    assert m["classes"]["19"] == list(CLASSES_19) and len(m["classes"]["43"]) == 43
    assert verify(tmp_path / "all") == []
    for key, s in samples(tmp_path / "all").items():
        names = json.loads((ben1_tree / "BigEarthNet-v1.0" / key / f"{key}_labels_metadata.json").read_text())["labels"]
        assert [CLASSES_43[i] for i, v in enumerate(s["json"]["labels43"]) if v] == sorted(names, key=CLASSES_43.index)
        assert s["json"]["labels19"] == to_19(s["json"]["labels43"]) and len(s["json"]["labels19"]) == 19
        assert s["s2"].shape == (12, 36, 36) and s["json"]["sources"]["s2/B8A"].endswith(f"{key}_B8A.tif")
    m = shard_dataset(ben1_tree, "bigearthnet", tmp_path / "train", maxcount=3, split="train")
    train = [r[0] for r in csv.reader((ben1_tree / "bigearthnet-train.csv").open())]
    assert sorted(samples(tmp_path / "train")) == sorted(train) and m["split"] == "train"


# ------------------------------------------------------------------------------------ BigEarthNet v2


def test_bigearthnet_v2_layout_parquet_and_shards(ben2_tree, tmp_path):
    import pyarrow.parquet as pq

    meta = pq.read_table(ben2_tree / "metadata.parquet").to_pylist()
    cols = ["patch_id", "labels", "split", "country", "s1_name", "s2v1_name", "contains_seasonal_snow", "contains_cloud_or_shadow"]
    assert pq.read_table(ben2_tree / "metadata.parquet").column_names == cols
    assert not any(r["contains_seasonal_snow"] or r["contains_cloud_or_shadow"] for r in meta)
    flagged = pq.read_table(ben2_tree / "metadata_for_patches_with_snow_cloud_or_shadow.parquet").to_pylist()
    assert flagged and len(meta) + len(flagged) == 8
    row = meta[0]
    pid = row["patch_id"]
    assert re.match(r"^S2[AB]_MSIL2A_\d{8}T\d{6}_N9999_R\d{3}_T\w{5}_\d{2}_\d{2}$", pid)
    s2_dir = ben2_tree / "BigEarthNet-S2" / pid.rsplit("_", 2)[0] / pid
    assert header(s2_dir / f"{pid}_B02.tif")[5] == 0  # nodata 0, as published
    assert (ben2_tree / "BigEarthNet-S1" / row["s1_name"].rsplit("_", 3)[0] / row["s1_name"] / f"{row['s1_name']}_VV.tif").is_file()
    ref = ben2_tree / "Reference_Maps" / pid.rsplit("_", 2)[0] / pid / f"{pid}_reference_map.tif"
    with rasterio.open(ref) as ds:
        assert ds.dtypes[0] == "uint16" and ds.nodata == 0 and ds.compression.name.lower() == "deflate"
        assert set(np.unique(ds.read(1)).tolist()) <= set(CLC_CODES)  # CORINE level-3 codes
    assert all(label in CLASSES_19 for r in meta for label in r["labels"])

    m = shard_dataset(ben2_tree, "bigearthnet-v2", tmp_path / "v2", maxcount=3)
    assert m["total_samples"] == len(meta) and m["bands"]["s2"] == L2A
    assert {e["key"] for e in m["excluded"]} == {r["patch_id"] for r in flagged}
    assert all("listed in metadata_for_patches_with_snow_cloud_or_shadow.parquet" in e["reason"] for e in m["excluded"])
    assert verify(tmp_path / "v2") == []
    got = samples(tmp_path / "v2")[pid]["json"]
    assert [CLASSES_19[i] for i, v in enumerate(got["labels19"]) if v] == sorted(row["labels"], key=CLASSES_19.index)
    assert got["s1_name"] == row["s1_name"] and got["split"] == row["split"]
    m = shard_dataset(ben2_tree, "bigearthnet-v2", tmp_path / "test", maxcount=3, split="test")
    assert sorted(samples(tmp_path / "test")) == sorted(r["patch_id"] for r in meta if r["split"] == "test")


def test_bigearthnet_v2_missing_parquet_names_the_file(ben2_tree, tmp_path):
    src = tmp_path / "src"
    shutil.copytree(ben2_tree, src)
    (src / "metadata.parquet").unlink()
    with pytest.raises(SatfuseError, match=r"metadata.parquet: not found"):
        shard_dataset(src, "bigearthnet-v2", tmp_path / "out")


def test_int16_s2_and_out_of_range(ben1_tree, tmp_path):
    """S2 stored as int16 (some tools do) is accepted when non-negative; a negative value is bad data."""
    src = tmp_path / "src"
    shutil.copytree(ben1_tree, src)
    name = sorted((src / "BigEarthNet-v1.0").iterdir())[0].name
    path = src / "BigEarthNet-v1.0" / name / f"{name}_B04.tif"
    with rasterio.open(path) as ds:
        data, profile = ds.read(1), ds.profile
    profile.update(dtype="int16")
    with rasterio.open(path, "w", **profile) as ds:
        ds.write(data.astype(np.int16), 1)
    shard_dataset(src, "bigearthnet", tmp_path / "ok", maxcount=8)
    assert np.array_equal(samples(tmp_path / "ok")[name]["s2"][3], data)
    data = data.astype(np.int16)
    data[0, 0] = -5
    with rasterio.open(path, "w", **profile) as ds:
        ds.write(data, 1)
    with pytest.raises(SatfuseError, match=r"out of range: .*_B04.tif holds values -5"):
        shard_dataset(src, "bigearthnet", tmp_path / "bad", maxcount=8)


# ------------------------------------------------------------------------------------ bands


def test_band_sets_of_manifests_and_checkpoints():
    assert len(manifest_bands({})["s2"]) == 13  # SEN12MS sets record no names: 13 L1C bands
    old = {"s1": {"bands": ["VV", "VH"]}, "s2": {"bands": 13}}
    assert normalization_bands(old) == manifest_bands({})
    ben = {"s1": ["VV", "VH"], "s2": L2A}
    check_same_bands(ben, dict(ben), "ckpt", "shards")
    with pytest.raises(SatfuseError, match=r"band mismatch: checkpoint runs/x/step_3 .* s2 bands .*\(13\), the shard set shards/ben holds .*\(12\)"):
        check_same_bands(normalization_bands(old), ben, "runs/x/step_3", "shards/ben")


def test_export_builds_the_checkpoints_band_count():
    from satfuse.checkpoint.export import default_builder
    from satfuse.config import ModelConfig, to_dict

    meta = {"config": {"model": to_dict(ModelConfig(backbone="tiny"))}, "normalization": {"s1": {"bands": ["VV", "VH"]}, "s2": {"bands": L2A}}}
    model = default_builder(meta)
    assert model.in_channels() == {"s1": 2, "s2": 12}


# ------------------------------------------------------------------------------------ pretraining


@pytest.mark.slow
def test_pretrain_on_each_dataset_then_band_mismatch_is_refused(ssl_tree, ben1_tree, ben2_tree, tmp_path):
    from tests.engines.ranks import logs, metrics, run_ranks

    shards = {
        "ssl": (ssl_tree, "ssl4eo-s12", {}),
        "ben1": (ben1_tree, "bigearthnet", {}),
        "ben2": (ben2_tree, "bigearthnet-v2", {}),
    }
    for name, (src, dataset, extra) in shards.items():
        shard_dataset(src, dataset, tmp_path / f"sh_{name}", maxcount=3, **extra)
        run, logdir = tmp_path / f"run_{name}", tmp_path / f"log_{name}"
        logdir.mkdir()
        args = [f"data.shards={tmp_path / f'sh_{name}'}", f"train.run_dir={run}", "train.steps=2",
                "train.log_every=1", "data.batch_size=2", "checkpoint.every_steps=2"]
        assert run_ranks(1, args, logdir) == [0], logs(logdir)
        assert [r["step"] for r in metrics(run) if "loss" in r] == [1, 2]
        meta = json.loads(next((run / "checkpoints").glob("step_*/meta.json")).read_text())
        assert len(meta["normalization"]["s2"]["bands"]) == (13 if name == "ssl" else 12)
    # resume the 12-band BigEarthNet run on the 13-band SSL4EO shards: refused, naming both
    logdir = tmp_path / "log_mismatch"
    logdir.mkdir()
    args = [f"data.shards={tmp_path / 'sh_ssl'}", f"train.run_dir={tmp_path / 'run_ben1'}", "train.steps=4", "data.batch_size=2"]
    assert run_ranks(1, args, logdir) != [0]
    text = logs(logdir)
    assert "band mismatch: checkpoint" in text and str(tmp_path / "sh_ssl") in text and "(12)" in text and "(13)" in text
    # held-out shards of other bands are refused before training, not after it
    logdir = tmp_path / "log_val"
    logdir.mkdir()
    args = [f"data.shards={tmp_path / 'sh_ben2'}", f"data.val_shards={tmp_path / 'sh_ssl'}",
            f"train.run_dir={tmp_path / 'run_val'}", "train.steps=2", "data.batch_size=2"]
    assert run_ranks(1, args, logdir) != [0]
    assert f"band mismatch: data.val_shards={tmp_path / 'sh_ssl'}" in logs(logdir)
    assert not (tmp_path / "run_val" / "metrics.jsonl").exists()


# ------------------------------------------------------------------------------------ CLI, parts, resume


def test_cli_synth_shard_verify_and_option_checks(tmp_path, capsys):
    from satfuse.cli import main

    assert main(["synth", "bigearthnet", "--version", "2", "--out", str(tmp_path / "b"), "--patches", "4", "--size", "12"]) == 0
    args = ["shard", "--src", str(tmp_path / "b"), "--dataset", "bigearthnet-v2", "--out", str(tmp_path / "s"),
            "--resample", "cubic", "--colocation-tol-m", "5", "--maxcount", "2"]
    assert main(args) == 0
    m = json.loads((tmp_path / "s" / "manifest.json").read_text())
    assert m["resample"]["method"] == "cubic" and m["resample"]["tolerance_m"] == 5.0
    assert main(["shard", "verify", str(tmp_path / "s")]) == 0
    capsys.readouterr()
    bad = ["shard", "--src", str(tmp_path / "b"), "--dataset", "sen12ms", "--out", str(tmp_path / "t"), "--resample", "nearest"]
    assert main(bad) != 0
    assert "--resample only apply to --dataset ssl4eo-s12|bigearthnet|bigearthnet-v2" in capsys.readouterr().err


def test_job_array_parts_merge_to_the_single_run_and_reruns_reuse(ben1_tree, tmp_path):
    from satfuse.data.packing.shard_dir import merge

    single = shard_dataset(ben1_tree, "bigearthnet", tmp_path / "one", maxcount=2, seed=5)
    for i in range(2):
        shard_dataset(ben1_tree, "bigearthnet", tmp_path / "two", maxcount=2, seed=5, shard_index=i, num_shards=2)
    merged = merge(tmp_path / "two")
    drop = ("created", "command", "part_commands", "name", "plan", "shards")  # these name the directory
    assert {k: v for k, v in merged.items() if k not in drop} == {k: v for k, v in single.items() if k not in drop}
    assert [(s["count"], s["sha256"]) for s in merged["shards"]] == [(s["count"], s["sha256"]) for s in single["shards"]]
    assert merged["bands"]["s2"] == L2A and len(merged["stats"]["s2"]["mean"]) == 12
    pooled = shard_dataset(ben1_tree, "bigearthnet", tmp_path / "one_p", maxcount=2, seed=5, workers=2)
    assert [s["sha256"] for s in pooled["shards"]] == [s["sha256"] for s in single["shards"]]
    before = {p.name: p.stat().st_mtime_ns for p in (tmp_path / "one").glob("*.tar")}
    again = shard_dataset(ben1_tree, "bigearthnet", tmp_path / "one", maxcount=2, seed=5)
    assert {p.name: p.stat().st_mtime_ns for p in (tmp_path / "one").glob("*.tar")} == before  # kept, not rewritten
    assert again["shards"] == single["shards"]


def test_unreadable_band_fails_naming_it_or_is_listed_with_exclude_bad(ben1_tree, tmp_path):
    src = tmp_path / "src"
    shutil.copytree(ben1_tree, src)
    name = sorted((src / "BigEarthNet-v1.0").iterdir())[0].name
    band = src / "BigEarthNet-v1.0" / name / f"{name}_B11.tif"
    band.write_bytes(band.read_bytes()[:300])
    with pytest.raises(SatfuseError, match=rf"unreadable: .*{name}_B11.tif"):
        shard_dataset(src, "bigearthnet", tmp_path / "strict", maxcount=8)
    assert not (tmp_path / "strict" / "manifest.json").exists()
    m = shard_dataset(src, "bigearthnet", tmp_path / "lenient", maxcount=8, exclude_bad=True)
    assert [e["key"] for e in m["excluded"] if e["reason"].startswith("unreadable")] == [name]


def test_s1_that_is_not_db_fails_or_is_listed_with_exclude_bad(ben1_tree, tmp_path):
    src = tmp_path / "src"
    shutil.copytree(ben1_tree, src)
    folder = sorted((src / "BigEarthNet-S1-v1.0").iterdir())[0]
    vv = folder / f"{folder.name}_VV.tif"
    with rasterio.open(vv, "r+") as ds:
        ds.write(np.full((ds.height, ds.width), 65533.0, np.float32), 1)  # digital numbers, not dB
    with pytest.raises(SatfuseError, match=r"out of range: .* holds S1 values .*\.\.65533, backscatter in dB"):
        shard_dataset(src, "bigearthnet", tmp_path / "strict", maxcount=8)
    m = shard_dataset(src, "bigearthnet", tmp_path / "lenient", maxcount=8, exclude_bad=True)
    assert len([e for e in m["excluded"] if e["reason"].startswith("out of range")]) == 1


def test_repeated_rows_of_bigearthnet_lists_are_said_and_read_once(ben1_tree, ben2_tree, tmp_path, caplog):
    """A v1 split list, a v2 split list and metadata.parquet that repeat a patch: each patch is
    read once (not twice under one key, nor merged silently) and the repeats are said, through
    the SEN12MS reader's helper: rows vs patches and the first repeats."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from satfuse.data.sources.bigearthnet import scan_bigearthnet

    rows = list(csv.reader((ben1_tree / "bigearthnet-train.csv").open()))
    v1 = tmp_path / "v1.csv"
    v1.write_text("".join(f"{s2},{s1}\r\n" for s2, s1 in [*rows, rows[0], rows[0]]))
    with caplog.at_level("WARNING", logger="satfuse.data.sources.split_lists"):
        scan = scan_bigearthnet(ben1_tree, 1, split_file=v1)
    assert sorted(s.key for s in scan.samples) == sorted(r[0] for r in rows)
    n = len(rows)
    assert (f"{v1}: {n + 2} rows name {n} patches: 2 duplicate row(s) (line {n + 1} repeats line 1, line {n + 2} "
            "repeats line 1) are packed once") in caplog.text
    caplog.clear()
    root = tmp_path / "ben2"  # the v2 tree with a metadata.parquet that repeats its second row
    root.mkdir()
    for d in ("BigEarthNet-S1", "BigEarthNet-S2"):
        (root / d).symlink_to(ben2_tree / d)
    table = pq.read_table(ben2_tree / "metadata.parquet")
    pq.write_table(pa.concat_tables([table, table.slice(1, 1)]), root / "metadata.parquet")
    pid = table.column("patch_id")[1].as_py()
    listed = tmp_path / "v2.csv"
    listed.write_text(f"{pid}\n{pid}\n")
    with caplog.at_level("WARNING", logger="satfuse.data.sources.split_lists"):
        scan = scan_bigearthnet(root, 2, split_file=listed)
    assert [s.key for s in scan.samples] == [pid]
    assert (f"{root / 'metadata.parquet'}: {table.num_rows + 1} rows name {table.num_rows} patches: 1 duplicate row(s) "
            f"(row {table.num_rows + 1} repeats row 2)") in caplog.text
    assert f"{listed}: 2 rows name 1 patches: 1 duplicate row(s) (line 2 repeats line 1)" in caplog.text


def test_pair_lists_in_either_column_order_and_s2_only(ben1_tree, tmp_path):
    src = tmp_path / "src"
    shutil.copytree(ben1_tree, src)
    rows = list(csv.reader((src / "bigearthnet-train.csv").open()))
    (tmp_path / "s1first.csv").write_text("".join(f"{s1},{s2}\r\n" for s2, s1 in rows))
    (tmp_path / "s2only.csv").write_text("".join(f"{s2}\n" for s2, _ in rows))
    for lst in ("s1first.csv", "s2only.csv"):
        m = shard_dataset(src, "bigearthnet", tmp_path / lst.split(".")[0], maxcount=8, split_file=tmp_path / lst)
        assert sorted(samples(tmp_path / lst.split(".")[0])) == sorted(r[0] for r in rows)
        assert m["folders_outside_split"] > 0 and m["ignored"] == []  # counted, not listed one by one

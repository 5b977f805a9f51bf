"""SEN12MS and DFC2020 as their publishers lay them out: split lists in every published
format, the DFC2020 download's folders, label dtypes other tools write, nothing skipped
without a word, and the contracts third-party loaders rely on (checked on the synthetic
trees, without re-implementing those loaders)."""

from __future__ import annotations

import csv
import glob
import json
import os
import pickle
import shutil
from pathlib import Path

import numpy as np
import pytest
import rasterio

from satfuse.cli import main
from satfuse.data.format.manifest import summary
from satfuse.data.format.verify import verify
from satfuse.data.packing.shard_dir import merge
from satfuse.data.packing.shard_writer import shard_dataset
from satfuse.data.sources.layout import patch_path
from satfuse.data.sources.split_lists import read_split
from satfuse.data.sources.synth import write_dfc2020, write_sen12ms
from satfuse.data.sources.tree_scan import scan
from satfuse.utils import SatfuseError

SPRING, SUMMER = "ROIs1158_spring", "ROIs1868_summer"


def _rewrite(path: Path, array: np.ndarray) -> None:
    with rasterio.open(path) as ds:
        profile = ds.profile
    profile.update(count=array.shape[0], dtype=array.dtype.name)
    with rasterio.open(path, "w", **profile) as dst:
        dst.write(array)


def _csv(path: Path) -> list[list[str]]:
    with open(path, newline="") as fh:
        return list(csv.reader(fh))


def _read(path: Path) -> np.ndarray:
    with rasterio.open(path) as ds:
        return ds.read()


# --------------------------------------------------------------------------------------------
# Split lists as published
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "text",
    ["Seasons.SPRING,1,2\nSeasons.SUMMER,2,6\n",  # the authors' files: no header
     "Seasons.SPRING,1,2\r\nSeasons.SUMMER,2,6\r\n",  # CRLF
     "Season,Scene,ID\nSeasons.SPRING,1,2\nSeasons.SUMMER,2,6\n",  # satfuse's old header
     "\ufeffSeason,Scene,ID\r\nSeasons.SPRING,1,2\r\nSeasons.SUMMER,2,6\r\n",  # Excel: BOM + CRLF
     "\ufeffSeasons.SPRING,1,2\nSeasons.SUMMER,2,6\n"],  # BOM, no header
)  # fmt: skip
def test_authors_csv_in_every_variant(sen12ms_tree: Path, tmp_path: Path, text: str) -> None:
    split = tmp_path / "sen12ms_observations.csv"
    split.write_bytes(text.encode())
    assert read_split(split, "sen12ms") == {(SPRING, 1, 2), (SUMMER, 2, 6)}
    assert [p.key for p in scan(sen12ms_tree, "sen12ms", split).pairs] == ["ROIs1158_spring_1_p2", "ROIs1868_summer_2_p6"]


def test_dfc_tokens_valset_testset(dfc_tree: Path, tmp_path: Path) -> None:
    split = tmp_path / "validation_observations.csv"
    split.write_text("Seasons.VALSET,0,1\nSeasons.TESTSET,0,2\n")
    assert read_split(split, "dfc2020") == {("ROIs0000_validation", 0, 1), ("ROIs0000_test", 0, 2)}
    with pytest.raises(SatfuseError, match=r"validation_observations.csv:1: Season 'Seasons.VALSET' is a dfc2020 token.*--dataset dfc2020"):
        read_split(split, "sen12ms")


@pytest.mark.parametrize(
    ("text", "match"),
    [("Season,Scene,ID\n", "the list is empty"), ("\ufeffSeason,Scene,ID\r\n", "the list is empty"), ("", "the list is empty"),
     ("Seasons.SPRING,1\n", "1:.*2 column"), ("ROIs1158_spring/s1_63\n", "scene list.*--exclude-scenes"),
     ("Seasons.SPRING,1,١\n", "ASCII digits"), ("photo.jpg\n", "not a patch file name")],
)  # fmt: skip
def test_bad_or_empty_lists_say_what(tmp_path: Path, text: str, match: str) -> None:
    split = tmp_path / "x_observations.csv"
    split.write_text(text)
    with pytest.raises(SatfuseError, match=match):
        read_split(split, "sen12ms")


def test_sen12ms_list_txt_and_pkl(sen12ms_tree: Path, tmp_path: Path) -> None:
    names = ["ROIs1158_spring_s2_1_p3.tif", "ROIs1868_summer_s2_2_p4.tif"]
    txt = tmp_path / "test_list.txt"
    txt.write_bytes("".join(n + "\r\n" for n in names).encode())
    pkl = tmp_path / "test_list.pkl"
    pkl.write_bytes(pickle.dumps(names, protocol=3))
    want = {(SPRING, 1, 3), (SUMMER, 2, 4)}
    assert read_split(txt, "sen12ms") == want == read_split(pkl, "sen12ms")
    assert len(scan(sen12ms_tree, "sen12ms", pkl).pairs) == 2


class _Evil:
    def __init__(self, marker: str) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple:
        return (open, (self.marker, "w"))  # unpickling this would create the marker file


def test_malicious_pickle_never_runs(tmp_path: Path) -> None:
    marker = tmp_path / "PWNED"
    evil = tmp_path / "train_list.pkl"
    evil.write_bytes(pickle.dumps([_Evil(str(marker))], protocol=3))
    with pytest.raises(SatfuseError, match=r"train_list.pkl: refused.*never runs code"):
        read_split(evil, "sen12ms")
    assert not marker.exists()
    assert pickle.loads(evil.read_bytes()) and marker.exists()  # proof the pickle was live
    other = tmp_path / "test_list.pkl"
    other.write_bytes(pickle.dumps({"ROIs1158_spring_s2_1_p1.tif": 1}, protocol=3))
    with pytest.raises(SatfuseError, match=r"test_list.pkl: refused: not a plain pickled list of file names \(opcode EMPTY_DICT"):
        read_split(other, "sen12ms")


def test_duplicate_rows_and_extra_columns_are_said(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """A class-balanced list repeats rows (the authors' balanced CSV: 2,619 rows, 986 patches) and
    may carry more columns: both are read, and both are said, not merged or ignored silently."""
    split = tmp_path / "balanced_observations.csv"
    split.write_text("Season,Scene,ID,Label\nSeasons.SPRING,1,2,4\nSeasons.SPRING,1,3,7\nSeasons.SPRING,1,2,4\nSeasons.SPRING,1,2,4\n")
    with caplog.at_level("WARNING", logger="satfuse.data.sources.split_lists"):
        assert read_split(split, "sen12ms") == {(SPRING, 1, 2), (SPRING, 1, 3)}
    text = caplog.text
    assert "4 row(s) have columns beyond Season,Scene,ID (Label) (first: line 2); they are not used" in text
    assert "4 rows name 2 patches: 2 duplicate row(s) (line 4 repeats line 2, line 5 repeats line 2) are packed once" in text
    caplog.clear()
    names = tmp_path / "test_list.txt"
    names.write_text("ROIs1158_spring_s2_1_p2.tif\r\nROIs1158_spring_s2_1_p2.tif\r\n")
    with caplog.at_level("WARNING", logger="satfuse.data.sources.split_lists"):
        assert read_split(names, "sen12ms") == {(SPRING, 1, 2)}
    assert "2 rows name 1 patches: 1 duplicate row(s) (line 2 repeats line 1)" in caplog.text


def test_exclude_scenes_lists_held_out_patches(sen12ms_tree: Path, tmp_path: Path) -> None:
    scenes = tmp_path / "SEN12MS_holdOutScenes.txt"
    scenes.write_text("ROIs1868_summer/s1_2\n")
    result = scan(sen12ms_tree, "sen12ms", exclude_scenes=scenes)
    assert {p.roi for p in result.pairs} == {SPRING} and len(result.pairs) == 6
    assert len(result.excluded) == 6 and all(e.reason.startswith("held out: scene ROIs1868_summer/2") for e in result.excluded)


def test_missing_split_entries_reported_and_strict(sen12ms_tree: Path, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    split = tmp_path / "s_observations.csv"
    split.write_text("".join(f"Seasons.SPRING,1,{i}\n" for i in range(1, 13)))  # 7..12 do not exist
    out = tmp_path / "o"
    assert main(["shard", "--src", str(sen12ms_tree), "--dataset", "sen12ms", "--out", str(out), "--split-file", str(split), "--maxcount", "3"]) == 0
    err = capsys.readouterr().err
    assert "6 listed patch(es) have no files" in err and "ROIs1158_spring_1_p10" in err
    manifest = json.loads((out / "manifest.json").read_text())
    # the manifest keeps a count and the first few; the full list is the side file (a published
    # list over a partial tree would otherwise write 180,659 entries, 30 MB, into manifest.json)
    side = [json.loads(line) for line in (out / "missing.jsonl").read_text().splitlines()]
    assert sorted(e["key"] for e in side) == sorted(f"ROIs1158_spring_1_p{i}" for i in range(7, 13))
    assert all(e["reason"].startswith("missing: listed in") for e in side)
    assert manifest["missing"] == {"count": 6, "first": side[:5], "file": "missing.jsonl"}
    assert not [e for e in manifest["excluded"] if e["reason"].startswith("missing")]
    assert verify(out) == []
    # a job array: each part document keeps count + first few of its share (the list would be in
    # every part otherwise), merge joins the shares into the single run's missing.jsonl and manifest
    parts = tmp_path / "arr" / "o"
    for i in (1, 0):
        doc = shard_dataset(sen12ms_tree, "sen12ms", parts, maxcount=3, split_file=split, shard_index=i, num_shards=2)
        share = [json.loads(line) for line in (parts / f"missing.part-{i}-of-2.jsonl").read_text().splitlines()]
        assert share == side[3 * i : 3 * i + 3] and not [e for e in doc["scan_excluded"] if e["reason"].startswith("missing")]
        assert json.loads((parts / f"manifest.part-{i}-of-2.json").read_text())["missing"] == {
            "count": 3, "of": 6, "first": share, "file": f"missing.part-{i}-of-2.jsonl"}
    merged = merge(parts, command=["t"])
    assert (parts / "missing.jsonl").read_bytes() == (out / "missing.jsonl").read_bytes()
    assert summary(merged) == summary(manifest) and "excluded 6 (6 missing; missing listed in missing.jsonl)" in summary(merged)
    drop = ("created", "command", "part_commands")
    assert {k: v for k, v in merged.items() if k not in drop} == {k: v for k, v in manifest.items() if k not in drop}
    out2 = tmp_path / "o2"
    assert main(["shard", "--src", str(sen12ms_tree), "--dataset", "sen12ms", "--out", str(out2), "--split-file", str(split), "--strict-split"]) == 2
    assert "--strict-split makes this fatal" in capsys.readouterr().err and not (out2 / "manifest.json").exists()


# --------------------------------------------------------------------------------------------
# DFC2020 folders, labels of other dtypes
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("folders", ["validation", "0"])
def test_dfc2020_both_validation_folder_names(tmp_path: Path, folders: str) -> None:
    root = tmp_path / "DFC2020"
    write_dfc2020(root, n_validation=3, n_test=2, seed=1, size=16, validation_folders=folders)
    assert (root / "ROIs0000_validation" / f"s1_{folders}" / "ROIs0000_validation_s1_0_p1.tif").is_file()
    result = scan(root, "dfc2020")
    assert len(result.pairs) == 5 and result.label == "dfc" and result.aux == ("lc",) and not result.excluded
    assert {p.season for p in result.pairs} == {"validation", "test"}
    manifest = shard_dataset(root, "dfc2020", tmp_path / "shards" / "d", maxcount=8)
    assert manifest["total_samples"] == 5 and manifest["aux"] == ["lc"]
    assert verify(tmp_path / "shards" / "d") == []


def test_label_and_s2_dtypes_other_tools_write(tree: Path, tmp_path: Path) -> None:
    """torchgeo's SEN12MS fixture: lc as uint16 (s1 float32, s2 uint16); S2 as int16."""
    lc = patch_path(tree, SPRING, "lc", 1, 1)
    lc_values = _read(lc)
    _rewrite(lc, lc_values.astype(np.uint16))
    s2 = patch_path(tree, SPRING, "s2", 1, 2)
    s2_values = _read(s2)
    _rewrite(s2, s2_values.astype(np.int16))
    manifest = shard_dataset(tree, "sen12ms", tmp_path / "o", maxcount=20)
    assert manifest["total_samples"] == 12 and manifest["excluded"] == []
    import webdataset as wds

    samples = {s["__key__"]: s for s in wds.WebDataset(str(tmp_path / "o" / "o-000000.tar"), shardshuffle=False).decode()}
    got = samples["ROIs1158_spring_1_p1"]["lc.npy"]
    assert got.dtype == np.uint8 and np.array_equal(got, lc_values)
    assert samples["ROIs1158_spring_1_p2"]["s2.npy"].dtype == np.uint16
    assert np.array_equal(samples["ROIs1158_spring_1_p2"]["s2.npy"], s2_values)


@pytest.mark.parametrize(
    ("sensor", "make", "match"),
    [("lc", lambda a: a.astype(np.float32), "needs 4 of an integer type"),
     ("lc", lambda a: np.where(a == a[0, 0, 0], 20, a).astype(np.uint16), "out of range: .* band 1 holds values .*0..17"),
     ("s2", lambda a: (a.astype(np.int32) - 30000).astype(np.int16), "out of range"),
     ("s2", lambda a: a[:12], "has 12 band"),
     ("s1", lambda a: np.where(a > np.median(a), 65533.0, a).astype(np.float32),  # torchgeo's fixture: not dB
      r"out of range: .*ROIs1158_spring_s1_1_p3.tif holds S1 values .*\.\.65533, backscatter in dB lies within -100..60")],
)  # fmt: skip
def test_bad_label_or_s2_values_are_named(tree: Path, tmp_path: Path, sensor: str, make, match: str) -> None:
    path = patch_path(tree, SPRING, sensor, 1, 3)
    _rewrite(path, make(_read(path)))
    with pytest.raises(SatfuseError, match=match):
        shard_dataset(tree, "sen12ms", tmp_path / "o", maxcount=20)
    manifest = shard_dataset(tree, "sen12ms", tmp_path / "o2", maxcount=20, exclude_bad=True)
    assert [e["key"] for e in manifest["excluded"]] == ["ROIs1158_spring_1_p3"]


# --------------------------------------------------------------------------------------------
# Nothing skipped without a word; ambiguous and non-ASCII ids
# --------------------------------------------------------------------------------------------


def test_unknown_folders_and_files_are_listed(tree: Path, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    extra = tree / SPRING / "s2_extra"
    shutil.copytree(tree / SPRING / "s2_1", extra)
    (tree / "README.txt").write_text("notes")
    (tree / SPRING / "s1_1" / "thumbs.db").write_text("x")
    out = tmp_path / "o"
    assert main(["shard", "--src", str(tree), "--dataset", "sen12ms", "--out", str(out)]) == 0
    err = capsys.readouterr().err
    assert f"{extra}: looks like a sensor folder but is not one of sen12ms's" in err
    manifest = json.loads((out / "manifest.json").read_text())
    ignored = {i["path"]: i["reason"] for i in manifest["ignored"]}
    assert ignored[f"{SPRING}/s2_extra"].startswith("unknown sensor folder")
    assert ignored["README.txt"].startswith("not part of the sen12ms layout")
    assert ignored[f"{SPRING}/s1_1/thumbs.db"].startswith("not a patch")
    assert "train_list.txt" in ignored and "SEN12MS_holdOutScenes.txt" in ignored
    assert f"ignored {len(ignored)} file(s)/folder(s)" in err


def test_duplicate_and_unicode_patch_ids_are_excluded(tree: Path) -> None:
    folder = tree / SPRING / "s1_1"
    shutil.copy(folder / f"{SPRING}_s1_1_p3.tif", folder / f"{SPRING}_s1_1_p03.tif")
    os.replace(folder / f"{SPRING}_s1_1_p1.tif", folder / f"{SPRING}_s1_1_p\u0661.tif")  # Arabic-Indic one
    result = scan(tree, "sen12ms")
    reasons = {e.key: e.reason for e in result.excluded}
    assert reasons[f"{SPRING}/s1_1/{SPRING}_s1_1_p03.tif"].startswith("ambiguous: ")
    assert reasons[f"{SPRING}/s1_1/{SPRING}_s1_1_p3.tif"].startswith("ambiguous: ")
    assert reasons[f"{SPRING}/s1_1/{SPRING}_s1_1_p\u0661.tif"].startswith("unrecognised name")
    assert reasons["ROIs1158_spring_1_p1"].startswith("lone file(s)") and reasons["ROIs1158_spring_1_p3"].startswith("lone file(s)")
    assert {p.key for p in result.pairs}.isdisjoint({"ROIs1158_spring_1_p1", "ROIs1158_spring_1_p3"}) and len(result.pairs) == 10


def test_duplicate_scene_folders_are_excluded(tree: Path) -> None:
    (tree / SPRING / "s1_01").mkdir()
    os.replace(tree / SPRING / "s1_1" / f"{SPRING}_s1_1_p6.tif", tree / SPRING / "s1_01" / f"{SPRING}_s1_1_p6.tif")
    result = scan(tree, "sen12ms")
    ambiguous = [e for e in result.excluded if e.reason.startswith("ambiguous: folders")]
    assert len(ambiguous) == 6 and "s1_01 and s1_1" in ambiguous[0].reason
    assert {p.roi for p in result.pairs} == {SUMMER}  # no scene-1 S1 is trusted


def test_symlink_loop_is_one_line(tree: Path, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    os.symlink("s1_7", tree / SPRING / "s1_7")
    out = tmp_path / "o"
    assert main(["shard", "--src", str(tree), "--dataset", "sen12ms", "--out", str(out)]) == 0
    err = capsys.readouterr().err
    assert "Traceback" not in err and f"{tree / SPRING / 's1_7'}: symlink loop" in err
    ignored = json.loads((out / "manifest.json").read_text())["ignored"]
    assert any(i["path"] == f"{SPRING}/s1_7" and i["reason"].startswith("symlink loop") for i in ignored)


# --------------------------------------------------------------------------------------------
# Output directory that holds another shard set
# --------------------------------------------------------------------------------------------


def test_shard_refuses_other_shard_set_and_overwrite_cleans(sen12ms_tree: Path, dfc_tree: Path, tmp_path: Path) -> None:
    out = tmp_path / "s"
    shard_dataset(sen12ms_tree, "sen12ms", out, maxcount=2)
    assert len(list(out.glob("*.tar"))) == 6
    with pytest.raises(SatfuseError, match=r"holds another shard set \(dataset 'sen12ms'.*--overwrite"):
        shard_dataset(dfc_tree, "dfc2020", out, maxcount=4)
    manifest = shard_dataset(dfc_tree, "dfc2020", out, maxcount=4, overwrite=True)
    assert sorted(p.name for p in out.glob("*.tar")) == [s["name"] for s in manifest["shards"]] == ["s-000000.tar", "s-000001.tar", "s-000002.tar"]
    assert verify(out) == []
    renamed = tmp_path / "t"
    out.rename(renamed)  # another name: its tars are s-*.tar
    with pytest.raises(SatfuseError, match="holds another shard set"):
        shard_dataset(dfc_tree, "dfc2020", renamed, maxcount=4)
    shard_dataset(dfc_tree, "dfc2020", renamed, maxcount=4, overwrite=True)
    assert sorted(p.name for p in renamed.glob("*.tar")) == ["t-000000.tar", "t-000001.tar", "t-000002.tar"]


# --------------------------------------------------------------------------------------------
# A user's own pairs
# --------------------------------------------------------------------------------------------


def test_pairs_file_packs_any_collection(sen12ms_tree: Path, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    src = tmp_path / "mine"
    for i, sensor in [(1, "s1"), (1, "s2"), (2, "s1"), (2, "s2"), (3, "s1")]:
        (src / f"site{i}").mkdir(parents=True, exist_ok=True)
        shutil.copy(patch_path(sen12ms_tree, SPRING, sensor, 1, i), src / f"site{i}" / f"{sensor}.tif")
    label = _read(patch_path(sen12ms_tree, SPRING, "lc", 1, 1))[:1].astype(np.uint16)
    shutil.copy(patch_path(sen12ms_tree, SPRING, "lc", 1, 1), src / "site1" / "label.tif")
    _rewrite(src / "site1" / "label.tif", label)
    shutil.copy(patch_path(sen12ms_tree, SPRING, "lc", 1, 2), src / "site2" / "label.tif")
    _rewrite(src / "site2" / "label.tif", _read(src / "site2" / "label.tif")[:1])
    (src / "notes.md").write_text("x")
    pairs = tmp_path / "pairs.csv"
    with open(pairs, "w", newline="") as fh:
        w = csv.writer(fh)
        w.writerows([["s1", "s2", "label"], ["site1/s1.tif", "site1/s2.tif", "site1/label.tif"],
                     ["site2/s1.tif", "site2/s2.tif", "site2/label.tif"], ["site3/s1.tif", "site3/s2.tif", "site3/label.tif"]])  # fmt: skip
    out = tmp_path / "p"
    assert main(["shard", "--src", str(src), "--dataset", "pairs", "--pairs-file", str(pairs), "--out", str(out)]) == 0
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["total_samples"] == 2 and manifest["label"] == "label" and manifest["dataset"] == "pairs"
    assert manifest["excluded"] == [] and manifest["missing"]["count"] == 1
    assert [e["key"] for e in manifest["missing"]["first"]] == ["site3_s2"] and manifest["missing"]["first"][0]["reason"].startswith("missing:")
    assert {i["path"] for i in manifest["ignored"]} == {"notes.md"}
    assert verify(out) == []
    with pytest.raises(SatfuseError, match="needs --pairs-file"):
        shard_dataset(src, "pairs", tmp_path / "q")


# --------------------------------------------------------------------------------------------
# The synthetic trees keep third-party contracts (datasets.md), checked without their code
# --------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def full_sen12ms(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("full") / "SEN12MS"
    write_sen12ms(root, scenes=5, patches_per_scene=2, seed=0, size=16)
    return root


def test_synth_sen12ms_writes_the_published_files(full_sen12ms: Path) -> None:
    root = full_sen12ms
    assert sorted(p.name for p in root.glob("ROIs*")) == ["ROIs1158_spring", "ROIs1868_summer", "ROIs1970_fall", "ROIs2017_winter"]
    rows = (_csv(root / "sen12ms_observations.csv"))
    assert len(rows) == 10 and rows[0] == ["Seasons.SPRING", "1", "1"]  # no header, the authors' tokens
    raw = (root / "test_list.txt").read_bytes()
    assert raw.endswith(b"\r\n") and raw.count(b"\r\n") == 2 and raw.startswith(b"ROIs1158_spring_s2_5_p1.tif")
    assert pickle.loads((root / "test_list.pkl").read_bytes()) == raw.decode().split()
    assert (root / "SEN12MS_holdOutScenes.txt").read_text() == "ROIs1158_spring/s1_5\n"
    held = scan(root, "sen12ms", root / "train_list.txt", exclude_scenes=root / "SEN12MS_holdOutScenes.txt")
    assert len(held.pairs) == 8 and not held.excluded


def test_torchgeo_and_hsg_paths_exist_on_synth_sen12ms(full_sen12ms: Path) -> None:
    root = full_sen12ms
    for list_name in ("train_list.txt", "test_list.txt"):  # torchgeo: line.rstrip(), parts[2] = sensor
        for line in (root / list_name).read_text().splitlines():
            name = line.rstrip()
            for sensor in ("s1", "s2", "lc"):
                parts = name.split("_")
                parts[2] = sensor
                assert (root / "_".join(parts[:2]) / "_".join(parts[2:4]) / "_".join(parts)).is_file()
    seasons = {"Seasons.SPRING": SPRING, "Seasons.SUMMER": SUMMER, "Seasons.FALL": "ROIs1970_fall", "Seasons.WINTER": "ROIs2017_winter"}
    for token, scene, pid in _csv(root / "sen12ms_observations.csv"):  # HSG: <base>/<season>/<sensor>_<scene>/...
        season = seasons[token]
        for sensor in ("s1", "s2", "lc"):
            assert (root / season / f"{sensor}_{scene}" / f"{season}_{sensor}_{scene}_p{pid}.tif").is_file()


def test_third_party_dfc_paths_exist_on_synth_dfc2020(dfc_tree: Path) -> None:
    for split in ("validation", "test"):  # LL: glob s2_*/*.tif, derive s1 and dfc by replace()
        s2_files = glob.glob(str(dfc_tree / f"ROIs0000_{split}" / "s2_*" / "*.tif"))
        assert s2_files
        for s2 in s2_files:
            assert Path(s2.replace("_s2_", "_s1_").replace("s2_", "s1_")).is_file()
            assert Path(s2.replace("s2_", "dfc_")).is_file() and Path(s2.replace("s2_", "lc_")).is_file()
    assert (dfc_tree / "ROIs0000_validation" / "s2_validation" / "ROIs0000_validation_s2_0_p1.tif").is_file()
    rows = (_csv(dfc_tree / "test_observations.csv"))
    assert rows[0] == ["Seasons.TESTSET", "0", "1"] and len(rows) == 4
    for _, scene, pid in rows:  # HSG: ROIs0000_test/<sensor>_0/ROIs0000_test_<sensor>_0_p<ID>.tif
        for sensor in ("s1", "s2", "dfc"):
            assert (dfc_tree / "ROIs0000_test" / f"{sensor}_{scene}" / f"ROIs0000_test_{sensor}_{scene}_p{pid}.tif").is_file()
    assert (_csv(dfc_tree / "validation_observations.csv"))[0] == ["Seasons.VALSET", "0", "1"]
    with rasterio.open(dfc_tree / "ROIs0000_test" / "lc_0" / "ROIs0000_test_lc_0_p1.tif") as ds:
        assert ds.count == 4


def test_known_broken_sen12ms_patch_is_named_and_excludable(tree: Path, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    """SEN12MS's ROIs1868_summer_s1_146_p202 has NaN in S1 (the SEN12MS README)."""
    for sensor in ("s1", "s2", "lc"):
        dst = patch_path(tree, SUMMER, sensor, 146, 202)
        dst.parent.mkdir()
        shutil.copy(patch_path(tree, SUMMER, sensor, 2, 1), dst)
    s1 = patch_path(tree, SUMMER, "s1", 146, 202)
    values = _read(s1)
    values[0, 3, 4] = np.nan
    _rewrite(s1, values)
    cmd = ["shard", "--src", str(tree), "--dataset", "sen12ms", "--out", str(tmp_path / "o")]
    assert main(cmd) == 2
    assert f"non-finite: {s1} has 1 NaN/Inf pixel(s)" in capsys.readouterr().err
    assert main([*cmd, "--exclude-bad"]) == 0
    manifest = json.loads((tmp_path / "o" / "manifest.json").read_text())
    assert [e["key"] for e in manifest["excluded"]] == ["ROIs1868_summer_146_p202"] and manifest["total_samples"] == 12


def test_dfc2020_both_folder_variants_at_once_are_ambiguous(dfc_tree: Path, tmp_path: Path) -> None:
    root = tmp_path / "DFC2020"
    shutil.copytree(dfc_tree, root)
    shutil.copytree(root / "ROIs0000_validation" / "s1_validation", root / "ROIs0000_validation" / "s1_0")
    result = scan(root, "dfc2020")
    assert {p.season for p in result.pairs} == {"test"}
    assert any("folders s1_0 and s1_validation both name scene 0 of s1" in e.reason for e in result.excluded)


def test_dfc2020_samples_with_lc_still_label_with_dfc(dfc_tree: Path, tmp_path: Path) -> None:
    """DFC2020 samples carry lc.npy beside dfc.npy; the stream loader's label is dfc."""
    from satfuse.data.reading.stream_io import decode_label, read_shard

    out = tmp_path / "d"
    shard_dataset(dfc_tree, "dfc2020", out, maxcount=16)
    (sample,) = list(read_shard(str(out / "d-000000.tar"), 0, {0}, 0))
    name, label = decode_label(sample)
    assert name == "dfc" and label.shape == (1, 32, 32) and int(label.max()) <= 10


def test_synth_cli_writes_renamed_validation_folders(tmp_path: Path) -> None:
    out = tmp_path / "dfc"
    assert main(["synth", "dfc2020", "--out", str(out), "--n-validation", "2", "--n-test", "1", "--size", "16", "--validation-folders", "0"]) == 0
    assert sorted(p.name for p in (out / "ROIs0000_validation").iterdir()) == ["dfc_0", "lc_0", "s1_0", "s2_0"]
    assert len(scan(out, "dfc2020").pairs) == 3

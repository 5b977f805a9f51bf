"""Layout scan and pairing: real names, lone files, split lists, bad roots."""

from __future__ import annotations

from pathlib import Path

import pytest

from satfuse.data.sources.layout import make_key, patch_path
from satfuse.data.sources.split_lists import read_split
from satfuse.data.sources.tree_scan import scan
from satfuse.utils import SatfuseError


def test_scan_pairs_every_patch_sorted(sen12ms_tree: Path) -> None:
    result = scan(sen12ms_tree, "sen12ms")
    assert len(result.pairs) == 12 and result.excluded == [] and result.label == "lc"
    ids = [(p.roi, p.scene, p.patch) for p in result.pairs]
    assert ids == sorted(ids)
    first = result.pairs[0]
    assert first.key == "ROIs1158_spring_1_p1" and first.season == "spring"
    assert first.s1 == patch_path(sen12ms_tree, "ROIs1158_spring", "s1", 1, 1)
    assert first.s2.name == "ROIs1158_spring_s2_1_p1.tif" and first.label.name == "ROIs1158_spring_lc_1_p1.tif"
    assert {p.roi for p in result.pairs} == {"ROIs1158_spring", "ROIs1868_summer"}


def test_scan_dfc_layout(dfc_tree: Path) -> None:
    result = scan(dfc_tree, "dfc2020")
    assert len(result.pairs) == 9 and result.label == "dfc"
    assert {p.season for p in result.pairs} == {"validation", "test"}
    assert "ROIs0000_validation_0_p3" in {p.key for p in result.pairs}
    assert all(p.scene == 0 and p.label.parent.name in ("dfc_0", "dfc_validation") for p in result.pairs)


def test_lone_files_are_excluded_with_reason(tree: Path) -> None:
    patch_path(tree, "ROIs1158_spring", "s2", 1, 2).unlink()  # S1 without S2
    for sensor in ("s1", "s2"):  # a label alone
        patch_path(tree, "ROIs1868_summer", sensor, 2, 3).unlink()
    result = scan(tree, "sen12ms")
    assert len(result.pairs) == 10
    reasons = {e.key: e.reason for e in result.excluded}
    assert reasons.keys() == {"ROIs1158_spring_1_p2", "ROIs1868_summer_2_p3"}
    assert reasons["ROIs1158_spring_1_p2"].startswith("lone file(s)") and "s2 missing" in reasons["ROIs1158_spring_1_p2"]
    assert "s1, s2 missing" in reasons["ROIs1868_summer_2_p3"]


def test_missing_label_is_excluded_when_tree_has_labels(tree: Path) -> None:
    patch_path(tree, "ROIs1158_spring", "lc", 1, 4).unlink()
    result = scan(tree, "sen12ms")
    assert [e.key for e in result.excluded] == ["ROIs1158_spring_1_p4"]
    assert "lc missing" in result.excluded[0].reason


def test_misnamed_file_is_listed(tree: Path) -> None:
    src = patch_path(tree, "ROIs1158_spring", "s1", 1, 5)
    src.rename(src.with_name("ROIs1158_spring_s1_1_patch5.tif"))
    result = scan(tree, "sen12ms")
    kinds = sorted(e.reason.split(":")[0] for e in result.excluded)
    assert kinds == ["lone file(s)", "unrecognised name"]


def test_split_file_selects_pairs_and_reports_missing(sen12ms_tree: Path, tmp_path: Path) -> None:
    split = tmp_path / "mine_observations.csv"
    split.write_text("Season,Scene,ID\nSeasons.SPRING,1,2\nSeasons.SUMMER,2,6\nSeasons.SUMMER,2,99\n")
    result = scan(sen12ms_tree, "sen12ms", split)
    assert [p.key for p in result.pairs] == ["ROIs1158_spring_1_p2", "ROIs1868_summer_2_p6"]
    assert [e.key for e in result.excluded] == [make_key("ROIs1868_summer", 2, 99)]
    assert result.excluded[0].reason.startswith("missing:")


def test_synth_split_lists_cover_the_tree(sen12ms_tree: Path, dfc_tree: Path) -> None:
    train = read_split(sen12ms_tree / "train_list.txt", "sen12ms")
    val = read_split(sen12ms_tree / "test_list.txt", "sen12ms")
    assert len(train) == 6 and len(val) == 6 and not train & val
    assert read_split(sen12ms_tree / "sen12ms_observations.csv", "sen12ms") == train | val
    assert (sen12ms_tree / "sen12ms_observations.csv").read_text().splitlines()[0] == "Seasons.SPRING,1,1"
    assert len(scan(dfc_tree, "dfc2020", dfc_tree / "test_observations.csv").pairs) == 4
    assert (dfc_tree / "validation_observations.csv").read_text().splitlines()[1] == "Seasons.VALSET,0,2"


@pytest.mark.parametrize(
    ("text", "match"),
    [("Season,Scene\nSeasons.SPRING,1\n", "Season,Scene,ID"), ("Season,Scene,ID\nSeasons.MONSOON,1,1\n", "unknown Season"),
     ("Season,Scene,ID\nSeasons.SPRING,x,1\n", "must be integers")],
)  # fmt: skip
def test_bad_split_file(sen12ms_tree: Path, tmp_path: Path, text: str, match: str) -> None:
    split = tmp_path / "bad_observations.csv"
    split.write_text(text)
    with pytest.raises(SatfuseError, match=match):
        scan(sen12ms_tree, "sen12ms", split)


def test_bad_roots(tmp_path: Path) -> None:
    with pytest.raises(SatfuseError, match="does not exist"):
        scan(tmp_path / "nope", "sen12ms")
    (tmp_path / "empty").mkdir()
    with pytest.raises(SatfuseError, match="is empty"):
        scan(tmp_path / "empty", "sen12ms")
    (tmp_path / "other" / "photos").mkdir(parents=True)
    with pytest.raises(SatfuseError, match="no sen12ms patches found"):
        scan(tmp_path / "other", "sen12ms")

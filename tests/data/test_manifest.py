"""satfuse.data.manifest: one owner of the shard format, one validator for every reader."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from satfuse.data.manifest import FORMAT, load, tar_name, url_tar_name
from satfuse.data.shard_sets import resolve_shards
from satfuse.data.verify import verify
from satfuse.evaluation.data import read_manifest
from satfuse.utils import SatfuseError


def _write(folder: Path, doc: object) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "manifest.json").write_text(json.dumps(doc))
    return folder


def test_names_have_one_meaning() -> None:
    assert tar_name("sen12ms", 3) == "sen12ms-000003.tar"
    assert url_tar_name("/data/shards/x/x-000007.tar") == "x-000007.tar"
    assert url_tar_name("pipe:aws s3 cp s3://bucket/x/x-000001.tar -") == "x-000001.tar"
    assert url_tar_name("/data/my set/my set-000001.tar") == "my set-000001.tar"  # a local name keeps its space


@pytest.mark.parametrize(("doc", "message"), [
    ({"format": "other/1", "shards": [], "stats": {"s1": {}, "s2": {}}}, f"not a {FORMAT} manifest (its format is 'other/1'"),
    ({"format": "satfuse-shards/2", "shards": [], "stats": {"s1": {}, "s2": {}}},
     f"not a {FORMAT} manifest: it is satfuse-shards/2, written by a newer satfuse"),
    ({"format": FORMAT, "shards": [{"count": 3}], "stats": {"s1": {}, "s2": {}}}, "no 'shards' list of {name, count}"),
    ({"format": FORMAT, "shards": [], "stats": {"s1": {}}}, "stats lack 's2'"),
])
def test_every_reader_gets_the_same_one_line_error(tmp_path: Path, doc: dict, message: str) -> None:
    folder = _write(tmp_path / "set", doc)
    path = folder / "manifest.json"
    with pytest.raises(SatfuseError, match="re-shard") as raised:
        load(path)
    assert str(raised.value).startswith(f"{path}: ") and message in str(raised.value) and "\n" not in str(raised.value)
    with pytest.raises(SatfuseError, match=message.replace("{", r"\{").replace("}", r"\}").replace("(", r"\(")):
        resolve_shards(str(folder))
    assert message in verify(folder)[0]


def test_label_readers_validate_the_format_too(tmp_path: Path) -> None:
    """The DFC2020 pipeline used to accept any JSON here; it now goes through the same validator."""
    folder = _write(tmp_path / "set", {"format": "something-else", "shards": []})
    with pytest.raises(SatfuseError, match=f"not a {FORMAT} manifest"):
        read_manifest(folder)
    ok = _write(tmp_path / "ok", {"format": FORMAT, "shards": []})  # no stats: label readers do not need them
    assert read_manifest(ok)["format"] == FORMAT


def test_missing_and_broken_manifest_name_the_file(tmp_path: Path) -> None:
    with pytest.raises(SatfuseError, match=r"manifest.json: missing, so there is no manifest.json"):
        load(tmp_path / "manifest.json")
    (tmp_path / "manifest.json").write_text("{not json")
    with pytest.raises(SatfuseError, match="manifest is not valid JSON"):
        load(tmp_path / "manifest.json")

"""satfuse.data.format.manifest: one owner of the shard format, one validator for every reader."""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import pytest

from satfuse.data.format.manifest import FORMAT, load, tar_name, url_tar_name
from satfuse.data.format.verify import verify
from satfuse.data.reading.shard_sets import resolve_shards
from satfuse.evaluation.data import load_split, read_manifest
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
    (ok / "stray-000000.tar").write_bytes(b"")  # fine-tuning used to glob *.tar here without a word
    with pytest.raises(SatfuseError, match=r"manifest.json: manifest lists no shards \(1 .tar file\(s\) beside it, "
                                           r"e.g. stray-000000.tar, are not read without an entry\); re-shard"):
        load_split(ok)


def test_missing_and_broken_manifest_name_the_file(tmp_path: Path) -> None:
    with pytest.raises(SatfuseError, match=r"manifest.json: missing, so there is no manifest.json"):
        load(tmp_path / "manifest.json")
    (tmp_path / "manifest.json").write_text("{not json")
    with pytest.raises(SatfuseError, match="manifest is not valid JSON"):
        load(tmp_path / "manifest.json")


def test_a_manifest_names_plain_tars_never_commands(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A manifest is data: `pipe:sh evil.sh` (a file of that name beside it) used to run with
    data.shards=. ; every name that is not a plain tar in the set's own folder is refused
    by every reader, and a local shard is opened by its absolute path."""
    from tests.data.loader_shards import make_shards

    d = make_shards(tmp_path, [3])
    marker = tmp_path / "ran"
    (d / "evil.sh").write_text(f"touch {marker}\n")
    good = (d / "manifest.json").read_text()
    monkeypatch.chdir(d)
    assert all(Path(u).is_absolute() for u in resolve_shards(".").urls)
    for name, why in (("pipe:sh evil.sh", "URL scheme or pipe:"), ("http://host/x.tar", "path separator"),
                      ("../synth/synth-000000.tar", "path separator"), ("..x.tar", "outside"), ("x.tgz", "not a .tar")):
        (d / name.split("/")[0]).write_bytes((d / "synth-000000.tar").read_bytes()) if "/" not in name else None
        doc = json.loads(good)
        doc["shards"][0]["name"] = name
        (d / "manifest.json").write_text(json.dumps(doc))
        for spec in (".", "./"):
            with pytest.raises(SatfuseError, match=f"shard entry 0 name .* {why}") as raised:
                resolve_shards(spec)
            assert str(raised.value).startswith(str(Path("manifest.json"))) and "\n" not in str(raised.value)
        assert why in verify(Path("."))[0]
        with pytest.raises(SatfuseError, match=why):
            read_manifest(d)
    assert not marker.exists()


def test_manifest_integrity_holes_are_refused(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """Repeated shards, entries without sha256/bytes, a count below the tar's, one set under two
    spellings and a set re-packed under the same names: each refused or noticed."""
    from satfuse.data.reading.pretrain_loader import PretrainLoader
    from satfuse.data.reading.shard_sets import same_set_warning
    from satfuse.data.reading.stream_io import _digests, index_shard
    from tests.data.loader_shards import data_cfg, make_shards

    a = make_shards(tmp_path / "a", [4, 3])
    good = json.loads((a / "manifest.json").read_text())
    for change, message in (
        (lambda doc: doc["shards"].append(dict(doc["shards"][0])), "is listed twice (entries 0 and 2)"),
        (lambda doc: doc["shards"][1].pop("sha256"), "has no valid sha256"),
        (lambda doc: doc["shards"][1].update(sha256=""), "has no valid sha256"),
        (lambda doc: doc["shards"][0].pop("bytes"), "has bytes=None"),
        (lambda doc: doc["shards"][0].update(count=-1), "has count=-1"),
    ):
        doc = json.loads(json.dumps(good))
        change(doc)
        (a / "manifest.json").write_text(json.dumps(doc))
        with pytest.raises(SatfuseError, match=re.escape(message)):
            resolve_shards(str(a))
        assert message in verify(a)[0]
    doc = json.loads(json.dumps(good))
    doc["shards"][0]["count"] = 3  # the tar holds 4: the 4th would have been dropped without a word
    (a / "manifest.json").write_text(json.dumps(doc))
    _digests.cache_clear()  # keyed by mtime, which may not tick between two quick writes
    index = index_shard(str(a / "synth-000000.tar"))
    assert index.samples == [] and "the tar holds 4 samples, manifest.json says 3" in index.error
    (a / "manifest.json").write_text(json.dumps(good))
    _digests.cache_clear()
    assert len(index_shard(str(a / "synth-000000.tar")).samples) == 4

    with pytest.raises(SatfuseError, match="is listed twice"):
        resolve_shards([str(a), f"{a.parent}/./synth"])
    with pytest.raises(SatfuseError, match="is listed twice"):
        resolve_shards(f"{a}/synth-000000.tar,{a}/../synth/synth-000000.tar")
    copies = tmp_path / "copies"
    copies.mkdir()
    shutil.copy(a / "synth-000000.tar", copies)
    with caplog.at_level("WARNING"):
        assert resolve_shards(f"{a}/synth-000000.tar").counts == [4] and "cannot check" not in caplog.text
        resolve_shards(f"{copies}/synth-000000.tar", manifest=str(a / "manifest.json"))
    assert f"{copies}: 1 shard(s) have no manifest.json beside them" in caplog.text
    ss = resolve_shards(str(a))
    alias = resolve_shards(f"{a}/")
    assert "data.val_shards=" in same_set_warning(ss, alias, "data.shards", "data.val_shards")

    b = make_shards(tmp_path / "b", [4, 3], first_id=100)  # same names and counts, other bytes: a re-pack
    other = resolve_shards(str(b))
    assert same_set_warning(ss, other, "data.shards", "data.val_shards") == ""
    state = PretrainLoader(ss, data_cfg(), rank=0, world_size=1, seed=0).state_dict()
    with pytest.raises(SatfuseError, match="re-packed since"):
        PretrainLoader(other, data_cfg(), rank=0, world_size=1, seed=0).load_state_dict([state])
    PretrainLoader(alias, data_cfg(), rank=0, world_size=1, seed=0).load_state_dict([state])


def test_resume_from_a_loader_state_of_the_previous_satfuse(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """A loader state written before sha256s were in the shard fingerprint (names + counts)
    still resumes, exactly where it stopped, with one warning; a re-packed set is
    still refused from a state of this satfuse."""
    import hashlib

    import torch

    from satfuse.data.reading.pretrain_loader import PretrainLoader
    from tests.data.loader_shards import data_cfg, make_shards, run_rank

    ss = resolve_shards(str(make_shards(tmp_path / "a", [8, 7])))
    first = PretrainLoader(ss, data_cfg(), rank=0, world_size=1, seed=0)
    run_rank(first, 1)
    state = json.loads(json.dumps(first.state_dict()))
    old = dict(state)  # the same keys as main's PretrainLoader.state_dict, but its shard fingerprint:
    names = [f"synth-{i:06d}.tar" for i in range(2)]
    old["shards"] = hashlib.sha256(json.dumps([names, [8, 7]]).encode()).hexdigest()[:16]
    with caplog.at_level("WARNING"):
        resumed = PretrainLoader(ss, data_cfg(), rank=0, world_size=1, seed=0)
        resumed.load_state_dict([old])
    assert caplog.text.count("predates shard sha256s") == 1 and "re-packed since cannot be told" in caplog.text
    assert (resumed.state_dict()["epoch"], resumed.state_dict()["step"]) == (0, 1)
    whole = run_rank(PretrainLoader(ss, data_cfg(), rank=0, world_size=1, seed=0), 2)
    got = run_rank(resumed, 1)[0]
    assert got["key"] == whole[1]["key"] and torch.equal(got["s2"], whole[1]["s2"])

    other = resolve_shards(str(make_shards(tmp_path / "b", [8, 7], first_id=100)))  # same names and counts
    with pytest.raises(SatfuseError, match="re-packed since"):
        PretrainLoader(other, data_cfg(), rank=0, world_size=1, seed=0).load_state_dict([state])
    old["shards"] = hashlib.sha256(json.dumps([names, [8, 8]]).encode()).hexdigest()[:16]  # other counts
    with pytest.raises(SatfuseError, match="another shard set"):
        PretrainLoader(ss, data_cfg(), rank=0, world_size=1, seed=0).load_state_dict([old])


def test_fine_tuning_warns_when_test_is_train(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    from satfuse.evaluation.finetune import FtDataConfig, prepare_data
    from tests.evaluation.helpers import write_dfc_shards

    train = write_dfc_shards(tmp_path / "train", 20, 16, seed=0)
    test = write_dfc_shards(tmp_path / "test", 10, 16, seed=1)
    with caplog.at_level("WARNING"):
        prepare_data(FtDataConfig(train_shards=str(train), test_shards=str(test), crop=8), 0)
        assert "not held-out" not in caplog.text
        prepare_data(FtDataConfig(train_shards=str(train), test_shards=f"{train}/.", crop=8), 0)
    assert "data.test_shards" in caplog.text and "shares 1 shard(s)" in caplog.text and "not held-out" in caplog.text

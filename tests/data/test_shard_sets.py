"""resolve_shards: every spec form, and a clear SatfuseError for every bad one."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from satfuse.data.reading.pretrain_loader import PretrainLoader
from satfuse.data.reading.shard_sets import resolve_shards
from satfuse.utils import SatfuseError
from tests.data.loader_shards import data_cfg, run_rank, sample_ids


def test_directory_spec(shard_dir: Path) -> None:
    ss = resolve_shards(str(shard_dir))
    assert ss.counts == [23, 17, 30, 9, 21, 25, 12]
    assert [Path(u).name for u in ss.urls] == [f"synth-{i:06d}.tar" for i in range(7)]
    assert set(ss.stats) >= {"s1", "s2"} and ss.manifest["format"] == "satfuse-shards/1"


def test_brace_and_comma_specs(shard_dir: Path) -> None:
    brace = resolve_shards(f"{shard_dir}/synth-{{000001..000003}}.tar")
    assert brace.counts == [17, 30, 9]
    comma = resolve_shards(f"{shard_dir}/synth-000004.tar,{shard_dir}/synth-000000.tar")
    assert comma.counts == [21, 23]


def test_pipe_spec_reads_the_same_samples(shard_dir: Path) -> None:
    spec = ",".join(f"pipe:cat {shard_dir}/synth-{i:06d}.tar" for i in range(7))
    with pytest.raises(SatfuseError, match="data.manifest"):
        resolve_shards(spec)
    piped = resolve_shards(spec, manifest=str(shard_dir / "manifest.json"))
    local = resolve_shards(str(shard_dir))
    assert piped.counts == local.counts
    cfg = data_cfg(crop=0)
    a = run_rank(PretrainLoader(piped, cfg, rank=0, world_size=1, seed=5), 6)
    b = run_rank(PretrainLoader(local, cfg, rank=0, world_size=1, seed=5), 6)
    assert [sample_ids(x) for x in a] == [sample_ids(x) for x in b]
    assert all((x["s2"] == y["s2"]).all() for x, y in zip(a, b, strict=True))


@pytest.mark.parametrize(
    ("spec", "match"),
    [
        ("", "data.shards is empty"),
        ("{d}/synth-{{000005..000009}}.tar", "shard not found"),
        ("{d}/nothing-here.tar", "shard not found"),
    ],
)
def test_bad_specs(shard_dir: Path, spec: str, match: str) -> None:
    with pytest.raises(SatfuseError, match=match):
        resolve_shards(spec.format(d=shard_dir))


def test_unknown_shard_name_vs_manifest(shard_dir: Path, tmp_path: Path) -> None:
    other = tmp_path / "other"
    other.mkdir()
    shutil.copy(shard_dir / "synth-000000.tar", other / "renamed-000000.tar")
    with pytest.raises(SatfuseError, match="not listed in"):
        resolve_shards(str(other / "renamed-000000.tar"), manifest=str(shard_dir / "manifest.json"))
    with pytest.raises(SatfuseError, match="no manifest.json"):
        resolve_shards(str(other / "renamed-000000.tar"))


def test_dir_with_missing_tar_or_empty_manifest(shard_dir: Path) -> None:
    (shard_dir / "synth-000003.tar").unlink()
    with pytest.raises(SatfuseError, match="synth-000003.tar: listed in the manifest but missing"):
        resolve_shards(str(shard_dir))
    man = json.loads((shard_dir / "manifest.json").read_text())
    man["shards"] = []
    (shard_dir / "manifest.json").write_text(json.dumps(man))
    with pytest.raises(SatfuseError, match="lists no shards"):
        resolve_shards(str(shard_dir))


def test_not_a_manifest(shard_dir: Path) -> None:
    (shard_dir / "manifest.json").write_text('{"format": "something-else"}')
    with pytest.raises(SatfuseError, match="not a satfuse-shards/1 manifest"):
        resolve_shards(str(shard_dir))

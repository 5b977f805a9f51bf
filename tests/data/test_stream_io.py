"""The member index of local shards (memory map + headers parsed once): it must read every
tar exactly as a sequential `tarfile` stream does - same samples, same bytes, same failures
on truncated or corrupt tars - and decoded members must be views, not copies."""

from __future__ import annotations

import io
import tarfile
from pathlib import Path

import numpy as np
import pytest

from satfuse.data.reading.pretrain_loader import PretrainLoader
from satfuse.data.reading.shard_sets import resolve_shards
from satfuse.data.reading.stream_io import (
    MemberRef,
    ShardCache,
    decode_pair,
    index_shard,
    load_npy,
    read_shard,
)
from satfuse.utils import SatfuseError
from tests.data.loader_shards import data_cfg, make_sample, make_shards, run_rank, truncate


def tarfile_members(path: Path) -> list[tuple[str, int, int]]:
    with tarfile.open(path, "r:") as tf:
        return [(m.name, m.offset_data, m.size) for m in tf if m.isfile()]


def index_members(path: Path) -> list[tuple[str, int, int]]:
    index = index_shard(str(path))
    assert not index.error
    return [(f"{key}.{ext}", ref.offset, ref.size) for key, members in index.samples for ext, ref in members.items()]


def read_all(url: str, n: int) -> list[tuple]:
    """(index, key, S1+S2 bytes) per sample; errors and decode failures as markers."""
    out: list[tuple] = []
    for s in read_shard(url, 0, set(range(n)), n - 1):
        if s.error:
            out.append((s.index, "read error"))
            continue
        try:
            s1, s2 = decode_pair(s)
            out.append((s.index, s.key, s1.tobytes() + s2.tobytes()))
        except ValueError:
            out.append((s.index, s.key, "decode error"))
    return out


def test_index_matches_tarfile(tmp_path: Path) -> None:
    d = make_shards(tmp_path, [5], label=True)
    path = d / "synth-000000.tar"
    assert index_members(path) == tarfile_members(path)


def test_pax_headers_fall_back_to_tarfile(tmp_path: Path) -> None:
    """A member name over 100 characters gets a pax header: the index leaves it to tarfile."""
    path = tmp_path / "long.tar"
    sample = make_sample(7, 8)
    long_key = "d" * 120 + "/" + sample["__key__"]
    with tarfile.open(path, "w", format=tarfile.PAX_FORMAT) as tf:
        for ext in ("json", "s1.npy", "s2.npy"):
            info = tarfile.TarInfo(f"{long_key}.{ext}")
            info.size = len(sample[ext])
            tf.addfile(info, io.BytesIO(sample[ext]))
    assert index_members(path) == tarfile_members(path)
    (raw,) = read_shard(str(path), 0, {0}, 0)
    assert raw.key == long_key and not raw.error
    assert decode_pair(raw)[1][0, 0, 0] == 7


def test_truncated_tar_reads_like_a_sequential_stream(tmp_path: Path) -> None:
    """Cut a shard at many points (inside headers, data and padding): the indexed read gives
    the same samples, bytes and failures as `tarfile` streaming it through a pipe."""
    d = make_shards(tmp_path, [6], hw=8)
    data = (d / "synth-000000.tar").read_bytes()
    cut = tmp_path / "cut.tar"
    for size in [*range(0, len(data), 509), len(data) - 1, len(data) - 1024]:
        cut.write_bytes(data[:size])
        assert read_all(str(cut), 6) == read_all(f"pipe:cat {cut}", 6), f"cut at byte {size}"


@pytest.mark.parametrize("content", [b"", b"\0" * 10, b"garbage", b"x" * 1024])
def test_not_a_tar_is_unreadable(tmp_path: Path, content: bytes) -> None:
    path = tmp_path / "bad.tar"
    path.write_bytes(content)
    (raw,) = read_shard(str(path), 0, {0}, 0)
    assert raw.error.startswith("unreadable tar (ReadError")


def test_truncated_shard_fatal_error_is_one_line_naming_the_file(tmp_path: Path) -> None:
    d = make_shards(tmp_path, [12, 12])
    truncate(d / "synth-000001.tar", 0.5)
    ld = PretrainLoader(resolve_shards(str(d)), data_cfg(on_decode_error="fatal"), rank=0, world_size=1, seed=0)
    with pytest.raises(SatfuseError) as err:
        run_rank(ld, ld.steps_per_epoch)
    message = str(err.value)
    assert "\n" not in message
    assert message.startswith(str(d / "synth-000001.tar") + ": sample ")
    assert "unexpected end of data" in message or "truncated" in message


def test_members_decode_to_views_of_the_map(tmp_path: Path) -> None:
    d = make_shards(tmp_path, [3], hw=16)
    index = ShardCache().get(str(d / "synth-000000.tar"))
    ref = index.samples[1][1]["s2.npy"]
    assert isinstance(ref, MemberRef)
    arr = load_npy(ref, (13,))
    assert arr.shape == (13, 16, 16) and arr[0, 0, 0] == 1 and not arr.flags.writeable
    assert np.shares_memory(arr, np.frombuffer(ref.tar.data, dtype=np.uint8))
    raw = next(iter(read_shard(str(d / "synth-000000.tar"), 0, {2}, 2)))
    s1, s2 = decode_pair(raw, lambda h, w: (4, 2, 8))
    assert s1.shape == (2, 8, 8) and s2.shape == (13, 8, 8) and s2.base is not None


def test_cache_reuses_an_index_until_the_file_changes(tmp_path: Path) -> None:
    d = make_shards(tmp_path, [4, 4])
    cache = ShardCache(capacity=1)
    a, b = str(d / "synth-000000.tar"), str(d / "synth-000001.tar")
    first = cache.get(a)
    assert cache.get(a) is first
    cache.get(b)
    assert cache.get(a) is not first, "capacity 1: the least recently used index is dropped"
    again = cache.get(a)
    truncate(Path(a), 0.5)
    changed = cache.get(a)
    assert changed is not again and len(changed.samples) < len(again.samples)

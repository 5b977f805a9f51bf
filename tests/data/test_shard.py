"""The sharding tool: round trip, manifest, determinism, workers, job-array parts, resume."""

from __future__ import annotations

import io
import json
import os
import signal
import subprocess
import sys
import tarfile
import time
from pathlib import Path

import numpy as np
import pytest
import rasterio
import webdataset as wds

from satfuse.data.packing.raster import npy_buffer
from satfuse.data.packing.shard_dir import merge
from satfuse.data.packing.shard_plan import plan_shards
from satfuse.data.packing.shard_writer import shard_dataset
from satfuse.data.sources.tree_scan import scan
from satfuse.utils import SatfuseError, sha256_file

VOLATILE = {"created", "command", "part_commands"}


def _tars(out: Path) -> list[Path]:
    return sorted(out.glob("*.tar"))


def _stable(manifest: dict) -> dict:
    return {k: v for k, v in manifest.items() if k not in VOLATILE}


def test_round_trip_bit_exact_with_stock_webdataset(sen12ms_tree: Path, tmp_path: Path) -> None:
    out = tmp_path / "s12"
    manifest = shard_dataset(sen12ms_tree, "sen12ms", out, maxcount=5, seed=1)
    urls = [str(p) for p in _tars(out)]
    assert [Path(u).name for u in urls] == ["s12-000000.tar", "s12-000001.tar", "s12-000002.tar"]
    seen = 0
    for sample in wds.WebDataset(urls, shardshuffle=False).decode():
        meta = sample["json"]
        assert sample["__key__"] == meta["key"] and "." not in meta["key"]
        assert meta["dataset"] == "sen12ms" and meta["height"] == meta["width"] == 32
        for sensor in ("s1", "s2", "lc"):
            with rasterio.open(sen12ms_tree / meta["sources"][sensor]) as ds:
                ref = ds.read()
                assert meta["crs"] == ds.crs.to_string() and meta["transform"] == list(ds.transform)[:6]
            got = sample[f"{sensor}.npy"]
            assert got.dtype == ref.dtype and got.shape == ref.shape and np.array_equal(got, ref)
        seen += 1
    assert seen == manifest["total_samples"] == 12


def test_npy_buffer_equals_np_save() -> None:
    for shape, dtype in [((13, 5, 7), np.uint16), ((2, 3, 3), np.float32), ((1, 4, 4), np.uint8)]:
        buf, view = npy_buffer(shape, np.dtype(dtype))
        view[...] = np.arange(np.prod(shape)).reshape(shape).astype(dtype)
        ref = io.BytesIO()
        np.save(ref, view.copy(), allow_pickle=False)
        assert bytes(buf) == ref.getvalue()


def test_manifest_checksums_counts_and_stats(sen12ms_tree: Path, tmp_path: Path) -> None:
    out = tmp_path / "m"
    manifest = shard_dataset(sen12ms_tree, "sen12ms", out, maxcount=5, seed=0)
    on_disk = json.loads((out / "manifest.json").read_text())
    assert _stable(on_disk) == _stable(manifest) and on_disk["format"] == "satfuse-shards/1"
    assert [s["count"] for s in manifest["shards"]] == [5, 5, 2] and manifest["label"] == "lc"
    for entry in manifest["shards"]:
        tar = out / entry["name"]
        assert entry["bytes"] == tar.stat().st_size and entry["sha256"] == sha256_file(tar)
    arrays = {"s1": [], "s2": []}
    for pair in scan(sen12ms_tree, "sen12ms").pairs:
        for sensor in arrays:
            with rasterio.open(getattr(pair, sensor)) as ds:
                arrays[sensor].append(ds.read().astype(np.float64))
    for sensor, items in arrays.items():
        data = np.concatenate([a.reshape(a.shape[0], -1) for a in items], axis=1)
        stats = manifest["stats"][sensor]
        assert stats["count"] == data.shape[1]
        np.testing.assert_allclose(stats["mean"], data.mean(axis=1), rtol=1e-9)
        np.testing.assert_allclose(stats["std"], data.std(axis=1), rtol=1e-6)
        assert stats["min"] == list(data.min(axis=1)) and stats["max"] == list(data.max(axis=1))
    assert {"numpy", "rasterio", "webdataset", "gdal"} <= manifest["versions"].keys()
    assert (out / "manifest.json").stat().st_mode & 0o044 == 0o044  # readable by the cluster


def test_deterministic_and_shuffled_across_shards(sen12ms_tree: Path, tmp_path: Path) -> None:
    a = shard_dataset(sen12ms_tree, "sen12ms", tmp_path / "a" / "x", maxcount=4, seed=7)
    b = shard_dataset(sen12ms_tree, "sen12ms", tmp_path / "b" / "x", maxcount=4, seed=7)
    c = shard_dataset(sen12ms_tree, "sen12ms", tmp_path / "c" / "x", maxcount=4, seed=8)
    assert a["shards"] == b["shards"] and _stable(a) == _stable(b)
    assert [s["sha256"] for s in a["shards"]] != [s["sha256"] for s in c["shards"]]
    plan = plan_shards(scan(sen12ms_tree, "sen12ms").pairs, seed=7, maxcount=4)
    for shard in plan:  # 6 neighbouring patches per scene never fill a shard of 4 on their own
        assert len({p.scene for p in shard}) > 1 or len(shard) < 4
    keys = [s["__key__"] for s in wds.WebDataset(str(_tars(tmp_path / "a" / "x")[0]), shardshuffle=False)]
    assert keys == [p.key for p in plan[0]]


def test_workers_and_maxsize(sen12ms_tree: Path, tmp_path: Path) -> None:
    one = shard_dataset(sen12ms_tree, "sen12ms", tmp_path / "one" / "x", maxcount=3, seed=2)
    two = shard_dataset(sen12ms_tree, "sen12ms", tmp_path / "two" / "x", maxcount=3, seed=2, workers=2)
    assert one["shards"] == two["shards"] and one["stats"] == two["stats"]
    sized = shard_dataset(sen12ms_tree, "sen12ms", tmp_path / "sz" / "x", maxsize=60_000, seed=2)
    assert sized["maxcount"] >= 1 and max(s["bytes"] for s in sized["shards"]) <= 60_000
    assert sum(s["count"] for s in sized["shards"]) == 12 and len(sized["shards"]) > 1
    with pytest.raises(SatfuseError, match="--maxsize"):
        shard_dataset(sen12ms_tree, "sen12ms", tmp_path / "tiny" / "x", maxsize=20_000)


def test_job_array_parts_merge_to_the_single_run(sen12ms_tree: Path, tmp_path: Path) -> None:
    single = shard_dataset(sen12ms_tree, "sen12ms", tmp_path / "single" / "s", maxcount=2, seed=4)
    parts = tmp_path / "parts" / "s"
    for i in (2, 0):
        shard_dataset(sen12ms_tree, "sen12ms", parts, maxcount=2, seed=4, shard_index=i, num_shards=3)
    assert not (parts / "manifest.json").exists()
    with pytest.raises(SatfuseError, match=r"part 1 of 3 is missing .*--shard-index 1 --num-shards 3"):
        merge(parts)
    part1 = shard_dataset(sen12ms_tree, "sen12ms", parts, maxcount=2, seed=4, shard_index=1, num_shards=3)
    assert [r["index"] for r in part1["records"]] == [1, 4]
    merged = merge(parts)
    assert _stable(merged) == _stable(single)
    assert json.loads((parts / "manifest.json").read_text())["stats"] == single["stats"]
    for a, b in zip(_tars(tmp_path / "single" / "s"), _tars(parts), strict=True):
        assert a.name == b.name and a.read_bytes() == b.read_bytes()


def test_reuses_only_shards_that_match(sen12ms_tree: Path, tmp_path: Path) -> None:
    out = tmp_path / "r"
    first = shard_dataset(sen12ms_tree, "sen12ms", out, maxcount=4, seed=0)
    tars = _tars(out)
    before = {t.name: t.stat().st_mtime_ns for t in tars}
    data = bytearray(tars[1].read_bytes())
    data[700] ^= 0xFF  # same size, damaged content
    tars[1].write_bytes(bytes(data))
    time.sleep(0.01)
    again = shard_dataset(sen12ms_tree, "sen12ms", out, maxcount=4, seed=0)
    assert again["shards"] == first["shards"]
    after = {t.name: t.stat().st_mtime_ns for t in _tars(out)}
    assert after[tars[0].name] == before[tars[0].name] and after[tars[2].name] == before[tars[2].name]
    assert after[tars[1].name] != before[tars[1].name]
    smaller = shard_dataset(sen12ms_tree, "sen12ms", out, maxcount=6, seed=0)  # new plan: 2 shards
    assert [t.name for t in _tars(out)] == [s["name"] for s in smaller["shards"]] == ["r-000000.tar", "r-000001.tar"]


def _wait_for(predicate, proc: subprocess.Popen, timeout: float = 60.0) -> None:
    end = time.monotonic() + timeout
    while not predicate():
        assert proc.poll() is None, proc.communicate()
        assert time.monotonic() < end, "timed out waiting for the sharding run"
        time.sleep(0.02)


def test_resume_after_kill_equals_uninterrupted(tree: Path, tmp_path: Path) -> None:
    """Kill -9 while shard 3 is being written (its pair's S2 is a FIFO the reader blocks on),
    rerun, and compare with an uninterrupted run: shards 0-2 are kept, the rest redone."""
    plan = plan_shards(scan(tree, "sen12ms").pairs, seed=0, maxcount=2)
    blocker = plan[3][1].s2
    real = blocker.read_bytes()
    blocker.unlink()
    os.mkfifo(blocker)
    out = tmp_path / "k"
    cmd = [sys.executable, "-m", "satfuse.cli", "shard", "--src", str(tree), "--dataset", "sen12ms", "--out", str(out), "--maxcount", "2"]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        _wait_for(lambda: (out / "k-000003.tar.tmp").exists() and (out / ".satfuse" / "k-000002.tar.json").exists(), proc)
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.communicate()
    assert not (out / "manifest.json").exists()
    kept = {t.name: t.stat().st_mtime_ns for t in _tars(out)}
    assert sorted(kept) == ["k-000000.tar", "k-000001.tar", "k-000002.tar"]
    blocker.unlink()
    blocker.write_bytes(real)
    resumed = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert resumed.returncode == 0, resumed.stderr
    assert {n: (out / n).stat().st_mtime_ns for n in kept} == kept  # not rewritten
    assert not list(out.glob("*.tmp"))
    reference = shard_dataset(tree, "sen12ms", tmp_path / "ref" / "k", maxcount=2, seed=0)
    assert json.loads((out / "manifest.json").read_text())["shards"] == reference["shards"]


def test_dfc2020_shards_carry_the_dfc_label(dfc_tree: Path, tmp_path: Path) -> None:
    manifest = shard_dataset(dfc_tree, "dfc2020", tmp_path / "d", maxcount=4, split_file=dfc_tree / "validation_observations.csv")
    assert manifest["label"] == "dfc" and manifest["total_samples"] == 5
    with tarfile.open(_tars(tmp_path / "d")[0]) as tf:
        names = tf.getnames()
    assert names[:5] == [f"{names[0].split('.')[0]}.{ext}" for ext in ("dfc.npy", "json", "lc.npy", "s1.npy", "s2.npy")]
    assert manifest["aux"] == ["lc"]
    sample = next(iter(wds.WebDataset(str(_tars(tmp_path / "d")[0]), shardshuffle=False).decode()))
    assert sample["dfc.npy"].shape == (1, 32, 32) and sample["dfc.npy"].dtype == np.uint8
    assert sample["json"]["season"] == "validation" and sample["json"]["scene"] == 0


def test_one_writer_per_output_directory(sen12ms_tree: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Two `satfuse shard` runs into one --out: the second is refused in one line naming the
    first (its lease: the run directory's RunLease), with or without --overwrite, and touches
    nothing; job-array parts have one lease each (parts run side by side, a whole run and a
    part refuse each other); a refused run in a new directory leaves no directory behind."""
    from satfuse.engines.rundir import RunLease

    out = tmp_path / "s"
    first = RunLease(out, name=".satfuse/.lock")  # a first run writing: held by this process
    first.acquire()
    for overwrite in (False, True):
        with pytest.raises(SatfuseError, match=r"s: another run is writing this shard directory \(pid "
                                               rf"{os.getpid()} on .*\); wait for it to end, stop it, or choose another --out"):
            shard_dataset(sen12ms_tree, "sen12ms", out, maxcount=4, overwrite=overwrite)
    assert {str(p.relative_to(out)) for p in out.rglob("*")} == {".satfuse", ".satfuse/.lock"}
    first.release()
    part0 = RunLease(out, name=".satfuse/.lock-part-0")
    part0.acquire()
    done = shard_dataset(sen12ms_tree, "sen12ms", out, maxcount=4, shard_index=1, num_shards=2)
    assert [r["index"] for r in done["records"]] == [1]  # another part beside part 0: fine
    with pytest.raises(SatfuseError, match=r"s: job-array part 0 is writing this shard directory"):
        shard_dataset(sen12ms_tree, "sen12ms", out, maxcount=4)
    with pytest.raises(SatfuseError, match="another run is writing this shard directory"):
        shard_dataset(sen12ms_tree, "sen12ms", out, maxcount=4, shard_index=0, num_shards=2)
    part0.release()
    from satfuse.data.packing import shard_writer

    held: list[bool] = []  # --overwrite empties the directory but keeps the lease of the run doing it
    stale = shard_writer.remove_stale
    monkeypatch.setattr(shard_writer, "remove_stale", lambda o, *a: (held.append((o / ".satfuse" / ".lock").is_file()), stale(o, *a)))
    manifest = shard_dataset(sen12ms_tree, "sen12ms", out, maxcount=4, overwrite=True)
    assert held == [True] and manifest["total_samples"] == 12 and not list((out / ".satfuse").glob(".lock*"))
    fresh = tmp_path / "fresh"
    with pytest.raises(SatfuseError):
        shard_dataset(sen12ms_tree, "sen12ms", fresh, maxcount=0)
    assert not fresh.exists()


def test_merge_holds_the_output_directorys_lease(sen12ms_tree: Path, tmp_path: Path) -> None:
    """`satfuse shard merge` takes the whole run's lease: refused while a part (or a whole run,
    or another merge) writes the directory, nothing published; while a merge holds it, a part
    is refused; once free the merge publishes manifest.json and leaves no lease behind."""
    from satfuse.data.packing.shard_dir import out_lease
    from satfuse.engines.rundir import RunLease

    out = tmp_path / "parts"
    for i in (0, 1):
        shard_dataset(sen12ms_tree, "sen12ms", out, maxcount=4, shard_index=i, num_shards=2)
    for name, msg in ((".lock-part-1", r"parts: job-array part 1 is writing this shard directory"),
                      (".lock", r"parts: another run is writing this shard directory")):
        held = RunLease(out, name=f".satfuse/{name}")
        held.acquire()
        with pytest.raises(SatfuseError, match=msg):
            merge(out, command=["t"])
        held.release()
        assert not (out / "manifest.json").exists()
    with out_lease(None, out, None):  # a merge in progress
        with pytest.raises(SatfuseError, match=r"parts: a whole run or merge is writing this shard directory"):
            shard_dataset(sen12ms_tree, "sen12ms", out, maxcount=4, shard_index=0, num_shards=2)
        with pytest.raises(SatfuseError, match="another run is writing this shard directory"):
            merge(out, command=["t"])
    assert merge(out, command=["t"])["total_samples"] == 12
    assert not list((out / ".satfuse").glob(".lock*"))

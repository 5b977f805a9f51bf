"""`satfuse shard --compress / --s1-dtype float16 / --no-labels` (satfuse.data.format.codecs):
round trips, stock webdataset reads, the lossy bound, verify, resume and job-array merges."""

from __future__ import annotations

import io
import json
import re
import shutil
import tarfile
from pathlib import Path

import numpy as np
import pytest
import rasterio
import torch

from satfuse.data.format.codecs import CODECS, DEFAULT_LEVEL, make_encoding, webdataset_handler
from satfuse.data.format.verify import verify
from satfuse.data.packing.shard_dir import merge
from satfuse.data.packing.shard_writer import shard_dataset
from satfuse.data.reading.eval_loader import EvalLoader
from satfuse.data.reading.shard_sets import resolve_shards
from satfuse.evaluation.data import load_split
from satfuse.utils import SatfuseError
from tests.data.loader_shards import data_cfg


def documented_decoder():
    """The webdataset handler exactly as shards/FORMAT.md prints it (the code block with `satfuse_npy`)."""
    text = (Path(__file__).resolve().parents[2] / "shards" / "FORMAT.md").read_text()
    block = next(b for b in re.findall(r"```python\n(.*?)```", text, re.S) if "def satfuse_npy" in b)
    namespace: dict = {}
    exec(block.split("\nfor sample")[0], namespace)  # noqa: S102 - our own documentation
    return namespace["satfuse_npy"]


def pack(src: Path, out: Path, dataset: str = "sen12ms", **enc) -> dict:
    return shard_dataset(src, dataset, out, maxcount=4, seed=0, command=["test"], encoding=make_encoding(**enc))


def members(shard_dir: Path) -> dict[str, dict[str, bytes]]:
    """key -> {tar extension: bytes} of every sample (plain tarfile: no satfuse reader)."""
    out: dict[str, dict[str, bytes]] = {}
    for tar in sorted(shard_dir.glob("*.tar")):
        with tarfile.open(tar) as tf:
            for m in tf:
                key, _, ext = m.name.partition(".")
                out.setdefault(key, {})[ext] = tf.extractfile(m).read()
    return out


def arrays(shard_dir: Path) -> dict[str, dict[str, np.ndarray]]:
    return {k: {ext[:-4]: np.load(io.BytesIO(v)) for ext, v in m.items() if ext.endswith(".npy")}
            for k, m in members(shard_dir).items()}


@pytest.fixture(scope="module")
def plain(sen12ms_tree: Path, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("enc") / "plain"
    pack(sen12ms_tree, out)
    return out


@pytest.mark.parametrize("codec", ["zstd", "lz4", "zstd-blocks", "blocks"])
def test_compressed_set_reads_back_bit_exact_with_stock_webdataset(sen12ms_tree, plain, tmp_path, codec):
    import webdataset as wds

    out = tmp_path / codec
    manifest = pack(sen12ms_tree, out, compress=codec)
    assert manifest["encoding"] == {"compress": codec, "level": DEFAULT_LEVEL[codec],
                                    "s1_dtype": "float32", "labels": True}
    assert verify(out) == []
    names = set(next(iter(members(out).values())))
    suffix = CODECS[codec]
    assert names == {"json", f"s1.npy{suffix}", f"s2.npy{suffix}", f"lc.npy{suffix}"}
    want = arrays(plain)
    urls = [str(p) for p in sorted(out.glob("*.tar"))]
    seen = 0
    handler = documented_decoder()
    for sample in wds.WebDataset(urls, shardshuffle=False).decode(handler):  # stock webdataset + the FORMAT.md decoder
        ref = want[sample["__key__"]]
        for sensor in ("s1", "s2", "lc"):
            got = sample[f"{sensor}.npy{suffix}"]
            assert got.dtype == ref[sensor].dtype and np.array_equal(got, ref[sensor])
        assert sample["json"]["key"] == sample["__key__"]
        seen += 1
    assert seen == len(want) == manifest["total_samples"]
    blob = members(out)[sample["__key__"]][f"s2.npy{suffix}"]  # the library's handler is the same decoder
    assert np.array_equal(webdataset_handler(f"k.s2.npy{suffix}", blob), handler(f"k.s2.npy{suffix}", blob))
    if codec != "blocks":  # raw blocks: the plain bytes plus a block table
        assert sum(s["bytes"] for s in manifest["shards"]) < sum(s["bytes"] for s in json.loads((plain / "manifest.json").read_text())["shards"])


def test_loaders_read_every_encoding_without_configuration(sen12ms_tree, plain, tmp_path):
    """EvalLoader (the same decode path as pretraining) on zstd, and on zstd(-blocks) + float16 + no labels."""
    lossless, lossy, blocked = tmp_path / "z", tmp_path / "zf", tmp_path / "zbf"
    pack(sen12ms_tree, lossless, compress="zstd")
    m = pack(sen12ms_tree, lossy, compress="zstd", s1_dtype="float16", no_labels=True)
    pack(sen12ms_tree, blocked, compress="zstd-blocks", s1_dtype="float16", no_labels=True)

    def batches(d: Path) -> list[dict]:
        return list(EvalLoader(resolve_shards(str(d)), data_cfg(crop=0), rank=0, world_size=1, batch_size=4))

    ref, same, approx, rows = batches(plain), batches(lossless), batches(lossy), batches(blocked)
    std = torch.tensor(resolve_shards(str(plain)).stats["s1"]["std"]).view(1, 2, 1, 1)
    for a, b, c, d in zip(ref, same, approx, rows, strict=True):
        assert d["key"] == c["key"] and torch.equal(d["s1"], c["s1"]) and torch.equal(d["s2"], c["s2"])
        assert a["key"] == b["key"] == c["key"]
        assert torch.equal(a["s1"], b["s1"]) and torch.equal(a["s2"], b["s2"]) and torch.equal(a["lc"], b["lc"])
        assert torch.equal(a["s2"], c["s2"]) and "lc" not in c
        err = ((a["s1"] - c["s1"]).abs() * std).max().item()  # back to dB (stats are of the float32 source)
        assert 0 < err <= m["encoding"]["s1_max_abs_error_db"] * 1.001 + 1e-6


def test_float16_error_is_exact_and_merges_across_job_array_parts(sen12ms_tree, plain, tmp_path):
    single = pack(sen12ms_tree, tmp_path / "single", s1_dtype="float16")
    ref = arrays(plain)
    exact = max(float(np.max(np.abs(ref[k]["s1"].astype(np.float16).astype(np.float64) - ref[k]["s1"].astype(np.float64))))
                for k in ref)
    assert single["encoding"]["s1_max_abs_error_db"] == exact > 0
    assert all(a["s1"].dtype == np.float16 for a in arrays(tmp_path / "single").values())
    assert single["stats"] == json.loads((plain / "manifest.json").read_text())["stats"]  # stats of the source values
    parts = tmp_path / "parts"
    for i in range(2):
        shard_dataset(sen12ms_tree, "sen12ms", parts, maxcount=4, seed=0, shard_index=i, num_shards=2,
                      command=["test"], encoding=make_encoding(s1_dtype="float16"))
    merged = merge(parts, command=["test"])
    assert merged["encoding"] == single["encoding"]
    assert [s["sha256"] for s in merged["shards"]] == [s["sha256"] for s in single["shards"]]


@pytest.mark.parametrize("other", ["lz4", "zstd-blocks"])
def test_parts_with_other_flags_refuse_to_merge(sen12ms_tree, tmp_path, other):
    out = tmp_path / "mixed"
    shard_dataset(sen12ms_tree, "sen12ms", out, maxcount=4, shard_index=0, num_shards=2, command=["t"],
                  encoding=make_encoding(compress="zstd"))
    shard_dataset(sen12ms_tree, "sen12ms", out, maxcount=4, shard_index=1, num_shards=2, command=["t"],
                  encoding=make_encoding(compress=other))
    with pytest.raises(SatfuseError, match="other encoding flags.*--compress"):
        merge(out, command=["t"])


def test_rerun_with_other_flags_rewrites_every_shard(sen12ms_tree, tmp_path):
    out = tmp_path / "s"
    first = pack(sen12ms_tree, out, compress="lz4")
    again = pack(sen12ms_tree, out, compress="zstd")  # same plan, other flags: nothing reused
    assert all(".zst" in ext or ext == "json" for m in members(out).values() for ext in m)
    assert not {s["sha256"] for s in first["shards"]} & {s["sha256"] for s in again["shards"]}
    side = json.loads(next((out / ".satfuse").glob("*.tar.json")).read_text())
    assert pack(sen12ms_tree, out, compress="zstd")["shards"] == again["shards"]  # same flags: kept
    assert json.loads(next((out / ".satfuse").glob("*.tar.json")).read_text()) == side


def test_float16_out_of_range_is_an_error_naming_the_file(sen12ms_tree, tmp_path):
    src = tmp_path / "src"
    shutil.copytree(sen12ms_tree, src)
    bad = sorted(src.rglob("*_s1_*.tif"))[0]
    with rasterio.open(bad, "r+") as ds:
        a = ds.read()
        a[0, 0, 0] = 1e6  # linear power, not dB
        ds.write(a)
    with pytest.raises(SatfuseError, match=rf"{bad.name}.*out of range|out of range.*{bad.name}"):
        pack(src, tmp_path / "out", s1_dtype="float16")
    assert not (tmp_path / "out" / "manifest.json").exists()
    # 1e6 is not dB at all: float32 refuses it too (the S1 dB range check, before any cast)
    with pytest.raises(SatfuseError, match=rf"out of range: .*{bad.name} holds S1 values .*1e\+06, backscatter in dB"):
        pack(src, tmp_path / "f32")


def test_no_labels_pretraining_set_and_downstream_refusal(dfc_tree, tmp_path):
    out = tmp_path / "nolab"
    m = pack(dfc_tree, out, "dfc2020", no_labels=True)
    assert m["label"] is None and "aux" not in m and m["encoding"]["labels_dropped"] == ["dfc", "lc"]
    assert all(set(s) == {"json", "s1.npy", "s2.npy"} for s in members(out).values())
    assert verify(out) == []
    with pytest.raises(SatfuseError, match=rf"^{out}: packed with --no-labels.*re-shard it without --no-labels") as exc:
        load_split(out)
    assert "\n" not in str(exc.value)
    down = tmp_path / "down"
    pack(dfc_tree, down, "dfc2020", compress="zstd", s1_dtype="float16")  # downstream: labels kept
    split = load_split(down)
    assert len(split) == m["total_samples"] and split.labels.shape[0] == len(split)
    pack(dfc_tree, tmp_path / "rows", "dfc2020", compress="zstd-blocks", s1_dtype="float16")  # labels in row blocks
    blocked = load_split(tmp_path / "rows")
    assert np.array_equal(blocked.labels, split.labels) and np.array_equal(blocked.s2, split.s2)


def test_verify_reads_the_encoding_from_the_manifest(sen12ms_tree, tmp_path):
    out = tmp_path / "v"
    pack(sen12ms_tree, out, compress="zstd", s1_dtype="float16")
    assert verify(out) == []
    path = out / "manifest.json"
    doc = json.loads(path.read_text())
    lost = {k: v for k, v in doc.items() if k != "encoding"}  # as if an old satfuse had written it
    path.write_text(json.dumps(lost))
    problems = verify(out)
    assert any("members" in p and "s1.npy.zst" in p for p in problems)
    assert any("s1.npy is float16(2, 32, 32), expected float32" in p for p in problems)
    doc["encoding"]["s1_dtype"] = "float32"
    path.write_text(json.dumps(doc))
    assert any("s1.npy is float16" in p for p in verify(out))


@pytest.mark.parametrize("codec", ["lz4", "zstd-blocks"])
def test_per_band_datasets_take_the_flags(tmp_path, codec):
    from satfuse.data.sources.synth_multiband import write_ssl4eo

    write_ssl4eo(tmp_path / "ssl", locations=1, seed=1, size=36)
    m = pack(tmp_path / "ssl", tmp_path / "out", "ssl4eo-s12", compress=codec, s1_dtype="float16", no_labels=True)
    assert m["dtype"]["s1"] == "float16" and m["encoding"]["s1_max_abs_error_db"] > 0
    assert verify(tmp_path / "out") == []
    meta = json.loads(next(iter(members(tmp_path / "out").values()))["json"])
    assert meta["dtype"]["s1"] == "float16"


@pytest.mark.parametrize(("kw", "match"), [
    ({"level": 3}, "--compress-level 3 needs --compress"),
    ({"compress": "zstd", "level": 40}, "zstd levels are 1..22"),
    ({"compress": "gzip"}, "--compress 'gzip'"),
    ({"s1_dtype": "bfloat16"}, "--s1-dtype 'bfloat16'"),
])
def test_bad_flags_are_one_line_errors(kw, match):
    with pytest.raises(SatfuseError, match=match):
        make_encoding(**kw)


def test_cli_flags_pack_verify_and_pretrain_loader(sen12ms_tree, tmp_path, capfd):
    from satfuse.cli import main
    from satfuse.data.reading.pretrain_loader import PretrainLoader

    out = tmp_path / "cli"
    assert main(["shard", "--src", str(sen12ms_tree), "--dataset", "sen12ms", "--out", str(out), "--maxcount", "4",
                 "--compress", "zstd", "--compress-level", "5", "--s1-dtype", "float16", "--no-labels"]) == 0
    enc = json.loads((out / "manifest.json").read_text())["encoding"]
    assert (enc["compress"], enc["level"], enc["s1_dtype"], enc["labels"]) == ("zstd", 5, "float16", False)
    assert main(["shard", "verify", str(out)]) == 0
    batch = next(iter(PretrainLoader(resolve_shards(str(out)), data_cfg(crop=16), rank=0, world_size=1, seed=0)))
    assert batch["s1"].dtype == torch.float32 and batch["s1"].shape[1:] == (2, 16, 16) and torch.isfinite(batch["s1"]).all()
    assert main(["shard", "--src", str(sen12ms_tree), "--dataset", "sen12ms", "--out", str(tmp_path / "x"),
                 "--compress-level", "5"]) != 0
    assert "--compress-level 5 needs --compress zstd|lz4" in capfd.readouterr().err and not (tmp_path / "x").exists()


def test_an_unknown_encoding_is_refused_naming_the_manifest(sen12ms_tree, tmp_path):
    out = tmp_path / "future"
    pack(sen12ms_tree, out, compress="zstd")
    path = out / "manifest.json"
    doc = json.loads(path.read_text())
    doc["encoding"]["compress"] = "brotli"  # written by a newer satfuse, say
    path.write_text(json.dumps(doc))
    with pytest.raises(SatfuseError, match=rf"^{path}: unreadable `encoding` \(unknown codec 'brotli'\)"):
        resolve_shards(str(out))
    assert any("unknown codec 'brotli'" in p for p in verify(out))


def test_submit_shard_parts_carry_the_encoding(sen12ms_tree, tmp_path):
    """`satfuse submit shard --compress ...`: every array task packs with the flags, the merge
    records them, and `jobs ls`'s redo command for a part repeats them."""
    from satfuse.launch.jobs import part_command
    from satfuse.launch.task import ShardPart

    enc = {"compress": "lz4", "s1_dtype": "float16", "no_labels": True}
    part = ShardPart(src=str(sen12ms_tree), dataset="sen12ms", out=str(tmp_path / "arr"), num_shards=2, maxcount=4,
                     encoding=enc)
    for i in range(2):
        part(i)
    merged = merge(tmp_path / "arr", command=["t"])
    assert (merged["encoding"]["compress"], merged["encoding"]["s1_dtype"], merged["encoding"]["labels"]) == ("lz4", "float16", False)
    cmd = part_command({"src": "S", "dataset": "sen12ms", "out": "O", "num_shards": 2, "part": 1, "encoding": enc})
    assert cmd.endswith("--shard-index 1 --compress lz4 --s1-dtype float16 --no-labels`")


def _bomb(codec: str, header_shape: tuple[int, ...], payload: int, declare: bool) -> bytes:
    """An .npy member whose header says `header_shape` uint16 but which decompresses to
    `payload` more zero bytes, compressed as a frame that declares its size or not."""
    import lz4.frame
    import zstandard

    buf = io.BytesIO()
    np.lib.format.write_array_header_1_0(buf, {"descr": "<u2", "fortran_order": False, "shape": header_shape})
    head, chunk = buf.getvalue(), bytes(1 << 20)
    out = io.BytesIO()
    if codec == "zstd":
        size = len(head) + payload if declare else -1
        with zstandard.ZstdCompressor(level=1).stream_writer(out, size=size, closefd=False) as writer:
            writer.write(head)
            for _ in range(payload // len(chunk)):
                writer.write(chunk)
        return out.getvalue()
    with lz4.frame.LZ4FrameCompressor(content_checksum=False) as comp:
        parts = [comp.begin(len(head) + payload if declare else 0), comp.compress(head)]
        parts += [comp.compress(chunk) for _ in range(payload // len(chunk))]
        return b"".join([*parts, comp.flush()])


@pytest.mark.parametrize("codec", ["zstd", "lz4"])
def test_a_decompression_bomb_is_refused_before_it_costs_memory(codec: str) -> None:
    """A 31 KB zstd member that expands to 1 GB used to be decompressed in full before an
    error blaming S2's shape; now the member's size is bounded by the shape it must have
    (bands, the sample json's H, W; without a json, the member's own header) before anything
    is decompressed."""
    import tracemalloc

    from satfuse.data.format.codecs import compress, decompress_npy, load_array, npy_bytes
    from satfuse.data.format.verify import _check_array
    from satfuse.data.reading.stream_io import RawSample, decode_pair
    from satfuse.evaluation.data import _npy

    s1 = compress(npy_bytes(np.zeros((2, 16, 16), np.float32)), codec, 1)
    suffix = ".zst" if codec == "zstd" else ".lz4"
    meta = {"height": 16, "width": 16}  # what the shard writer records in each sample's json
    payload = 64 << 20
    for declare in (True, False):
        for shape in ((13, 16, 16), (13, 4096, 640)):  # the right shape with extra bytes; a header that lies
            bomb = _bomb(codec, shape, payload, declare)
            s1_bomb = _bomb(codec, (2, *shape[1:]), payload, declare)
            assert len(bomb) < payload // 100
            sample = RawSample(0, 0, "k", {f"s1.npy{suffix}": s1, f"s2.npy{suffix}": bomb})
            tracemalloc.start()
            with pytest.raises(ValueError, match="decompression bomb") as raised:
                decode_pair(sample)
            # S1 bounded by the sample's json (H, W), not by its own header, which may claim more
            with pytest.raises(ValueError, match="decompression bomb"):
                decode_pair(RawSample(0, 0, "k", {f"s1.npy{suffix}": s1_bomb, f"s2.npy{suffix}": bomb,
                                                  "json": json.dumps(meta).encode()}))
            # `shard verify` and fine-tuning: the same declared bound (one helper, codecs.declared_shape)
            assert "decompression bomb" in _check_array("s2", bomb, meta, 13, codec)[0]
            with pytest.raises(SatfuseError, match="decompression bomb"):
                _npy({f"s2.npy{suffix}": bomb, "json": json.dumps(meta).encode()}, "s2.npy", "t.tar:k", 13)
            if shape == (13, 16, 16):  # no json: bounded by the member's own header
                with pytest.raises(ValueError, match="decompression bomb"):
                    load_array(bomb, codec)
            with pytest.raises(ValueError, match="unexpected shape"):
                decompress_npy(bomb, codec, lambda shp, _: (_ for _ in ()).throw(ValueError(f"unexpected shape {shp}")))
            peak = tracemalloc.get_traced_memory()[1]
            tracemalloc.stop()
            assert peak < 8 << 20, f"{codec} declare={declare} {shape}: {peak} bytes allocated"
            assert "\n" not in str(raised.value) and "re-shard or restore it" in str(raised.value)
    plain = npy_bytes(np.arange(13 * 16 * 16, dtype=np.uint16).reshape(13, 16, 16))
    assert load_array(compress(plain, codec, 1), codec).sum() == np.arange(13 * 16 * 16).sum()


def test_blocked_set_reads_only_the_crop_rows_and_names_a_damaged_block(sen12ms_tree, plain, tmp_path, monkeypatch,
                                                                         caplog):
    """`--compress zstd-blocks`: a crop decodes exactly the plain set's pixels from its own row
    blocks alone (a damaged block elsewhere goes unnoticed, one inside is named by shard, sample,
    member and block), no shard is sha256-hashed on the training path, a damaged sample follows
    the skip policy, a cut block table is one line, and a plain set is noted once as read whole."""
    import hashlib
    import logging

    from satfuse.data.format import blocks
    from satfuse.data.reading import pretrain_loader, stream_io
    from satfuse.data.reading.pretrain_loader import PretrainLoader

    out = tmp_path / "zb"
    pack(sen12ms_tree, out, compress="zstd-blocks")
    want = arrays(plain)
    tar = sorted(out.glob("*.tar"))[0]

    def no_sha256(*a):
        raise AssertionError("the training path hashed a blocked shard whole")

    real = hashlib.sha256
    monkeypatch.setattr(stream_io.hashlib, "sha256", no_sha256)
    index = stream_io.index_shard(str(tar))
    monkeypatch.setattr(stream_io.hashlib, "sha256", real)
    assert not index.error and len(index.samples) == 4
    key, refs = index.samples[1]
    h = want[key]["s1"].shape[1]
    for top, left, size in ((0, 0, 0), (0, 0, 16), (3, 5, 20), (h - 17, 1, 17)):
        s1, s2 = stream_io.decode_pair(stream_io.RawSample(0, 1, key, refs), lambda H, W, t=(top, left, size): t)
        size = size or h
        for got, sensor in ((s1, "s1"), (s2, "s2")):
            assert np.array_equal(got, want[key][sensor][:, top : top + size, left : left + size])

    # flip one byte inside the last block of s2: a crop of the first rows never reads it
    member, s1_member = (members(out)[key][f"{sensor}.npy.zsb"] for sensor in ("s2", "s1"))
    idx = blocks.read_index(member, 0, len(member))
    last = len(idx.crcs) - 1
    raw = bytearray(tar.read_bytes())
    at = refs["s2.npy.zsb"].offset + int(idx.starts[last]) + 3
    raw[at] ^= 0xFF
    tar.write_bytes(bytes(raw))
    assert any(f"{tar.name}" in p and f"block {last}" in p and "crc32" in p for p in verify(out))  # shard verify too
    damaged = stream_io.index_shard(str(tar))
    sample = stream_io.RawSample(0, 1, key, damaged.samples[1][1])
    assert np.array_equal(stream_io.decode_pair(sample, lambda H, W: (0, 0, 16))[1], want[key]["s2"][:, :16, :16])
    with pytest.raises(ValueError, match=rf"^member s2.npy.zsb: block {last} \(rows {last * 16}\.\.{h - 1}\) fails its crc32"):
        stream_io.decode_pair(sample, lambda H, W: (h - 16, 0, 16))

    # the loader: the damaged sample is skipped (counted, warned naming shard and sample) at full crop
    caplog.set_level(logging.WARNING)
    ld = PretrainLoader(resolve_shards(str(out)), data_cfg(crop=0, shuffle_buffer=1), rank=0, world_size=1, seed=0)
    list(zip(range(ld.steps_per_epoch), iter(ld), strict=False))
    assert ld.decode_errors == 1
    assert f"{tar.name}: skipping sample {key}: member s2.npy.zsb: block {last}" in caplog.text

    # a cut or inconsistent block table: one line naming it (the worker prefixes shard and sample)
    for cut in (member[:20], member[:-1]):
        with pytest.raises(ValueError, match=r"^member s2.npy.zsb: block index (truncated|inconsistent)"):
            stream_io.decode_pair(stream_io.RawSample(0, 0, key, {"s1.npy.zsb": s1_member, "s2.npy.zsb": cut}))

    # a set without block checksums: read as before, noted once per set
    caplog.clear()
    caplog.set_level(logging.INFO, logger=pretrain_loader.__name__)
    monkeypatch.setattr(pretrain_loader, "_NOTED", set())
    for _ in range(2):
        PretrainLoader(resolve_shards(str(plain)), data_cfg(), rank=0, world_size=1, seed=0)
    assert caplog.text.count("packed without block checksums (--compress none): crop-only reads are off") == 1

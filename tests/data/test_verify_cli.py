"""`shard verify` catches damage; the CLI routes synth/shard/verify/merge; bench shard runs."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import pytest

from satfuse.cli import main
from satfuse.data.commands import slurm_array_defaults
from satfuse.data.format.verify import verify
from satfuse.data.packing.shard_writer import shard_dataset
from satfuse.utils import SatfuseError


@pytest.fixture()
def shards(sen12ms_tree: Path, tmp_path: Path) -> Path:
    out = tmp_path / "v"
    shard_dataset(sen12ms_tree, "sen12ms", out, maxcount=5, seed=0)
    return out


def test_verify_accepts_a_good_set(shards: Path) -> None:
    assert verify(shards) == []


def test_verify_catches_truncation(shards: Path) -> None:
    tar = shards / "v-000001.tar"
    tar.write_bytes(tar.read_bytes()[:5000])
    problems = verify(shards)
    text = "\n".join(problems)
    assert f"{tar}: 5000 bytes, manifest says" in text and f"{tar}: sha256 differs" in text
    assert f"{tar}: not a readable tar after" in text and "samples, manifest says 5" in text
    assert all(str(tar) in p or "total_samples" in p for p in problems)


def test_verify_catches_tampering_of_same_size(shards: Path) -> None:
    tar = shards / "v-000000.tar"
    data = bytearray(tar.read_bytes())
    data[-3000] ^= 0x01  # inside the last sample's array bytes (or padding): only the hash sees it
    tar.write_bytes(bytes(data))
    assert verify(shards) == [f"{tar}: sha256 differs from manifest.json (damaged or tampered); restore it or re-shard"]


def test_verify_catches_missing_manifest_missing_and_stray_tars(shards: Path) -> None:
    (shards / "v-000002.tar").rename(shards / "v-000099.tar")
    problems = verify(shards)
    assert any("v-000002.tar: listed in manifest.json but missing" in p for p in problems)
    assert any("v-000099.tar: tar not listed" in p for p in problems)
    (shards / "manifest.json").unlink()
    assert "manifest.json: missing" in verify(shards)[0]


def test_verify_catches_out_of_range_labels(dfc_tree: Path, tmp_path: Path) -> None:
    """A dfc.npy above class 10 (a shard written by another tool, or edited with its manifest)
    is named by verify, as the packer refuses such a label file."""
    import hashlib
    import io
    import tarfile

    import numpy as np

    out = tmp_path / "d"
    shard_dataset(dfc_tree, "dfc2020", out, maxcount=20, seed=0)
    assert verify(out) == []
    tar = out / "d-000000.tar"
    members = []
    with tarfile.open(tar) as tf:
        for m in tf:
            members.append((m, tf.extractfile(m).read()))
    first = next(m.name for m, _ in members if m.name.endswith(".dfc.npy"))
    with tarfile.open(tar, "w", format=tarfile.USTAR_FORMAT) as tf:
        for m, data in members:
            if m.name == first:
                label = np.load(io.BytesIO(data))
                label[0, 0, 0] = 200
                buf = io.BytesIO()
                np.save(buf, label)
                data = buf.getvalue()
            tf.addfile(m, io.BytesIO(data))
    man = json.loads((out / "manifest.json").read_text())
    man["shards"][0].update(sha256=hashlib.sha256(tar.read_bytes()).hexdigest(), bytes=tar.stat().st_size)
    (out / "manifest.json").write_text(json.dumps(man))
    assert verify(out) == [f"{tar}: sample {first.split('.')[0]}: dfc.npy band 1 holds values up to 200, a dfc label allows 0..10; "
                           "re-shard from fixed label files"]


def test_output_names_and_unwritable_outputs(sen12ms_tree: Path, tmp_path: Path, capsys: pytest.CaptureFixture,
                                             monkeypatch: pytest.MonkeyPatch) -> None:
    """`--out .` names the tars after the directory; a set name with a space resolves from a brace
    pattern; an output on /proc or /sys is one line naming the path, for shard and synth."""
    from satfuse.data.reading.shard_sets import resolve_shards

    here = tmp_path / "cwd-set"
    here.mkdir()
    monkeypatch.chdir(here)
    m = shard_dataset(sen12ms_tree, "sen12ms", Path("."), maxcount=5, seed=0)
    assert m["name"] == "cwd-set" and sorted(p.name for p in here.glob("*.tar")) == [f"cwd-set-00000{i}.tar" for i in range(3)]
    spaced = tmp_path / "my set"
    shard_dataset(sen12ms_tree, "sen12ms", spaced, maxcount=5, seed=0)
    assert resolve_shards(f"{spaced}/my set-{{000000..000002}}.tar").counts == [5, 5, 2]
    capsys.readouterr()
    # a name the readers would refuse as a URL scheme (`a:b-000000.tar`) is refused before packing
    assert main(["shard", "--src", str(sen12ms_tree), "--dataset", "sen12ms", "--out", str(tmp_path / "a:b")]) == 2
    err = capsys.readouterr().err
    assert "makes tar names (a:b-000000.tar) that starts with a URL scheme" in err and "Traceback" not in err
    assert not (tmp_path / "a:b").exists()
    for argv, path in ((["shard", "--src", str(sen12ms_tree), "--dataset", "sen12ms", "--out", "/proc/satfuse-x"], "/proc/satfuse-x"),
                       (["synth", "dfc2020", "--out", "/sys/satfuse-x", "--n-validation", "1", "--n-test", "1", "--size", "12"], "/sys/satfuse-x")):
        assert main(argv) == 2
        err = capsys.readouterr().err
        assert f"{path}: cannot write the output there" in err and "Traceback" not in err
        assert len([x for x in err.splitlines() if "ERROR" in x]) == 1


def test_cli_verify_exit_codes(shards: Path, capsys: pytest.CaptureFixture) -> None:
    assert main(["shard", "verify", str(shards)]) == 0
    assert json.loads(capsys.readouterr().out) == {"dir": str(shards), "ok": True, "shards": 3, "samples": 12}
    tar = shards / "v-000001.tar"
    tar.write_bytes(tar.read_bytes()[:-2048])
    assert main(["shard", "verify", str(shards)]) == 1
    assert "v-000001.tar" in capsys.readouterr().err


def test_cli_synth_shard_merge(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    src, out = tmp_path / "raw", tmp_path / "shards" / "c"
    assert main(["synth", "dfc2020", "--out", str(src), "--n-validation", "3", "--n-test", "2", "--size", "16"]) == 0
    assert json.loads(capsys.readouterr().out)["pairs"] == 5
    base = ["shard", "--src", str(src), "--dataset", "dfc2020", "--out", str(out), "--maxcount", "2", "--num-shards", "2"]
    assert main([*base, "--shard-index", "0"]) == 0 and main([*base, "--shard-index", "1"]) == 0
    assert main(["shard", "merge", str(out)]) == 0
    assert json.loads((out / "manifest.json").read_text())["total_samples"] == 5
    assert main(["shard", "--dataset", "dfc2020"]) == 2
    assert "needs --src, --out" in capsys.readouterr().err


def test_slurm_array_defaults() -> None:
    assert slurm_array_defaults({}) == (None, None)
    assert slurm_array_defaults({"SLURM_ARRAY_TASK_ID": "3", "SLURM_ARRAY_TASK_COUNT": "4", "SLURM_ARRAY_TASK_MIN": "0"}) == (3, 4)
    assert slurm_array_defaults({"SLURM_ARRAY_TASK_ID": "5", "SLURM_ARRAY_TASK_MIN": "1", "SLURM_ARRAY_TASK_MAX": "8"}) == (4, 8)
    with pytest.raises(SatfuseError, match="SLURM_ARRAY_TASK_COUNT"):
        slurm_array_defaults({"SLURM_ARRAY_TASK_ID": "1"})


def test_bench_shard_reports_both_rates(tmp_path: Path) -> None:
    from satfuse.bench import shard as bench

    parser = argparse.ArgumentParser()
    bench.add_arguments(parser)
    result = bench.run(parser.parse_args(["--pairs", "6", "--size", "32", "--repeats", "1", "--workdir", str(tmp_path)]))
    assert result["pairs"] == 6 and result["read_pairs_per_s"] > 0 and result["shard_pairs_per_s"] > 0
    assert result["shard_over_read_time"] == pytest.approx(result["read_pairs_per_s"] / result["shard_pairs_per_s"])
    assert list(tmp_path.iterdir()) == []  # temporary data removed

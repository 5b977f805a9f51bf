"""`satfuse submit shard`: a 3-task job array + a dependent merge job on the real cluster gives
the same shards (same manifest checksums) as the single-process sharding run."""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import pytest

from tests.slurm.slurm_helpers import ROOT, cli, cli_json, queued_ids, scontrol_field, wait_gone

pytestmark = [pytest.mark.slurm, pytest.mark.usefixtures("slurm_env", "job_env")]


@pytest.fixture(scope="module")
def raw_sen12ms(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from satfuse.data.sources.synth import write_sen12ms

    raw = tmp_path_factory.mktemp("raw") / "sen12ms"
    write_sen12ms(raw, scenes=2, patches_per_scene=12, seed=0, size=32)
    return raw


@pytest.fixture(scope="module")
def single_manifest(raw_sen12ms: Path, tmp_path_factory: pytest.TempPathFactory) -> dict:
    """The reference: the single-process sharding run (output dir named `shards` like the others)."""
    from satfuse.data.packing.shard_writer import shard_dataset

    return shard_dataset(raw_sen12ms, "sen12ms", tmp_path_factory.mktemp("single") / "shards", maxcount=4, seed=0)


def shard_records(manifest: dict) -> list[tuple[str, int, str]]:
    return [(s["name"], s["count"], s["sha256"]) for s in manifest["shards"]]


def test_dry_run_is_an_array_script(capsys: pytest.CaptureFixture[str], raw_sen12ms: Path, tmp_path: Path) -> None:
    before = queued_ids()
    rc, out, err = cli(capsys, "submit", "shard", "--src", str(raw_sen12ms), "--out", str(tmp_path / "shards"),
                       "--cluster", "localslurm", "--array-size", "3", "--dry-run")
    assert rc == 0, err
    assert "#SBATCH --array=0-2%3" in out and "#SBATCH --ntasks-per-node=1" in out
    script = tmp_path / "a.sh"
    script.write_text(out)
    res = subprocess.run(["sbatch", "--test-only", str(script)], capture_output=True, text=True, timeout=60)
    assert res.returncode == 0, res.stderr
    assert queued_ids() == before


def test_array_of_3_plus_merge_equals_single_process(capsys: pytest.CaptureFixture[str], raw_sen12ms: Path,
                                                     single_manifest: dict, tmp_path: Path) -> None:
    single = single_manifest
    out_dir = tmp_path / "array" / "shards"  # same directory name: shard names follow it
    sub = cli_json(capsys, "submit", "shard", "--src", str(raw_sen12ms), "--out", str(out_dir),
                   "--maxcount", "4", "--seed", "0", "--cluster", "localslurm", "--array-size", "3",
                   "--run-dir", str(tmp_path / "run"), "--wait")
    kinds = [j["kind"] for j in sub["jobs"]]
    assert kinds == ["shard", "shard", "shard", "merge"]
    array_id = sub["jobs"][0]["job_id"].split("_")[0]
    assert [j["job_id"] for j in sub["jobs"][:3]] == [f"{array_id}_{i}" for i in range(3)]
    assert sub["jobs"][3]["after"] == array_id
    merged = json.loads((out_dir / "manifest.json").read_text())
    assert shard_records(merged) == shard_records(single) and len(merged["shards"]) >= 3
    assert merged["total_samples"] == single["total_samples"] and merged["stats"] == single["stats"]
    assert len(list(out_dir.glob("manifest.part-*-of-3.json"))) == 3  # three disjoint parts wrote
    wait_gone(sub["jobs"][3]["job_id"], timeout=60)  # the result is written just before the job ends
    assert scontrol_field(sub["jobs"][3]["job_id"], "JobState") == "COMPLETED"
    rc, out, _ = cli(capsys, "jobs", "ls", str(tmp_path / "run"))
    assert rc == 0 and out.count("COMPLETED") == 4


def test_plain_shard_array_template_equals_single_process(raw_sen12ms: Path, single_manifest: dict,
                                                          tmp_path: Path) -> None:
    """slurm/shard-array.sbatch as its header says: an array of 3, then the merge via --wrap."""
    out_dir = tmp_path / "shards"
    satfuse = str(ROOT / ".venv" / "bin" / "satfuse")
    env = {**os.environ, "SRC": str(raw_sen12ms), "OUT": str(out_dir), "MAXCOUNT": "4", "SEED": "0",
           "SATFUSE": satfuse}
    sub = subprocess.run(["sbatch", "--parsable", "--array=0-2", f"--output={tmp_path}/part-%A_%a.out",
                          str(ROOT / "slurm" / "shard-array.sbatch")],
                         capture_output=True, text=True, timeout=60, env=env, cwd=ROOT)
    assert sub.returncode == 0, sub.stderr
    array_id = sub.stdout.strip().split(";")[0]
    merge = subprocess.run(["sbatch", "--parsable", f"--dependency=afterok:{array_id}", "--kill-on-invalid-dep=yes",
                            f"--output={tmp_path}/merge.out", "--wrap", f"{satfuse} shard merge {out_dir}"],
                           capture_output=True, text=True, timeout=60, env=env, cwd=ROOT)
    assert merge.returncode == 0, merge.stderr
    merge_id = merge.stdout.strip().split(";")[0]
    wait_gone(merge_id, timeout=180)
    assert scontrol_field(merge_id, "JobState") == "COMPLETED", (tmp_path / "merge.out").read_text()[-2000:]
    merged = json.loads((out_dir / "manifest.json").read_text())
    assert shard_records(merged) == shard_records(single_manifest)


def test_cancelled_part_leaves_the_merge_unrun_and_ls_says_what_to_run(
        capsys: pytest.CaptureFixture[str], raw_sen12ms: Path, tmp_path: Path) -> None:
    out_dir, run = tmp_path / "shards", tmp_path / "run"
    sub = cli_json(capsys, "submit", "shard", "--src", str(raw_sen12ms), "--out", str(out_dir), "--maxcount", "4",
                   "--cluster", "localslurm", "--array-size", "2", "--run-dir", str(run))
    part1, merge = sub["jobs"][1]["job_id"], sub["jobs"][2]["job_id"]
    subprocess.run(["scancel", part1], check=True, timeout=30)
    wait_gone(merge, timeout=120)  # kill-on-invalid-dep: SLURM drops the merge
    wait_gone(sub["jobs"][0]["job_id"], timeout=120)
    assert not (out_dir / "manifest.json").exists()
    rc, out, _ = cli(capsys, "jobs", "ls", str(run))
    assert rc == 0 and "UNKNOWN" not in out
    hint = next(ln for ln in out.splitlines() if "merge never ran" in ln)
    assert "part(s) 1 (" in hint and "did not complete" in hint and "part(s) 0" not in hint
    assert f"--out {out_dir} --num-shards 2 --shard-index 1 --maxcount 4" in hint
    assert f"`satfuse shard merge {out_dir}`" in hint


def test_a_copied_run_dir_acts_on_nothing_of_the_original(capsys: pytest.CaptureFixture[str], raw_sen12ms: Path,
                                                          tmp_path: Path) -> None:
    """A held (never running) array of 2 + merge in "run A" (a space in the path: scontrol's
    line is split at keys, not spaces). `cp -r` to "run B": B shows A's jobs as ELSEWHERE,
    cancels none of them and does not count them as running; A cancels its array by the id
    `submit` printed, then the rest; `--task 7` of a 1-task part says there is no such task."""
    import shutil

    from satfuse.launch.submit import refuse_if_running

    prof = tmp_path / "held.yaml"
    prof.write_text((ROOT / "hpc" / "clusters" / "localslurm.yaml").read_text() + "sbatch:\n  hold: true\n")
    run_a, run_b = tmp_path / "run A", tmp_path / "run B"
    sub = cli_json(capsys, "submit", "shard", "--src", str(raw_sen12ms), "--out", str(tmp_path / "shards"),
                   "--cluster", str(prof), "--array-size", "2", "--run-dir", str(run_a))
    ids = [j["job_id"] for j in sub["jobs"]]
    array_id, merge = ids[0].split("_")[0], ids[2]
    try:
        status = cli_json(capsys, "jobs", "status", str(run_a))
        assert [j["state"].split()[0] for j in status["jobs"]] == ["PENDING"] * 3
        assert status["jobs"][0]["slurm"]["Command"].startswith(str(run_a / "submitit") + "/")
        shutil.copytree(run_a, run_b)
        rc, out, _ = cli(capsys, "jobs", "ls", str(run_b))
        assert rc == 0 and out.count("ELSEWHERE") == 3 and "PENDING" not in out
        assert f"recorded by the run dir {run_a}: this one is a copy of it" in out
        assert cli_json(capsys, "jobs", "cancel", str(run_b)) == {"cancelled": [], "elsewhere": ids}
        assert "slurm" not in cli_json(capsys, "jobs", "status", str(run_b))["jobs"][0]
        refuse_if_running(run_b, 600)  # A's pending jobs do not block B
        assert set(ids) <= queued_ids()
        rc, _, err = cli(capsys, "jobs", "logs", str(run_a), "--job", ids[0], "--task", "7")
        assert rc == 2 and f"job {ids[0]} has no task 7: it has 1 task(s)" in err
        rc, _, err = cli(capsys, "jobs", "logs", str(run_a), "--job", array_id)
        assert rc == 2 and f"{array_id} is a job array of 2 parts" in err
        assert cli_json(capsys, "jobs", "cancel", str(run_a), "--job", array_id) == {"cancelled": ids[:2]}
        assert cli_json(capsys, "jobs", "cancel", str(run_a)) == {"cancelled": [merge]}
        assert not set(ids) & queued_ids()
    finally:
        subprocess.run(["scancel", array_id, merge], capture_output=True, timeout=30, check=False)

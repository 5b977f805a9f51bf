"""Cluster profiles, time parsing, ports, sbatch text: no cluster needed."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

from satfuse.config import ConfigError
from satfuse.distributed.ports import port_from_job_id as master_port
from satfuse.launch.cluster import (
    ClusterProfile,
    load_profile,
    sbatch_script,
    slurm_parameters,
    time_to_minutes,
)
from satfuse.launch.task import REQUEUE_EXIT_CODE
from tests.slurm.slurm_helpers import ROOT


@pytest.mark.parametrize(
    ("text", "minutes"),
    [("30", 30), ("04:00:00", 240), ("1-00:00:00", 1440), ("2-12", 3600), ("10:30", 11), ("0:0:1", 1)],
)
def test_slurm_time_syntax(text: str, minutes: int) -> None:
    assert time_to_minutes(text) == minutes


def test_bad_time_is_refused() -> None:
    with pytest.raises(ConfigError, match="not SLURM time"):
        time_to_minutes("4h")


def test_every_shipped_profile_loads(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(ROOT)
    names = sorted(p.stem for p in (ROOT / "hpc" / "clusters").glob("*.yaml"))
    assert {"local", "localslurm", "example"} <= set(names)
    for name in names:
        profile, where = load_profile(name)
        assert where.endswith(f"{name}.yaml")
    example, _ = load_profile("example")
    assert (example.partition, example.account, example.qos) == ("gpu", "my_project", "normal")
    assert example.constraint and example.mem_gb > 0 and example.cpus_per_task > 1
    assert example.tasks == example.gpus_per_node  # one task per GPU


def test_unknown_key_names_the_key(tmp_path: Path) -> None:
    bad = tmp_path / "typo.yaml"
    bad.write_text("executor: slurm\npartiton: debug\n")
    with pytest.raises(ConfigError, match="unknown key partiton"):
        load_profile(str(bad))


def test_flags_override_profile(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(ROOT)
    p, _ = load_profile("example", {"nodes": 4, "partition": "big", "time": "00:30:00", "qos": None})
    assert (p.nodes, p.partition, p.time, p.qos) == (4, "big", "00:30:00", "normal")
    assert p.world_size == 16


def test_missing_profile_lists_known(monkeypatch: pytest.MonkeyPatch) -> None:
    from satfuse.utils import SatfuseError

    monkeypatch.chdir(ROOT)
    with pytest.raises(SatfuseError, match="localslurm"):
        load_profile("nosuchcluster")


def test_signal_must_fit_in_the_time_limit() -> None:
    from satfuse.launch.cluster import validate_profile

    with pytest.raises(ConfigError, match="signal_delay_s"):
        validate_profile(ClusterProfile(time="1", signal_delay_s=120), "x.yaml")
    with pytest.raises(ConfigError, match="signal"):
        validate_profile(ClusterProfile(signal="KILL"), "x.yaml")
    with pytest.raises(ConfigError, match="signal=TERM cannot be told apart from scancel"):
        validate_profile(ClusterProfile(signal="SIGTERM"), "x.yaml")


def test_only_signals_the_trainer_saves_on_are_accepted() -> None:
    """On INT only submitit's handler runs (rank 0): the other ranks die unsaved. The profile's
    signals are exactly the trainer's (StopFlag's handlers) minus TERM, and `sbatch:` cannot
    slip a signal or requeue flag past those checks."""
    from satfuse.engines.signals import DEFAULT_SIGNALS
    from satfuse.launch.cluster import SIGNALS, validate_profile

    with pytest.raises(ConfigError, match=r"x.yaml: signal='INT' is not one the trainer saves on \(USR1, USR2, HUP\)"):
        validate_profile(ClusterProfile(signal="INT"), "x.yaml")
    assert {f"SIG{s}" for s in SIGNALS} == set(DEFAULT_SIGNALS) - {"SIGTERM"}
    for name in SIGNALS:
        validate_profile(ClusterProfile(signal=f"SIG{name}"), "x.yaml")
    for key in ("signal", "requeue", "no_requeue"):
        with pytest.raises(ConfigError, match=f"sbatch: {key} would bypass the profile's `signal`/`requeue`"):
            validate_profile(ClusterProfile(sbatch={key: "INT@60" if key == "signal" else True}), "x.yaml")


def test_requeue_false_submits_no_requeue(tmp_path: Path) -> None:
    """SLURM's JobRequeue=1 default requeues a job given no flag: `requeue: false` says --no-requeue."""
    text = sbatch_script(ClusterProfile(requeue=False), tmp_path / "submitit", "satfuse-x")
    assert "#SBATCH --no-requeue" in text and "#SBATCH --requeue" not in text
    assert "#SBATCH --requeue" in sbatch_script(ClusterProfile(), tmp_path / "submitit", "satfuse-x")


def test_sbatch_text_has_requeue_signal_and_site_values(tmp_path: Path) -> None:
    p = ClusterProfile(partition="gpu", account="acc", qos="high", constraint="a100", gpus_per_node=4,
                       nodes=2, mem_gb=64, time="1-00:00:00", signal="HUP", signal_delay_s=300,
                       env={"SATFUSE_IFNAME": "ib0"}, sbatch={"mail-type": "END"})
    text = sbatch_script(p, tmp_path / "submitit", "satfuse-x")
    for line in ("--partition=gpu", "--account=acc", "--qos=high", "--constraint=a100",
                 "--gpus-per-node=4", "--ntasks-per-node=4", "--nodes=2", "--mem=64GB",
                 "--time=1440", "--signal=HUP@300", "--requeue", "--open-mode=append", "--mail-type=END"):
        assert f"#SBATCH {line}" in text, line
    assert "export SUBMITIT_PREEMPT_SIGNAL=HUP" in text and "export SATFUSE_IFNAME=ib0" in text
    assert slurm_parameters(p, "n")["additional_parameters"]["signal"] == "HUP@300"


def test_master_port_is_shared_and_moves_on_requeue() -> None:
    assert master_port("1234") == master_port("1234", 0) == 20000 + 1234
    assert master_port("1234", 1) == 20000 + 1235
    assert master_port("11999", 1) == 20000  # wraps inside [20000, 32000)
    assert all(20000 <= master_port(str(j), r) < 32000 for j in (0, 7, 19999, 10**9) for r in range(4))


def test_requeue_code_matches_the_trainer() -> None:
    from satfuse.engines.signals import REQUEUE_EXIT_CODE as TRAINER_CODE
    from satfuse.engines.signals import STOP_EXIT_CODE as TRAINER_STOP
    from satfuse.launch.task import STOP_EXIT_CODE

    assert REQUEUE_EXIT_CODE == TRAINER_CODE and STOP_EXIT_CODE == TRAINER_STOP


def test_a_failing_setup_line_stops_the_job_there_saying_which(tmp_path: Path) -> None:
    """The batch script stops at the failing line (not after it: a COMPLETED job that ran
    without its modules), says which line on stderr, and records it where `jobs ls` reads it."""
    from satfuse.launch.outcomes import read_outcome

    folder = tmp_path / "sub it"
    folder.mkdir()
    p = ClusterProfile(setup=["export A=1", "echo ran-$A", "false  # a comment stays a comment", "echo never"])
    script = tmp_path / "job.sh"
    script.write_text(sbatch_script(p, folder, "satfuse-x"))
    for env, job in (({"SLURM_JOB_ID": "77"}, "77"),
                     ({"SLURM_JOB_ID": "81", "SLURM_ARRAY_JOB_ID": "80", "SLURM_ARRAY_TASK_ID": "1"}, "80_1")):
        res = subprocess.run(["/bin/bash", str(script)], capture_output=True, text=True, timeout=30,
                             env={"PATH": "/usr/bin:/bin", **env})
        assert res.returncode == 1 and res.stdout == "ran-1\n"  # nothing after the failing line ran
        assert res.stderr == ("satfuse: profile setup line 3 failed with status 1: false  # a comment stays a "
                              "comment; fix setup: in the cluster profile\n")
        assert read_outcome(folder, job) == {"state": "FAILED", "stage": "setup", "exit_code": 1,
                                             "error": "profile setup line 3 failed: false  # a comment stays a comment"}

"""Runs after the other multinode tests (file order): `multinode.sh stop` removes exactly
what start made, twice is fine, and start brings the cluster back for later sessions."""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

import pytest

from .conftest import BASE, NODES, REPO, cluster_env, run_script

pytestmark = pytest.mark.multinode

HOSTS_TAG = "# satfuse-multinode"


def _leftovers(pids_text: str) -> list[str]:
    found = []
    netns = subprocess.run(
        ["ip", "netns", "list"], capture_output=True, text=True, check=False
    ).stdout
    found += [f"namespace {n}" for n in NODES if re.search(rf"^{n}\b", netns, re.M)]
    if (
        subprocess.run(
            ["ip", "link", "show", "sfbr77"], capture_output=True, check=False
        ).returncode
        == 0
    ):
        found.append("bridge sfbr77")
    found += [
        f"hosts line {ln!r}"
        for ln in Path("/etc/hosts").read_text().splitlines()
        if HOSTS_TAG in ln
    ]
    for line in pids_text.splitlines():
        name, _, pid = line.partition("=")
        comm = Path(f"/proc/{pid}/comm")
        if pid and name != "MUNGED_PID" and comm.exists():
            found.append(f"{name} {pid} ({comm.read_text().strip()})")
    return found


def test_stop_removes_everything_and_is_idempotent(multinode_cluster: Path) -> None:
    """Runs last in this file: stop, check nothing is left, stop again, start again."""
    pids = (BASE / "run" / "pids").read_text()
    res = run_script("stop", timeout=120)
    assert res.returncode == 0, res.stderr
    assert _leftovers(pids) == []
    assert run_script("stop", timeout=120).returncode == 0  # twice is fine
    assert run_script("status", timeout=60).returncode != 0
    res = run_script("start")  # the session fixture's cluster is back for later tests
    assert res.returncode == 0, res.stderr
    res = subprocess.run(["srun", "-N2", "-n2", "hostname"], capture_output=True, text=True,
                         timeout=60, env=cluster_env(), cwd=REPO, check=False)  # fmt: skip
    assert sorted(res.stdout.split()) == list(NODES), res.stderr

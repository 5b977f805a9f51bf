"""Guards of the suite itself: a hang fails the one test that hangs, with every thread's stack,
instead of stalling CI until its limit; no multi-rank code destroys its process group."""

from __future__ import annotations

import re
import subprocess
import sys
import time
import tomllib
from pathlib import Path

from tests.conftest import backstop_grace_s

ROOT = Path(__file__).resolve().parents[1]

# Where `destroy_process_group()` may be called: groups of one rank only (see
# `satfuse.distributed.env.teardown` for the deadlock a multi-rank gloo group's destruction hits).
DESTROY_ALLOWED = {
    "src/satfuse/distributed/env.py",  # teardown: only when this process is the whole world
    "src/satfuse/bench/gpu.py",  # its DDP check's own 1-rank group
}


def test_no_multi_rank_code_destroys_its_process_group() -> None:
    """Multi-rank code ends with `exit_cleanly` (the OS frees the group); a call to
    `destroy_process_group()` anywhere else is a possible hang of 2 ranks."""
    call = re.compile(r"\bdestroy_process_group\(")
    found = sorted(str(p.relative_to(ROOT)) for top in ("src", "tests") for p in (ROOT / top).rglob("*.py")
                   if p != Path(__file__).resolve() and call.search(p.read_text(errors="replace")))
    assert set(found) <= DESTROY_ALLOWED, f"destroy_process_group() called in {sorted(set(found) - DESTROY_ALLOWED)}"


def hang_run(select: str) -> subprocess.CompletedProcess:
    """tests/hang_cases.py in a pytest of its own, with this suite's configuration and a 2 s limit."""
    return subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "--timeout=2",
                           "tests/hang_cases.py", "-k", select], cwd=ROOT, capture_output=True, text=True,
                          timeout=120)


def test_a_hang_fails_its_test_with_every_stack_and_a_stuck_one_ends_the_run() -> None:
    config = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["pytest"]["ini_options"]
    assert float(config["timeout"]) > 0 and config["timeout_method"] == "signal"
    slept = hang_run("not blocks")  # pytest-timeout: this test fails, the next one still runs
    assert slept.returncode == 1, slept.stdout[-3000:]
    assert "Failed: Timeout (>2.0s) from pytest-timeout" in slept.stdout
    assert "Stack of hang-case-helper" in slept.stdout and "1 failed, 1 passed" in slept.stdout
    t0 = time.monotonic()
    stuck = hang_run("blocks")  # SIGALRM never reaches it: the backstop dumps and exits
    grace = backstop_grace_s(2)
    assert stuck.returncode == 1 and time.monotonic() - t0 < 30 - grace, stuck.stderr[-3000:]
    assert f"Timeout (0:00:0{2 + int(grace)})!" in stuck.stderr
    assert 'hang_cases.py", line' in stuck.stderr and "in test_blocks_where_sigalrm_cannot_reach" in stuck.stderr
    assert stuck.stderr.count("Thread 0x") >= 1 and "passed" not in stuck.stdout


def test_xdist_groups_keep_clusters_and_costly_fixtures_on_one_worker() -> None:
    """`make test` runs two xdist workers with `--dist loadgroup`, scheduled by tests/conftest.py:
    the slurm and multinode tests share the local clusters (one group), an area with costly session
    data is one group, every other test goes with its file (module fixtures built once), and an
    explicit `@group` suffix wins. Other `--dist` modes keep xdist's own scheduler."""
    from types import SimpleNamespace

    from tests.conftest import CLUSTER_GROUP, pytest_xdist_make_scheduler, xdist_group_of

    assert xdist_group_of("tests/slurm/test_submit_slurm.py::test_a") == CLUSTER_GROUP \
        == xdist_group_of("tests/multinode/test_submit_2node.py::test_b[x@y]")
    assert xdist_group_of("tests/checkpoint/test_resume.py::t") == xdist_group_of("tests/checkpoint/test_x.py::u") \
        != xdist_group_of("tests/evaluation/test_y.py::t")
    assert xdist_group_of("tests/deepspeed/test_ds_train.py::test_parity") \
        == xdist_group_of("tests/deepspeed/test_ds_train.py::test_export[bf16]") == "tests/deepspeed/test_ds_train.py"
    assert xdist_group_of("tests/deepspeed/test_ds_trust.py::t") != xdist_group_of("tests/deepspeed/test_ds_train.py::t")
    assert xdist_group_of("tests/engines/test_pretrain.py::t@mine") == "mine"
    assert pytest_xdist_make_scheduler(SimpleNamespace(getvalue=lambda name: "load"), None) is None

"""Suite-wide settings and shared fixtures.

Multi-process tests start real process groups (gloo) on 2 cores: one thread per rank keeps
them from oversubscribing the machine.
"""

from __future__ import annotations

import faulthandler
import os
from pathlib import Path

import pytest

os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("DS_ACCELERATOR", "cpu")

ROOT = Path(__file__).resolve().parents[1]

# The hang guard (pyproject.toml: pytest-timeout's `timeout`, method `signal`) fails a test that
# runs too long with every thread's stack and goes on with the next one. SIGALRM needs the main
# thread to run Python again: one blocked in C (a gloo destructor joining a thread that waits for
# the GIL, see `satfuse.distributed.env.teardown`) never does. So faulthandler's own thread,
# which needs no GIL, dumps every thread to the real stderr and ends the run a grace period later.
BACKSTOP_FD = pytest.StashKey[int]()
# Per marker, above the default of pyproject.toml: the slurm and multinode tests wait on a real
# scheduler and start it in their first test's set-up; the deepspeed ones start DeepSpeed ranks
# (34 s for one 1-rank engine set-up and step on a loaded 2-core machine; their own subprocess
# limits are up to 600 s). A test's own `@pytest.mark.timeout` wins.
MARKER_TIMEOUT_S = {"slurm": 900, "multinode": 900, "deepspeed": 600}


def backstop_grace_s(timeout: float) -> float:
    """How long after pytest-timeout's limit the backstop ends the run (5 to 60 s)."""
    return min(60.0, max(5.0, timeout / 4))


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption("--fail-skips", action="store_true",
                     help="a skipped test fails instead (make gpu-check: a `cuda` test that skips did not "
                          "test the GPU, so the check must not pass)")


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo) -> pytest.TestReport:
    report = yield
    if report.skipped and item.config.getoption("--fail-skips") and not hasattr(report, "wasxfail"):
        reason = report.longrepr[2] if isinstance(report.longrepr, tuple) else str(report.longrepr)
        report.outcome = "failed"
        report.longrepr = f"skipped ({reason}), and --fail-skips is set: nothing was tested"
    return report


def pytest_configure(config: pytest.Config) -> None:
    config.stash[BACKSTOP_FD] = os.dup(2)  # the terminal's stderr: capturing is not on here


# pytest-xdist (`make test` runs `-n 2 --dist loadgroup`): tests that share something costly or
# exclusive must run on one worker. xdist 3.8's own `loadgroup` does not group on pytest 9.2 (it
# renames `item._nodeid`, which pytest 9.2 no longer reads: every test became its own group), so
# this conftest gives `loadgroup` its scheduler, grouping by node id: the slurm and multinode
# tests share the local clusters (job ids, ports, node names) in one group; the areas whose
# conftest builds costly session data (the checkpoint reference run, the DFC2020 and SEN12MS
# trees) are one group each; every other test goes with its file, so a module-scoped fixture is
# built once. An explicit `@name` suffix (xdist's own, should it work again) still wins.
CLUSTER_GROUP = "cluster"
AREA_GROUPS = {"tests/slurm/": CLUSTER_GROUP, "tests/multinode/": CLUSTER_GROUP,
               "tests/checkpoint/": "checkpoint", "tests/evaluation/": "evaluation", "tests/data/": "data"}


def xdist_group_of(nodeid: str) -> str:
    """The group (scheduling unit) of a test: tests of one group run in order on one worker."""
    if nodeid.rfind("@") > nodeid.rfind("]"):
        return nodeid.rsplit("@", 1)[1]
    return next((group for prefix, group in AREA_GROUPS.items() if nodeid.startswith(prefix)),
                nodeid.split("::", 1)[0])


@pytest.hookimpl(optionalhook=True)  # pytest-xdist's hook: no error without it
def pytest_xdist_make_scheduler(config: pytest.Config, log: object) -> object | None:
    if config.getvalue("dist") != "loadgroup":
        return None
    from xdist.scheduler import LoadScopeScheduling  # optional: pytest-xdist (dev extra)

    class GroupScheduling(LoadScopeScheduling):
        """xdist's per-scope load balancing with `xdist_group_of` as the scope."""

        def _split_scope(self, nodeid: str) -> str:
            return xdist_group_of(nodeid)

    return GroupScheduling(config, log)


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        limits = [s for name, s in MARKER_TIMEOUT_S.items() if item.get_closest_marker(name)]
        if limits and item.get_closest_marker("timeout") is None:
            item.add_marker(pytest.mark.timeout(max(limits)))


@pytest.hookimpl(tryfirst=True, optionalhook=True)  # pytest-timeout's hook: no error without it
def pytest_timeout_set_timer(item: pytest.Item, settings: object) -> None:
    """Arm the backstop beside pytest-timeout's own timer (returning None lets it set that)."""
    timeout = getattr(settings, "timeout", None)
    if timeout and timeout > 0:
        faulthandler.dump_traceback_later(timeout + backstop_grace_s(timeout), exit=True,
                                          file=item.config.stash[BACKSTOP_FD])


@pytest.hookimpl(tryfirst=True, optionalhook=True)  # pytest-timeout's hook: no error without it
def pytest_timeout_cancel_timer(item: pytest.Item) -> None:
    faulthandler.cancel_dump_traceback_later()


@pytest.fixture(autouse=True)
def _restore_environ():
    """Undo any os.environ change a test makes (monkeypatch's delenv of an absent key records
    nothing, so a later direct write would leak): a leaked GLOO_SOCKET_IFNAME=lo once made every
    later 2-node srun job hang."""
    saved = dict(os.environ)
    yield
    os.environ.clear()
    os.environ.update(saved)


@pytest.fixture(scope="session")
def repo_root() -> Path:
    return ROOT


@pytest.fixture(scope="session")
def sen12ms_shards(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Synthetic SEN12MS (real layout, 32x32 patches) packed into 8 small shards."""
    from satfuse.data.packing.shard_writer import shard_dataset
    from satfuse.data.sources.synth import write_sen12ms

    base = tmp_path_factory.mktemp("sen12ms")
    write_sen12ms(base / "raw", scenes=2, patches_per_scene=24, seed=0, size=32)
    shard_dataset(base / "raw", "sen12ms", base / "shards", maxcount=6, seed=0)
    return base / "shards"


@pytest.fixture(scope="session")
def sen12ms_heldout(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Held-out scenes (another seed) for retrieval accuracy."""
    from satfuse.data.packing.shard_writer import shard_dataset
    from satfuse.data.sources.synth import write_sen12ms

    base = tmp_path_factory.mktemp("sen12ms_heldout")
    write_sen12ms(base / "raw", scenes=1, patches_per_scene=16, seed=99, size=32)
    shard_dataset(base / "raw", "sen12ms", base / "shards", maxcount=8, seed=1)
    return base / "shards"

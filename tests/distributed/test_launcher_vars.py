"""One owner for the launcher environment: no module but `distributed/launcher_env.py` reads or
sets a launcher's variables (SLURM_*, SUBMITIT_*, torchrun's RANK/WORLD_SIZE/MASTER_*/
TORCHELASTIC_*, satfuse's SATFUSE_LAUNCHER_PID), and only `registry.py` reads SATFUSE_PLUGINS.

The scan is of the syntax tree, not of text: a variable's name as a whole string constant
(`os.environ["RANK"]`, `env.get("SLURM_JOB_ID")`, a tuple of prefixes such as `"SLURM_"`) or
as a keyword (`os.environ.update(MASTER_PORT=...)`) counts; the names inside docstrings and
messages do not."""

from __future__ import annotations

import ast
import re
from pathlib import Path

from satfuse.distributed import launcher_env

SRC = Path(__file__).resolve().parents[2] / "src" / "satfuse"

LAUNCHER_VAR = re.compile(
    r"^(SLURM_\w*|SLURMD_\w+|SUBMITIT_\w*|TORCHELASTIC_\w*|MASTER_\w*|RANK|LOCAL_RANK|WORLD_SIZE|"
    r"LOCAL_WORLD_SIZE|NODE_RANK|GROUP_RANK|GROUP_WORLD_SIZE|SATFUSE_LAUNCHER_PID)$"
)
PLUGINS_VAR = re.compile(r"^SATFUSE_PLUGINS$")
OWNERS = {LAUNCHER_VAR: {"distributed/launcher_env.py"}, PLUGINS_VAR: {"registry.py"}}


def variable_names(source: str) -> list[tuple[int, str]]:
    """(line, name) of every launcher or plugin variable named in `source`'s code."""
    found = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Constant) and isinstance(node.value, str):
            name = node.value
        elif isinstance(node, ast.keyword) and node.arg:
            name = node.arg
        else:
            continue
        if any(p.match(name) for p in OWNERS):
            found.append((node.lineno, name))
    return found


def strays(root: Path) -> list[str]:
    """`path:line name` for each variable named outside the module that owns it."""
    out = []
    for path in sorted(root.rglob("*.py")):
        rel = path.relative_to(root).as_posix()
        for line, name in variable_names(path.read_text()):
            owners = next(owner for pattern, owner in OWNERS.items() if pattern.match(name))
            if rel not in owners:
                out.append(f"{rel}:{line} {name}")
    return out


def test_only_launcher_env_reads_the_launchers_variables() -> None:
    # the scanner itself: a read, a write, a prefix and a membership test are each caught,
    # a message or docstring naming a variable is not
    planted = (
        '"""Reads SLURM_JOB_ID."""\n'
        'import os\n'
        'a = os.environ.get("SLURM_ARRAY_TASK_ID")\n'
        'os.environ.update(MASTER_PORT="1")\n'
        'b = [k for k in os.environ if k.startswith(("SLURM_", "RANK"))]\n'
        'c = "WORLD_SIZE" in os.environ\n'
        'd = os.environ["SATFUSE_PLUGINS"]\n'
        'e = f"set {os.getpid()} as RANK in the message"\n'
    )
    assert sorted(variable_names(planted)) == [(3, "SLURM_ARRAY_TASK_ID"), (4, "MASTER_PORT"), (5, "RANK"),
                                               (5, "SLURM_"), (6, "WORLD_SIZE"), (7, "SATFUSE_PLUGINS")]
    assert strays(SRC) == [], "read these through satfuse.distributed.launcher_env's named functions"


def test_named_readers_follow_the_launchers() -> None:
    """The readers that replaced the scattered ones give the same answers for each launcher."""
    slurm_array = {"SLURM_JOB_ID": "90", "SLURM_ARRAY_JOB_ID": "77", "SLURM_ARRAY_TASK_ID": "3",
                   "SLURM_ARRAY_TASK_MIN": "1", "SLURM_ARRAY_TASK_MAX": "4", "SLURM_PROCID": "2",
                   "SLURM_RESTART_COUNT": "5"}
    assert launcher_env.slurm_job_id(slurm_array) == "77_3"
    assert launcher_env.slurm_job_id({"SLURM_JOB_ID": "90"}) == "90"
    assert launcher_env.slurm_job_id({}) == ""
    assert launcher_env.slurm_array_defaults(slurm_array) == (2, 4)
    assert launcher_env.slurm_restart_count(slurm_array) == 5 and launcher_env.slurm_restart_count({}) == 0
    assert launcher_env.process_rank(slurm_array) == 2
    assert launcher_env.process_rank({**slurm_array, "RANK": "1"}) == 1  # torchrun's numbering wins
    assert launcher_env.process_rank({}) == 0
    assert launcher_env.started_by_launcher(slurm_array) and launcher_env.started_by_launcher({"RANK": "0"})
    assert not launcher_env.started_by_launcher({"SLURM_JOB_ID": "90"})  # an allocation, not a task
    assert launcher_env.torchrun_multi_rank({"RANK": "0", "WORLD_SIZE": "2"})
    assert not launcher_env.torchrun_multi_rank({"RANK": "0", "WORLD_SIZE": "1"})
    clean = launcher_env.without_launcher_vars({**slurm_array, "RANK": "1", "MASTER_PORT": "2", "HOME": "/h"}, "/c")
    assert clean == {"HOME": "/h", "SLURM_CONF": "/c"}

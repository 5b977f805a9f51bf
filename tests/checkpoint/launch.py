"""Start the toy loop as real ranks (one process each, gloo over localhost), like torchrun.

Why not torchrun: the kill tests need each rank's pid (SIGKILL every rank, SIGUSR1 one
rank), and starting the ranks directly saves torchrun's own start-up on 2 cores.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

from satfuse.distributed.ports import free_port

TOY = Path(__file__).with_name("toy_train.py")
STACK_SIGNAL = signal.SIGQUIT  # toy_train.py dumps every thread's stack on it


def start(world: int, args: list[str], log_dir: Path) -> list[subprocess.Popen]:
    """Launch `world` ranks of the toy loop; stdout+stderr of rank r go to log_dir/rank{r}.log."""
    port = free_port()
    log_dir.mkdir(parents=True, exist_ok=True)
    procs = []
    for rank in range(world):
        env = {**os.environ, "RANK": str(rank), "LOCAL_RANK": str(rank), "WORLD_SIZE": str(world),
               "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port), "OMP_NUM_THREADS": "1"}
        out = open(log_dir / f"rank{rank}.log", "ab")  # noqa: SIM115 - closed by the child's exit
        procs.append(subprocess.Popen([sys.executable, str(TOY), *map(str, args)],
                                      env=env, stdout=out, stderr=subprocess.STDOUT))
    return procs


def wait(procs: list[subprocess.Popen], timeout: float = 120.0, log_dir: Path | None = None) -> list[int]:
    """Exit codes of every rank. A rank that hangs past `timeout` fails the test with every
    rank's Python stack (SIGQUIT -> faulthandler in toy_train.py; not SIGUSR2, which the stop
    flag takes over) and log, then all are killed."""
    deadline = time.monotonic() + timeout
    codes = []
    try:
        for p in procs:
            codes.append(p.wait(timeout=max(0.1, deadline - time.monotonic())))
    except subprocess.TimeoutExpired:
        for p in procs:
            if p.poll() is None:
                p.send_signal(STACK_SIGNAL)
        time.sleep(2.0)
        states = "\n".join(proc_state(p) for p in procs)
        kill(procs)
        where = logs(log_dir) if log_dir is not None else "(no logs)"
        raise AssertionError(f"ranks hung for {timeout:.0f} s; exit codes so far {codes}\n"
                             f"{states}\n{where}") from None
    return codes


def proc_state(p: subprocess.Popen) -> str:
    """The kernel's view of a rank that did not answer: its state and where each thread waits
    (a rank in D state or mid-exit cannot run faulthandler, so its log stays empty)."""
    if p.poll() is not None:
        return f"pid {p.pid}: exited {p.returncode}"
    lines = [f"pid {p.pid}:"]
    for task in sorted(Path(f"/proc/{p.pid}/task").glob("*")):
        try:
            stat = (task / "stat").read_text().rsplit(")", 1)[1].split()
            wchan = (task / "wchan").read_text()
            comm = (task / "comm").read_text().strip()
        except OSError:
            continue
        lines.append(f"  tid {task.name} {comm} state={stat[0]} wchan={wchan}")
    return "\n".join(lines)


def kill(procs: list[subprocess.Popen]) -> None:
    for p in procs:
        if p.poll() is None:
            p.kill()
    for p in procs:
        p.wait()


def run(world: int, args: list[str], log_dir: Path, timeout: float = 120.0) -> list[int]:
    return wait(start(world, args, log_dir), timeout, log_dir)


def wait_for(cond: Callable[[], bool], timeout: float = 60.0, what: str = "condition") -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        if time.monotonic() > deadline:
            raise TimeoutError(f"timed out waiting for {what}")
        time.sleep(0.01)


def logs(log_dir: Path) -> str:
    return "\n".join(f"--- {p.name}\n{p.read_text(errors='replace')[-6000:]}"
                     for p in sorted(log_dir.glob("rank*.log")))

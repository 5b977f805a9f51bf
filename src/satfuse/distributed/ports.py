"""Rendezvous ports that cannot be stolen by a TCP self-connect.

Why not `bind(("", 0))` or any port in [32768, 61000): Linux draws the *local* port of every
outgoing connection from `net.ipv4.ip_local_port_range` (default 32768-60999). While rank 0
is still starting, the other ranks retry `connect()` to MASTER_PORT; should the kernel pick
MASTER_PORT itself as one such socket's local port, the socket connects to itself (TCP
simultaneous open), that rank waits for a store reply from itself, and rank 0 cannot bind
the port. Rare per attempt (about 1 in 28,000 local ports) but retried many times per start,
and a CI run starts many process groups on 2 busy cores (the likely cause of a 3-rank test
that hung in CI once). Ports below the ephemeral range are never handed out by connect(), so every port
here comes from [20000, 32000).
"""

from __future__ import annotations

import random
import re
import socket

PORT_BASE = 20000
PORT_SPAN = 12000  # [20000, 32000): below Linux's default ephemeral range (32768-60999)


def port_from_job_id(job_id: str, restart: int = 0) -> int:
    """A per-job port (20000 + (job id + restart) % 12000), equal on every task of one
    attempt, so two jobs sharing a node do not fight over one rendezvous port and a requeued
    job does not meet the sockets of its previous attempt."""
    digits = re.sub(r"\D", "", str(job_id).split("_")[0]) or "0"
    return PORT_BASE + (int(digits) + restart) % PORT_SPAN


def free_port(host: str = "127.0.0.1", tries: int = 200) -> int:
    """A port of [20000, 32000) that is free on `host` right now (for local process groups)."""
    rng = random.Random()
    for _ in range(tries):
        port = PORT_BASE + rng.randrange(PORT_SPAN)
        with socket.socket() as s:
            try:
                s.bind((host, port))
            except OSError:
                continue
            return port
    raise OSError(f"no free port in [{PORT_BASE}, {PORT_BASE + PORT_SPAN}) on {host} after {tries} tries")

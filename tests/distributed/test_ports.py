"""Rendezvous ports stay below the kernel's ephemeral range (no TCP self-connect)."""

from __future__ import annotations

import socket
from pathlib import Path

from satfuse.distributed.ports import PORT_BASE, PORT_SPAN, free_port, port_from_job_id


def ephemeral_low() -> int:
    """The first port connect() may hand out as a local port on this machine."""
    path = Path("/proc/sys/net/ipv4/ip_local_port_range")
    return int(path.read_text().split()[0]) if path.exists() else 32768


def test_every_port_is_below_the_ephemeral_range() -> None:
    assert ephemeral_low() >= PORT_BASE + PORT_SPAN
    assert all(PORT_BASE <= port_from_job_id(str(j), r) < PORT_BASE + PORT_SPAN
               for j in (0, 1, 11999, 987654, 10**12) for r in range(3))
    assert port_from_job_id("4242_7") == port_from_job_id("4242")  # array task ids share the job's


def test_free_port_is_free_and_below_the_ephemeral_range() -> None:
    ports = {free_port() for _ in range(20)}
    assert all(PORT_BASE <= p < ephemeral_low() for p in ports)
    with socket.socket() as s:
        s.bind(("127.0.0.1", ports.pop()))  # really free

"""A rank of a real gloo job: joins via `init_distributed`, all-reduces, prints one JSON line.

Run as a script by the tests (one subprocess per rank), so nothing here is mocked: the
rendezvous, the interface check and the collective are the real ones.
"""

from __future__ import annotations

import json
import os
import socket
import sys

from satfuse.distributed import collectives as coll
from satfuse.distributed import env as denv
from satfuse.utils import SatfuseError


def main() -> int:
    timeout = int(os.environ.get("WORKER_TIMEOUT_S", "60"))
    try:
        info = denv.init_distributed(timeout_s=timeout)
    except SatfuseError as exc:
        print(f"SatfuseError: {exc}", file=sys.stderr, flush=True)
        return 2
    import torch
    import torch.distributed as dist

    die_rank = int(os.environ.get("WORKER_DIE_RANK", "-1"))
    if die_rank >= 0:
        return _lose_a_peer(info.rank, die_rank)
    t = torch.tensor([float(info.rank + 1)])
    if dist.is_initialized():
        dist.all_reduce(t)
    stop = coll.any_rank(info.rank == info.world_size - 1)
    print(
        json.dumps(
            {
                "env": info.as_dict(),
                "sum": t.item(),
                "stop": stop,
                "host": socket.gethostname(),
                "world": coll.world(),
                "rank": coll.rank(),
                "is_main": coll.is_main(),
                "gloo_ifname": os.environ.get("GLOO_SOCKET_IFNAME"),
            }
        ),
        flush=True,
    )
    return 0


def _lose_a_peer(me: int, die_rank: int) -> int:
    """Rank `die_rank` dies abruptly; the others must fail fast naming the lost node."""
    import time

    import torch
    import torch.distributed as dist

    if me == die_rank:
        os._exit(9)
    try:
        for _ in range(50):
            dist.all_reduce(torch.ones(1))
            time.sleep(0.1)
    except RuntimeError as exc:
        print(f"SatfuseError: {denv.comm_failure(exc, 'the test all_reduce')}", file=sys.stderr)
        return 3
    return 0


if __name__ == "__main__":
    denv.exit_cleanly(main())

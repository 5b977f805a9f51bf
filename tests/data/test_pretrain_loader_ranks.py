"""The loader in a real gloo group: every rank runs a collective per batch, so a rank with
fewer batches than the others would hang the group (the timeout turns that into a failure).
One shard is truncated mid-epoch and skipped: the ranks must still finish together."""

from __future__ import annotations

import json
import os
import sys
import time
from datetime import timedelta
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from satfuse.data.reading.pretrain_loader import PretrainLoader
from satfuse.data.reading.shard_sets import resolve_shards
from satfuse.distributed.ports import free_port
from tests.data.loader_shards import data_cfg, gather_report, make_shards, sample_ids, truncate


def _rank(rank: int, world: int, port: int, shard_dir: str, out: str) -> None:
    try:
        dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank,
                                world_size=world, timeout=timedelta(seconds=60))
        ld = PretrainLoader(resolve_shards(shard_dir), data_cfg(num_workers=1), rank=rank, world_size=world, seed=0)
        ids, it = [], iter(ld)
        for _ in range(2 * ld.steps_per_epoch):
            batch = next(it)
            total = torch.tensor([float(batch["s1"].sum())])
            dist.all_reduce(total)  # what a training step does: every rank must take part
            if batch["epoch"] == 0:
                ids += sample_ids(batch)
        report = {"ids": ids, "state": ld.state_dict(), "errors": ld.decode_errors, "steps": ld.steps_per_epoch}
        gather_report(report, world, rank, out)
    except BaseException as exc:  # noqa: BLE001 - report it, then die with a failure status
        print(f"rank {rank}: {exc!r}", file=sys.stderr, flush=True)
        os._exit(1)
    sys.stdout.flush()
    os._exit(0)


def test_ranks_finish_together_despite_a_truncated_shard(tmp_path: Path) -> None:
    d = make_shards(tmp_path, [12, 12, 12, 12, 12, 12])
    truncate(d / "synth-000004.tar", 0.5)
    out = tmp_path / "result.json"
    ctx = mp.start_processes(_rank, args=(2, free_port(), str(d), str(out)), nprocs=2, join=False,
                             start_method="spawn")
    deadline = time.monotonic() + 120
    while not ctx.join(timeout=5):
        assert time.monotonic() < deadline, "ranks did not finish: a hang"
    reports = json.loads(out.read_text())
    assert reports[0]["steps"] == reports[1]["steps"]
    assert all(r["state"]["epoch"] == 2 and r["state"]["step"] == 0 for r in reports)
    assert sum(r["errors"] for r in reports) >= 1
    assert len(reports[0]["ids"]) == len(reports[1]["ids"]) == reports[0]["steps"] * 4

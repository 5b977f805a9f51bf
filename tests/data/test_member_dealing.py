"""Fewer shards than ranks x workers: members (contiguous member ranges) are dealt instead
of whole shards. One shard on 2 ranks x 2 workers in a real gloo group: each epoch disjoint
across ranks, equal batch counts (a collective per batch would hang otherwise), exact resume
on 2 ranks and a resume on 3 ranks that repeats nothing of the epoch."""

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
from satfuse.data.reading.stream_plan import make_plan, runs_size
from satfuse.distributed.ports import free_port
from tests.data.loader_shards import data_cfg, gather_report, make_shards, sample_ids

TOTAL, STOP = 96, 3  # one shard of 96 samples; the first run stops after 3 batches per rank


def test_one_shard_plan_deals_member_ranges_that_change_each_epoch() -> None:
    plans = [make_plan([TOTAL], 5, e, None, world_size=2, workers=2, batch_size=4, drop_last=True) for e in range(3)]
    for plan in plans:
        flat = [(s, i) for slot in plan.slots for s, lo, hi in slot for i in range(lo, hi)]
        assert sorted(flat) == [(0, i) for i in range(TOTAL)]  # disjoint and complete
        assert {runs_size(slot) for slot in plan.slots} == {24}
        assert plan.steps == 12
    assert plans[0].slots != plans[1].slots != plans[2].slots, "the ranks' shares must change every epoch"
    # enough shards: whole shards, dealt exactly as before (existing checkpoints resume unchanged)
    whole = make_plan([11] * 4, 5, 0, None, world_size=2, workers=2, batch_size=4, drop_last=True)
    assert all(len(slot) == 1 and slot[0][1:] == (0, 11) for slot in whole.slots)


def _rank(rank: int, world: int, port: int, shard_dir: str, states_in: str, out: str) -> None:
    try:
        dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank,
                                world_size=world, timeout=timedelta(seconds=60))
        ss = resolve_shards(shard_dir)
        cfg = data_cfg(num_workers=2)
        ld = PretrainLoader(ss, cfg, rank=rank, world_size=world, seed=1)
        report: dict = {"steps": ld.steps_per_epoch}
        if states_in:
            ld.load_state_dict(json.loads(Path(states_in).read_text()))
        steps = ld.steps_this_epoch
        report["steps_this_epoch"] = steps
        it, batches = iter(ld), []
        for i in range(steps):
            batch = next(it)
            total = torch.tensor([float(batch["s1"].sum())])
            dist.all_reduce(total)  # what a training step does: every rank must take part
            batches.append(batch)
            if i + 1 == STOP and not states_in:
                report["state"] = ld.state_dict()
        del it
        report["ids"] = [sample_ids(b) for b in batches]
        report["epochs"] = [b["epoch"] for b in batches]
        if not states_in:  # exact resume on the same world size: rebuild from every rank's state at STOP
            gathered: list = [None] * world
            dist.all_gather_object(gathered, report["state"])
            again = PretrainLoader(ss, cfg, rank=rank, world_size=world, seed=1)
            again.load_state_dict(json.loads(json.dumps(gathered)))
            it = iter(again)
            report["exact"] = all(
                (b2 := next(it))["key"] == b["key"] and torch.equal(b2["s2"], b["s2"]) and torch.equal(b2["s1"], b["s1"])
                for b in batches[STOP:]
            )
            del it
        gather_report(report, world, rank, out)
    except BaseException as exc:  # noqa: BLE001 - report it, then die with a failure status
        print(f"rank {rank}: {exc!r}", file=sys.stderr, flush=True)
        os._exit(1)
    sys.stdout.flush()
    os._exit(0)


def _spawn(world: int, shard_dir: Path, states_in: str, out: Path) -> list[dict]:
    ctx = mp.start_processes(_rank, args=(world, free_port(), str(shard_dir), states_in, str(out)), nprocs=world,
                             join=False, start_method="spawn")
    deadline = time.monotonic() + 180
    while not ctx.join(timeout=5):
        assert time.monotonic() < deadline, "ranks did not finish: a hang"
    return json.loads(out.read_text())


def test_one_shard_on_two_ranks_of_two_workers_then_three_ranks(tmp_path: Path) -> None:
    d = make_shards(tmp_path, [TOTAL])
    reports = _spawn(2, d, "", tmp_path / "two.json")
    assert reports[0]["steps"] == reports[1]["steps"] == 12  # 96 / 4 slots = 24 -> 6 batches a worker
    assert all(r["epochs"] == [0] * 12 for r in reports)
    per_rank = [[i for b in r["ids"] for i in b] for r in reports]
    assert len(per_rank[0]) == len(per_rank[1]) == 48
    assert not set(per_rank[0]) & set(per_rank[1]), "ranks shared a sample within the epoch"
    assert all(r["exact"] for r in reports), "resume on the same world size was not bitwise exact"

    states = tmp_path / "states.json"
    states.write_text(json.dumps([r["state"] for r in reports]))
    consumed = [i for r in reports for b in r["ids"][:STOP] for i in b]
    resumed = _spawn(3, d, str(states), tmp_path / "three.json")
    assert len({r["steps_this_epoch"] for r in resumed}) == 1 and resumed[0]["steps_this_epoch"] > 0
    assert all(r["epochs"] == [0] * r["steps_this_epoch"] for r in resumed)
    rest = [i for r in resumed for b in r["ids"] for i in b]
    seen = consumed + rest
    assert len(seen) == len(set(seen)), "a sample was repeated within the epoch after the resume on 3 ranks"
    assert TOTAL - len(seen) < 3 * 2 * 2 * 4  # the loader's bound on samples left out of an epoch


def test_one_streamed_shard_is_dealt_by_members_too(tmp_path: Path) -> None:
    """A `pipe:` shard: each slot streams the shard up to the end of its range; the ranks'
    batches are those of the same shard read locally."""
    d = make_shards(tmp_path, [40])
    local = resolve_shards(str(d))
    piped = resolve_shards(f"pipe:cat {d / 'synth-000000.tar'}", str(d / "manifest.json"))
    seen = []
    for r in range(2):
        want = PretrainLoader(local, data_cfg(), rank=r, world_size=2, seed=2)
        got = PretrainLoader(piped, data_cfg(), rank=r, world_size=2, seed=2)
        assert got.steps_per_epoch == want.steps_per_epoch == 5
        it_w, it_g = iter(want), iter(got)
        for _ in range(5):
            w, g = next(it_w), next(it_g)
            assert g["key"] == w["key"] and torch.equal(g["s2"], w["s2"])
            seen += sample_ids(g)
    assert len(seen) == len(set(seen)) == 40

"""Staging to node-local storage (`data.stage_dir`): which node holds which shards, the epoch
plan with node groups (and resume across node counts), and the copier (copy, verified
reuse, a damaged local copy copied again, a damaged source refused, no room refused)."""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import pytest

from satfuse.data.reading import staging
from satfuse.data.reading.pretrain_loader import PretrainLoader
from satfuse.data.reading.shard_sets import resolve_shards
from satfuse.data.reading.staging import NodeLayout, copy_share, plan_copies
from satfuse.data.reading.stream_plan import (
    make_plan,
    node_groups,
    runs_size,
    shuffle_order,
    slot_rng,
)
from satfuse.utils import SatfuseError
from tests.data.loader_shards import data_cfg, make_shards, sample_ids

COUNTS = [23, 17, 30, 9, 21, 25, 12, 14]


def hashed_shards(root: Path, counts: list[int]) -> Path:
    """make_shards with the sha256 of every tar in its manifest (staging verifies against it)."""
    d = make_shards(root, counts)
    man = json.loads((d / "manifest.json").read_text())
    for s in man["shards"]:
        s["sha256"] = hashlib.sha256((d / s["name"]).read_bytes()).hexdigest()
    (d / "manifest.json").write_text(json.dumps(man))
    return d


def samples(slots: list) -> list[tuple[int, int]]:
    return [(sh, i) for piece in slots for sh, lo, hi in piece for i in range(lo, hi)]


# -------------------------------------------------------------------------- the node split


def test_node_groups_are_a_fixed_balanced_partition() -> None:
    owner = node_groups(COUNTS, seed=3, groups=3)
    assert owner == node_groups(COUNTS, seed=3, groups=3)  # deterministic
    assert sorted(set(owner)) == [0, 1, 2]
    loads = [sum(c for c, g in zip(COUNTS, owner, strict=True) if g == k) for k in range(3)]
    assert max(loads) - min(loads) <= max(COUNTS)  # greedy by samples: within one shard
    assert node_groups(COUNTS, seed=4, groups=3) != owner  # the seed picks the split
    assert node_groups(COUNTS, seed=3, groups=1) == [0] * len(COUNTS)


def test_plan_with_groups_keeps_each_node_on_its_shards_every_epoch() -> None:
    owner = node_groups(COUNTS, seed=5, groups=2)
    plans = [make_plan(COUNTS, 5, e, None, world_size=4, workers=2, batch_size=4, drop_last=True, groups=2)
             for e in range(3)]
    for plan in plans:
        assert sorted(samples(plan.slots)) == [(s, i) for s, c in enumerate(COUNTS) for i in range(c)]
        for slot, piece in enumerate(plan.slots):  # slots 0-3: ranks 0-1 = node 0; slots 4-7: node 1
            assert {owner[sh] for sh, _, _ in piece} <= {slot // 4}
    assert plans[0].slots != plans[1].slots  # still a new order inside the node each epoch
    # one group is the plain plan (staging on one node changes nothing in the data order)
    assert (make_plan(COUNTS, 5, 1, None, world_size=2, workers=2, batch_size=4, drop_last=True, groups=1).slots
            == make_plan(COUNTS, 5, 1, None, world_size=2, workers=2, batch_size=4, drop_last=True).slots)


@pytest.mark.parametrize(("old", "new"), [((2, 2), (1, 1)), ((2, 2), (3, 3)), ((1, 1), (4, 2)), ((2, 2), (4, 2))])
def test_resume_on_other_nodes_reads_exactly_the_rest(old: tuple[int, int], new: tuple[int, int]) -> None:
    """(world, groups) -> (world, groups): the leftovers of the saving run, every one once,
    each read by a rank of the node that now holds its shard."""
    (w0, g0), (w1, g1) = old, new
    plan = make_plan(COUNTS, 7, 2, None, world_size=w0, workers=1, batch_size=4, drop_last=True, groups=g0)
    cursors = [(5, 0, 22, 40)[s % 4] for s in range(w0)]
    consumed = set()
    for s, c in enumerate(cursors):
        order = shuffle_order(runs_size(plan.slots[s]), 8, slot_rng(7, 2, 0, s, w0))
        flat = samples([plan.slots[s]])
        consumed |= {flat[p] for p in order[: min(c, len(flat))].tolist()}
    base = {"world_size": w0, "workers": 1, "shuffle_buffer": 8, "cursors": cursors, "base": None, "groups": g0}
    resumed = make_plan(COUNTS, 7, 2, base, world_size=w1, workers=1, batch_size=4, drop_last=True, groups=g1)
    left = samples(resumed.slots)
    assert len(left) == len(set(left)) and not set(left) & consumed
    assert set(left) | consumed == {(s, i) for s, c in enumerate(COUNTS) for i in range(c)}
    owner = node_groups(COUNTS, 7, g1)
    per = w1 // g1
    for slot, piece in enumerate(resumed.slots):
        assert {owner[sh] for sh, _, _ in piece} <= {slot // per}


# -------------------------------------------------------------------------- the copier


def test_copy_then_reuse_then_recopy_a_damaged_copy(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    shards = resolve_shards(str(hashed_shards(tmp_path, [5, 4, 6])))
    set_dir, rows = plan_copies(shards, tmp_path / "local")
    first = copy_share(shards, set_dir, rows)
    assert (first["copied"], first["reused"], first["recopied"]) == (3, 0, 0)
    for r in rows:
        assert r.dest.read_bytes() == Path(r.source).read_bytes()
    assert (set_dir / "part0" / "manifest.json").is_file()  # the loader's first-open check reads it
    # hashed while copied: the loader's first open compares the size only, the shared original is hashed
    from satfuse.data.reading import stream_io

    hashed: list[int] = []
    monkeypatch.setattr(stream_io.hashlib, "sha256", lambda data=b"": hashed.append(1) or hashlib.new("sha256", data))
    assert not stream_io.index_shard(str(rows[0].dest)).error and not hashed
    assert not stream_io.index_shard(rows[0].source).error and hashed
    monkeypatch.undo()
    assert not list(set_dir.rglob(".*tmp*"))
    dead = rows[0].dest.with_name(f".{rows[0].dest.name}.tmp-{(1 << 22) + 12345}-1")  # beyond pid_max: no process
    live = rows[0].dest.with_name(f".{rows[0].dest.name}.tmp-{os.getpid()}-1")
    dead.write_bytes(b"half a shard")
    live.write_bytes(b"being written")
    again = copy_share(shards, set_dir, rows)
    assert (again["copied"], again["reused"], again["bytes_copied"]) == (0, 3, 0)
    assert not dead.exists() and live.exists()  # a dead copier's temp goes, a live one's stays
    live.unlink()
    # same size, other bytes: only the sha256 notices; it is copied again, the others reused
    damaged = rows[1].dest
    data = bytearray(damaged.read_bytes())
    data[700] ^= 0xFF
    damaged.write_bytes(bytes(data))
    rows[2].dest.write_bytes(rows[2].dest.read_bytes()[:100])  # truncated
    third = copy_share(shards, set_dir, rows)
    assert (third["reused"], third["recopied"], third["copied"]) == (1, 1, 1)
    assert damaged.read_bytes() == Path(rows[1].source).read_bytes()
    assert rows[2].dest.read_bytes() == Path(rows[2].source).read_bytes()


def test_damaged_source_is_refused_and_nothing_half_written_stays(tmp_path: Path) -> None:
    d = hashed_shards(tmp_path, [5, 4])
    tar = d / "synth-000001.tar"
    data = bytearray(tar.read_bytes())
    data[600] ^= 0xFF
    tar.write_bytes(bytes(data))
    shards = resolve_shards(str(d))
    set_dir, rows = plan_copies(shards, tmp_path / "local")
    with pytest.raises(SatfuseError, match=r"synth-000001.tar: its bytes do not hash to the manifest's sha256"):
        copy_share(shards, set_dir, rows)
    assert not rows[1].dest.exists() and not list(set_dir.rglob(".*tmp*"))


def test_no_room_is_refused_up_front(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    shards = resolve_shards(str(hashed_shards(tmp_path, [5, 4])))
    set_dir, rows = plan_copies(shards, tmp_path / "local")
    monkeypatch.setattr(staging, "free_bytes", lambda _p: 1000)
    with pytest.raises(SatfuseError, match=r"data.stage_dir has 1000 bytes free but node 0's share needs"):
        copy_share(shards, set_dir, rows)
    assert not any(r.dest.exists() for r in rows)


def test_stage_dir_key_changes_with_the_bytes(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Another shard set (here: same names, other sha256) never shares a staged directory."""
    a = resolve_shards(str(hashed_shards(tmp_path / "a", [5, 4])))
    b = resolve_shards(str(hashed_shards(tmp_path / "b", [5, 3])))
    assert plan_copies(a, tmp_path / "l")[0] != plan_copies(b, tmp_path / "l")[0]
    monkeypatch.setenv("SF_NODE_DIR", str(tmp_path / "n1"))
    assert staging.stage_root("$SF_NODE_DIR/x") == tmp_path / "n1" / "x"
    with pytest.raises(SatfuseError, match="SF_UNSET_VAR"):
        staging.stage_root("$SF_UNSET_VAR/x")


# -------------------------------------------------------------------------- the loader


@pytest.mark.parametrize("workers", [0, 2])
def test_two_nodes_stage_disjoint_subsets_and_read_only_them(tmp_path: Path, workers: int) -> None:
    """Two 1-rank 'nodes' in one process (no group: the agreement is local): each copies only
    its share, reads only local files (in loader workers too), and they read disjoint samples."""
    src = hashed_shards(tmp_path, [12, 12, 12, 12, 12, 12])
    shards = resolve_shards(str(src))
    ids, held, loaders = [], [], []
    for node in range(2):
        cfg = data_cfg(num_workers=workers, stage_dir=str(tmp_path / f"node{node}"), on_decode_error="fatal")
        ld = PretrainLoader(shards, cfg, rank=node, world_size=2, seed=0, node=NodeLayout(node, 2, 0, 1))
        local = [Path(u) for u in ld.shards.urls]
        assert all(str(p).startswith(str(tmp_path / f"node{node}")) for p in local)
        held.append({p.name for p in local if p.exists()})
        loaders.append(ld)
    src.rename(tmp_path / "shared-storage-gone")  # from here on only the local copies exist
    for ld in loaders:
        it = iter(ld)
        ids.append([i for _ in range(ld.steps_per_epoch) for i in sample_ids(next(it))])
    assert held[0] and held[1] and not held[0] & held[1] and len(held[0] | held[1]) == 6
    assert not set(ids[0]) & set(ids[1])
    by_shard = [{i // 12 for i in node_ids} for node_ids in ids]
    assert {f"synth-{s:06d}.tar" for s in by_shard[0]} <= held[0]
    assert {f"synth-{s:06d}.tar" for s in by_shard[1]} <= held[1]


def test_staged_loader_resumes_exactly_on_the_same_nodes(tmp_path: Path) -> None:
    """Mid-epoch state of a staged 2-node run, loaded by a new loader on the same layout: the
    next batches are the ones the uninterrupted loader gives (local copies reused)."""
    import torch

    shards = resolve_shards(str(hashed_shards(tmp_path, [12, 12, 12, 12, 12, 12])))
    cfg = data_cfg(num_workers=0, stage_dir=str(tmp_path / "node$SF_TEST_NODE"))

    def loader(node: int) -> PretrainLoader:
        with pytest.MonkeyPatch.context() as mp:
            mp.setenv("SF_TEST_NODE", str(node))
            return PretrainLoader(shards, cfg, rank=node, world_size=2, seed=1, node=NodeLayout(node, 2, 0, 1))

    first = [loader(0), loader(1)]
    its = [iter(ld) for ld in first]
    for _ in range(2):
        for it in its:
            next(it)
    states = [ld.state_dict() for ld in first]
    assert states[0]["groups"] == 2
    expected = [next(its[0]) for _ in range(3)]
    again = loader(0)
    again.load_state_dict(states)
    it = iter(again)
    for want in expected:
        got = next(it)
        assert torch.equal(got["s1"], want["s1"]) and torch.equal(got["s2"], want["s2"])


def _staging_rank(rank: int, port: int, src: str, root: str, out: str) -> None:
    import os
    import sys
    from datetime import timedelta

    import torch.distributed as dist

    from satfuse.distributed.env import exit_cleanly

    try:
        dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2,
                                timeout=timedelta(seconds=60))
        shards, node = resolve_shards(src), NodeLayout(rank, 2, 0, 1)
        report: dict = {}
        bad = f"{root}/node{rank}" + ("/$SF_UNSET_ON_RANK1" if rank == 1 else "")
        try:  # a value only rank 1 cannot expand: every rank must fail, none may hang
            PretrainLoader(shards, data_cfg(stage_dir=bad), rank=rank, world_size=2, seed=0, node=node)
        except SatfuseError as exc:
            report["error"] = str(exc)
        ld = PretrainLoader(shards, data_cfg(stage_dir=f"{root}/node{rank}"), rank=rank, world_size=2, seed=0,
                            node=node)
        report["held"] = sorted(os.path.basename(u) for u in ld.shards.urls if os.path.exists(u))
        Path(f"{out}.{rank}").write_text(json.dumps(report))
    except BaseException as exc:  # noqa: BLE001 - report it, then die with a failure status
        print(f"rank {rank}: {exc!r}", file=sys.stderr, flush=True)
        exit_cleanly(1)
    exit_cleanly(0)  # the 2-rank group is left to the exit: destroying it can deadlock (`teardown`)


def test_staging_in_a_process_group_fails_together_and_splits_the_set(tmp_path: Path) -> None:
    import time

    import torch.multiprocessing as mp

    from satfuse.distributed.ports import free_port

    src = hashed_shards(tmp_path, [6, 6, 6, 6])
    out = tmp_path / "report"
    ctx = mp.start_processes(_staging_rank, args=(free_port(), str(src), str(tmp_path / "stage"), str(out)),
                             nprocs=2, join=False, start_method="spawn")
    deadline = time.monotonic() + 120
    while not ctx.join(timeout=5):
        assert time.monotonic() < deadline, "ranks did not finish: a hang"
    r0, r1 = (json.loads(Path(f"{out}.{r}").read_text()) for r in range(2))
    assert "SF_UNSET_ON_RANK1" in r1["error"] and "staging failed on another node" in r0["error"]
    assert r0["held"] and r1["held"] and not set(r0["held"]) & set(r1["held"])
    assert len(r0["held"]) + len(r1["held"]) == 4

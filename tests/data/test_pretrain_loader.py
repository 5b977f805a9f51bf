"""PretrainLoader: coverage per epoch, equal steps, exact resume, resume on another world
size, decode errors, start-up checks. Ranks are independent (the loader never communicates),
so several ranks' loaders are driven from one process here; test_distributed.py runs them in
a real gloo group."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import numpy as np
import pytest
import torch

from satfuse.data.reading.pretrain_loader import PretrainLoader
from satfuse.data.reading.shard_sets import resolve_shards
from satfuse.utils import SatfuseError
from tests.data.loader_shards import S2_STATS, data_cfg, make_shards, run_rank, sample_ids, truncate

TOTAL = 137


def epoch_ids(shard_dir: Path, world: int, workers: int, seed: int = 0, epochs: int = 1, **kw) -> list[list[list[int]]]:
    """ids[epoch][rank] -> ids seen by that rank in that epoch (drives all ranks)."""
    ss = resolve_shards(str(shard_dir))
    cfg = data_cfg(num_workers=workers, **kw)
    loaders = [PretrainLoader(ss, cfg, rank=r, world_size=world, seed=seed) for r in range(world)]
    steps = {ld.steps_per_epoch for ld in loaders}
    assert len(steps) == 1, "steps_per_epoch must be identical on every rank"
    out = [[[] for _ in range(world)] for _ in range(epochs)]
    for r, ld in enumerate(loaders):
        for b in run_rank(ld, steps.pop() * epochs if not steps else ld.steps_per_epoch * epochs):
            out[b["epoch"]][r] += sample_ids(b)
        assert ld.state_dict()["epoch"] == epochs and ld.state_dict()["step"] == 0
    return out


def unused_bound(world: int, workers: int, batch: int) -> int:
    """The module docstring's bound on samples not used in one epoch."""
    return world * workers * 2 * batch


@pytest.mark.parametrize(("world", "workers"), [(1, 0), (2, 2), (3, 1), (3, 2)])
def test_each_epoch_disjoint_complete_equal(shard_dir: Path, world: int, workers: int) -> None:
    ids = epoch_ids(shard_dir, world, workers, epochs=2)
    for per_rank in ids:
        flat = [i for r in per_rank for i in r]
        assert len(flat) == len(set(flat)), "a sample was delivered twice in one epoch"
        assert len({len(r) for r in per_rank}) == 1, "ranks got different numbers of samples"
        assert 0 <= TOTAL - len(flat) < unused_bound(world, max(workers, 1), 4)
    assert ids[0][0] != ids[1][0], "epochs must not repeat the same order"


def test_batches_hold_normalised_data_of_their_key(shard_dir: Path) -> None:
    ss = resolve_shards(str(shard_dir))
    ld = PretrainLoader(ss, data_cfg(crop=0, num_workers=1), rank=0, world_size=1, seed=0)
    (b,) = run_rank(ld, 1)
    assert b["s1"].dtype == torch.float32 and b["s1"].shape == (4, 2, 16, 16) and b["s2"].shape == (4, 13, 16, 16)
    raw_b1 = b["s2"][:, 0, 0, 0] * S2_STATS["std"][0] + S2_STATS["mean"][0]  # S2 B1 pixel holds the id
    assert torch.allclose(raw_b1, torch.tensor(sample_ids(b), dtype=torch.float32), atol=0.05)
    assert float(b["s1"].min()) >= (-25 - (-12)) / 4 - 1e-5  # S1 clipped to [-25, 0] dB first
    assert ld.normalization["s1"]["clip"] == [-25.0, 0.0]


def test_crops_do_not_depend_on_workers(shard_dir: Path) -> None:
    ss = resolve_shards(str(shard_dir))
    by_key = {}
    for workers, world in ((0, 1), (2, 2)):
        for r in range(world):
            ld = PretrainLoader(ss, data_cfg(num_workers=workers), rank=r, world_size=world, seed=4)
            for b in run_rank(ld, ld.steps_per_epoch):
                for k, x in zip(b["key"], b["s2"], strict=True):
                    if k in by_key:
                        assert torch.equal(by_key[k], x)
                    by_key[k] = x
    assert len(by_key) > 100


def reference(ss, cfg, rank: int, world: int, n: int) -> list[dict]:
    return run_rank(PretrainLoader(ss, cfg, rank=rank, world_size=world, seed=3), n)


@pytest.mark.parametrize("stop", [0, 3, 7, 16, 17, 25])
def test_exact_resume_same_world(shard_dir: Path, stop: int) -> None:
    """Kill after `stop` batches, resume from JSON states: the rest is bitwise the same."""
    ss = resolve_shards(str(shard_dir))
    cfg = data_cfg(num_workers=2)
    world, total = 2, 34  # 2 epochs of 16 steps + 2
    refs = [reference(ss, cfg, r, world, total) for r in range(world)]
    first = [PretrainLoader(ss, cfg, rank=r, world_size=world, seed=3) for r in range(world)]
    for ld in first:
        run_rank(ld, stop)
    states = json.loads(json.dumps([ld.state_dict() for ld in first]))
    for r in range(world):
        ld = PretrainLoader(ss, cfg, rank=r, world_size=world, seed=3)
        ld.load_state_dict(states)
        for got, want in zip(run_rank(ld, total - stop), refs[r][stop:], strict=True):
            assert got["key"] == want["key"] and got["epoch"] == want["epoch"]
            assert torch.equal(got["s1"], want["s1"]) and torch.equal(got["s2"], want["s2"])


def consume(loaders: list[PretrainLoader], steps: int, seen: list[int]) -> list[dict]:
    for ld in loaders:
        for b in run_rank(ld, steps):
            assert b["epoch"] == 0
            seen += sample_ids(b)
    return [ld.state_dict() for ld in loaders]


@pytest.mark.parametrize(("new_world", "new_workers", "stop"), [(1, 1, 5), (3, 1, 5), (3, 2, 9), (1, 0, 0)])
def test_resume_on_another_world_size(shard_dir: Path, new_world: int, new_workers: int, stop: int) -> None:
    """2 ranks -> 1 or 3: the epoch goes on without a repeat; what is left out is bounded."""
    ss = resolve_shards(str(shard_dir))
    seen: list[int] = []
    old = [PretrainLoader(ss, data_cfg(num_workers=2), rank=r, world_size=2, seed=3) for r in range(2)]
    states = consume(old, stop, seen)
    cfg = data_cfg(num_workers=new_workers)
    new = [PretrainLoader(ss, cfg, rank=r, world_size=new_world, seed=3) for r in range(new_world)]
    for ld in new:
        ld.load_state_dict(json.loads(json.dumps(states)))
    steps = {ld.steps_this_epoch for ld in new}
    assert len(steps) == 1
    consume(new, steps.pop(), seen)
    assert len(seen) == len(set(seen)), "a sample was repeated within the epoch"
    assert TOTAL - len(seen) < unused_bound(new_world, max(new_workers, 1), 4)
    assert all(ld.state_dict()["epoch"] == 1 for ld in new)
    nxt = run_rank(new[0], 1)[0]
    assert nxt["epoch"] == 1


def test_chained_world_size_changes_in_one_epoch(shard_dir: Path) -> None:
    ss = resolve_shards(str(shard_dir))
    seen: list[int] = []
    a = [PretrainLoader(ss, data_cfg(num_workers=2), rank=r, world_size=2, seed=9) for r in range(2)]
    states = consume(a, 4, seen)
    b = [PretrainLoader(ss, data_cfg(num_workers=1, batch_size=3), rank=r, world_size=3, seed=9) for r in range(3)]
    for ld in b:
        ld.load_state_dict(states)
    states = consume(b, 3, seen)
    c = [PretrainLoader(ss, data_cfg(num_workers=2), rank=0, world_size=1, seed=9)]
    c[0].load_state_dict(states)
    consume(c, c[0].steps_this_epoch, seen)
    assert len(seen) == len(set(seen))
    assert TOTAL - len(seen) < unused_bound(1, 2, 4)


def test_resume_rejects_mismatched_states(shard_dir: Path, tmp_path: Path) -> None:
    ss = resolve_shards(str(shard_dir))
    lds = [PretrainLoader(ss, data_cfg(), rank=r, world_size=2, seed=3) for r in range(2)]
    run_rank(lds[0], 2)
    states = [ld.state_dict() for ld in lds]
    fresh = PretrainLoader(ss, data_cfg(), rank=0, world_size=2, seed=3)
    with pytest.raises(SatfuseError, match="inconsistent checkpoint"):
        fresh.load_state_dict(states)
    with pytest.raises(SatfuseError, match="got 1 rank states for a world size of 2"):
        fresh.load_state_dict(states[:1] * 1 + [])
    other = resolve_shards(str(make_shards(tmp_path / "o", [5, 5, 5])))
    with pytest.raises(SatfuseError, match="another shard set"):
        PretrainLoader(other, data_cfg(batch_size=2), rank=0, world_size=1, seed=3).load_state_dict([states[1]] * 2)
    with pytest.raises(SatfuseError, match="seed"):
        PretrainLoader(ss, data_cfg(), rank=0, world_size=2, seed=4).load_state_dict([lds[1].state_dict()] * 2)


def test_startup_checks(shard_dir: Path) -> None:
    ss = resolve_shards(str(shard_dir))
    # fewer shards (7) than ranks x workers (8): members are dealt, no longer refused
    assert PretrainLoader(ss, data_cfg(num_workers=2), rank=0, world_size=4, seed=0).steps_per_epoch == 8
    with pytest.raises(SatfuseError, match="rank 8 is outside world size 8"):
        PretrainLoader(ss, data_cfg(), rank=8, world_size=8, seed=0)
    with pytest.raises(SatfuseError, match="cannot fill one batch"):
        PretrainLoader(ss, data_cfg(batch_size=100), rank=0, world_size=2, seed=0)
    with pytest.raises(SatfuseError, match="data.crop=32 is larger"):
        run_rank(PretrainLoader(ss, data_cfg(crop=32), rank=0, world_size=1, seed=0), 1)


def test_corrupt_sample_skip_counts_and_warns(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    d = make_shards(tmp_path, [10, 10, 10, 10], corrupt=frozenset({3, 14, 15}))
    ss = resolve_shards(str(d))
    seen: list[int] = []
    errors = 0
    with caplog.at_level(logging.WARNING):
        for r in range(2):
            ld = PretrainLoader(ss, data_cfg(num_workers=0), rank=r, world_size=2, seed=1)
            for b in run_rank(ld, ld.steps_per_epoch):
                seen += sample_ids(b)
            errors += ld.decode_errors
            assert ld.state_dict()["epoch"] == 1
    assert errors == 3 and not {3, 14, 15} & set(seen)
    assert "synth-000001.tar: skipping sample ROIs1158_spring_0_p14" in caplog.text


def test_corrupt_sample_fatal_names_the_shard(tmp_path: Path) -> None:
    d = make_shards(tmp_path, [10, 10], corrupt=frozenset({12}))
    ss = resolve_shards(str(d))
    ld = PretrainLoader(ss, data_cfg(num_workers=1, on_decode_error="fatal"), rank=0, world_size=1, seed=1)
    with pytest.raises(SatfuseError, match=r"synth-000001.tar: sample ROIs1158_spring_0_p12 failed to decode"):
        run_rank(ld, ld.steps_per_epoch)


@pytest.mark.parametrize("workers", [0, 2])
def test_truncated_shard_still_delivers_every_step(tmp_path: Path, workers: int) -> None:
    d = make_shards(tmp_path, [12, 12, 12, 12])
    truncate(d / "synth-000002.tar", 0.4)
    ss = resolve_shards(str(d))
    for r in range(2):
        ld = PretrainLoader(ss, data_cfg(num_workers=workers), rank=r, world_size=2, seed=2)
        batches = run_rank(ld, ld.steps_per_epoch + 1)
        assert [b["epoch"] for b in batches].count(0) == ld.steps_per_epoch
    fatal = PretrainLoader(ss, data_cfg(on_decode_error="fatal"), rank=0, world_size=1, seed=2)
    with pytest.raises(SatfuseError, match="synth-000002.tar"):
        run_rank(fatal, fatal.steps_per_epoch)


def test_unreadable_slot_is_an_error_not_a_hang(tmp_path: Path) -> None:
    d = make_shards(tmp_path, [8, 8])
    (d / "synth-000000.tar").write_bytes(b"\0" * 10)
    (d / "synth-000001.tar").write_bytes(b"garbage")
    ld = PretrainLoader(resolve_shards(str(d)), data_cfg(), rank=0, world_size=1, seed=0)
    with pytest.raises(SatfuseError, match="no readable sample"):
        run_rank(ld, 1)


def test_simclr_views(shard_dir: Path) -> None:
    ss = resolve_shards(str(shard_dir))
    for mode, channels in (("s2_rgb", 3), ("s1s2", 15)):
        ld = PretrainLoader(ss, data_cfg(), rank=0, world_size=1, seed=0, method="simclr", simclr_input=mode)
        (b,) = run_rank(ld, 1)
        assert b["view1"].shape == b["view2"].shape == (4, channels, 8, 8)
        assert not torch.equal(b["view1"], b["view2"])
        (again,) = run_rank(PretrainLoader(ss, data_cfg(), rank=0, world_size=1, seed=0, method="simclr",
                                           simclr_input=mode), 1)
        assert torch.equal(b["view1"], again["view1"])


def test_state_is_small_json(shard_dir: Path) -> None:
    ld = PretrainLoader(resolve_shards(str(shard_dir)), data_cfg(num_workers=2), rank=1, world_size=2, seed=0)
    run_rank(ld, 3)
    st = ld.state_dict()
    assert len(json.dumps(st)) < 1000
    assert st["epoch"] == 0 and st["step"] == 3 and sum(st["batches"]) == 3
    assert st["samples_consumed"] == 12 and np.all(np.array(st["cursors"]) > 0)

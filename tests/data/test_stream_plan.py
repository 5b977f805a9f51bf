"""The plan arithmetic: shuffle orders, slot cuts and the remainder after a checkpoint."""

from __future__ import annotations

import numpy as np
import pytest

from satfuse.data.reading.stream_plan import (
    make_plan,
    positions_to_runs,
    runs_size,
    shuffle_order,
    slot_rng,
    split_runs,
)


@pytest.mark.parametrize(("n", "k"), [(0, 4), (1, 4), (10, 1), (50, 8), (50, 100)])
def test_shuffle_order_is_a_bounded_permutation(n: int, k: int) -> None:
    order = shuffle_order(n, k, np.random.default_rng(0))
    assert sorted(order.tolist()) == list(range(n))
    # output j was among the first j + k inputs: a reader never holds more than k samples
    assert all(order[j] < j + max(k, 1) for j in range(n))


def test_shuffle_order_depends_on_seed_only() -> None:
    a = shuffle_order(100, 16, slot_rng(1, 0, 0, 0, 4))
    b = shuffle_order(100, 16, slot_rng(1, 0, 0, 0, 4))
    c = shuffle_order(100, 16, slot_rng(1, 1, 0, 0, 4))
    assert (a == b).all() and not (a == c).all()


def test_split_runs_equal_contiguous_pieces() -> None:
    runs = [(3, 0, 10), (0, 0, 1), (2, 0, 7), (1, 0, 5)]
    pieces = split_runs(runs, 4)
    assert [runs_size(p) for p in pieces] == [6, 6, 6, 5]
    flat = [(s, i) for p in pieces for s, lo, hi in p for i in range(lo, hi)]
    assert flat == [(s, i) for s, lo, hi in runs for i in range(lo, hi)]


def test_positions_to_runs_roundtrip() -> None:
    runs = [(5, 2, 6), (1, 0, 3)]
    assert positions_to_runs(np.array([0, 1, 3, 4, 6]), runs) == [(5, 2, 4), (5, 5, 6), (1, 0, 1), (1, 2, 3)]


def test_plan_equal_steps_and_new_order_each_epoch() -> None:
    counts = [23, 17, 30, 9, 21, 25, 12]
    p0 = make_plan(counts, 0, 0, None, world_size=3, workers=2, batch_size=4, drop_last=True)
    p1 = make_plan(counts, 0, 1, None, world_size=3, workers=2, batch_size=4, drop_last=True)
    assert p0.steps == p1.steps == 10  # 137 samples / 6 slots = 22-23 -> 5 batches a slot, 2 slots a rank
    assert p0.slots != p1.slots
    for r in range(3):
        sched = p0.schedule(r)
        assert len(sched) == p0.steps and sched[:4] == [0, 1, 0, 1]


def test_remainder_is_exactly_what_was_not_consumed() -> None:
    counts = [23, 17, 30, 9, 21, 25, 12]
    plan = make_plan(counts, 7, 2, None, world_size=2, workers=2, batch_size=4, drop_last=True)
    cursors = [5, 0, 22, 40]  # mid-way, untouched, almost done, finished (past its size: top-up pass)
    consumed = set()
    for s, c in enumerate(cursors):
        order = shuffle_order(runs_size(plan.slots[s]), 8, slot_rng(7, 2, 0, s, 4))
        flat = [(sh, i) for sh, lo, hi in plan.slots[s] for i in range(lo, hi)]
        consumed |= {flat[p] for p in order[: min(c, len(flat))].tolist()}
    base = {"world_size": 2, "workers": 2, "shuffle_buffer": 8, "cursors": cursors, "base": None}
    new = make_plan(counts, 7, 2, base, world_size=3, workers=1, batch_size=4, drop_last=True)
    left = [(sh, i) for p in new.slots for sh, lo, hi in p for i in range(lo, hi)]
    assert len(left) == len(set(left))
    assert set(left) | consumed == {(s, i) for s, c in enumerate(counts) for i in range(c)}
    assert not set(left) & consumed
    assert new.generation == 1

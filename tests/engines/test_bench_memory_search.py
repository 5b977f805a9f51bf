"""The search of `satfuse bench memory` (doubling, then one bisection launch), with the rank
launches replaced by a memory model: peak = fixed + per_sample x batch, and a watchdog kill
above 1.25x the budget (the real launches are tested in tests/deepspeed/test_ds_launch.py)."""

from __future__ import annotations

import pytest

from satfuse.bench import memory


def fake_launch(fixed: float, per_sample: float, calls: list[list[int]]):
    def launch(setup, ckpt, batches, a, world):
        calls.append(list(batches))
        budget = a["budget_gb"] * 1024
        probes = []
        for b in batches:
            peak = fixed + per_sample * b
            if peak > memory.WATCHDOG_SLACK * budget:  # the watchdog ends the ranks mid-step
                return {"probes": probes, "killed_at": b, "idle_baseline_mib": 800.0}
            probes.append({"batch": b, "peak_mib": peak, "step_s": 0.1})
            if peak > budget:
                break
        return {"probes": probes, "idle_baseline_mib": 800.0}
    return launch


@pytest.mark.parametrize(("fixed", "per_sample", "budget_gb", "max_batch", "want", "capped", "over"), [
    (100.0, 50.0, 1.0, 64, 16, False, 20),  # fits 18.48: doubling 16 ok / 32 killed; quarters 20, 24, 28: 20 over (resolution 4)
    (1000.0, 10.0, 1.0, 64, 2, False, 3),  # 1024 MiB budget: 2 fits (1020), 4 over (1040, not killed)
    (10.0, 1.0, 1.0, 48, 48, True, None),  # everything fits: the cap, flagged
    (2000.0, 1.0, 1.0, 8, 0, False, 1),  # not even one sample
])
def test_doubling_then_bisection(monkeypatch, fixed, per_sample, budget_gb, max_batch, want, capped, over):
    calls: list[list[int]] = []
    monkeypatch.setattr(memory, "_launch", fake_launch(fixed, per_sample, calls))
    a = {"budget_gb": budget_gb, "max_batch": max_batch}
    row = memory._search("ddp", False, a, 2)
    budget = budget_gb * 1024
    assert row["largest_batch"] == want and row["capped"] == capped, (row, calls)
    assert row["first_over_budget"] == over, (row, calls)  # bisection narrowed the doubling's interval
    if want:
        assert fixed + per_sample * want <= budget
    if not capped:
        assert row["first_over_budget"] > want and fixed + per_sample * row["first_over_budget"] > budget
        assert row["resolution"] == row["first_over_budget"] - want
    assert calls[0][:4] == [1, 2, 4, 8][:len(calls[0][:4])] and calls[0][-1] <= max_batch
    assert all(b > 0 for c in calls for b in c) and len(calls) <= 2
    assert all(c == sorted(c) for c in calls)  # increasing: the high-water mark is each probe's peak

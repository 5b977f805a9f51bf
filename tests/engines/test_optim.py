"""LARS and the warmup + cosine schedule against their closed forms, and a kill-and-resume run
with both (the demo's and the paper's recipe) that checks the lr of the first step after
the restart."""

from __future__ import annotations

import math
import signal
from pathlib import Path

import pytest
import torch

from satfuse.config import OptimConfig
from satfuse.engines.optim import LARS, build_optimizer, build_scheduler, lr_factor
from tests.engines.ranks import kill_all, logs, metrics, run_ranks, start_ranks, wait_for_step

# ------------------------------------------------------------------------------------ LARS


def test_lars_first_step_is_the_trust_ratio_formula() -> None:
    """You et al. 2017: update = lr * eta * ||w|| / ||g + wd w|| * (g + wd w) for weights;
    biases (ndim <= 1) take plain SGD-momentum steps without decay or trust ratio."""
    w = torch.tensor([[3.0, 4.0]])  # ||w|| = 5
    g = torch.tensor([[0.5, -1.5]])
    b, gb = torch.tensor([2.0]), torch.tensor([0.25])
    pw, pb = torch.nn.Parameter(w.clone()), torch.nn.Parameter(b.clone())
    lr, wd, eta = 0.1, 0.5, 0.01
    opt = LARS([pw, pb], lr=lr, momentum=0.9, weight_decay=wd, eta=eta)
    pw.grad, pb.grad = g.clone(), gb.clone()
    opt.step()
    d = torch.tensor([[0.5 + 1.5, -1.5 + 2.0]])  # g + wd w = [[2.0, 0.5]]
    trust = eta * 5.0 / math.sqrt(2.0**2 + 0.5**2)
    assert torch.allclose(pw.detach(), w - lr * trust * d, rtol=0, atol=1e-7)
    assert torch.allclose(pb.detach(), b - lr * gb, rtol=0, atol=1e-7)  # no decay, no trust


def test_lars_momentum_accumulates_scaled_updates() -> None:
    """Second step: buf = m * buf + trust_2 * (g_2 + wd w_1); w_2 = w_1 - lr * buf."""
    p = torch.nn.Parameter(torch.tensor([[1.0, -2.0], [2.0, 0.5]]))
    lr, m, wd, eta = 0.05, 0.9, 1e-2, 0.02
    opt = LARS([p], lr=lr, momentum=m, weight_decay=wd, eta=eta)
    grads = [torch.tensor([[0.3, 0.1], [-0.2, 0.4]]), torch.tensor([[-0.1, 0.2], [0.5, 0.0]])]
    w = p.detach().clone()
    buf = None
    for g in grads:
        d = g + wd * w
        upd = eta * w.norm() / d.norm() * d
        buf = upd if buf is None else m * buf + upd
        w = w - lr * buf
        p.grad = g.clone()
        opt.step()
        assert torch.allclose(p.detach(), w, rtol=0, atol=1e-7)


def test_lars_zero_weight_or_gradient_uses_trust_one() -> None:
    p = torch.nn.Parameter(torch.zeros(2, 2))
    opt = LARS([p], lr=0.1, weight_decay=0.0, eta=0.001)
    p.grad = torch.ones(2, 2)
    opt.step()
    assert torch.allclose(p.detach(), torch.full((2, 2), -0.1))


def test_build_optimizer_picks_lars_with_config_values() -> None:
    model = torch.nn.Linear(3, 2)
    opt = build_optimizer(model, OptimConfig(name="lars", lr=0.3, momentum=0.8, weight_decay=1e-6))
    assert isinstance(opt, LARS)
    group = opt.param_groups[0]
    assert (group["lr"], group["momentum"], group["weight_decay"]) == (0.3, 0.8, 1e-6)


# -------------------------------------------------------------------------------- schedule

COSINE = OptimConfig(lr=0.2, schedule="cosine", warmup_steps=4, min_lr_ratio=0.1)
TOTAL = 20


def closed_form(step: int, total: int = TOTAL, warmup: int = 4, floor: float = 0.1) -> float:
    """Linear warmup to 1 over `warmup` steps, then floor + (1 - floor) * (1 + cos(pi t)) / 2."""
    if step < warmup:
        return (step + 1) / warmup
    t = (step - warmup) / (total - warmup)
    return floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * t))


@pytest.mark.parametrize(("step", "expected"), [
    (0, 0.25),  # first warmup step
    (3, 1.0),  # end of warmup
    (4, 1.0),  # first cosine step
    (12, 0.1 + 0.9 * 0.5),  # mid-cosine: half way
    (19, 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * 15 / 16))),  # last step
])
def test_lr_factor_closed_form(step: int, expected: float) -> None:
    assert lr_factor(step, TOTAL, COSINE) == pytest.approx(expected, abs=1e-12)


def test_scheduler_lr_follows_the_closed_form_at_every_step() -> None:
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=COSINE.lr)
    sched = build_scheduler(opt, COSINE, TOTAL)
    for step in range(TOTAL):
        assert opt.param_groups[0]["lr"] == pytest.approx(COSINE.lr * closed_form(step), abs=1e-12), step
        opt.step()
        sched.step()


def test_constant_schedule_after_warmup() -> None:
    cfg = OptimConfig(schedule="constant", warmup_steps=2)
    assert [lr_factor(s, 10, cfg) for s in range(4)] == [0.5, 1.0, 1.0, 1.0]


# ---------------------------------------------------------------- kill and resume (LARS)


@pytest.mark.slow
def test_kill_and_resume_with_lars_and_warmup_cosine(sen12ms_shards: Path, tmp_path: Path) -> None:
    """SIGKILL mid-run, restart: the first step after the checkpoint updates with the lr of the
    closed form (warmup + cosine position restored, not restarted; metrics.jsonl logs the lr
    each step used, so a resume that gets only that one step's lr wrong fails here, not just
    through the loss), and the run ends with the same losses as an uninterrupted run."""
    steps, every, lr = 12, 4, 0.5
    args = lambda run: [f"data.shards={sen12ms_shards}", f"train.run_dir={run}", f"train.steps={steps}",  # noqa: E731
                        "train.log_every=1", f"checkpoint.every_steps={every}", "optim.name=lars",
                        f"optim.lr={lr}", "optim.schedule=cosine", "optim.warmup_steps=3",
                        "optim.min_lr_ratio=0.1", "optim.weight_decay=1e-6"]
    (tmp_path / "ref").mkdir()
    assert run_ranks(1, args(tmp_path / "ref_run"), tmp_path / "ref") == [0], logs(tmp_path / "ref")
    ref = {m["step"]: m for m in metrics(tmp_path / "ref_run") if "loss" in m}
    cfg = OptimConfig(name="lars", lr=lr, schedule="cosine", warmup_steps=3, min_lr_ratio=0.1)
    for step, m in ref.items():  # the logged lr is the one that step used: 0-based index step - 1
        assert m["lr"] == pytest.approx(lr * lr_factor(step - 1, steps, cfg), rel=1e-9), step

    run = tmp_path / "run"
    (tmp_path / "killed").mkdir()
    procs = start_ranks(1, args(run), log_dir=tmp_path / "killed")
    wait_for_step(run, 5, procs)
    kill_all(procs, signal.SIGKILL)
    assert [p.returncode for p in procs] == [-signal.SIGKILL]  # the kill landed mid-run
    saved = max(p.name for p in (run / "checkpoints").glob("step_*") if (p / "meta.json").is_file())
    at = int(saved.split("_")[1])  # the newest committed one (what resume=auto takes)
    assert 4 <= at < steps
    before = [m["step"] for m in metrics(run) if "loss" in m]
    (tmp_path / "resumed").mkdir()
    assert run_ranks(1, args(run), tmp_path / "resumed") == [0], logs(tmp_path / "resumed")
    assert f"resumed from {run / 'checkpoints' / saved} at step {at}" in logs(tmp_path / "resumed")
    after = [m for m in metrics(run) if "loss" in m][len(before):]
    assert after[0]["step"] == at + 1  # continues after the checkpoint: no step before it redone
    assert after[0]["lr"] == pytest.approx(lr * lr_factor(at, steps, cfg), rel=1e-9)  # step at+1's lr
    for m in after:
        assert m["lr"] == pytest.approx(ref[m["step"]]["lr"], rel=1e-9), m["step"]
        assert m["loss"] == ref[m["step"]]["loss"], m["step"]

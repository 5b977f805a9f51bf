"""`train.nan_policy`: what a non-finite loss or gradient norm does to a pretraining run.

- `stop` (default): every micro-batch notes on the device the first step whose loss was not
  finite (`observe`: no host read per step); `check`, a collective every rank calls on log
  steps and before every save, reads it and stops the run naming the step and its batch keys,
  so the weights of a non-finite step are never saved.
- `skip`: the trainer's one reduction per step (the stop level and this rank's
  `non_finite` verdict, before the update) tells `decide_skip` whether any rank saw a
  non-finite loss or gradient norm; then every rank drops that update
  (`Engine.backward_step(skip=...)`), and `train.nan_skip_limit` steps in a row stop the run
  as diverged.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import torch

from satfuse.config import TrainConfig
from satfuse.distributed.collectives import any_rank
from satfuse.utils import SatfuseError

log = logging.getLogger(__name__)

KEYS_KEPT = 10_000  # steps whose batch keys are remembered between checks (a huge log_every stays bounded)


class NanGuard:
    """The NaN bookkeeping of one run: the first bad step (device), recent batch keys, skips."""

    def __init__(self, train: TrainConfig, lr: float, checkpoints: Path, device: torch.device) -> None:
        """`lr` (optim.lr) and `checkpoints` (the run's checkpoint directory) go into the advice."""
        self.skip = train.nan_policy == "skip"
        self.limit = train.nan_skip_limit
        self.advice = (f"try a lower optim.lr (now {lr}), optim.grad_clip=1.0, train.precision=fp32, or "
                       f"resume from the last checkpoint in {checkpoints}")
        self.first_bad = torch.zeros((), dtype=torch.long, device=device)  # 0: none (stop policy)
        self.recent_keys: dict[int, list] = {}  # the first batch keys of each step since the last check
        self.skipped_steps = 0  # skip policy: updates dropped so far (this attempt)
        self.in_row = 0

    def remember(self, step: int, batch: dict[str, Any]) -> None:
        """Keep the first keys of `step`'s batch, for the message that names a bad step."""
        self.recent_keys[step] = list(batch.get("key", [])[:4])
        if len(self.recent_keys) > KEYS_KEPT:
            self.recent_keys.pop(next(iter(self.recent_keys)))

    def observe(self, step: int, loss: torch.Tensor) -> None:
        """Stop policy: note `step` on the device when its loss is not finite (no host read)."""
        if not self.skip:
            bad = ~torch.isfinite(loss)
            self.first_bad = torch.where((self.first_bad == 0) & bad, step, self.first_bad)

    @staticmethod
    def non_finite(loss: torch.Tensor, grad_norm: torch.Tensor) -> bool:
        """Skip policy: this rank's verdict on its step, the policy's one host read per step."""
        return bool(~torch.isfinite(loss.detach()) | ~torch.isfinite(grad_norm))

    def decide_skip(self, step: int, any_bad: bool, seen_here: bool) -> bool:
        """Skip policy, after the ranks agreed (`any_bad`): True = drop this update everywhere.
        Fails once `train.nan_skip_limit` steps in a row were dropped: the run diverged."""
        if not any_bad:
            self.in_row = 0
            return False
        self.skipped_steps += 1
        self.in_row += 1
        keys = self.recent_keys.get(step, [])
        if self.in_row >= self.limit:
            raise SatfuseError(
                f"non-finite loss or gradients at {self.in_row} steps in a row (last: step {step}, "
                f"batch keys {keys}...), train.nan_skip_limit={self.limit}: the run diverged; {self.advice}")
        log.warning("train.nan_policy=skip: non-finite loss or gradients at step %d (%s on this rank, batch "
                    "keys %s...): update dropped on every rank (%d skipped so far, %d in a row)", step,
                    "seen" if seen_here else "not seen", keys, self.skipped_steps, self.in_row)
        return True

    def check(self, step: int) -> None:
        """Stop if any rank saw a non-finite loss. Collective: every rank calls it at the same
        steps (log steps, saves); the one host read of the stop policy's bookkeeping."""
        first = int(self.first_bad)
        if any_rank(first > 0):
            where = (f"at step {first} (batch keys {self.recent_keys.get(first, [])}...)" if first
                     else f"on another rank before step {step}")
            raise SatfuseError(f"non-finite loss {where}: {self.advice}")
        self.recent_keys.clear()

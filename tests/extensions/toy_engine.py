"""A toy engine registered from a test file (no edit under src/): DDP with its optimizer steps
counted, so a run can prove the registered class trained. Loaded by `satfuse pretrain` through
`SATFUSE_PLUGINS=tests.extensions.toy_engine` (tests/extensions/test_toy_engine.py)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

from satfuse.engines.ddp import DDPEngine
from satfuse.engines.kinds import EngineKind
from satfuse.registry import ENGINES


class ToyEngine(DDPEngine):
    """The DDP engine under another name, counting its `backward_step` calls."""

    kind = "toy"
    steps_taken = 0

    def backward_step(self, loss: torch.Tensor,
                      skip: Callable[[torch.Tensor], bool] | None = None) -> torch.Tensor:
        """Count, then DDP's step."""
        self.steps_taken += 1
        return super().backward_step(loss, skip)

    def engine_state(self) -> dict[str, Any]:
        """DDP's state plus the count (kept in the per-rank files)."""
        return {**super().engine_state(), "toy_steps": self.steps_taken}


ENGINES.register("toy", EngineKind(target=f"{__name__}:ToyEngine"))

"""Run curves into the tools people already watch: TensorBoard and (optionally) W&B.

Why beside metrics.jsonl and not instead: metrics.jsonl is what `satfuse report` and scripts
read; a multi-day pretraining job is watched in TensorBoard or W&B. Both are written by rank
0 only (`log.tensorboard`, `log.wandb`), through the tools' own writers (torch's
`SummaryWriter`, `wandb.log`), never a hand-made event format.

A requeued run appends to the same `{run_dir}/tensorboard/`: its first event file says
`purge_step`, so TensorBoard drops the steps that the preempted attempt logged after its
last checkpoint (they are re-run) instead of drawing them twice.

W&B is optional: with `log.wandb=true` and no `wandb` package, one warning says so and the
run goes on without it. It runs in offline mode unless WANDB_MODE is set (no network
needed; `wandb sync {run_dir}/wandb/offline-run-*` uploads later).
"""

from __future__ import annotations

import hashlib
import logging
import math
import os
from pathlib import Path
from typing import Any

from satfuse.config import LogConfig
from satfuse.run_layout import RunLayout

log = logging.getLogger(__name__)

WANDB_MISSING = ("log.wandb=true but the `wandb` package is not installed (pip install wandb); "
                 "continuing without Weights & Biases")


class MetricSinks:
    """Scalars to TensorBoard / W&B; a no-op when disabled or not on rank 0."""

    def __init__(self, log_cfg: LogConfig, run_dir: Path, enabled: bool = True, start_step: int = 0,
                 config: dict[str, Any] | None = None, kind: str = "pretrain") -> None:
        """From the `log` section (pretraining and fine-tuning share it). `config` is the run's
        whole config as a plain dict, recorded as the W&B run's config, not read."""
        self.tb: Any = None
        self.wandb: Any = None
        if not enabled:
            return
        run_dir = Path(run_dir)
        if log_cfg.tensorboard:
            self.tb = _tensorboard_writer(RunLayout(run_dir).tensorboard, start_step)
        if log_cfg.wandb:
            self.wandb = _wandb_run(run_dir, log_cfg.wandb_project, config, kind)

    @property
    def active(self) -> bool:
        return self.tb is not None or self.wandb is not None

    def scalars(self, step: int, values: dict[str, Any]) -> None:
        """Write every finite number of `values` at `step` (None/NaN are left out)."""
        if not self.active:
            return
        clean = {k: float(v) for k, v in values.items()
                 if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(float(v))}
        if self.tb is not None:
            for k, v in clean.items():
                self.tb.add_scalar(k, v, global_step=step)
        if self.wandb is not None and clean:
            self.wandb.log(clean, step=step)

    def flush(self) -> None:
        if self.tb is not None:
            self.tb.flush()

    def close(self) -> None:
        if self.tb is not None:
            self.tb.close()
            self.tb = None
        if self.wandb is not None:
            self.wandb.finish()
            self.wandb = None


def _tensorboard_writer(path: Path, start_step: int) -> Any:
    try:
        from torch.utils.tensorboard import SummaryWriter  # optional: tensorboard
    except ImportError:
        log.warning("log.tensorboard=true but the `tensorboard` package is not installed "
                    "(pip install tensorboard); continuing without TensorBoard events")
        return None
    path.mkdir(parents=True, exist_ok=True)
    # resumed after step `start_step`: that step's events are the checkpoint's own and stay; only
    # what the interrupted attempt logged after it (start_step + 1 on) is logged again and purged
    writer = SummaryWriter(log_dir=str(path), purge_step=start_step + 1 if start_step > 0 else None)
    log.info("TensorBoard events -> %s (tensorboard --logdir %s)", path, path)
    return writer


def _stable_id(run_dir: Path) -> str:
    """The same W&B run id for every attempt of one run dir (requeues resume the W&B run)."""
    return hashlib.sha1(str(run_dir.resolve()).encode()).hexdigest()[:12]


def _wandb_run(run_dir: Path, project: str, config: dict[str, Any] | None, kind: str) -> Any:
    try:
        import wandb  # optional: wandb
    except ImportError:
        log.warning(WANDB_MISSING)
        return None
    run_dir.mkdir(parents=True, exist_ok=True)
    run = wandb.init(project=project, dir=str(run_dir), config=config or {}, job_type=kind,
                     name=run_dir.name, mode=os.environ.get("WANDB_MODE", "offline"),
                     resume="allow", id=f"{kind}-{_stable_id(run_dir)}")
    return run

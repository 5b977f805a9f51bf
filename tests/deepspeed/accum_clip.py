"""One DeepSpeed optimizer step over 4 accumulated micro-batches, with and without
`optim.grad_clip`, in one process: prints the reported grad norm and each run's bias update.

Run as `python -m tests.deepspeed.accum_clip RUN_DIR` (a subprocess keeps DeepSpeed's process
group out of the test process). LARS takes plain SGD steps on biases (lr x gradient, no trust
ratio), so a clipped step moves a bias by exactly clip / norm of the unclipped one.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch

from satfuse.config import PretrainConfig, load_config
from satfuse.engines.deepspeed_engine import DeepSpeedEngine
from satfuse.models import build_pretrain_model
from tests.models.test_methods import batch

CLIP = 1e-3


def micro_batches() -> list[dict[str, torch.Tensor]]:
    return [{k: v + 0.1 * i for k, v in batch(n=6).items()} for i in range(4)]


def reference_norm() -> float:
    """Global norm of the accumulated (mean over 4 micro-batches) gradient, in plain torch."""
    cfg = load_config(PretrainConfig, "hpc/pretrain/tiny_deepspeed.yaml", [])
    torch.manual_seed(0)
    module = build_pretrain_model(cfg.model)
    for data in micro_batches():
        loss, _ = module.loss(module(data), cfg.loss)
        (loss / 4).backward()
    return float(torch.nn.utils.clip_grad_norm_(module.parameters(), float("inf")))


def one_step(run_dir: Path, clip: float) -> tuple[float, dict[str, torch.Tensor]]:
    cfg = load_config(PretrainConfig, "hpc/pretrain/tiny_deepspeed.yaml", [
        "deepspeed.config=hpc/deepspeed/zero2_accum4.yaml", "deepspeed.zero_stage=0",
        "optim.name=lars", "optim.lr=0.1", "optim.weight_decay=0", f"optim.grad_clip={clip}",
        "train.steps=4", "checkpoint.every_steps=4", f"train.run_dir={run_dir}"])
    torch.manual_seed(0)
    module = build_pretrain_model(cfg.model)
    engine = DeepSpeedEngine(module, torch.device("cpu"), cfg.train, cfg.optim, cfg.checkpoint, cfg.deepspeed,
                             micro_batch=cfg.data.batch_size)
    before = {n: p.detach().clone() for n, p in module.named_parameters() if p.ndim == 1}
    norms = []
    for data in micro_batches():
        loss, _ = module.loss(engine.model(data), cfg.loss)
        norms.append(engine.backward_step(loss))
    assert all(n != n for n in norms[:3]), norms  # no optimizer step before the boundary
    moved = {n: (p.detach() - before[n]) for n, p in module.named_parameters() if p.ndim == 1}
    return norms[3], moved


def main() -> None:
    """Prints {"reference_norm", "ratios": {bias: |clipped update| / |unclipped update|}}.
    Biases only: they start at 0 (BatchNorm) or small, so a tiny clipped update is not lost
    to float32 rounding against a weight near 1."""
    out = Path(sys.argv[1])
    ref = reference_norm()
    _, clipped = one_step(out / "clipped", CLIP)
    _, free = one_step(out / "free", 0.0)
    ratios = {n: float(clipped[n].norm() / free[n].norm()) for n in clipped
              if n.endswith(".bias") and free[n].norm() > 0}
    print(json.dumps({"reference_norm": ref, "clip": CLIP, "ratios": ratios}))


if __name__ == "__main__":
    main()

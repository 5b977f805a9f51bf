"""One DeepSpeed optimizer step over 4 accumulated micro-batches, with and without
`optim.grad_clip`, at ZeRO stage 0 and 2, in one process: prints, per stage, the grad norm the
engine reported, the norm of the gradient the optimizer's own `step` was handed (after
DeepSpeed's clipping: at stage 2 its flat fp32 partitions) and, at stage 0, each bias update.

Run as `python -m tests.deepspeed.accum_clip RUN_DIR` (a subprocess keeps DeepSpeed's process
group out of the test process). Stage 0 uses LARS, which takes plain SGD steps on biases
(lr x gradient, no trust ratio), so a clipped step moves a bias by exactly clip / norm of the
unclipped one. Stage 2 refuses LARS (flat partitions), and Adam's update hides the gradient's
scale, so there the gradient handed to the optimizer is what shows the clipping.
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


def one_step(run_dir: Path, clip: float, stage: int) -> tuple[float, float, dict[str, torch.Tensor]]:
    """(reported norm, norm of the gradient the optimizer's step got, each 1-d parameter's update)."""
    cfg = load_config(PretrainConfig, "hpc/pretrain/tiny_deepspeed.yaml", [
        "deepspeed.config=hpc/deepspeed/zero2_accum4.yaml", f"deepspeed.zero_stage={stage}",
        f"optim.name={'lars' if stage == 0 else 'adam'}", "optim.lr=0.1", "optim.weight_decay=0",
        f"optim.grad_clip={clip}", "train.steps=4", "checkpoint.every_steps=4", f"train.run_dir={run_dir}"])
    torch.manual_seed(0)
    module = build_pretrain_model(cfg.model)
    engine = DeepSpeedEngine(module, torch.device("cpu"), cfg.train, cfg.optim, cfg.checkpoint, cfg.deepspeed,
                             micro_batch=cfg.data.batch_size)
    assert engine.zero_stage == stage
    handed: list[float] = []
    opt, real_step = engine.optimizer, engine.optimizer.step  # the client optimizer DeepSpeed steps

    def recording_step(*args: object, **kwargs: object) -> object:
        # float64: a float32 sum of 637k squares is off by ~1e-5 relative here
        grads = [p.grad.double().flatten() for g in opt.param_groups for p in g["params"] if p.grad is not None]
        handed.append(float(torch.linalg.vector_norm(torch.cat(grads))))
        return real_step(*args, **kwargs)

    opt.step = recording_step  # type: ignore[method-assign]
    before = {n: p.detach().clone() for n, p in module.named_parameters() if p.ndim == 1}
    norms = []
    for data in micro_batches():
        loss, _ = module.loss(engine.model(data), cfg.loss)
        norms.append(engine.backward_step(loss))
    assert all(n != n for n in norms[:3]), norms  # no optimizer step before the boundary
    assert len(handed) == 1, handed  # one optimizer step, at the boundary
    moved = {n: (p.detach() - before[n]) for n, p in module.named_parameters() if p.ndim == 1}
    return norms[3], handed[0], moved


def main() -> None:
    """Prints {"reference_norm", "clip", "stages": {stage: {"reported", "handed" (per run:
    clipped, free), "ratios" (stage 0): {bias: |clipped update| / |unclipped update|}}}}.
    Biases only: they start at 0 (BatchNorm) or small, so a tiny clipped update is not lost
    to float32 rounding against a weight near 1."""
    out = Path(sys.argv[1])
    doc: dict = {"reference_norm": reference_norm(), "clip": CLIP, "stages": {}}
    for stage in (0, 2):
        c_norm, c_handed, clipped = one_step(out / f"clipped{stage}", CLIP, stage)
        f_norm, f_handed, free = one_step(out / f"free{stage}", 0.0, stage)
        doc["stages"][stage] = {
            "reported": {"clipped": c_norm, "free": f_norm}, "handed": {"clipped": c_handed, "free": f_handed},
            "ratios": {n: float(clipped[n].norm() / free[n].norm()) for n in clipped
                       if n.endswith(".bias") and free[n].norm() > 0} if stage == 0 else {}}
    print(json.dumps(doc))


if __name__ == "__main__":
    main()

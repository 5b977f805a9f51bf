"""The pretraining loop, shared by every engine: wiring and the loop. Read top to bottom:

1. build loader, model and engine (the one `train.engine` names), each from its own sections
   of one `PretrainConfig` (the trainer is the one place that splits it);
2. resume from the newest complete checkpoint (`checkpoint.resume=auto`), restoring model,
   optimizer, schedule, loader position and RNG state, so the continuation is bitwise equal
   to an uninterrupted run on the same world size;
3. step: forward under autocast -> global contrastive loss -> engine backward/step, queued
   without a host synchronisation (loss, metrics and grad norm stay on the device) -> on log
   steps and before every save: the NaN check agreed by all ranks, then the numbers are read
   and logged. The in-batch retrieval metric (three collectives) is computed on log steps
   only. Per step there is ONE flag reduction (stop signal, plus the non-finite flag under
   `train.nan_policy=skip`, which drops that step's update on every rank);
4. checkpoint every N steps, at the end, and when any rank got a stop signal (SLURM
   preemption/time limit): then every rank saves and the run returns `REQUEUE_EXIT_CODE`
   (`STOP_EXIT_CODE` after SIGTERM, i.e. scancel: saved, not to be requeued);
5. at the end (and every `train.eval_every` steps), cross-modal retrieval on held-out shards.

Each policy lives with its owner: set-up (device, engine, compile) in `engines/setup.py`, the
run-dir lease in `engines/rundir.py`, `train.nan_policy` in `engines/nan_policy.py`,
`data.max_skipped_fraction` in `engines/skipped_samples.py`, held-out retrieval in
`engines/heldout.py`, resuming in `engines/resume.py`, what the run writes beside checkpoints in `engines/run_records.py`.
"""

from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from tqdm import tqdm

import satfuse
from satfuse.config import PretrainConfig, to_dict
from satfuse.data.format.bands import channels
from satfuse.data.reading.pretrain_loader import PretrainLoader
from satfuse.data.reading.shard_sets import resolve_shards
from satfuse.distributed.collectives import (
    agree_max,
    broadcast_object,
    control_group,
)
from satfuse.distributed.env import DistEnv
from satfuse.distributed.gather import equal_rows
from satfuse.engines.base import check_precision
from satfuse.engines.heldout import HeldOutRetrieval
from satfuse.engines.metrics_sinks import MetricSinks
from satfuse.engines.nan_policy import NanGuard
from satfuse.engines.resume import resume_run
from satfuse.engines.rng import capture_rng
from satfuse.engines.run_records import MetricsLog, write_config
from satfuse.engines.rundir import RunLease, claim_run_dir
from satfuse.engines.setup import (
    build_engine,
    compiled_forward,
    configure_backends,
    select_device,
    to_device,
)
from satfuse.engines.signals import StopFlag
from satfuse.engines.skipped_samples import SkippedSamples
from satfuse.exit_codes import REQUEUE_EXIT_CODE, STOP_EXIT_CODE
from satfuse.models import build_pretrain_model
from satfuse.run_layout import RunLayout
from satfuse.utils import SatfuseError

log = logging.getLogger(__name__)

__all__ = ["REQUEUE_EXIT_CODE", "Trainer", "TrainResult"]


@dataclass
class TrainResult:
    status: str  # "completed" | "preempted" (requeue me) | "stopped" (SIGTERM: do not requeue) | "already_complete" (resumed at train.steps: nothing to do)
    step: int
    final_loss: float
    retrieval_top1: float | None = None
    retrieval_chance: float | None = None
    skipped_samples: int = 0  # undecodable/truncated/altered samples skipped, all ranks
    skipped_steps: int = 0  # train.nan_policy=skip: steps whose update was dropped (non-finite)


class Trainer:
    def __init__(self, cfg: PretrainConfig, env: DistEnv) -> None:
        self.cfg = cfg
        self.env = env
        self.device = select_device(cfg.train.device, env.local_rank)
        check_precision(cfg.train.precision, self.device)
        if cfg.model.sync_bn and self.device.type != "cuda":  # refused at start, like fp16
            raise SatfuseError("model.sync_bn=true needs CUDA (torch's SyncBatchNorm does not run on "
                               "CPU/gloo); set model.sync_bn=false for CPU runs")
        configure_backends(cfg.data.crop, self.device)
        self.run_dir = Path(cfg.train.run_dir)
        torch.manual_seed(cfg.train.seed)  # identical initial weights on every rank
        self.shards = resolve_shards(cfg.data.shards, cfg.data.manifest, cfg.data.shard_weights)
        self.loader = PretrainLoader(
            self.shards, cfg.data, rank=env.rank, world_size=env.world_size, seed=cfg.train.seed,
            method=cfg.model.method, simclr_input=cfg.model.simclr_input,
            pin_memory=self.device.type == "cuda",
        )
        self.heldout = (HeldOutRetrieval(self.shards, cfg.data, self.loader.bands, env.rank, env.world_size)
                        if cfg.data.val_shards else None)
        self.module = build_pretrain_model(cfg.model, channels(self.loader.bands), img_size=cfg.data.crop or None)
        if cfg.train.channels_last:
            self.module.to(memory_format=torch.channels_last)
        self.engine = build_engine(self.module, self.device, cfg.train, cfg.optim, cfg.checkpoint,
                                   cfg.deepspeed, micro_batch=cfg.data.batch_size)
        self.forward = compiled_forward(cfg.train, self.engine.model)
        # pairs per optimizer step: every trainer step is one, over `accumulation` micro-batches
        self.global_batch = cfg.data.batch_size * env.world_size * self.engine.accumulation
        self.skipped = SkippedSamples(self.loader, cfg.data, self.global_batch)
        self.nan = NanGuard(cfg.train, cfg.optim.lr, RunLayout(self.run_dir).checkpoints, self.device)
        self.step = 0
        self.epoch = 0
        self.lease: RunLease | None = None
        self.stop = StopFlag()
        self._stop_level: int | None = None  # the stop level agreed inside this step (skip policy)

    # ---------------------------------------------------------------- checkpoints
    def meta(self) -> dict[str, Any]:
        return {
            "epoch": self.epoch,
            "config": to_dict(self.cfg),
            "normalization": self.loader.normalization,
            "engine": self.engine.kind,
            "satfuse_version": satfuse.__version__,
        }

    def rank_state(self) -> dict[str, Any]:
        return {
            "step": self.step,
            "loader": self.loader.state_dict(),
            "rng": capture_rng(),
            "engine": self.engine.engine_state(),
        }

    def save(self, last_step: bool = False) -> Path | None:
        """Save the current step when the engine's cadence says so (every
        checkpoint.every_steps, and the last step unless just saved); None when not due."""
        if not self.engine.checkpoint_due(self.step, last_step=last_step):
            return None
        if self.lease is not None:
            self.lease.check()  # a run that lost its lease must not commit a checkpoint
        self.nan.check(self.step)  # never keep the weights of a non-finite step
        path = self.engine.save(self.step, self.rank_state(), self.meta())
        log.info("checkpoint step %d -> %s", self.step, path)
        return path

    def resume(self) -> None:
        """Continue from the checkpoint `checkpoint.resume` names, if any (`engines/resume.py`)."""
        step = resume_run(self.engine, self.loader, self.env, self.cfg.checkpoint, self.cfg.optim,
                          to_dict(self.cfg), self.run_dir, self.shards.spec)
        if step is not None:
            self.step, self.epoch = step, self.loader.epoch

    # ---------------------------------------------------------------- training
    def train_step(self, batch: dict[str, Any], metrics: bool = True) -> dict[str, Any]:
        """One step, queued without reading anything on the host: the returned loss, metrics
        and grad norm are 0-d device tensors (`read_metrics` on log steps). Every rank has the
        same batch size (the loader's plan), so the loss's gathers skip the size exchange.
        `metrics=False` (steps that are not logged) skips the retrieval metric's collectives.
        Under `train.nan_policy=skip` the step agrees with every rank on one small reduction
        (stop level, non-finite flag) before the update: one host read per step, that policy only."""
        self.engine.model.train()
        batch = to_device(batch, self.device, self.cfg.train.channels_last)
        with equal_rows():
            with self.engine.autocast():
                outputs = self.forward(batch)
            loss, values = self.module.loss(outputs, self.cfg.loss, metrics=metrics)
        skip = (lambda norm: self._agree_skip(loss, norm)) if self.cfg.train.nan_policy == "skip" else None
        grad_norm = self.engine.backward_step(loss, skip=skip)
        return {"loss": loss.detach(), "grad_norm": grad_norm, **values}

    def _agree_skip(self, loss: torch.Tensor, grad_norm: torch.Tensor) -> bool:
        """nan_policy=skip: the step's one reduction, [stop level, non-finite] MAX over ranks
        (gloo on NCCL jobs), before the update. True = every rank drops this update."""
        bad = self.nan.non_finite(loss, grad_norm)
        self._stop_level, any_bad = agree_max([self.stop.level, int(bad)], control_group())
        return self.nan.decide_skip(self.step + 1, bool(any_bad), bad)

    def fit(self) -> TrainResult:
        self.lease = claim_run_dir(
            self.run_dir, self.env.rank == 0, self.cfg.train.lease_timeout_s,
            self.cfg.checkpoint.resume_spec.kind == "none",
            self.cfg.checkpoint.force_new_run, broadcast_object)
        try:
            return self._fit()
        finally:
            if self.lease is not None:
                self.lease.release()

    def _fit(self) -> TrainResult:
        cfg = self.cfg
        self.resume()
        if self.env.rank == 0:  # after resume: a refused change must not be recorded as run
            write_config(cfg, RunLayout(self.run_dir).config)
        already = self.step >= cfg.train.steps > 0
        if already:  # still re-saved below: on another world size that converts the layout
            log.info("already complete: %s holds step %d of train.steps=%d; nothing to train (raise "
                     "train.steps to continue, or start a new train.run_dir)",
                     RunLayout(self.run_dir).checkpoints, self.step, cfg.train.steps)
        stop = self.stop
        stop.install()
        metrics_log = MetricsLog(RunLayout(self.run_dir).metrics, self.env.rank == 0)
        sinks = MetricSinks(cfg.log, self.run_dir, self.env.rank == 0, self.step, to_dict(cfg))
        total = cfg.train.steps
        bar = tqdm(total=total, initial=self.step, desc="pretrain", disable=self.env.rank != 0,
                   dynamic_ncols=True)
        data_iter = iter(self.loader)
        last: dict[str, float] = {"loss": math.nan}
        pending: dict[str, Any] | None = None  # the latest step's numbers, still on the device
        t0, seen = time.perf_counter(), 0
        status = "completed"
        try:
            while self.step < total:
                if self.lease is not None:
                    self.lease.check()
                t_wait = time.perf_counter()
                batches = [next(data_iter) for _ in range(self.engine.accumulation)]
                t_step = time.perf_counter()
                log_step = (self.step + 1) % cfg.train.log_every == 0 or self.step + 1 == total
                # the lr this step's update uses: read before the scheduler moves it on (after the
                # step, engine.lr() is already the next step's; a resume's lr would go unseen)
                step_lr = self.engine.lr()
                for i, batch in enumerate(batches):  # micro-batches of one optimizer step
                    new_epoch = int(batch.get("epoch", self.epoch))
                    if new_epoch != self.epoch:
                        skipped = self.skipped.count()
                        log.info("epoch %d done at step %d: %d samples skipped so far", self.epoch, self.step, skipped)
                        metrics_log.write({"step": self.step, "epoch_done": self.epoch, "skipped_samples": skipped})
                        self.skipped.check(skipped, self.step)
                    self.epoch = new_epoch
                    self.nan.remember(self.step + 1, batch)
                    pending = self.train_step(batch, metrics=log_step and i == len(batches) - 1)
                    self.nan.observe(self.step + 1, pending["loss"])
                self.step += 1
                seen += self.global_batch
                bar.update(1)
                if log_step:
                    self.nan.check(self.step)
                    last = read_metrics(pending)  # the host reads the step's numbers only here
                    last["data_wait_s"] = t_step - t_wait
                    sinks.scalars(self.step, step_scalars(last, step_lr, self.global_batch,
                                                          time.perf_counter() - t_wait))
                    rate = seen / max(time.perf_counter() - t0, 1e-9)
                    skipped = self.skipped.count()
                    record = {"step": self.step, "epoch": self.epoch, "lr": step_lr,
                              "pairs_per_s": rate, "skipped_samples": skipped, **last}
                    if cfg.train.nan_policy == "skip":
                        record["skipped_steps"] = self.nan.skipped_steps
                    metrics_log.write(record)
                    log.info("step %d/%d loss %.4f top1 %.3f lr %.2e %.1f pairs/s", self.step, total,
                             last["loss"], last.get("retrieval_top1", float("nan")), record["lr"], rate)
                    bar.set_postfix(loss=f"{last['loss']:.3f}", top1=f"{last.get('retrieval_top1', 0):.2f}")
                    t0, seen = time.perf_counter(), 0
                    self.skipped.check(skipped, self.step)
                if cfg.train.eval_every and self.step % cfg.train.eval_every == 0 and self.step < total:
                    self.log_retrieval(metrics_log, sinks)
                # the step's one flag reduction: already done inside the step under nan_policy=skip
                level, self._stop_level = self._stop_level, None
                if (stop.agreed(level) if level is not None
                        else stop.should_stop(control_group())):  # gloo on NCCL jobs: no GPU sync
                    status = "stopped" if stop.terminate else "preempted"
                    break
                self.save()  # the engine decides whether this step is due
            self.save(last_step=True)
            self.engine.wait()
            if status == "preempted" and stop.exit_code == STOP_EXIT_CODE:  # scancel during the save wins
                log.warning("SIGTERM arrived while saving for the requeue signal: stopping for good instead")
                status = "stopped"
        finally:
            bar.close()
            sinks.flush()
        if pending is not None:
            last = read_metrics(pending)
        if already and status == "completed":
            status = "already_complete"
        result = TrainResult(status=status, step=self.step, final_loss=last["loss"],
                             skipped_samples=self.skipped.count(), skipped_steps=self.nan.skipped_steps)
        if status == "completed" and self.heldout is not None:
            result.retrieval_top1, result.retrieval_chance = self.log_retrieval(metrics_log, sinks)
        metrics_log.close()
        sinks.close()
        if status == "preempted":
            log.warning("stop signal received: saved step %d; exiting with %d (requeue me)",
                        self.step, REQUEUE_EXIT_CODE)
        elif status == "stopped":
            log.warning("SIGTERM received (scancel, SLURM ending or requeueing the job, or a kill): saved step %d; "
                        "exiting with %d (stopped: satfuse does not requeue it)", self.step, STOP_EXIT_CODE)
        return result

    def log_retrieval(self, metrics_log: MetricsLog, sinks: MetricSinks) -> tuple[float | None, float | None]:
        """Held-out retrieval now (every `train.eval_every` steps and at the end), logged."""
        top1, chance = self.heldout.evaluate(self.module, self.cfg.model.method, self.device, self.engine.autocast)
        metrics_log.write({"step": self.step, "heldout_retrieval_top1": top1, "heldout_retrieval_chance": chance})
        sinks.scalars(self.step, {"heldout/retrieval_top1": top1, "heldout/retrieval_chance": chance})
        return top1, chance


def step_scalars(last: dict[str, float], lr: float, global_batch: int, step_s: float) -> dict[str, float]:
    """The per-step curves of TensorBoard/W&B: loss, lr (the one the step's update used, as in
    metrics.jsonl), pairs/s (global batch over the step's wall time, data wait included),
    in-batch retrieval top-1, grad norm, data wait."""
    out = {"train/loss": last.get("loss"), "train/lr": lr,
           "train/pairs_per_s": global_batch / max(step_s, 1e-9),
           "train/retrieval_top1": last.get("retrieval_top1"), "train/grad_norm": last.get("grad_norm"),
           "train/data_wait_s": last.get("data_wait_s")}
    return {k: v for k, v in out.items() if v is not None}


def read_metrics(values: dict[str, Any]) -> dict[str, float]:
    """The step's device tensors as floats: a host synchronisation, on log steps only."""
    return {k: float(v) for k, v in values.items()}

"""The pretraining loop, shared by every engine. Read top to bottom:

1. build loader, model and engine (DDP or DeepSpeed), each from its own sections of one
   `PretrainConfig` (the trainer is the one place that splits it);
2. resume from the newest complete checkpoint (`checkpoint.resume=auto`), restoring model,
   optimizer, schedule, loader position and RNG state, so the continuation is bitwise equal
   to an uninterrupted run on the same world size;
3. step: forward under autocast -> global contrastive loss -> engine backward/step, queued
   without a host synchronisation (loss, metrics and grad norm stay on the device; a
   non-finite loss is noted there) -> on log steps and before every save: the NaN check
   agreed by all ranks, then the numbers are read and logged. The in-batch retrieval metric
   (three collectives) is computed on log steps only. Per step there is ONE flag reduction
   (stop signal, plus the non-finite flag under `train.nan_policy=skip`, which drops that
   step's update on every rank);
4. checkpoint every N steps, at the end, and when any rank got a stop signal (SLURM
   preemption/time limit): then every rank saves and the run returns `REQUEUE_EXIT_CODE`
   (`STOP_EXIT_CODE` after SIGTERM, i.e. scancel: saved, not to be requeued);
5. at the end (and every `train.eval_every` steps), cross-modal retrieval accuracy on
   held-out shards.

One job, the loop: its set-up (device, engine, compile) is in `engines/setup.py`, what the run
writes beside checkpoints (metrics.jsonl, config.yaml, overrides.jsonl) in
`engines/run_records.py`.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from tqdm import tqdm

import satfuse
from satfuse.checkpoint.layout import META_NAME
from satfuse.config import PretrainConfig, to_dict
from satfuse.data.bands import channels, check_same_bands, manifest_bands, normalization_bands
from satfuse.data.eval_loader import EvalLoader
from satfuse.data.pretrain_loader import PretrainLoader
from satfuse.data.shard_sets import resolve_shards, same_set_warning
from satfuse.distributed.collectives import (
    agree_max,
    all_reduce_sum,
    any_rank,
    broadcast_object,
    control_group,
)
from satfuse.distributed.env import DistEnv
from satfuse.distributed.gather import equal_rows
from satfuse.engines.base import check_precision
from satfuse.engines.metrics_sinks import MetricSinks
from satfuse.engines.optim import apply_hparams
from satfuse.engines.rng import capture_rng, restore_rng
from satfuse.engines.run_records import (
    MetricsLog,
    config_changes,
    record_overrides,
    refuse_changes,
    write_config,
    write_error,
)
from satfuse.engines.rundir import PRETRAIN_RUN, RunLease, check_run_dir_kind, prepare_fresh_start
from satfuse.engines.setup import (
    build_engine,
    compiled_forward,
    configure_backends,
    select_device,
    to_device,
)
from satfuse.engines.signals import StopFlag
from satfuse.exit_codes import REQUEUE_EXIT_CODE, STOP_EXIT_CODE
from satfuse.losses import retrieval_accuracy
from satfuse.models import build_pretrain_model
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
        if cfg.data.val_shards:  # held-out pairs go through the same model: refuse other bands now, not at the end
            val_set = resolve_shards(cfg.data.val_shards)
            overlap = same_set_warning(self.shards, val_set, "data.shards", "data.val_shards")
            if overlap and env.rank == 0:
                log.warning("%s", overlap)
            val = manifest_bands(val_set.manifest, cfg.data.val_shards)
            if val != self.loader.bands:
                raise SatfuseError(
                    f"band mismatch: data.val_shards={cfg.data.val_shards} holds {val}, data.shards={cfg.data.shards} "
                    f"holds {self.loader.bands}; evaluate on shards with the training bands"
                )
        self.module = build_pretrain_model(cfg.model, channels(self.loader.bands))
        if cfg.train.channels_last:
            self.module.to(memory_format=torch.channels_last)
        self.engine = build_engine(self.module, self.device, cfg.train, cfg.optim, cfg.checkpoint,
                                   cfg.deepspeed, micro_batch=cfg.data.batch_size)
        self.forward = compiled_forward(cfg.train, self.engine.model)
        self.step = 0
        self.epoch = 0
        self.lease: RunLease | None = None
        # first step whose loss was not finite (0: none), kept on the device: no per-step sync
        self._first_bad = torch.zeros((), dtype=torch.long, device=self.device)
        self._recent_keys: dict[int, list] = {}  # batch keys since the last check, for the message
        self.stop = StopFlag()
        self.skipped_steps = 0  # nan_policy=skip: updates dropped so far (this attempt)
        self._skips_in_row = 0
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
        """Save the current step when the checkpointer's cadence says so (`due`: every
        checkpoint.every_steps, and the last step unless just saved); None when not due."""
        if not self.engine.checkpoint_due(self.step, last_step=last_step):
            return None
        if self.lease is not None:
            self.lease.check()  # a run that lost its lease must not commit a checkpoint
        self.check_finite()  # never keep the weights of a non-finite step
        path = self.engine.save(self.step, self.rank_state(), self.meta())
        log.info("checkpoint step %d -> %s", self.step, path)
        return path

    def resume(self) -> None:
        path = self.engine.find_resume(self.cfg.checkpoint.resume_spec)
        if path is None:
            if self.env.rank == 0 and self.cfg.checkpoint.resume_spec.kind == "auto":
                # an earlier run that died before its first checkpoint: its metrics would mix
                # with this run's (steps 1.. twice), so its files go to previous-<time>/
                prepare_fresh_start(self.run_dir, force=True)
            return
        self._check_checkpoint_bands(path)  # before loading: a band mismatch is a shape error there
        rank_states, meta = self.engine.load(path)
        path = self.engine.resumed_from or path  # an older one if `path` proved damaged while loading
        same_world = len(rank_states) == self.env.world_size
        mine = rank_states[self.env.rank] if same_world else rank_states[0]
        changed = config_changes(meta.get("config") or {}, to_dict(self.cfg))
        refuse_changes(changed, path)
        self.step = int(mine["step"])
        self.engine.load_engine_state(mine["engine"])
        if any(k.startswith("optim.") for k in changed):  # the restored optimizer had the old values
            apply_hparams(self.engine.optimizer, self.engine.scheduler, self.cfg.optim)
        if self.env.rank == 0:
            record_overrides(self.run_dir, self.step, path, changed)
        self.loader.load_state_dict([s["loader"] for s in rank_states])
        self.epoch = self.loader.epoch
        if same_world:
            restore_rng(mine["rng"])
        log.info(
            "resumed from %s at step %d (saved by %d ranks, now %d)",
            path, self.step, len(rank_states), self.env.world_size,
        )

    def _check_checkpoint_bands(self, path: Path) -> None:
        """Refuse to resume a checkpoint trained on other bands than the shard set holds."""
        meta_path = Path(path) / META_NAME
        try:
            meta = json.loads(meta_path.read_text())
        except (OSError, ValueError):
            return  # the engine's load reports an unreadable checkpoint
        trained = normalization_bands(meta.get("normalization") if isinstance(meta, dict) else None)
        if trained is not None:
            check_same_bands(trained, self.loader.bands, str(path), self.shards.spec)

    # ---------------------------------------------------------------- skipped samples
    def skipped(self) -> int:
        """Samples skipped so far on all ranks (collective when distributed)."""
        return int(all_reduce_sum(torch.tensor([int(self.loader.decode_errors)], dtype=torch.long)))

    def check_skipped(self, skipped: int) -> None:
        """Fail (on every rank alike) once more than data.max_skipped_fraction of the samples
        read were skipped: a truncated shard must not quietly shrink the data set."""
        read = skipped + self.step * self.cfg.data.batch_size * self.env.world_size * self.engine.accumulation
        limit = self.cfg.data.max_skipped_fraction
        if skipped and skipped > limit * max(read, 1):
            raise SatfuseError(
                f"{self.cfg.data.shards}: {skipped} of {read} samples read were skipped as undecodable "
                f"(truncated, damaged or altered shards; the warnings above name them), more than "
                f"data.max_skipped_fraction={limit}: check the shards with `satfuse shard verify`, "
                "or raise data.max_skipped_fraction to accept the loss"
            )

    # ---------------------------------------------------------------- training
    def train_step(self, batch: dict[str, Any], metrics: bool = True) -> dict[str, Any]:
        """One step, queued without reading anything on the host: the returned loss, metrics
        and grad norm are 0-d device tensors (`read_metrics` on log steps). Every rank has the
        same batch size (the loader's plan), so the loss's gathers skip the size exchange.
        `metrics=False` (steps that are not logged) skips the retrieval metric's collectives.
        Under `train.nan_policy=skip` the step agrees with every rank on one small reduction
        (stop level, non-finite flag) before the update: one host read per step, that policy only."""
        self.engine.model.train()
        self._recent_keys[self.step + 1] = list(batch.get("key", [])[:4])
        if len(self._recent_keys) > 10_000:  # a huge log_every: keep the message's memory bounded
            self._recent_keys.pop(next(iter(self._recent_keys)))
        batch = to_device(batch, self.device, self.cfg.train.channels_last)
        with equal_rows():
            with self.engine.autocast():
                outputs = self.forward(batch)
            loss, values = self.module.loss(outputs, self.cfg.loss, metrics=metrics)
        bad = ~torch.isfinite(loss.detach())
        if self.cfg.train.nan_policy == "skip":
            grad_norm = self.engine.backward_step(loss, skip=lambda norm: self._agree_skip(bad, norm))
        else:
            self._first_bad = torch.where((self._first_bad == 0) & bad, self.step + 1, self._first_bad)
            grad_norm = self.engine.backward_step(loss)
        return {"loss": loss.detach(), "grad_norm": grad_norm, **values}

    def _agree_skip(self, bad_loss: torch.Tensor, grad_norm: torch.Tensor) -> bool:
        """nan_policy=skip: the step's one reduction, [stop level, non-finite] MAX over ranks
        (gloo on NCCL jobs), before the update. True = every rank drops this update."""
        bad = bool(bad_loss | ~torch.isfinite(grad_norm))  # the policy's one host read per step
        self._stop_level, any_bad = agree_max([self.stop.level, int(bad)], control_group())
        step = self.step + 1
        if not any_bad:
            self._skips_in_row = 0
            return False
        self.skipped_steps += 1
        self._skips_in_row += 1
        limit = self.cfg.train.nan_skip_limit
        keys = self._recent_keys.get(step, [])
        if self._skips_in_row >= limit:
            raise SatfuseError(
                f"non-finite loss or gradients at {self._skips_in_row} steps in a row (last: step {step}, "
                f"batch keys {keys}...), train.nan_skip_limit={limit}: the run diverged; try a lower "
                f"optim.lr (now {self.cfg.optim.lr}), optim.grad_clip=1.0, train.precision=fp32, or resume "
                f"from the last checkpoint in {self.run_dir / 'checkpoints'}")
        log.warning("train.nan_policy=skip: non-finite loss or gradients at step %d (%s on this rank, batch "
                    "keys %s...): update dropped on every rank (%d skipped so far, %d in a row)", step,
                    "seen" if bad else "not seen", keys, self.skipped_steps, self._skips_in_row)
        return True

    def check_finite(self) -> None:
        """Stop if any rank saw a non-finite loss. Collective: every rank calls it at the same
        steps (log steps, saves); the one host read of the NaN bookkeeping."""
        first = int(self._first_bad)
        if any_rank(first > 0):
            self.on_nan(first)
        self._recent_keys.clear()

    def on_nan(self, step: int) -> None:
        where = (f"at step {step} (batch keys {self._recent_keys.get(step, [])}...)" if step
                 else f"on another rank before step {self.step}")
        raise SatfuseError(
            f"non-finite loss {where}: try a lower "
            f"optim.lr (now {self.cfg.optim.lr}), optim.grad_clip=1.0, train.precision=fp32, or "
            f"resume from the last checkpoint in {self.run_dir / 'checkpoints'}"
        )

    def claim_run_dir(self) -> None:
        """Rank 0 takes the run_dir's lease and, for resume=none, makes sure no earlier run
        is overwritten; every rank gets the outcome (one error, raised everywhere)."""
        error = None
        if self.env.rank == 0:
            try:
                check_run_dir_kind(self.run_dir, PRETRAIN_RUN, "use another train.run_dir (a new or empty directory)")
                self.lease = RunLease(self.run_dir, timeout_s=self.cfg.train.lease_timeout_s)
                self.lease.acquire()
                if self.cfg.checkpoint.resume_spec.kind == "none":
                    prepare_fresh_start(self.run_dir, self.cfg.checkpoint.force_new_run)
            except (SatfuseError, OSError) as exc:
                error = str(exc) if isinstance(exc, SatfuseError) else str(
                    write_error(exc, self.run_dir, 4096, "claiming the run_dir (its lease file)"))
                if self.lease is not None:
                    self.lease.release()  # deletes the lease only if it is ours
                self.lease = None
        error = broadcast_object(error)
        if error:
            raise SatfuseError(error)
        if self.lease is not None:
            self.lease.start_heartbeat()

    def fit(self) -> TrainResult:
        self.claim_run_dir()
        try:
            return self._fit()
        finally:
            if self.lease is not None:
                self.lease.release()

    def _fit(self) -> TrainResult:
        cfg = self.cfg
        self.resume()
        if self.env.rank == 0:  # after resume: a refused change must not be recorded as run
            write_config(cfg, self.run_dir / "config.yaml")
        already = self.step >= cfg.train.steps > 0
        if already:  # still re-saved below: on another world size that converts the layout
            log.info("already complete: %s holds step %d of train.steps=%d; nothing to train (raise "
                     "train.steps to continue, or start a new train.run_dir)",
                     self.run_dir / "checkpoints", self.step, cfg.train.steps)
        stop = self.stop
        stop.install()
        metrics_log = MetricsLog(self.run_dir / "metrics.jsonl", self.env.rank == 0)
        sinks = MetricSinks(cfg.log, self.run_dir, self.env.rank == 0, self.step, to_dict(cfg))
        total = cfg.train.steps
        bar = tqdm(total=total, initial=self.step, desc="pretrain", disable=self.env.rank != 0,
                   dynamic_ncols=True)
        data_iter = iter(self.loader)
        last: dict[str, float] = {"loss": math.nan}
        pending: dict[str, Any] | None = None  # the latest step's numbers, still on the device
        t0, seen = time.perf_counter(), 0
        # pairs per optimizer step: every trainer step is one, over `accumulation` micro-batches
        global_batch = cfg.data.batch_size * self.env.world_size * self.engine.accumulation
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
                        skipped = self.skipped()
                        log.info("epoch %d done at step %d: %d samples skipped so far", self.epoch, self.step, skipped)
                        metrics_log.write({"step": self.step, "epoch_done": self.epoch, "skipped_samples": skipped})
                        self.check_skipped(skipped)
                    self.epoch = new_epoch
                    pending = self.train_step(batch, metrics=log_step and i == len(batches) - 1)
                self.step += 1
                seen += global_batch
                bar.update(1)
                if self.step % cfg.train.log_every == 0 or self.step == total:
                    self.check_finite()
                    last = read_metrics(pending)  # the host reads the step's numbers only here
                    last["data_wait_s"] = t_step - t_wait
                    sinks.scalars(self.step, step_scalars(last, step_lr, global_batch,
                                                          time.perf_counter() - t_wait))
                    rate = seen / max(time.perf_counter() - t0, 1e-9)
                    skipped = self.skipped()
                    record = {"step": self.step, "epoch": self.epoch, "lr": step_lr,
                              "pairs_per_s": rate, "skipped_samples": skipped, **last}
                    if cfg.train.nan_policy == "skip":
                        record["skipped_steps"] = self.skipped_steps
                    metrics_log.write(record)
                    log.info("step %d/%d loss %.4f top1 %.3f lr %.2e %.1f pairs/s", self.step, total,
                             last["loss"], last.get("retrieval_top1", float("nan")), record["lr"], rate)
                    bar.set_postfix(loss=f"{last['loss']:.3f}", top1=f"{last.get('retrieval_top1', 0):.2f}")
                    t0, seen = time.perf_counter(), 0
                    self.check_skipped(skipped)
                if cfg.train.eval_every and self.step % cfg.train.eval_every == 0 and self.step < total:
                    self.log_retrieval(metrics_log, sinks)
                # the step's one flag reduction: already done inside the step under nan_policy=skip
                level, self._stop_level = self._stop_level, None
                if (stop.agreed(level) if level is not None
                        else stop.should_stop(control_group())):  # gloo on NCCL jobs: no GPU sync
                    status = "stopped" if stop.terminate else "preempted"
                    break
                self.save()  # the checkpointer decides whether this step is due
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
        result = TrainResult(status=status, step=self.step, final_loss=last["loss"], skipped_samples=self.skipped(),
                             skipped_steps=self.skipped_steps)
        if status == "completed" and cfg.data.val_shards:
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

    # ---------------------------------------------------------------- evaluation
    def log_retrieval(self, metrics_log: MetricsLog, sinks: MetricSinks) -> tuple[float | None, float | None]:
        """Held-out retrieval now (every `train.eval_every` steps and at the end), logged."""
        top1, chance = self.evaluate_retrieval()
        metrics_log.write({"step": self.step, "heldout_retrieval_top1": top1, "heldout_retrieval_chance": chance})
        sinks.scalars(self.step, {"heldout/retrieval_top1": top1, "heldout/retrieval_chance": chance})
        return top1, chance

    @torch.no_grad()
    def evaluate_retrieval(self) -> tuple[float | None, float | None]:
        """S1 -> S2 top-1 retrieval over the whole held-out set (chance = 1 / N)."""
        cfg = self.cfg
        if cfg.model.method == "simclr":
            log.info("held-out retrieval is S1 -> S2: not defined for single-modality SimCLR")
            return None, None
        # held-out pairs are normalised with the *training* statistics, as the model saw them
        shards = dataclasses.replace(resolve_shards(cfg.data.val_shards), stats=self.shards.stats)
        loader = EvalLoader(shards, cfg.data, rank=self.env.rank, world_size=self.env.world_size,
                            batch_size=cfg.data.batch_size, crop=cfg.data.crop)
        self.module.eval()
        za, zb = [], []
        for batch in loader:
            mask = batch["mask"].bool()
            batch = to_device(batch, self.device)
            with self.engine.autocast():
                a, b = pair_embeddings(self.module(batch))
            za.append(a.float().cpu()[mask])
            zb.append(b.float().cpu()[mask])
        a, b = torch.cat(za), torch.cat(zb)
        n = all_reduce_sum(torch.tensor([a.shape[0]], dtype=torch.long))
        top1 = retrieval_accuracy(a, b)
        chance = 1.0 / max(1, int(n))
        log.info("held-out S1->S2 retrieval top-1: %.3f (chance %.4f, n=%d)", top1, chance, int(n))
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


def pair_embeddings(outputs: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """The (S1, S2) embeddings of a model's outputs: projections, or pooled MMA feature maps."""
    if "z_s1" in outputs:
        return outputs["z_s1"], outputs["z_s2"]
    return outputs["f_s1"].mean(dim=(2, 3)), outputs["f_s2"].mean(dim=(2, 3))

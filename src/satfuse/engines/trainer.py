"""The pretraining loop, shared by every engine. Read top to bottom:

1. build loader, model and engine (DDP or DeepSpeed) from one `PretrainConfig`;
2. resume from the newest complete checkpoint (`checkpoint.resume=auto`), restoring model,
   optimizer, schedule, loader position and RNG state, so the continuation is bitwise equal
   to an uninterrupted run on the same world size;
3. step: forward under autocast -> global contrastive loss -> engine backward/step, queued
   without a host synchronisation (loss, metrics and grad norm stay on the device; a
   non-finite loss is noted there) -> on log steps and before every save: the NaN check
   agreed by all ranks, then the numbers are read and logged;
4. checkpoint every N steps, at the end, and when any rank got a stop signal (SLURM
   preemption/time limit): then every rank saves and the run returns `REQUEUE_EXIT_CODE`;
5. at the end, cross-modal retrieval accuracy on held-out shards.
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
import torch.distributed as dist
from tqdm import tqdm

import satfuse
from satfuse.checkpoint.rng import capture_rng, restore_rng
from satfuse.checkpoint.signals import REQUEUE_EXIT_CODE, StopFlag
from satfuse.config import PretrainConfig, dump_yaml, to_dict
from satfuse.data.reader import EvalLoader, PretrainLoader, resolve_shards
from satfuse.distributed.env import DistEnv, all_reduce_max_bool, control_group, cuda_index
from satfuse.distributed.gather import equal_rows
from satfuse.engines.base import Engine, check_precision
from satfuse.losses import retrieval_accuracy
from satfuse.models import build_pretrain_model
from satfuse.utils import SatfuseError

log = logging.getLogger(__name__)

__all__ = ["REQUEUE_EXIT_CODE", "Trainer", "TrainResult"]


@dataclass
class TrainResult:
    status: str  # "completed" | "preempted"
    step: int
    final_loss: float
    retrieval_top1: float | None = None
    retrieval_chance: float | None = None


def select_device(cfg: PretrainConfig, env: DistEnv) -> torch.device:
    want = cfg.train.device
    if want == "cuda" or (want == "auto" and torch.cuda.is_available()):
        if not torch.cuda.is_available():
            raise SatfuseError("train.device=cuda but no CUDA device is visible; use train.device=cpu")
        return torch.device("cuda", cuda_index(env.local_rank, torch.cuda.device_count()))
    return torch.device("cpu")


def build_engine(cfg: PretrainConfig, model: torch.nn.Module, device: torch.device) -> Engine:
    if cfg.train.engine == "deepspeed":
        from satfuse.engines.deepspeed_engine import DeepSpeedEngine

        return DeepSpeedEngine(cfg, model, device)
    from satfuse.engines.ddp import DDPEngine

    return DDPEngine(cfg, model, device)


def to_device(batch: dict[str, Any], device: torch.device, channels_last: bool = False) -> dict[str, Any]:
    """Tensors to `device` with non_blocking copies (they overlap with compute when the loader
    pinned the batch); 4-D image tensors in channels_last when the model is."""
    def move(v: torch.Tensor) -> torch.Tensor:
        if channels_last and v.dim() == 4:
            return v.to(device, non_blocking=True, memory_format=torch.channels_last)
        return v.to(device, non_blocking=True)

    return {k: (move(v) if torch.is_tensor(v) else v) for k, v in batch.items()}


def configure_backends(cfg: PretrainConfig, device: torch.device) -> None:
    """cuDNN autotuning for fixed input shapes: with a fixed crop (data.crop > 0) every batch
    has the same shape, so benchmarking the convolution algorithms once pays back at once."""
    if device.type == "cuda" and cfg.data.crop > 0:
        torch.backends.cudnn.benchmark = True


def compiled_forward(cfg: PretrainConfig, model: torch.nn.Module) -> torch.nn.Module:
    """`train.compile=true`: the forward pass through torch.compile (inductor)."""
    if not cfg.train.compile:
        return model
    if cfg.train.engine != "ddp":
        raise SatfuseError("train.compile=true works with train.engine=ddp; set train.compile=false "
                           "for train.engine=deepspeed")
    return torch.compile(model)


class MetricsLog:
    """JSONL metrics on rank 0, appended across requeues (one file per run)."""

    def __init__(self, path: Path, enabled: bool) -> None:
        self.enabled = enabled
        self.path = path
        if enabled:
            path.parent.mkdir(parents=True, exist_ok=True)
            self.fh = open(path, "a", buffering=1)  # noqa: SIM115 - kept open for the run

    def write(self, record: dict[str, Any]) -> None:
        if self.enabled:
            self.fh.write(json.dumps(record) + "\n")

    def close(self) -> None:
        if self.enabled:
            self.fh.close()


class Trainer:
    def __init__(self, cfg: PretrainConfig, env: DistEnv) -> None:
        self.cfg = cfg
        self.env = env
        self.device = select_device(cfg, env)
        check_precision(cfg.train.precision, self.device)
        configure_backends(cfg, self.device)
        self.run_dir = Path(cfg.train.run_dir)
        torch.manual_seed(cfg.train.seed)  # identical initial weights on every rank
        self.shards = resolve_shards(cfg.data.shards, cfg.data.manifest, cfg.data.shard_weights)
        self.loader = PretrainLoader(
            self.shards, cfg.data, rank=env.rank, world_size=env.world_size, seed=cfg.train.seed,
            method=cfg.model.method, simclr_input=cfg.model.simclr_input,
            pin_memory=self.device.type == "cuda",
        )
        self.module = build_pretrain_model(cfg.model)
        if cfg.train.channels_last:
            self.module.to(memory_format=torch.channels_last)
        self.engine = build_engine(cfg, self.module, self.device)
        self.forward = compiled_forward(cfg, self.engine.model)
        self.step = 0
        self.epoch = 0
        # first step whose loss was not finite (0: none), kept on the device: no per-step sync
        self._first_bad = torch.zeros((), dtype=torch.long, device=self.device)
        self._recent_keys: dict[int, list] = {}  # batch keys since the last check, for the message

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

    def save(self) -> Path:
        self.check_finite()  # never keep the weights of a non-finite step
        path = self.engine.save(self.step, self.rank_state(), self.meta())
        log.info("checkpoint step %d -> %s", self.step, path)
        return path

    def resume(self) -> None:
        path = self.engine.find_resume(self.cfg.checkpoint.resume)
        if path is None:
            return
        rank_states, meta = self.engine.load(path)
        same_world = len(rank_states) == self.env.world_size
        mine = rank_states[self.env.rank] if same_world else rank_states[0]
        self.step = int(mine["step"])
        self.engine.load_engine_state(mine["engine"])
        self.loader.load_state_dict([s["loader"] for s in rank_states])
        if same_world:
            restore_rng(mine["rng"])
        log.info(
            "resumed from %s at step %d (saved by %d ranks, now %d)",
            path, self.step, len(rank_states), self.env.world_size,
        )

    # ---------------------------------------------------------------- training
    def train_step(self, batch: dict[str, Any]) -> dict[str, Any]:
        """One step, queued without reading anything on the host: the returned loss, metrics
        and grad norm are 0-d device tensors (`read_metrics` on log steps). Every rank has the
        same batch size (the loader's plan), so the loss's gathers skip the size exchange."""
        self.engine.model.train()
        self._recent_keys[self.step + 1] = list(batch.get("key", [])[:4])
        if len(self._recent_keys) > 10_000:  # a huge log_every: keep the message's memory bounded
            self._recent_keys.pop(next(iter(self._recent_keys)))
        batch = to_device(batch, self.device, self.cfg.train.channels_last)
        with equal_rows():
            with self.engine.autocast():
                outputs = self.forward(batch)
            loss, metrics = self.module.loss(outputs, self.cfg.loss)
        bad = ~torch.isfinite(loss.detach())
        self._first_bad = torch.where((self._first_bad == 0) & bad, self.step + 1, self._first_bad)
        grad_norm = self.engine.backward_step(loss)
        return {"loss": loss.detach(), "grad_norm": grad_norm, **metrics}

    def check_finite(self) -> None:
        """Stop if any rank saw a non-finite loss. Collective: every rank calls it at the same
        steps (log steps, saves); the one host read of the NaN bookkeeping."""
        first = int(self._first_bad)
        if all_reduce_max_bool(first > 0):
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

    def fit(self) -> TrainResult:
        cfg = self.cfg
        if self.env.rank == 0:
            dump_yaml(cfg, self.run_dir / "config.yaml")
        self.resume()
        stop = StopFlag()
        stop.install()
        metrics_log = MetricsLog(self.run_dir / "metrics.jsonl", self.env.rank == 0)
        total = cfg.train.steps
        bar = tqdm(total=total, initial=self.step, desc="pretrain", disable=self.env.rank != 0,
                   dynamic_ncols=True)
        data_iter = iter(self.loader)
        last: dict[str, float] = {"loss": math.nan}
        pending: dict[str, Any] | None = None  # the latest step's numbers, still on the device
        t0, seen = time.perf_counter(), 0
        global_batch = cfg.data.batch_size * self.env.world_size
        # a resumed run re-saves even at the end: after a world-size change the newest
        # checkpoint is then in the current layout (DeepSpeed need not convert it again)
        status, saved_at = "completed", -1
        try:
            while self.step < total:
                batch = next(data_iter)
                self.epoch = int(batch.get("epoch", self.epoch))
                pending = self.train_step(batch)
                self.step += 1
                seen += global_batch
                bar.update(1)
                if self.step % cfg.train.log_every == 0 or self.step == total:
                    self.check_finite()
                    last = read_metrics(pending)
                    rate = seen / max(time.perf_counter() - t0, 1e-9)
                    record = {"step": self.step, "epoch": self.epoch, "lr": self.engine.lr(),
                              "samples_per_s": rate, **last}
                    metrics_log.write(record)
                    log.info("step %d/%d loss %.4f top1 %.3f lr %.2e %.1f pairs/s", self.step, total,
                             last["loss"], last.get("retrieval_top1", float("nan")), record["lr"], rate)
                    bar.set_postfix(loss=f"{last['loss']:.3f}", top1=f"{last.get('retrieval_top1', 0):.2f}")
                    t0, seen = time.perf_counter(), 0
                if stop.should_stop(control_group()):  # gloo on NCCL jobs: no GPU sync
                    status = "preempted"
                    break
                if cfg.checkpoint.every_steps and self.step % cfg.checkpoint.every_steps == 0:
                    self.save()
                    saved_at = self.step
            if saved_at != self.step:
                self.save()
            self.engine.wait()
        finally:
            bar.close()
        if pending is not None:
            last = read_metrics(pending)
        result = TrainResult(status=status, step=self.step, final_loss=last["loss"])
        if status == "completed" and cfg.data.val_shards:
            result.retrieval_top1, result.retrieval_chance = self.evaluate_retrieval()
            metrics_log.write({"step": self.step, "heldout_retrieval_top1": result.retrieval_top1,
                               "heldout_retrieval_chance": result.retrieval_chance})
        metrics_log.close()
        if status == "preempted":
            log.warning("stop signal received: saved step %d; exiting with %d (requeue me)",
                        self.step, REQUEUE_EXIT_CODE)
        return result

    # ---------------------------------------------------------------- evaluation
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
        n = torch.tensor([a.shape[0]], dtype=torch.long)
        if dist.is_initialized():
            dist.all_reduce(n)
        top1 = retrieval_accuracy(a, b)
        chance = 1.0 / max(1, int(n))
        log.info("held-out S1->S2 retrieval top-1: %.3f (chance %.4f, n=%d)", top1, chance, int(n))
        return top1, chance


def read_metrics(values: dict[str, Any]) -> dict[str, float]:
    """The step's device tensors as floats: a host synchronisation, on log steps only."""
    return {k: float(v) for k, v in values.items()}


def pair_embeddings(outputs: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """The (S1, S2) embeddings of a model's outputs: projections, or pooled MMA feature maps."""
    if "z_s1" in outputs:
        return outputs["z_s1"], outputs["z_s2"]
    return outputs["f_s1"].mean(dim=(2, 3)), outputs["f_s2"].mean(dim=(2, 3))

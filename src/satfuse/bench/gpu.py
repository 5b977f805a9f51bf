"""GPU check: proves the CUDA path (correctness) and measures Dual-SimCLR pairs/s per GPU.

One job, the GPU check; it is long because the check has the four sections below, each a
few small row functions.

One command for whoever has a GPU at hand (`make gpu-check` wraps it), finishing in a few
minutes on one H100/H200, writing one JSON and logging a table:

1. environment: torch / CUDA / cuDNN / NCCL versions, GPU name and memory, CPU cores;
2. correctness: the NT-Xent loss and its gradients on the device (fp32, TF32 off) against
   the CPU reference on the same batch (1e-5); a 1-rank DDP run (NCCL on CUDA, gloo on CPU)
   of the tiny Dual-SimCLR in bf16 and fp16 + GradScaler (fp16 only on CUDA): loss finite
   and falling, every convolution and linear layer in the autocast dtype and the loss in fp32,
   the scaler's scale logged and, after a step whose gradients overflow, halved with the
   weights untouched; a checkpoint written by the `Trainer` on the
   device resumes on the CPU with the same loss, and back; DeepSpeed ZeRO-1 bf16 (a
   `satfuse pretrain` subprocess) when DeepSpeed imports;
3. throughput of Dual-SimCLR (two ResNet-50s, bf16): (a) model only, data already on the
   device: eager, channels_last, torch.compile; pairs/s, step time, peak memory, and the
   largest per-GPU batch that fits; (b) the real loader from shards with several worker
   counts, pinned memory and non-blocking copies: the device's idle fraction = time the
   step waits for data / step time (the step ends with a synchronize, so that wait is time
   the device had nothing to do), next to the loader alone (CPU decode) and the
   host-to-device copy, so a bottleneck is named from measured rows; (c) `transformers`:
   the same model-only step with two ViT-B/16 or two Swin-T (timm) trunks, eager, bf16, at
   224 and 128 (`--transformer-batch` pairs per GPU; --quick: ViT-Ti/16 and Swin-T at 32);
4. the reference in the same run: a torchvision-layout ResNet-50, single modality (3
   bands, 1000 classes), training images/s at 224 - the figure NVIDIA publishes for it.

`--device cpu --quick` runs every code path at tiny sizes (tiny model, crop 32, a few steps,
0/1 loader workers) in well under a minute: CI runs it (tests/bench/test_bench_gpu.py).
The result's `ok` is false when a correctness check failed; the command then exits 1.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import math
import os
import subprocess
import sys
import tempfile
import time
import traceback
from collections.abc import Callable, Iterator
from importlib.metadata import version
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from satfuse.bench.common import paper_scale
from satfuse.config import DataConfig, LossConfig, ModelConfig, PretrainConfig, load_config
from satfuse.engines.base import autocast_context, cpu_has_native_bf16
from satfuse.run_layout import RunLayout
from satfuse.utils import SatfuseError, atomic_write_text

log = logging.getLogger(__name__)

SECTIONS = ("environment", "correctness", "model_only", "transformers", "loader", "reference")
# ViT-B/16 and Swin-T Dual-SimCLR rows (pairs/s per GPU, bf16) at these crops; --quick: test-sized
TRANSFORMERS = (("vit_base_patch16", (224, 128)), ("swin_tiny_patch4_window7", (224, 128)))
QUICK_TRANSFORMERS = (("timm:vit_tiny_patch16_224", (32,)), ("swin_tiny_patch4_window7", (32,)))
LOSS_TOL = 1e-5  # loss and gradients, device fp32 vs CPU fp32
RESUME_TOL = 1e-3  # loss after a cross-device resume vs the uninterrupted run (fp32 conv numerics)


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--device", choices=["auto", "cuda", "cpu"], default="auto",
                   help="auto: cuda when visible")
    p.add_argument("--quick", action="store_true",
                   help="dry run at tiny sizes (tiny model, crop 32, few steps, 0/1 workers)")
    p.add_argument("--shards", default="",
                   help="shard dir (with manifest.json) for the loader rows and the checkpoint "
                        "check; empty: those parts say 'no --shards'")
    p.add_argument("--crops", nargs="*", type=int, default=[128, 256])
    p.add_argument("--batches", nargs="*", type=int, default=[128, 200], help="pairs per GPU")
    p.add_argument("--workers", nargs="*", type=int, default=[4, 8, 12], help="loader workers")
    p.add_argument("--steps", type=int, default=10, help="timed steps per throughput row")
    p.add_argument("--train-steps", type=int, default=30, help="steps of the 1-rank DDP check")
    p.add_argument("--compile-batch", type=int, default=200,
                   help="torch.compile rows only at this per-GPU batch (each shape compiles anew)")
    p.add_argument("--max-batch", type=int, default=2048, help="largest-batch search stops here")
    p.add_argument("--reference-batch", type=int, default=256)
    p.add_argument("--transformer-batch", type=int, default=64,
                   help="pairs per GPU of the ViT-B/16 and Swin-T rows (needs timm)")
    p.add_argument("--skip", nargs="*", default=[], choices=SECTIONS, help="sections to leave out")
    p.add_argument("--no-deepspeed", action="store_true",
                   help="leave out the DeepSpeed check (on CPU its start-up alone takes minutes)")


def quick_defaults(args: argparse.Namespace) -> argparse.Namespace:
    """--quick: every code path at tiny sizes (a CPU dry run)."""
    args.crops, args.batches, args.workers = [32], [8], [0, 1]
    args.steps, args.train_steps, args.compile_batch = 2, 6, 8
    args.max_batch, args.reference_batch, args.transformer_batch = 16, 4, 2
    return args


def pick_device(name: str) -> torch.device:
    if name == "cuda" or (name == "auto" and torch.cuda.is_available()):
        if not torch.cuda.is_available():
            raise SatfuseError("--device cuda but torch sees no CUDA device; use --device cpu")
        return torch.device("cuda", 0)
    return torch.device("cpu")


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def peak_gib(device: torch.device) -> float | None:
    return torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None


def reset_peak(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)


@contextlib.contextmanager
def no_tf32() -> Iterator[None]:
    """fp32 means fp32 for the correctness checks (TF32 matmuls/convs differ at ~1e-3)."""
    saved = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved


def is_oom(exc: BaseException) -> bool:
    return isinstance(exc, torch.OutOfMemoryError) or "out of memory" in str(exc).lower()


# --------------------------------------------------------------------------------------------
# 1. environment
# --------------------------------------------------------------------------------------------


def environment(device: torch.device) -> dict[str, Any]:
    cuda = device.type == "cuda"
    nccl = None
    if cuda:
        with contextlib.suppress(Exception):
            v = torch.cuda.nccl.version()
            nccl = ".".join(map(str, v)) if isinstance(v, tuple) else str(v)
    props = torch.cuda.get_device_properties(device) if cuda else None
    return {
        "device": str(device),
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "cudnn": torch.backends.cudnn.version() if cuda else None,
        "nccl": nccl,
        "gpu_name": props.name if props else None,
        "gpu_memory_gib": round(props.total_memory / 2**30, 2) if props else None,
        "gpu_count": torch.cuda.device_count() if cuda else 0,
        "bf16_supported": torch.cuda.is_bf16_supported() if cuda else None,
        "cpu_cores": os.cpu_count(),
        "affinity_cores": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None,
        "deepspeed": deepspeed_version(),
    }


def deepspeed_version() -> str | None:
    try:
        return version("deepspeed")
    except Exception:
        return None


# --------------------------------------------------------------------------------------------
# 2. correctness
# --------------------------------------------------------------------------------------------


def check_loss_grad(device: torch.device, n: int, dim: int) -> dict[str, Any]:
    """NT-Xent loss + gradients on `device` (fp32) equal the CPU reference on the same batch.

    The reference is computed in float64, so the comparison measures something on a CPU-only
    dry run too (fp32 rounding, ~1e-7), not a tensor compared with itself."""
    from satfuse.losses import nt_xent  # lazy: --help stays fast

    gen = torch.Generator().manual_seed(0)
    za, zb = torch.randn(n, dim, generator=gen), torch.randn(n, dim, generator=gen)

    def run(dev: torch.device, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        a = za.detach().clone().to(dev, dtype).requires_grad_()  # fresh leaves every run
        b = zb.detach().clone().to(dev, dtype).requires_grad_()
        loss = nt_xent(a, b, 0.1, "nt_xent", True)
        loss.backward()
        return tuple(t.detach().to("cpu", torch.float64).clone() for t in (loss, a.grad, b.grad))

    with no_tf32():
        ref, got = run(torch.device("cpu"), torch.float64), run(device, torch.float32)
    diffs = [float((r - g).abs().max()) for r, g in zip(ref, got, strict=True)]
    return {"batch": n, "dim": dim, "loss_cpu": float(ref[0]), "loss_device": float(got[0]),
            "max_abs_diff_loss": diffs[0], "max_abs_diff_grad_s1": diffs[1],
            "max_abs_diff_grad_s2": diffs[2], "tolerance": LOSS_TOL,
            "ok": all(d <= LOSS_TOL for d in diffs)}


def learnable_pairs(batch: int, crop: int, device: torch.device, seed: int = 0) -> dict[str, torch.Tensor]:
    """S1/S2 that share a latent image, so the contrastive loss can fall on a fixed batch."""
    gen = torch.Generator().manual_seed(seed)
    latent = torch.randn(batch, 4, crop, crop, generator=gen)
    s1 = latent[:, :2] + 0.1 * torch.randn(batch, 2, crop, crop, generator=gen)
    s2 = torch.cat([latent] * 3 + [latent[:, :1]], dim=1) + 0.1 * torch.randn(batch, 13, crop, crop, generator=gen)
    return {"s1": s1.to(device), "s2": s2.to(device)}


def tiny_model_cfg() -> ModelConfig:
    return ModelConfig(method="dual_simclr", backbone="tiny", proj_hidden=64, proj_out=32)


def check_ddp_train(device: torch.device, precision: str, steps: int, batch: int, crop: int,
                    work: Path) -> dict[str, Any]:
    """1-rank DDP (NCCL on CUDA, gloo on CPU): loss finite and falling; scaler scale logged."""
    from torch.nn.parallel import DistributedDataParallel as DDP  # lazy: --help stays fast

    from satfuse.models import build_pretrain_model  # lazy: --help stays fast

    backend = "nccl" if device.type == "cuda" else "gloo"
    store = dist.FileStore(str(work / f"ddp_{precision}.store"), 1)
    dist.init_process_group(backend, store=store, rank=0, world_size=1)
    try:
        torch.manual_seed(0)
        module = build_pretrain_model(tiny_model_cfg()).to(device)
        model = DDP(module, device_ids=[device.index] if device.type == "cuda" else None)
        opt = torch.optim.Adam(module.parameters(), lr=1e-3)
        scaler = torch.amp.GradScaler(device.type, enabled=precision == "fp16")
        data = learnable_pairs(batch, crop, device)
        losses, scales = [], []
        for step in range(steps):
            with autocast_context(precision, device), layer_dtypes(module) as dtypes:
                out = model(data)
            loss, _ = module.loss(out, LossConfig(temperature=0.1))
            if step == 0:
                dtype_check = check_dtypes(dtypes, loss, precision)
            scaler.scale(loss).backward()
            scaler.step(opt)
            scaler.update()
            opt.zero_grad(set_to_none=True)
            losses.append(loss.detach())
            if scaler.is_enabled():
                scales.append(float(scaler.get_scale()))
        values = torch.stack(losses).float().cpu().tolist()
        overflow = None
        if scaler.is_enabled():
            with autocast_context(precision, device):
                out = model(data)
            overflow = overflow_step(module, opt, scaler, module.loss(out, LossConfig(temperature=0.1))[0])
    finally:
        dist.destroy_process_group()
    k = max(1, min(5, steps // 3))
    first, last = sum(values[:k]) / k, sum(values[-k:]) / k
    finite = all(math.isfinite(v) for v in values)
    return {"backend": backend, "precision": precision, "steps": steps, "batch": batch,
            "crop": crop, "loss_first": values[0], "loss_last": values[-1],
            "loss_mean_first": first, "loss_mean_last": last, "losses": values,
            "scaler_scale": scales or None, "finite": finite, "falling": last < first,
            "dtypes": dtype_check, "scaler_overflow_step": overflow,
            "ok": finite and last < first and dtype_check["ok"] and (overflow is None or overflow["ok"])}


@contextlib.contextmanager
def layer_dtypes(model: nn.Module) -> Iterator[dict[str, set[str]]]:
    """{layer type: dtypes of its outputs} for every Conv2d and Linear that runs inside."""
    seen: dict[str, set[str]] = {}

    def record(layer: nn.Module, _inputs: Any, output: torch.Tensor) -> None:
        seen.setdefault(type(layer).__name__, set()).add(str(output.dtype))

    handles = [m.register_forward_hook(record) for m in model.modules() if isinstance(m, (nn.Conv2d, nn.Linear))]
    try:
        yield seen
    finally:
        for handle in handles:
            handle.remove()


def check_dtypes(seen: dict[str, set[str]], loss: torch.Tensor, precision: str) -> dict[str, Any]:
    """Under bf16/fp16 autocast every convolution and linear layer computes in that dtype (finite
    losses alone would not show autocast silently off) and the loss in fp32."""
    want = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[precision]
    layers = {name: sorted(dtypes) for name, dtypes in sorted(seen.items())}
    ok = set(layers) == {"Conv2d", "Linear"} and all(d == [str(want)] for d in layers.values())
    return {"expected": str(want), "layers": layers, "loss": str(loss.dtype),
            "ok": ok and loss.dtype == torch.float32}


def overflow_step(module: nn.Module, opt: torch.optim.Optimizer, scaler: torch.amp.GradScaler,
                  loss: torch.Tensor) -> dict[str, Any]:
    """A step whose gradients overflow (the loss times inf): GradScaler must skip the optimizer
    step (weights unchanged) and back its scale off; one that did neither lets fp16 overflows
    corrupt the weights, which a finite loss on the next steps might not show."""
    before = float(scaler.get_scale())
    weights = [p.detach().clone() for p in module.parameters()]
    scaler.scale(loss * float("inf")).backward()
    scaler.step(opt)
    scaler.update()
    opt.zero_grad(set_to_none=True)
    after = float(scaler.get_scale())
    expected = before * scaler.get_backoff_factor() if scaler.is_enabled() else None  # off: no scale
    unchanged = all(torch.equal(w, p.detach()) for w, p in zip(weights, module.parameters(), strict=True))
    return {"scale_before": before, "scale_after": after, "expected_scale_after": expected,
            "weights_unchanged": unchanged, "ok": after == expected and unchanged}


def trainer_overrides(shards: str, run_dir: Path, device: torch.device, steps: int,
                      precision: str = "fp32") -> list[str]:
    return [f"data.shards={shards}", "data.batch_size=8", "data.num_workers=0",
            "data.shuffle_buffer=32", "data.crop=32", "model.backbone=tiny",
            "model.proj_hidden=64", "model.proj_out=32", "loss.temperature=0.1",
            "optim.lr=1e-3", f"train.run_dir={run_dir}", f"train.steps={steps}",
            f"train.device={device.type}", f"train.precision={precision}", "train.log_every=1",
            "checkpoint.every_steps=2", "checkpoint.keep_last=4"]


def train_losses(shards: str, run_dir: Path, device: torch.device, steps: int) -> dict[int, float]:
    """Run (or resume) the real Trainer on `device` up to `steps`; the loss logged per step."""
    from satfuse.distributed.env import DistEnv  # lazy: --help stays fast
    from satfuse.engines.trainer import Trainer  # lazy: --help stays fast

    cfg = load_config(PretrainConfig, None, trainer_overrides(shards, run_dir, device, steps))
    with no_tf32():
        Trainer(cfg, DistEnv()).fit()
    out = {}
    for line in RunLayout(run_dir).metrics.read_text().splitlines():
        rec = json.loads(line)
        if "loss" in rec:
            out[int(rec["step"])] = float(rec["loss"])
    return out


def check_checkpoint_cross_device(device: torch.device, shards: str, work: Path) -> dict[str, Any]:
    """A checkpoint written on the device resumes on the CPU with the same loss, and back."""
    cpu = torch.device("cpu")
    ref = train_losses(shards, work / "ref", device, 4)  # uninterrupted, on the device
    out: dict[str, Any] = {"reference_device": str(device), "reference_losses": ref,
                           "tolerance": RESUME_TOL}
    ok = True
    for name, first, then in (("device_to_cpu", device, cpu), ("cpu_to_device", cpu, device)):
        run = work / name
        train_losses(shards, run, first, 2)
        resumed = train_losses(shards, run, then, 4)
        diff = max(abs(resumed[s] - ref[s]) for s in (3, 4))
        out[name] = {"written_on": first.type, "resumed_on": then.type,
                     "loss_step3": resumed[3], "loss_step4": resumed[4], "max_abs_diff": diff}
        ok = ok and diff <= RESUME_TOL
    out["ok"] = ok
    return out


def check_deepspeed(device: torch.device, shards: str, work: Path, steps: int) -> dict[str, Any]:
    """ZeRO-1 bf16 through `satfuse pretrain` in a subprocess (DeepSpeed owns its process group)."""
    if deepspeed_version() is None:
        return {"skipped": "deepspeed is not installed here", "ok": True}
    root = Path(__file__).resolve().parents[3]
    ds_config = root / "hpc" / "deepspeed" / "zero1_bf16.json"
    run = work / "deepspeed"
    cmd = [sys.executable, "-m", "satfuse.cli", "pretrain",
           *trainer_overrides(shards, run, device, steps, precision="bf16"),
           "train.engine=deepspeed", f"deepspeed.config={ds_config}",
           f"checkpoint.every_steps={steps}"]
    env = dict(os.environ)
    env["DS_ACCELERATOR"] = "cuda" if device.type == "cuda" else "cpu"
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=600, check=False)
    losses = []
    metrics = RunLayout(run).metrics
    if metrics.exists():
        losses = [json.loads(x)["loss"] for x in metrics.read_text().splitlines() if '"loss"' in x]
    finite = bool(losses) and all(math.isfinite(v) for v in losses)
    return {"returncode": proc.returncode, "steps": steps, "losses": losses, "finite": finite,
            "wall_s": round(time.perf_counter() - t0, 2),
            "stderr_tail": proc.stderr[-1500:] if proc.returncode else "",
            "ok": proc.returncode == 0 and finite}


def correctness(device: torch.device, args: argparse.Namespace, work: Path) -> dict[str, Any]:
    out: dict[str, Any] = {}
    n, dim = (16, 32) if args.quick else (256, 128)
    out["loss_grad"] = guarded(lambda: check_loss_grad(device, n, dim))
    batch, crop = (8, 32) if args.quick else (32, 64)
    for precision in ("bf16", "fp16"):
        if precision == "fp16" and device.type != "cuda":
            out["ddp_fp16"] = {"skipped": "fp16 + GradScaler needs CUDA", "ok": True}
            continue
        out[f"ddp_{precision}"] = guarded(
            lambda p=precision: check_ddp_train(device, p, args.train_steps, batch, crop, work))
    if args.shards and not args.no_deepspeed:
        out["deepspeed_zero1_bf16"] = guarded(lambda: check_deepspeed(device, args.shards, work, 4 if args.quick else 10))
    else:
        out["deepspeed_zero1_bf16"] = {"skipped": "--no-deepspeed" if args.shards else "no --shards", "ok": True}
    if args.shards:
        out["checkpoint_cross_device"] = guarded(lambda: check_checkpoint_cross_device(device, args.shards, work))
    else:
        out["checkpoint_cross_device"] = {"skipped": "no --shards", "ok": True}
    out["ok"] = all(v.get("ok", False) for v in out.values() if isinstance(v, dict))
    return out


def guarded(fn: Callable[[], dict[str, Any]]) -> dict[str, Any]:
    """Run one check; an exception becomes a failed entry (the other checks still run)."""
    try:
        return fn()
    except Exception as exc:
        log.error("check failed: %s", exc)
        return {"error": f"{type(exc).__name__}: {exc}",
                "traceback": traceback.format_exc()[-2000:], "ok": False}


# --------------------------------------------------------------------------------------------
# 3. throughput
# --------------------------------------------------------------------------------------------


def dual_simclr(backbone: str, device: torch.device, channels_last: bool, img_size: int | None = None) -> nn.Module:
    from satfuse.models import build_pretrain_model  # lazy: --help stays fast

    hidden, out = (2048, 128) if paper_scale(backbone) else (64, 32)
    torch.manual_seed(0)
    model = build_pretrain_model(ModelConfig(method="dual_simclr", backbone=backbone,
                                             proj_hidden=hidden, proj_out=out), img_size=img_size).to(device)
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
    return model


class StepRunner:
    """One Dual-SimCLR bf16 training step (forward, global loss, backward, Adam), no host sync."""

    def __init__(self, model: nn.Module, device: torch.device, compile_backend: str | None,
                 precision: str = "bf16") -> None:
        self.module, self.device, self.precision = model, device, precision
        self.forward = torch.compile(model, backend=compile_backend) if compile_backend else model
        self.opt = torch.optim.Adam(model.parameters(), lr=1e-4)

    def __call__(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        with autocast_context(self.precision, self.device):
            out = self.forward(batch)
        loss, _ = self.module.loss(out, LossConfig(temperature=0.1))
        loss.backward()
        self.opt.step()
        self.opt.zero_grad(set_to_none=True)
        return loss.detach()


def model_batch(batch: int, crop: int, device: torch.device, channels_last: bool) -> dict[str, torch.Tensor]:
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    return {"s1": torch.randn(batch, 2, crop, crop, device=device).contiguous(memory_format=fmt),
            "s2": torch.randn(batch, 13, crop, crop, device=device).contiguous(memory_format=fmt)}


def time_model(backbone: str, device: torch.device, batch: int, crop: int, variant: str,
               steps: int, compile_backend: str, precision: str) -> dict[str, Any]:
    channels_last = variant in ("channels_last", "compile")
    reset_peak(device)
    runner = StepRunner(dual_simclr(backbone, device, channels_last, img_size=crop), device,
                        compile_backend if variant == "compile" else None, precision)
    data = model_batch(batch, crop, device, channels_last)
    t0 = time.perf_counter()
    for _ in range(2 if variant == "compile" else 1):  # warm-up (compile: forward + backward graphs)
        runner(data)
    sync(device)
    warm = time.perf_counter() - t0
    t0 = time.perf_counter()
    for _ in range(steps):
        loss = runner(data)
    sync(device)
    sec = (time.perf_counter() - t0) / steps
    return {"model": f"dual_simclr/{backbone}", "variant": variant, "batch": batch, "crop": crop,
            "precision": precision, "steps": steps, "step_s": sec, "pairs_per_s": batch / sec,
            "warmup_s": round(warm, 3), "peak_mem_gib": peak_gib(device),
            "loss_finite": bool(torch.isfinite(loss).item())}


def largest_batch(backbone: str, device: torch.device, crop: int, start: int, cap: int,
                  precision: str) -> dict[str, Any]:
    """Doubling search (channels_last, bf16): the largest per-GPU batch whose step fits."""
    fits, batch, tried = None, start, []
    while batch <= cap:
        try:
            reset_peak(device)
            runner = StepRunner(dual_simclr(backbone, device, True), device, None, precision)
            runner(model_batch(batch, crop, device, True))
            sync(device)
            fits = batch
            tried.append({"batch": batch, "fits": True, "peak_mem_gib": peak_gib(device)})
            batch *= 2
        except Exception as exc:
            if not is_oom(exc):
                raise
            tried.append({"batch": batch, "fits": False})
            break
        finally:
            runner = None  # noqa: F841 - drop the model before the next, larger try
            if device.type == "cuda":
                torch.cuda.empty_cache()
    return {"crop": crop, "largest_batch_fits": fits, "cap": cap,
            "cap_reached": fits is not None and fits * 2 > cap, "tried": tried}


def model_only(device: torch.device, args: argparse.Namespace, backbone: str, compile_backend: str) -> dict[str, Any]:
    rows = []
    for crop in args.crops:
        for batch in args.batches:
            for variant in ("eager", "channels_last", "compile"):
                if variant == "compile" and batch != args.compile_batch:
                    continue
                rows.append(guarded(lambda c=crop, b=batch, v=variant: time_model(
                    backbone, device, b, c, v, args.steps, compile_backend, args.precision)))
    fits = [guarded(lambda c=crop: largest_batch(backbone, device, c, max(args.batches),
                                                 args.max_batch, args.precision))
            for crop in args.crops]
    return {"rows": rows, "largest_batch": fits}


def transformer_rows(device: torch.device, args: argparse.Namespace) -> dict[str, Any]:
    """Dual-SimCLR pairs/s per GPU of ViT-B/16 and Swin-T (timm), eager, bf16, at 224 and 128
    (--quick: ViT-Ti/16 and Swin-T at 32, so the path runs on a CPU in seconds)."""
    rows = [guarded(lambda b=backbone, c=crop: time_model(b, device, args.transformer_batch, c, "eager",
                                                          args.steps, "", args.precision))
            for backbone, crops in (QUICK_TRANSFORMERS if args.quick else TRANSFORMERS) for crop in crops]
    return {"rows": rows}


# --------------------------------------------------------------------------------------------
# 3b. the real loader
# --------------------------------------------------------------------------------------------


def make_loader(shards: str, batch: int, crop: int, workers: int, pin: bool):
    from satfuse.data.reading.pretrain_loader import PretrainLoader  # lazy: --help stays fast
    from satfuse.data.reading.shard_sets import resolve_shards  # lazy: --help stays fast

    cfg = DataConfig(shards=shards, batch_size=batch, num_workers=workers, crop=crop,
                     shuffle_buffer=max(64, batch))
    return PretrainLoader(resolve_shards(shards), cfg, rank=0, world_size=1, seed=0, pin_memory=pin)


def fitting_batch(total: int, want: int, workers: int) -> int:
    """The loader needs one full batch per worker and epoch: the largest batch <= want that does."""
    return max(1, min(want, total // max(1, workers)))


def loader_row(device: torch.device, args: argparse.Namespace, backbone: str, crop: int,
               workers: int, model_step_s: float | None) -> dict[str, Any]:
    from satfuse.data.reading.shard_sets import resolve_shards  # lazy: --help stays fast
    from satfuse.engines.setup import to_device  # lazy: --help stays fast

    total = resolve_shards(args.shards).total
    batch = fitting_batch(total, min(args.batches), workers)
    pin = device.type == "cuda"
    channels_last = True
    runner = StepRunner(dual_simclr(backbone, device, channels_last, img_size=crop), device, None, args.precision)
    steps = args.steps
    # loader alone: CPU decode + crop + normalise (no device), in its own pass
    it = iter(make_loader(args.shards, batch, crop, workers, pin=False))
    next(it)  # workers started
    t0 = time.perf_counter()
    nbytes = 0
    for _ in range(steps):
        b = next(it)
        nbytes += sum(v.numel() * v.element_size() for v in b.values() if torch.is_tensor(v))
    alone = time.perf_counter() - t0
    del it
    # fed from the loader: wait = next() + non-blocking copy; the step ends with a synchronize
    it = iter(make_loader(args.shards, batch, crop, workers, pin=pin))
    runner(to_device(next(it), device, channels_last))  # warm-up, workers started
    sync(device)
    wait = copy = total_s = 0.0
    pinned = True
    for _ in range(steps):
        t0 = time.perf_counter()
        b = next(it)
        t1 = time.perf_counter()
        pinned = pinned and all(v.is_pinned() for v in b.values() if torch.is_tensor(v)) if pin else False
        b = to_device(b, device, channels_last)
        sync(device)
        t2 = time.perf_counter()
        runner(b)
        sync(device)
        t3 = time.perf_counter()
        wait += t2 - t0
        copy += t2 - t1
        total_s += t3 - t0
    del it
    step = total_s / steps
    row = {"workers": workers, "batch": batch, "crop": crop, "steps": steps, "step_s": step,
           "pairs_per_s": batch / step, "data_wait_s": wait / steps, "h2d_copy_s": copy / steps,
           "idle_fraction": wait / total_s, "pinned": pinned,
           "loader_alone_pairs_per_s": batch * steps / alone,
           "loader_alone_mb_per_s": nbytes / alone / 1e6, "model_step_s": model_step_s}
    row["bottleneck"] = name_bottleneck(row)
    return row


def name_bottleneck(row: dict[str, Any]) -> str:
    """Which resource runs out, read off the measured row (idle < 5%: none)."""
    if row["idle_fraction"] < 0.05:
        return "none (device busy > 95%)"
    step_compute = row["step_s"] - row["data_wait_s"]
    if row["h2d_copy_s"] > 0.5 * row["data_wait_s"]:
        return "host-to-device copy"
    if row["loader_alone_pairs_per_s"] < row["batch"] / max(step_compute, 1e-9):
        return "CPU decode (loader alone is slower than the model step)"
    return "bytes from disk or worker start-up (loader alone keeps up)"


def loader_rows(device: torch.device, args: argparse.Namespace, backbone: str,
                model_rows: list[dict[str, Any]]) -> dict[str, Any]:
    if not args.shards:
        return {"skipped": "no --shards"}
    rows = []
    for crop in args.crops:
        ref = [r for r in model_rows if r.get("crop") == crop and r.get("variant") == "channels_last"]
        model_step = ref[0]["step_s"] if ref else None
        for workers in args.workers:
            rows.append(guarded(lambda c=crop, w=workers, m=model_step: loader_row(
                device, args, backbone, c, w, m)))
    return {"shards": args.shards, "rows": rows,
            "note": "shards read from the page cache after the first pass (synthesised set)"}


# --------------------------------------------------------------------------------------------
# 4. reference
# --------------------------------------------------------------------------------------------


def reference(device: torch.device, args: argparse.Namespace) -> dict[str, Any]:
    """torchvision-layout ResNet-50 (3 bands, 1000 classes) training images/s at 224, bf16."""
    from satfuse.models.backbones import build_backbone  # lazy: --help stays fast

    quick = args.quick
    size, batch = (32, args.reference_batch) if quick else (224, args.reference_batch)
    try:
        import torchvision  # optional: torchvision

        net, source = torchvision.models.resnet50(), f"torchvision {torchvision.__version__}"
    except Exception:
        trunk = build_backbone("tiny" if quick else "resnet50", 3)
        net, source = nn.Sequential(trunk, nn.Linear(trunk.out_dim, 1000)), "satfuse backbone (torchvision layout)"
    if quick:
        trunk = build_backbone("tiny", 3)
        net, source = nn.Sequential(trunk, nn.Linear(trunk.out_dim, 1000)), "satfuse tiny (quick)"
    reset_peak(device)
    net = net.to(device).to(memory_format=torch.channels_last)
    opt = torch.optim.SGD(net.parameters(), lr=0.1, momentum=0.9)
    x = torch.randn(batch, 3, size, size, device=device).contiguous(memory_format=torch.channels_last)
    y = torch.randint(0, 1000, (batch,), device=device)

    def step() -> None:
        with autocast_context(args.precision, device):
            loss = nn.functional.cross_entropy(net(x), y)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    step()
    sync(device)
    t0 = time.perf_counter()
    for _ in range(args.steps):
        step()
    sync(device)
    sec = (time.perf_counter() - t0) / args.steps
    return {"model": "resnet50" if not quick else "tiny", "source": source, "crop": size,
            "batch": batch, "precision": args.precision, "channels_last": True, "step_s": sec,
            "images_per_s": batch / sec, "peak_mem_gib": peak_gib(device)}


# --------------------------------------------------------------------------------------------
# run + table
# --------------------------------------------------------------------------------------------


def run(args: argparse.Namespace) -> dict[str, Any]:
    if args.quick:
        args = quick_defaults(args)
    device = pick_device(args.device)
    backbone = "tiny" if args.quick else "resnet50"
    # quick: the compile row runs Dynamo + AOT autograd without inductor's C++ build (seconds,
    # not minutes, on 2 CPU cores); `train.compile=true` is tested with inductor elsewhere
    compile_backend = "aot_eager" if args.quick else "inductor"
    # throughput is measured in bf16; a --quick dry run on a CPU that only emulates bf16 (far
    # slower: `satfuse bench train` shows by how much) times fp32 instead, so it stays well under a minute (the DDP check keeps bf16)
    args.precision = "bf16"
    if args.quick and device.type == "cpu" and cpu_has_native_bf16() is False:
        args.precision = "fp32"
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True  # fixed crops: autotune the convolutions once
    result: dict[str, Any] = {"quick": args.quick, "backbone": backbone,
                              "compile_backend": compile_backend, "precision": args.precision}
    t_all = time.perf_counter()
    partial = Path(f"{args.out}.partial") if getattr(args, "out", None) else None
    with tempfile.TemporaryDirectory(prefix="satfuse-gpu-check-") as tmp:
        work = Path(tmp)
        if "environment" not in args.skip:
            result["environment"] = environment(device)
            save_partial(partial, result)
        if "correctness" not in args.skip:
            result["correctness"] = correctness(device, args, work)
            save_partial(partial, result)
        model_rows: list[dict[str, Any]] = []
        if "model_only" not in args.skip:
            result["model_only"] = model_only(device, args, backbone, compile_backend)
            model_rows = result["model_only"]["rows"]
            save_partial(partial, result)
        if "transformers" not in args.skip:
            result["transformers"] = transformer_rows(device, args)
            save_partial(partial, result)
        if "loader" not in args.skip:
            result["loader"] = loader_rows(device, args, backbone, model_rows)
            save_partial(partial, result)
        if "reference" not in args.skip:
            result["reference"] = guarded(lambda: reference(device, args))
    result["ratio"] = dual_over_reference(result)
    errors = find_errors(result)
    result["errors"] = errors
    result["ok"] = result.get("correctness", {}).get("ok", True) and not errors
    result["check_wall_s"] = round(time.perf_counter() - t_all, 2)
    log.info("\n%s", format_table(result))
    if partial is not None:
        partial.unlink(missing_ok=True)  # the complete JSON follows (bench commands' writer)
    return result


def save_partial(path: Path | None, result: dict[str, Any]) -> None:
    """The sections done so far, so a run stopped at a time limit still leaves its numbers."""
    if path is not None:
        path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_text(path, json.dumps(result, indent=2) + "\n")


def find_errors(node: Any, path: str = "") -> list[str]:
    """Every `error` entry of the result (a section that raised)."""
    found = []
    if isinstance(node, dict):
        if "error" in node:
            found.append(f"{path or '.'}: {node['error']}")
        for k, v in node.items():
            found += find_errors(v, f"{path}.{k}")
    elif isinstance(node, list):
        for i, v in enumerate(node):
            found += find_errors(v, f"{path}[{i}]")
    return found


def dual_over_reference(result: dict[str, Any]) -> dict[str, Any] | None:
    """Best Dual-SimCLR pairs/s per crop over the reference images/s (one pair = 2 images)."""
    ref = result.get("reference", {}).get("images_per_s")
    rows = [r for r in result.get("model_only", {}).get("rows", []) if "pairs_per_s" in r]
    if not ref or not rows:
        return None
    best: dict[int, float] = {}
    for r in rows:
        best[r["crop"]] = max(best.get(r["crop"], 0.0), r["pairs_per_s"])
    return {f"crop{c}": {"best_pairs_per_s": v, "pairs_over_reference_images": v / ref}
            for c, v in sorted(best.items())}


def format_table(result: dict[str, Any]) -> str:
    env = result.get("environment", {})
    lines = [f"satfuse bench gpu: {env.get('gpu_name') or env.get('device', '?')} | torch "
             f"{env.get('torch')} cuda {env.get('cuda')} cudnn {env.get('cudnn')} nccl "
             f"{env.get('nccl')} | {env.get('cpu_cores')} cores | ok={result.get('ok')}"]
    corr = result.get("correctness", {})
    for name, entry in corr.items():
        if isinstance(entry, dict):
            detail = entry.get("skipped") or entry.get("error") or ""
            lines.append(f"  check {name:<26} {'ok' if entry.get('ok') else 'FAILED'} {detail}".rstrip())
    lines.append("| model | variant | crop | batch | pairs/s | step ms | peak GiB |")
    lines.append("|---|---|---:|---:|---:|---:|---:|")
    for r in result.get("model_only", {}).get("rows", []) + result.get("transformers", {}).get("rows", []):
        if "error" in r:
            lines.append(f"| error | {r['error'][:60]} | | | | | |")
            continue
        mem = f"{r['peak_mem_gib']:.1f}" if r["peak_mem_gib"] is not None else "-"
        lines.append(f"| {r['model']} | {r['variant']} | {r['crop']} | {r['batch']} | "
                     f"{r['pairs_per_s']:.0f} | {r['step_s'] * 1e3:.1f} | {mem} |")
    for f in result.get("model_only", {}).get("largest_batch", []):
        if "largest_batch_fits" in f:
            lines.append(f"  largest batch at crop {f['crop']}: {f['largest_batch_fits']}"
                         f"{' (search cap reached)' if f['cap_reached'] else ''}")
    lrows = result.get("loader", {}).get("rows", [])
    if lrows:
        lines.append("| loader workers | crop | batch | pairs/s | idle % | loader alone pairs/s | bottleneck |")
        lines.append("|---:|---:|---:|---:|---:|---:|---|")
        for r in lrows:
            if "error" in r:
                lines.append(f"| error | {r['error'][:60]} | | | | | |")
                continue
            lines.append(f"| {r['workers']} | {r['crop']} | {r['batch']} | {r['pairs_per_s']:.0f} | "
                         f"{100 * r['idle_fraction']:.1f} | {r['loader_alone_pairs_per_s']:.0f} | {r['bottleneck']} |")
    ref = result.get("reference", {})
    if "images_per_s" in ref:
        lines.append(f"  reference {ref['source']} at {ref['crop']}: {ref['images_per_s']:.0f} images/s")
    for e in result.get("errors", []):
        lines.append(f"  ERROR {e[:200]}")
    return "\n".join(lines)

"""Bytes a 2-node run really moves vs the communication model (`satfuse.bench.model.row`).

Why: the README's performance section predicts, per step and per rank, the embedding
all-gather, the all-reduce of the gathered embeddings' gradient (backward of
`gather_with_grad`) and the gradient all-reduce (DDP). A model nobody checked is a guess, so
this benchmark runs the real trainer on the emulated 2-node cluster
(`slurm/local-cluster/multinode.sh`, one rank per node) and reads the nodes' interface
counters (`eth1` in namespaces sfnode1/sfnode2) before and after. Start-up traffic
(rendezvous, DDP's initial parameter broadcast, SLURM's own messages, the final checkpoint)
is the same for a run of N and of 2N steps, so the *difference* of the two runs is N steps
of pure training traffic; that is what is compared with the model.

Counting: every payload byte leaves one node (tx) and enters the other (rx), so the wire
volume is sum over nodes of (tx + rx) / 2. The model's per-rank figures are what each rank
receives; in a ring every rank sends as much as it receives, so the wire volume per step is
world x the per-rank sum. The counters include Ethernet/IP/TCP headers and gloo framing,
hence a ratio slightly above 1.

`compare()` is the arithmetic (usable with counters from any cluster); `run()` measures on
the emulated cluster and needs root and a running `multinode.sh` cluster.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

from satfuse.bench.model import row
from satfuse.config import PretrainConfig, load_config, read_yaml
from satfuse.distributed.launcher_env import LAUNCHER_VAR_PREFIXES, without_launcher_vars
from satfuse.utils import SatfuseError

log = logging.getLogger(__name__)

REPO = Path(__file__).resolve().parents[3]
NODES = ("sfnode1", "sfnode2")
IFNAME = "eth1"
DEFAULT_CONF = Path(os.environ.get("SATFUSE_SLURM2_BASE", "/tmp/satfuse-slurm2")) / "slurm.conf"
ENGINES = ("ddp", "zero0", "zero1")
# Variables of the submitting process that must not leak into a job on the 2-node cluster.
DROP_ENV = (*LAUNCHER_VAR_PREFIXES, "SATFUSE_IFNAME")


# --------------------------------------------------------------------------------------------
# The model's prediction and the comparison (pure arithmetic)
# --------------------------------------------------------------------------------------------


def predict(
    steps: int,
    world: int,
    batch: int,
    dim: int,
    params: int,
    buffer_bytes: int = 0,
    grad_bytes: int = 4,
    emb_bytes: int = 4,
    engine: str = "ddp",
) -> dict[str, Any]:
    """Wire bytes of `steps` Dual-SimCLR steps according to the model.

    Per rank and step: the model's three terms (`row()`), plus what the trainer and engine
    add. The README model leaves out two small terms: the retrieval-accuracy metric gathers
    the S2 embeddings once more without gradient ((W-1) B D values), and DDP broadcasts rank
    0's BatchNorm buffers before every forward ((W-1)/W x buffer bytes per rank on average).
    `engine="zero1"` (DeepSpeed stage 1) adds the all-gather of the updated parameter
    partitions ((W-1)/W x P): stage 1 does not partition gradients, so it all-reduces them
    in full like DDP (measured here: 1.5x DDP's gradient bytes, not the 1x of a
    reduce-scatter). "zero0" is DDP's all-reduce without the buffer broadcast.
    """
    if engine not in ENGINES:
        raise SatfuseError(
            f"commbytes: engine {engine!r} is not modelled; use one of {list(ENGINES)}"
        )
    r = row(world, batch, dim, params, grad_bytes, emb_bytes)
    per_rank = {
        "embedding_allgather": r["allgather_bytes_fwd"],
        "embedding_grad_allreduce": r["embedding_grad_allreduce_bytes_bwd"],
        "gradient_allreduce": r["grad_bytes_ddp_zero0"],
        "retrieval_metric_allgather": (world - 1) * batch * dim * emb_bytes,
        "ddp_buffer_broadcast": int((world - 1) / world * buffer_bytes) if engine == "ddp" else 0,
        "zero1_param_allgather": int((world - 1) / world * params * grad_bytes)
        if engine == "zero1"
        else 0,
    }
    per_step = world * sum(per_rank.values())
    return {
        "steps": steps,
        "world": world,
        "batch": batch,
        "dim": dim,
        "params": params,
        "engine": engine,
        "per_rank_per_step": per_rank,
        "wire_bytes_per_step": per_step,
        "predicted_bytes": steps * per_step,
    }


def compare(
    measured_bytes: int,
    steps: int,
    world: int,
    batch: int,
    dim: int,
    params: int,
    buffer_bytes: int = 0,
    grad_bytes: int = 4,
    emb_bytes: int = 4,
    engine: str = "ddp",
) -> dict[str, Any]:
    """The model's prediction for `steps` steps next to `measured_bytes`, and their ratio."""
    if steps <= 0 or measured_bytes < 0:
        raise SatfuseError(
            f"commbytes: need steps > 0 and measured bytes >= 0, got {steps} and {measured_bytes}"
        )
    pred = predict(steps, world, batch, dim, params, buffer_bytes, grad_bytes, emb_bytes, engine)
    readme_terms = sum(
        v
        for k, v in pred["per_rank_per_step"].items()
        if k in ("embedding_allgather", "embedding_grad_allreduce", "gradient_allreduce")
    )
    return {
        **pred,
        "measured_bytes": int(measured_bytes),
        "measured_bytes_per_step": measured_bytes / steps,
        "ratio_measured_vs_model": measured_bytes / pred["predicted_bytes"],
        "ratio_measured_vs_readme_terms": measured_bytes / (steps * world * readme_terms),
    }


# --------------------------------------------------------------------------------------------
# Measuring on the emulated 2-node cluster
# --------------------------------------------------------------------------------------------


def read_counters(namespace: str, ifname: str = IFNAME) -> tuple[int, int]:
    """(tx, rx) bytes of `ifname` in network namespace `namespace`.

    Why netlink (`ip -n NS -s -j link`) and not /sys/class/net: sysfs shows the namespace of
    whoever mounted it, so from the root namespace (or via `nsenter --net`) the node's eth1
    is not there.
    """
    cmd = ["ip", "-n", namespace, "-s", "-j", "link", "show", "dev", ifname]
    try:
        res = subprocess.run(cmd, capture_output=True, text=True, timeout=30, check=False)
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise SatfuseError(
            f"{' '.join(cmd)} failed ({exc}); install iproute2 and run as root"
        ) from exc
    if res.returncode != 0:
        raise SatfuseError(
            f"cannot read {ifname} counters in namespace {namespace} ({res.stderr.strip()}); start the "
            "2-node cluster with slurm/local-cluster/multinode.sh start (as root)"
        )
    stats = json.loads(res.stdout)[0]["stats64"]
    return int(stats["tx"]["bytes"]), int(stats["rx"]["bytes"])


def wire_bytes(before: dict[str, tuple[int, int]], after: dict[str, tuple[int, int]]) -> int:
    """Sum over nodes of (tx + rx) / 2 between two counter snapshots: each byte counted once."""
    total = sum((after[n][0] - before[n][0]) + (after[n][1] - before[n][1]) for n in before)
    return total // 2


def snapshot(nodes: tuple[str, ...] = NODES, ifname: str = IFNAME) -> dict[str, tuple[int, int]]:
    return {n: read_counters(n, ifname) for n in nodes}


def job_env(slurm_conf: Path) -> dict[str, str]:
    """This environment without launcher variables, pointed at the 2-node cluster."""
    env = without_launcher_vars(os.environ, str(slurm_conf))
    env.update(OMP_NUM_THREADS="1", SATFUSE_IFNAME=IFNAME)
    return env


def pretrain_2node(
    config: Path,
    shards: Path,
    run_dir: Path,
    steps: int,
    slurm_conf: Path,
    extra: list[str] | None = None,
    timeout: float = 300,
) -> dict[str, Any]:
    """`srun -N2 -n2 satfuse pretrain` of `steps` steps; the wire bytes it moved."""
    cmd = [
        "srun",
        "-N2",
        "-n2",
        "--kill-on-bad-exit=1",
        sys.executable,
        "-m",
        "satfuse.cli",
        "pretrain",
        "--config",
        str(config),
        f"data.shards={shards}",
        f"train.run_dir={run_dir}",
        f"train.steps={steps}",
        f"train.log_every={steps}",
        "checkpoint.every_steps=0",
        *(extra or []),
    ]
    before = snapshot()
    res = subprocess.run(
        cmd,
        capture_output=True,
        text=True,
        timeout=timeout,
        env=job_env(slurm_conf),
        cwd=REPO,
        check=False,
    )
    after = snapshot()
    if res.returncode != 0:
        tail = "\n".join(res.stderr.strip().splitlines()[-10:])
        raise SatfuseError(
            f"2-node pretraining of {steps} steps failed (srun exit {res.returncode}):\n{tail}"
        )
    per_node = {
        n: {"tx": after[n][0] - before[n][0], "rx": after[n][1] - before[n][1]} for n in before
    }
    return {"steps": steps, "wire_bytes": wire_bytes(before, after), "per_node": per_node}


def model_size(config: Path, overrides: list[str]) -> dict[str, Any]:
    """Parameters and buffer bytes of the real model; batch, embedding size and engine."""
    from satfuse.models import build_pretrain_model  # lazy: --help stays fast

    cfg = load_config(PretrainConfig, config, overrides)
    model = build_pretrain_model(cfg.model)
    return {
        "params": sum(p.numel() for p in model.parameters()),
        "buffer_bytes": sum(b.numel() * b.element_size() for b in model.buffers()),
        "batch": cfg.data.batch_size,
        "dim": cfg.model.proj_out,
        "engine": _engine(cfg, config),
    }


def _engine(cfg: Any, config: Path) -> str:
    """ "ddp", or "zero<stage>" of the DeepSpeed section (config file unless overridden)."""
    if cfg.train.engine != "deepspeed":
        return "ddp"
    stage = cfg.deepspeed.zero_stage
    if stage < 0:
        ds_path = Path(cfg.deepspeed.config)
        ds_path = ds_path if ds_path.is_absolute() else REPO / ds_path
        stage = int(read_yaml(ds_path).get("zero_optimization", {}).get("stage", 0))
    if f"zero{stage}" not in ENGINES:
        raise SatfuseError(
            f"{config}: ZeRO stage {stage} is not modelled by commbytes; use "
            "deepspeed.zero_stage=0 or 1, or train.engine=ddp"
        )
    return f"zero{stage}"


def synthetic_shards(base: Path) -> Path:
    """Small synthetic SEN12MS shards (the tests' layout) when no --shards is given."""
    from satfuse.data.packing.shard_writer import shard_dataset  # lazy: --help stays fast
    from satfuse.data.sources.synth import write_sen12ms  # lazy: --help stays fast

    write_sen12ms(base / "raw", scenes=2, patches_per_scene=24, seed=0, size=32)
    shard_dataset(base / "raw", "sen12ms", base / "shards", maxcount=6, seed=0)
    return base / "shards"


def measure(
    config: Path,
    shards: Path | None,
    steps: int,
    slurm_conf: Path,
    overrides: list[str] | None = None,
) -> dict[str, Any]:
    """Runs of `steps` and `2 x steps` on 2 nodes; their difference against the model."""
    overrides = list(overrides or [])
    if not Path(slurm_conf).is_file():
        raise SatfuseError(
            f"{slurm_conf}: no 2-node cluster config; start it with "
            "slurm/local-cluster/multinode.sh start (as root)"
        )
    size = model_size(config, overrides)
    with tempfile.TemporaryDirectory(prefix="satfuse-commbytes-") as tmp:
        base = Path(tmp)
        data = shards or synthetic_shards(base / "data")
        short = pretrain_2node(config, data, base / "short", steps, slurm_conf, overrides)
        long = pretrain_2node(config, data, base / "long", 2 * steps, slurm_conf, overrides)
    diff = long["wire_bytes"] - short["wire_bytes"]
    result = compare(
        diff,
        steps,
        2,
        size["batch"],
        size["dim"],
        size["params"],
        size["buffer_bytes"],
        engine=size["engine"],
    )
    result.update(runs=[short, long], startup_bytes=short["wire_bytes"] - diff)
    log.info(
        "model %.2f MB vs measured %.2f MB over %d steps: ratio %.3f",
        result["predicted_bytes"] / 1e6,
        diff / 1e6,
        steps,
        result["ratio_measured_vs_model"],
    )
    return result


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--config",
        default=str(REPO / "hpc" / "pretrain" / "tiny.yaml"),
        help="pretraining config (DDP engine)",
    )
    p.add_argument("--shards", default=None, help="training shards (default: small synthetic ones)")
    p.add_argument("--steps", type=int, default=8, help="N: runs of N and 2N steps are compared")
    p.add_argument(
        "--slurm-conf", default=str(DEFAULT_CONF), help="slurm.conf of the 2-node cluster"
    )
    p.add_argument("overrides", nargs="*", help="config overrides, e.g. data.batch_size=32")


def run(args: argparse.Namespace) -> dict:
    shards = Path(args.shards) if args.shards else None
    return measure(Path(args.config), shards, args.steps, Path(args.slurm_conf), args.overrides)

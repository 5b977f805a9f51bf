"""Communication and memory model of Dual-SimCLR data parallelism, 1..1024 GPUs.

Per step and per rank, for a global batch of W x B pairs, embedding size D and P parameters
(counted from the real model, built on the meta device):

- embedding all-gather (ring): each rank receives (W-1) x B x 2D values (S1 and S2);
  the backward of satfuse's gather (`satfuse.distributed.gather.gather_with_grad`) all-reduces
  the gradient of the gathered (W x B, 2D) embeddings, so that every rank's rows receive the
  gradient of every rank's anchors: 2 (W-1)/W x W x B x 2D values (ring all-reduce);
- gradient all-reduce (DDP = ZeRO-0, ring): 2 (W-1)/W x P values; ZeRO-1 (DeepSpeed stage 1
  does not partition gradients) all-reduces them in full and then all-gathers the updated
  parameter partitions: 3 (W-1)/W x P (measured on the 2-node run: 1.5x DDP); ZeRO-2 replaces
  the all-reduce by a reduce-scatter: 2 (W-1)/W x P (not measured here);
- logits of the global loss: the full NT-Xent matrix is (2WB)^2 per rank, the local-loss
  scheme (local rows against the global batch) is 2B x 2WB: O(B_local x B_global).

This is a model (arithmetic), not a measurement; `tests` and the 2-node run compare its
all-gather bytes with what the process group actually moved (see the README).
"""

from __future__ import annotations

import argparse

import torch

from satfuse.config import ModelConfig


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--nodes", type=int, default=0, help="report only this many nodes (0: sweep)")
    p.add_argument("--gpus-per-node", type=int, default=8)
    p.add_argument("--batch-per-gpu", type=int, default=64)
    p.add_argument("--backbone", default="resnet50")
    p.add_argument("--crop", type=int, default=224,
                   help="crop the backbone is built for (ViT/Swin: position tables; ResNets ignore it)")
    p.add_argument("--proj-hidden", type=int, default=2048)
    p.add_argument("--proj-out", type=int, default=128)
    p.add_argument("--grad-bytes", type=int, default=4, help="bytes per gradient value (fp32)")
    p.add_argument("--emb-bytes", type=int, default=4, help="bytes per gathered embedding value")


def count_params(backbone: str, proj_hidden: int, proj_out: int, crop: int = 224) -> int:
    from satfuse.models import build_pretrain_model  # lazy: --help stays fast

    cfg = ModelConfig(method="dual_simclr", backbone=backbone, proj_hidden=proj_hidden, proj_out=proj_out)
    with torch.device("meta"):
        model = build_pretrain_model(cfg, img_size=crop)
    return sum(p.numel() for p in model.parameters())


def row(world: int, batch: int, dim: int, params: int, grad_bytes: int, emb_bytes: int) -> dict:
    gather = (world - 1) * batch * 2 * dim * emb_bytes  # received per rank
    allreduce = int(2 * (world - 1) / world * params * grad_bytes) if world > 1 else 0
    return {
        "gpus": world,
        "global_batch": world * batch,
        "allgather_bytes_fwd": gather,
        "embedding_grad_allreduce_bytes_bwd": int(2 * (world - 1) / world * world * batch * 2 * dim * emb_bytes),
        "grad_bytes_ddp_zero0": allreduce,
        "grad_bytes_zero1": int(3 * (world - 1) / world * params * grad_bytes) if world > 1 else 0,
        "grad_bytes_zero2": allreduce,
        "logits_bytes_full": (2 * world * batch) ** 2 * 4,
        "logits_bytes_local_loss": (2 * batch) * (2 * world * batch) * 4,
    }


def run(args: argparse.Namespace) -> dict:
    params = count_params(args.backbone, args.proj_hidden, args.proj_out, args.crop)
    worlds = ([args.nodes * args.gpus_per_node] if args.nodes
              else [2**k for k in range(11)])  # 1..1024
    rows = [row(w, args.batch_per_gpu, args.proj_out, params, args.grad_bytes, args.emb_bytes)
            for w in worlds]
    return {"model": f"dual_simclr/{args.backbone}", "params": params,
            "batch_per_gpu": args.batch_per_gpu, "embedding_dim": args.proj_out, "rows": rows}


def format_table(result: dict) -> str:
    """Human-readable table (MiB/GiB) for the README."""
    lines = ["| GPUs | global batch | emb all-gather / step | grad all-reduce / step | logits full | logits local |",
             "|---:|---:|---:|---:|---:|---:|"]
    for r in result["rows"]:
        lines.append(
            f"| {r['gpus']} | {r['global_batch']} | {r['allgather_bytes_fwd'] / 2**20:.1f} MiB | "
            f"{r['grad_bytes_ddp_zero0'] / 2**20:.0f} MiB | {r['logits_bytes_full'] / 2**30:.2f} GiB | "
            f"{r['logits_bytes_local_loss'] / 2**20:.1f} MiB |"
        )
    return "\n".join(lines)

"""The global loss on 2 and 3 real gloo ranks equals one process on the concatenated batch.

Each rank trains on its slice of one global batch inside DDP; after backward (DDP averages
gradients) every rank's parameter gradients and the returned loss must equal those of a
single process on the whole batch, to 1e-6 in fp32. Cases cover the local-loss and full-loss
schemes, both variants, uneven per-rank batches, and the real DualSimCLR / MMA models.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn
from torch.nn.parallel import DistributedDataParallel as DDP

from satfuse.config import LossConfig, ModelConfig
from satfuse.distributed.env import teardown
from satfuse.distributed.ports import free_port
from satfuse.losses import nt_xent, retrieval_accuracy
from satfuse.models import build_pretrain_model
from satfuse.utils import SatfuseError

LOSS_CASES = [  # (variant, local_loss)
    ("nt_xent", True),
    ("nt_xent", False),
    ("infonce", True),
    ("infonce", False),
]
MODEL_CFG = dict(backbone="tiny", proj_hidden=32, proj_out=16, mma_dim=8)


class TwoTower(nn.Module):
    """A BN-free two-modality model: the loss is the only thing coupling the rows."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.a = nn.Sequential(nn.Linear(6, 16), nn.ReLU(), nn.Linear(16, 5))
        self.b = nn.Sequential(nn.Linear(7, 16), nn.ReLU(), nn.Linear(16, 5))

    def forward(self, xa: torch.Tensor, xb: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.a(xa), self.b(xb)


def global_data(total: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(123)
    return {
        "xa": torch.randn(total, 6, generator=g),
        "xb": torch.randn(total, 7, generator=g),
        "s1": torch.randn(total, 2, 32, 32, generator=g),
        "s2": torch.randn(total, 13, 32, 32, generator=g),
    }


def build_model(method: str) -> nn.Module:
    torch.manual_seed(0)
    model = build_pretrain_model(ModelConfig(method=method, **MODEL_CFG))
    return model.eval()  # BN on running stats: per-rank batch statistics would differ by design


def run_two_tower(data, variant, local_loss, wrap):
    model = wrap(TwoTower())
    za, zb = model(data["xa"], data["xb"])
    loss = nt_xent(za, zb, temperature=0.1, variant=variant, local_loss=local_loss)
    loss.backward()
    inner = model.module if isinstance(model, DDP) else model
    return float(loss.detach()), {n: p.grad.clone() for n, p in inner.named_parameters()}


def run_pretrain(data, method, wrap):
    model = wrap(build_model(method))
    batch = {"s1": data["s1"], "s2": data["s2"]}
    loss, metrics = (model.module if isinstance(model, DDP) else model).loss(
        model(batch), LossConfig()
    )
    loss.backward()
    inner = model.module if isinstance(model, DDP) else model
    return (
        float(loss.detach()),
        float(metrics["retrieval_top1"]),  # metrics are 0-d device tensors (no host read)
        {n: p.grad.clone() for n, p in inner.named_parameters()},
    )


def compute_all(data, wrap) -> dict:
    out = {}
    for variant, local in LOSS_CASES:
        out[f"{variant}-{local}"] = run_two_tower(data, variant, local, wrap)
    for method in ("dual_simclr", "mma"):
        out[method] = run_pretrain(data, method, wrap)
    z = torch.nn.functional.normalize(data["xa"][:, :5], dim=1)
    out["retrieval"] = retrieval_accuracy(
        z, z + 1.2 * torch.nn.functional.normalize(data["xb"][:, :5], dim=1)
    )
    return out


def _sync_bn_refused() -> bool:
    model = build_pretrain_model(ModelConfig(method="dual_simclr", sync_bn=True, **MODEL_CFG))
    try:
        model({"s1": torch.zeros(2, 2, 32, 32), "s2": torch.zeros(2, 13, 32, 32)})
    except SatfuseError as exc:
        return "sync_bn" in str(exc)
    return False


def worker(rank: int, world: int, port: int, sizes: list[int], out_dir: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group(
        "gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world
    )
    try:
        start = sum(sizes[:rank])
        full = global_data(sum(sizes))
        local = {k: v[start : start + sizes[rank]] for k, v in full.items()}
        result = compute_all(local, lambda m: DDP(m))
        result["sync_bn_refused"] = _sync_bn_refused()
        torch.save(result, Path(out_dir) / f"rank{rank}.pt")
    finally:
        dist.barrier()
        teardown()
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(0)  # gloo threads can abort a normal interpreter exit (deepspeed-cpu.md)


def assert_same(ref: dict, got: dict, label: str) -> None:
    for key, value in ref.items():
        if key == "retrieval":
            assert got[key] == pytest.approx(value, abs=1e-9), label
            continue
        loss_ref, *rest_ref = value
        loss_got, *rest_got = got[key]
        assert loss_got == pytest.approx(loss_ref, rel=1e-6, abs=1e-6), f"{label} {key} loss"
        if len(rest_ref) == 2:  # pretrain models also give retrieval top-1
            assert rest_got[0] == pytest.approx(rest_ref[0], abs=1e-9), f"{label} {key} top1"
        grads_ref, grads_got = rest_ref[-1], rest_got[-1]
        assert grads_ref.keys() == grads_got.keys()
        for name, g in grads_ref.items():
            torch.testing.assert_close(
                grads_got[name], g, rtol=1e-5, atol=1e-6, msg=f"{label} {key} {name}"
            )


@pytest.mark.parametrize("sizes", [[4, 4], [3, 2, 4]], ids=["2ranks-even", "3ranks-uneven"])
def test_global_loss_matches_single_process(sizes: list[int], tmp_path: Path) -> None:
    world = len(sizes)
    mp.spawn(worker, args=(world, free_port(), sizes, str(tmp_path)), nprocs=world, join=True)
    torch.manual_seed(0)
    reference = compute_all(global_data(sum(sizes)), lambda m: m)
    assert 0 < reference["retrieval"] < 1  # the check below is not vacuous
    for rank in range(world):
        got = torch.load(tmp_path / f"rank{rank}.pt", weights_only=False)
        assert got.pop("sync_bn_refused"), "sync_bn on CPU must raise a SatfuseError naming the key"
        assert_same(reference, got, f"rank {rank}/{world}")

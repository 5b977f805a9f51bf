"""All-gather across ranks, with and without gradients, for the global contrastive loss.

Why a hand-written autograd function instead of `torch.distributed.nn.functional.all_gather`:
that one is deprecated in torch 2.13 (FutureWarning), needs equal row counts on every rank,
and a wrong backward reduction silently breaks the loss (lightly #1528). Ours:

- forward: every rank's rows concatenated in rank order (rows may differ per rank; we pad
  to the largest and trim, so the last, smaller batch of an epoch still works);
- backward: the gradient of the gathered tensor is SUMMED over ranks and each rank keeps the
  rows it owns. Every rank's loss depends on every rank's rows, so the owner must receive the
  sum of all ranks' gradients for its rows; the contrastive loss relies on exactly this (and
  the tests in tests/models check it against one process on the concatenated batch).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
import torch.distributed as dist

from satfuse.distributed.collectives import comm_device, is_distributed, rank, world

_EQUAL_ROWS: list[bool] = [False]


@contextlib.contextmanager
def equal_rows() -> Iterator[None]:
    """Inside: every rank promises the same row count, so `gather_sizes` needs neither its
    collective nor the host read of its result (a GPU synchronisation in the middle of the
    forward). The trainer uses it for training steps: the loader gives every rank equal,
    full batches (drop_last; the same steps per epoch on all ranks)."""
    saved = _EQUAL_ROWS[0]
    _EQUAL_ROWS[0] = True
    try:
        yield
    finally:
        _EQUAL_ROWS[0] = saved


def gather_sizes(x: torch.Tensor, group: dist.ProcessGroup | None = None) -> list[int]:
    """Row count of `x` on every rank, in rank order (one tiny collective)."""
    world_size = world(group)
    if _EQUAL_ROWS[0]:
        return [int(x.shape[0])] * world_size
    size = torch.tensor([x.shape[0]], dtype=torch.int64, device=comm_device(x, group))
    sizes = [torch.zeros_like(size) for _ in range(world_size)]
    dist.all_gather(sizes, size, group=group)
    return [int(s.item()) for s in sizes]


def _all_gather_rows(
    x: torch.Tensor, sizes: list[int], group: dist.ProcessGroup | None
) -> torch.Tensor:
    """Concatenate every rank's rows; pads to max(sizes) because all_gather needs equal shapes."""
    home = x.device
    x = x.contiguous().to(comm_device(x, group))
    max_rows = max(sizes)
    if x.shape[0] < max_rows:
        pad = x.new_zeros((max_rows - x.shape[0], *x.shape[1:]))
        x = torch.cat([x, pad])
    parts = [torch.empty_like(x) for _ in sizes]
    dist.all_gather(parts, x, group=group)
    return torch.cat([p[:n] for p, n in zip(parts, sizes, strict=True)]).to(home)


class _GatherWithGrad(torch.autograd.Function):
    """all_gather whose backward sums the gradient over ranks and returns the owner's rows."""

    @staticmethod
    def forward(  # type: ignore[override]
        ctx, x: torch.Tensor, group: dist.ProcessGroup | None, sizes: list[int]
    ) -> torch.Tensor:
        me = rank(group)
        ctx.group = group
        ctx.start = sum(sizes[:me])
        ctx.rows = sizes[me]
        return _all_gather_rows(x, sizes, group)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> tuple[torch.Tensor, None, None]:  # type: ignore[override]
        # all_reduce + slice (gloo has no reduce_scatter); the SUM is the point, see module doc.
        grad = grad.contiguous().clone()
        dist.all_reduce(grad, op=dist.ReduceOp.SUM, group=ctx.group)
        return grad[ctx.start : ctx.start + ctx.rows], None, None


def gather_with_grad(
    x: torch.Tensor, group: dist.ProcessGroup | None = None, sizes: list[int] | None = None
) -> torch.Tensor:
    """All ranks' rows of `x` concatenated in rank order; gradients flow back to their owner.

    Without a process group (or with one rank) this returns `x` itself. Pass `sizes` (from
    `gather_sizes`) when gathering several tensors with the same rows, to save a collective.
    """
    if not is_distributed(group):
        return x
    return _GatherWithGrad.apply(x, group, sizes if sizes is not None else gather_sizes(x, group))


@torch.no_grad()
def gather_no_grad(
    x: torch.Tensor, group: dist.ProcessGroup | None = None, sizes: list[int] | None = None
) -> torch.Tensor:
    """All ranks' rows of `x` concatenated in rank order, detached (metrics, evaluation)."""
    if not is_distributed(group):
        return x.detach()
    return _all_gather_rows(
        x.detach(), sizes if sizes is not None else gather_sizes(x, group), group
    )


def rank_offset(x: torch.Tensor, group: dist.ProcessGroup | None = None) -> tuple[int, int]:
    """(first global row of this rank's rows, global row count) for `x` gathered in rank order."""
    if not is_distributed(group):
        return 0, x.shape[0]
    sizes = gather_sizes(x, group)
    return sum(sizes[: rank(group)]), sum(sizes)

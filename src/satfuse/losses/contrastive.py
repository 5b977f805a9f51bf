"""The global contrastive losses: NT-Xent (Dual-SimCLR/SimCLR), InfoNCE, MMA dense alignment.

Global batch: when a process group is up, every rank's embeddings are gathered (with
gradients back to their owner, `satfuse.distributed.gather`), so negatives come from the whole
global batch, as if one process held it.

Gradient scaling, the part that is easy to get silently wrong. Let W ranks, N global pairs,
L = (1 / 2N) * sum over all 2N anchors of the cross-entropy (the single-process loss). DDP and
DeepSpeed AVERAGE parameter gradients over ranks, and our gather SUMS the gradient of each
row over ranks on the way back to its owner. Hence:

- local loss (open_clip `--local-loss --gather-with-grad`): rank r computes only its own
  anchors' cross-entropy S_r (logits local rows x global batch, memory O(n x N)). It
  back-propagates W * S_r / 2N: the gather's sum gives its rows W * dL/dz, DDP's mean then
  gives exactly dL/dtheta. Any per-rank batch sizes work (the 1/2N is global).
- full loss (`local_loss=False`): every rank computes all 2N anchors (memory O(N x N)) and
  back-propagates L itself; the gather's sum again gives W * dL/dz, DDP's mean undoes it.

In both cases the returned VALUE is L, the same number on every rank (the local scheme
all-reduces the detached S_r for it); only the gradient carries the W factor, so the result
is correct under a data-parallel wrapper that averages gradients (DDP, DeepSpeed). Tests in
tests/models check loss and DDP gradients on 1, 2 and 3 real gloo ranks against one process.

Logits and softmax are computed in fp32 with autocast off: bf16 logits at temperature 0.07
lose about two digits of the similarity and the loss drifts.
"""

from __future__ import annotations

from typing import Literal

import torch
import torch.distributed as dist
import torch.nn.functional as F

from satfuse.distributed import collectives
from satfuse.distributed.collectives import all_reduce_sum, is_distributed
from satfuse.distributed.gather import gather_no_grad, gather_sizes, gather_with_grad
from satfuse.utils import SatfuseError

Variant = Literal["nt_xent", "infonce"]
VARIANTS = ("nt_xent", "infonce")


def _check_pair(a: torch.Tensor, b: torch.Tensor, temperature: float, variant: str) -> None:
    """One-line errors for inputs that would otherwise give a silently wrong loss."""
    if a.dim() != 2 or a.shape != b.shape:
        raise SatfuseError(
            f"contrastive loss: embeddings must both be (B, D) with equal shapes, got "
            f"{tuple(a.shape)} and {tuple(b.shape)}; pass the two modalities' projections of the same batch"
        )
    if a.shape[0] == 0:
        raise SatfuseError(
            "contrastive loss: empty batch (0 pairs); check data.batch_size and the loader"
        )
    if not temperature > 0:
        raise SatfuseError(
            f"contrastive loss: temperature must be > 0, got {temperature}; set loss.temperature"
        )
    if variant not in VARIANTS:
        raise SatfuseError(
            f"contrastive loss: variant {variant!r} is not one of {list(VARIANTS)}; set loss.variant"
        )


def _at_least_fp32(z: torch.Tensor) -> torch.Tensor:
    """fp32 for bf16/fp16/fp32 inputs; fp64 stays fp64 (exact gradient checks)."""
    return z if z.dtype == torch.float64 else z.float()


def _anchor_cross_entropy_sum(
    a: torch.Tensor,
    b: torch.Tensor,
    keys_a: torch.Tensor,
    keys_b: torch.Tensor,
    offset: int,
    temperature: float,
    variant: str,
) -> torch.Tensor:
    """Sum of the cross-entropy of the anchors `a` (rows offset.. of modality A) and `b`.

    keys_a / keys_b: the global (N, D) embeddings of each modality; anchor i of `a` has its
    positive at keys_b[offset + i] and vice versa. nt_xent: the candidates are all 2N
    embeddings but the anchor itself; infonce: only the other modality's N embeddings.
    """
    n, total = a.shape[0], keys_a.shape[0]
    idx = torch.arange(n, device=a.device) + offset
    # Scale the (n, D) anchors, not the (n, N) logits: the big matrix is touched once less.
    a, b = a / temperature, b / temperature
    if variant == "infonce":
        logits_ab = a @ keys_b.T
        logits_ba = b @ keys_a.T
        return F.cross_entropy(logits_ab, idx, reduction="sum") + F.cross_entropy(
            logits_ba, idx, reduction="sum"
        )
    keys = torch.cat([keys_a, keys_b])  # (2N, D)
    anchors = torch.cat([a, b])  # (2n, D)
    logits = anchors @ keys.T
    self_idx = torch.cat([idx, idx + total])
    pos_idx = torch.cat([idx + total, idx])
    rows = torch.arange(2 * n, device=a.device)
    # In place is safe: mm's backward needs its inputs, not this output. -inf drops the
    # anchor itself from its own softmax (nt_xent's 1[k != i]).
    logits[rows, self_idx] = float("-inf")
    return F.cross_entropy(logits, pos_idx, reduction="sum")


def nt_xent(
    z_s1: torch.Tensor,
    z_s2: torch.Tensor,
    temperature: float = 0.07,
    variant: Variant = "nt_xent",
    local_loss: bool = True,
    group: dist.ProcessGroup | None = None,
) -> torch.Tensor:
    """Contrastive loss between two views/modalities of the same places, over the global batch.

    z_s1, z_s2: (B_local, D) projections, row i of each from the same place. Embeddings are
    L2-normalised (cosine similarity). variant "nt_xent" is the authors' loss over the 2N
    embeddings (positive: the other modality of the same place; the other 2N-2 negatives;
    every anchor counts); "infonce" keeps only the cross-modal terms (CLIP style, both
    directions). Returns the mean over all 2N anchors of the global batch (see module doc
    for how the gradient is scaled for DDP).
    """
    _check_pair(z_s1, z_s2, temperature, variant)
    with torch.autocast(device_type=z_s1.device.type, enabled=False):
        a = F.normalize(_at_least_fp32(z_s1), dim=1)
        b = F.normalize(_at_least_fp32(z_s2), dim=1)
        if not is_distributed(group):
            return _anchor_cross_entropy_sum(a, b, a, b, 0, temperature, variant) / (2 * a.shape[0])
        world = collectives.world(group)
        sizes = gather_sizes(a, group)
        offset, total = sum(sizes[: collectives.rank(group)]), sum(sizes)
        # One collective for both modalities: side by side in columns, split after.
        keys_a, keys_b = gather_with_grad(torch.cat([a, b], dim=1), group, sizes).split(
            a.shape[1], dim=1
        )
        if not local_loss:
            return _anchor_cross_entropy_sum(
                keys_a, keys_b, keys_a, keys_b, 0, temperature, variant
            ) / (2 * total)
        local_sum = _anchor_cross_entropy_sum(a, b, keys_a, keys_b, offset, temperature, variant)
        objective = local_sum * (world / (2 * total))
        global_sum = all_reduce_sum(local_sum, group)
        return objective + (global_sum / (2 * total) - objective).detach()


def _flatten_locations(f: torch.Tensor) -> torch.Tensor:
    """(B, D, H, W) -> (B*H*W, D), image-major so each rank's rows stay contiguous."""
    return f.flatten(2).transpose(1, 2).reshape(-1, f.shape[1])


def dense_alignment_loss(
    f_s1: torch.Tensor,
    f_s2: torch.Tensor,
    temperature: float = 0.07,
    variant: Variant = "infonce",
    local_loss: bool = True,
    group: dist.ProcessGroup | None = None,
) -> torch.Tensor:
    """MMA loss: align two modalities' spatial embedding maps location by location.

    f_s1, f_s2: (B, D, H, W) maps of co-registered inputs (SEN12MS S1/S2 are on the same
    grid, so location (h, w) of one map sees the same ground as (h, w) of the other). Each
    location of every image is an anchor; its positive is the same location in the other
    modality; negatives are all other locations of all images of the global batch (other
    places in the same image included: that is what forces spatially distinct features).
    It is `nt_xent` over the B*H*W location embeddings, so the same global-batch gradient
    guarantees hold.
    """
    if f_s1.dim() != 4 or f_s1.shape != f_s2.shape:
        raise SatfuseError(
            f"dense alignment loss: feature maps must both be (B, D, H, W) with equal shapes, got "
            f"{tuple(f_s1.shape)} and {tuple(f_s2.shape)}; use the same crop size for S1 and S2"
        )
    return nt_xent(
        _flatten_locations(f_s1), _flatten_locations(f_s2), temperature, variant, local_loss, group
    )


def retrieval_accuracy(
    z_query: torch.Tensor,
    z_key: torch.Tensor,
    valid: torch.Tensor | None = None,
    group: dist.ProcessGroup | None = None,
) -> float:
    """`retrieval_accuracy_tensor` read on the host (a GPU synchronisation)."""
    return float(retrieval_accuracy_tensor(z_query, z_key, valid, group))


@torch.no_grad()
def retrieval_accuracy_tensor(
    z_query: torch.Tensor,
    z_key: torch.Tensor,
    valid: torch.Tensor | None = None,
    group: dist.ProcessGroup | None = None,
) -> torch.Tensor:
    """Top-1 accuracy of finding each query's own pair among all keys of the global batch.

    z_query / z_key: (B_local, D), row i of each from the same place (e.g. S1 -> S2).
    valid: optional (B_local,) bool mask of real rows (padded evaluation batches); invalid
    rows are neither queries nor candidate keys. Returns the same value on every rank.
    """
    q = F.normalize(z_query.detach().float(), dim=1)
    k = F.normalize(z_key.detach().float(), dim=1)
    mask = (
        torch.ones(q.shape[0], dtype=torch.bool, device=q.device) if valid is None else valid.bool()
    )
    sizes = gather_sizes(k, group) if is_distributed(group) else [k.shape[0]]
    offset = sum(sizes[: collectives.rank(group)]) if is_distributed(group) else 0
    keys = gather_no_grad(k, group, sizes) if is_distributed(group) else k
    key_mask = (
        gather_no_grad(mask.to(torch.uint8), group, sizes).bool() if is_distributed(group) else mask
    )
    sims = (q @ keys.T).masked_fill(~key_mask[None, :], float("-inf"))
    target = torch.arange(q.shape[0], device=q.device) + offset
    hits = ((sims.argmax(dim=1) == target) & mask).sum().double()
    count = mask.sum().double()
    stats = torch.stack([hits, count])
    if is_distributed(group):
        stats = all_reduce_sum(stats, group)
    return stats[0] / stats[1]  # 0-d, on the device, no host read (0/0 = nan: no valid row)

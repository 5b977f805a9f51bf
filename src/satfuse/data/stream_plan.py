"""The epoch plan of the streaming loader: pure arithmetic on manifest counts, no I/O.

Why a plan computed from counts alone: every rank must agree on `steps_per_epoch` without
talking to the others, and a resumed run (on any world size) must be able to work out which
samples the saving run had consumed without reading them again. Everything here is a
deterministic function of (shard counts, seed, epoch, world size, workers, batch, buffer).

Terms
- position: one sample, `(shard index, index of the sample inside the shard's tar)`.
- run: `(shard, lo, hi)`, the samples lo..hi-1 of one shard; an epoch's data is an ordered
  list of runs (a fresh epoch: every shard whole, in a seeded per-epoch permutation).
- slot: one (rank, worker) stream; slot = rank * workers + worker. The epoch's runs are cut
  into `world * workers` contiguous pieces of equal sample count (+-1), so the ranks get
  equal data even when shard sizes are uneven.
- order: inside a slot, a shuffle buffer of `k` samples. Its choices depend only on the
  buffer length, never on the contents, so `shuffle_order` gives the slot's whole output
  order as a permutation of local positions, for the worker and for a resume alike.
- cursor: how many outputs a slot has pulled from its order (failed decodes included).
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

import numpy as np

Run = tuple[int, int, int]  # (shard index, first sample, one past the last sample)


def stable_seed(*parts: object) -> int:
    """A 63-bit seed from arbitrary parts; stable across processes and Python versions
    (Python's own hash() of a str is salted per process, so it cannot be used here)."""
    text = "/".join(str(p) for p in parts).encode("utf-8")
    return int.from_bytes(hashlib.blake2b(text, digest_size=8).digest(), "little") >> 1


def slot_rng(seed: int, epoch: int, generation: int, slot: int, n_slots: int, pass_: int = 0) -> np.random.Generator:
    """The RNG of one slot's shuffle buffer; `generation` counts world-size changes in the epoch."""
    return np.random.default_rng(stable_seed("slot", seed, epoch, generation, slot, n_slots, pass_))


def shard_permutation(n_shards: int, seed: int, epoch: int) -> list[int]:
    """A new shard order every epoch (the epoch is fed in: the detshuffle pitfall)."""
    rng = np.random.default_rng(stable_seed("shards", seed, epoch))
    return [int(i) for i in rng.permutation(n_shards)]


def shuffle_order(n: int, k: int, rng: np.random.Generator) -> np.ndarray:
    """Output order of a classic shuffle buffer of size k over inputs 0..n-1.

    Fill k, then each step emits a random buffered item and refills from the input; at the
    end drain at random. Output j is always < j + k, so a reader holds at most k samples.
    """
    out = np.empty(n, dtype=np.int64)
    if n == 0:
        return out
    k = max(1, min(int(k), n))
    u = rng.random(n)
    buf = list(range(k))
    nxt = k
    for j in range(n):
        i = int(u[j] * len(buf))
        out[j] = buf[i]
        if nxt < n:
            buf[i] = nxt
            nxt += 1
        else:
            buf[i] = buf[-1]
            buf.pop()
    return out


def runs_size(runs: list[Run]) -> int:
    return sum(hi - lo for _, lo, hi in runs)


def split_runs(runs: list[Run], parts: int) -> list[list[Run]]:
    """Cut the ordered runs into `parts` contiguous pieces whose sizes differ by at most 1."""
    total = runs_size(runs)
    base, extra = divmod(total, parts)
    sizes = [base + (1 if p < extra else 0) for p in range(parts)]
    out: list[list[Run]] = [[] for _ in range(parts)]
    p, need = 0, sizes[0] if parts else 0
    for shard, lo, hi in runs:
        while lo < hi:
            while need == 0 and p < parts - 1:
                p += 1
                need = sizes[p]
            if need == 0:
                break
            take = min(need, hi - lo)
            out[p].append((shard, lo, lo + take))
            lo += take
            need -= take
    return out


def positions_to_runs(local: np.ndarray, runs: list[Run]) -> list[Run]:
    """Map sorted local positions of a slot back to global runs, merging neighbours."""
    starts = np.cumsum([0] + [hi - lo for _, lo, hi in runs])
    out: list[Run] = []
    for pos in local.tolist():
        r = int(np.searchsorted(starts, pos, side="right")) - 1
        shard, lo, _ = runs[r]
        idx = lo + pos - int(starts[r])
        if out and out[-1][0] == shard and out[-1][2] == idx:
            out[-1] = (shard, out[-1][1], idx + 1)
        else:
            out.append((shard, idx, idx + 1))
    return out


@dataclass(frozen=True)
class EpochPlan:
    """One epoch at one world size: the slot pieces, per-worker batch quotas and the
    rank-level interleave of workers (round robin, dropping workers whose quota is spent:
    the order torch's DataLoader uses, so the main process rarely has to reorder)."""

    slots: list[list[Run]]
    world_size: int
    workers: int
    batch_size: int
    drop_last: bool
    generation: int

    def slot(self, rank: int, worker: int) -> int:
        return rank * self.workers + worker

    def slot_batches(self, slot: int) -> int:
        n = runs_size(self.slots[slot])
        return n // self.batch_size if self.drop_last else -(-n // self.batch_size)

    @property
    def steps(self) -> int:
        """Batches per rank this epoch: the minimum over ranks, so no rank waits at the end."""
        per_rank = [
            sum(self.slot_batches(self.slot(r, w)) for w in range(self.workers)) for r in range(self.world_size)
        ]
        return min(per_rank) if per_rank else 0

    def schedule(self, rank: int) -> list[int]:
        """Which worker delivers each of the rank's `steps` batches."""
        left = [self.slot_batches(self.slot(rank, w)) for w in range(self.workers)]
        out: list[int] = []
        steps = self.steps
        while len(out) < steps:
            for w in range(self.workers):
                if left[w] > 0 and len(out) < steps:
                    out.append(w)
                    left[w] -= 1
        return out


def base_generation(base: dict | None) -> int:
    depth = 0
    while base is not None:
        depth += 1
        base = base.get("base")
    return depth


def epoch_runs(counts: list[int], seed: int, epoch: int, base: dict | None) -> list[Run]:
    """The ordered data of an epoch: all shards (fresh) or what a saving run left (base)."""
    if base is None:
        return [(s, 0, counts[s]) for s in shard_permutation(len(counts), seed, epoch) if counts[s] > 0]
    return remaining_runs(counts, seed, epoch, base)


def make_plan(
    counts: list[int], seed: int, epoch: int, base: dict | None, *, world_size: int, workers: int,
    batch_size: int, drop_last: bool,
) -> EpochPlan:
    runs = epoch_runs(counts, seed, epoch, base)
    return EpochPlan(
        slots=split_runs(runs, world_size * workers), world_size=world_size, workers=workers,
        batch_size=batch_size, drop_last=drop_last, generation=base_generation(base),
    )


def remaining_runs(counts: list[int], seed: int, epoch: int, base: dict) -> list[Run]:
    """Samples of the epoch that the saving run (described by `base`) had not pulled.

    `base` = {"world_size", "workers", "shuffle_buffer", "cursors": per old slot, "base"}.
    The old slot's shuffle order is recomputed from counts alone; its first `cursor` outputs
    were consumed, everything else (the shuffle buffer's contents and all unread samples)
    is returned, in the old epoch order. Nothing is read from the shards.
    """
    old_runs = epoch_runs(counts, seed, epoch, base.get("base"))
    n_slots = base["world_size"] * base["workers"]
    pieces = split_runs(old_runs, n_slots)
    gen = base_generation(base.get("base"))
    out: list[Run] = []
    for s, piece in enumerate(pieces):
        n, cursor = runs_size(piece), int(base["cursors"][s])
        if cursor >= n:
            continue
        order = shuffle_order(n, base["shuffle_buffer"], slot_rng(seed, epoch, gen, s, n_slots))
        left = np.sort(order[cursor:])
        out.extend(positions_to_runs(left, piece))
    return out

"""The epoch plan of the streaming loader: pure arithmetic on manifest counts, no I/O.

Why a plan computed from counts alone: every rank must agree on `steps_per_epoch` without
talking to the others, and a resumed run (on any world size) must be able to work out which
samples the saving run had consumed without reading them again. Everything here is a
deterministic function of (shard counts, seed, epoch, world size, workers, batch, buffer,
mix).

Terms
- position: one sample, `(shard index, index of the sample inside the shard's tar)`.
- run: `(shard, lo, hi)`, the samples lo..hi-1 of one shard; an epoch's data is an ordered
  list of runs (a fresh epoch: every shard whole, in a seeded per-epoch permutation).
- member dealing: when an epoch has fewer runs than slots (say 4 shards for 2 ranks x 4
  workers), every run is cut into `ceil(slots / runs)` contiguous member ranges of equal size
  (+-1) and the ranges, not the shards, are permuted (seeded per epoch); then the slots are
  cut as below. So the ranks' shares still change every epoch, and a slot reads one or two
  contiguous ranges. With enough shards the shards are dealt whole, as before (cheaper: a
  slot then indexes only the shards it reads).
- mix: several shard sets (`Mix`), concatenated in shard index; each epoch takes from each
  set its weighted share (see `mixed_runs`) and permutes all the runs together.
- slot: one (rank, worker) stream; slot = rank * workers + worker. The epoch's runs are cut
  into `world * workers` contiguous pieces of equal sample count (+-1), so the ranks get
  equal data even when shard sizes are uneven.
- node groups (staged shards, `data.stage_dir`): the shards split once into one group per
  node (`node_groups`); each group is planned as above for its node's slots only
  (`epoch_slots`). One group is the plain plan.
- order: inside a slot, a shuffle buffer of `k` samples. Its choices depend only on the
  buffer length, never on the contents, so `shuffle_order` gives the slot's whole output
  order as a permutation of local positions, for the worker and for a resume alike.
- cursor: how many outputs a slot has pulled from its order (failed decodes included).
"""

from __future__ import annotations

import functools
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


@dataclass(frozen=True)
class Mix:
    """Several shard sets concatenated in shard index: set i holds the shards
    bounds[i]..bounds[i+1]-1. `weights` (empty: each set in proportion to its size) are the
    sets' shares of every epoch's samples."""

    bounds: tuple[int, ...]
    weights: tuple[float, ...] = ()

    def shares(self, counts: list[int]) -> list[int]:
        """Samples each set contributes to every epoch.

        No weights: every sample of every set. Weights p_i (normalised): the epoch ends when
        the set the weights exhaust first has been read once, E = min_i size_i / p_i, and set
        i gives round(p_i x E) <= size_i samples: never a repeat within an epoch."""
        sizes = [sum(counts[a:b]) for a, b in zip(self.bounds, self.bounds[1:], strict=False)]
        if not self.weights:
            return sizes
        total_w = float(sum(self.weights))
        p = [w / total_w for w in self.weights]
        epoch = min(n / q for n, q in zip(sizes, p, strict=True))
        return [min(n, round(q * epoch)) for n, q in zip(sizes, p, strict=True)]


def deal_members(runs: list[Run], n_slots: int, seed: int, epoch: int) -> list[Run]:
    """Fewer runs than slots: cut each run into ceil(n_slots / runs) contiguous member ranges
    of equal size (+-1) and permute the ranges (seeded per epoch), so that every slot gets a
    different part of the data each epoch, as with whole shards."""
    if not runs or len(runs) >= n_slots:
        return runs
    m = -(-n_slots // len(runs))
    parts: list[Run] = []
    for shard, lo, hi in runs:
        base, extra = divmod(hi - lo, m)
        start = lo
        for j in range(m):
            size = base + (1 if j < extra else 0)
            if size:
                parts.append((shard, start, start + size))
            start += size
    rng = np.random.default_rng(stable_seed("members", seed, epoch))
    return [parts[int(i)] for i in rng.permutation(len(parts))]


def mixed_runs(counts: list[int], seed: int, epoch: int, mix: Mix) -> list[Run]:
    """A fresh epoch over several sets: each set's share (`Mix.shares`) taken from its shards
    in a seeded per-epoch order, starting at a seeded offset and wrapping around (a set read
    only in part gives a different part each epoch, every sample equally often over epochs);
    then all sets' runs permuted together."""
    runs: list[Run] = []
    for i, want in enumerate(mix.shares(counts)):
        a, b = mix.bounds[i], mix.bounds[i + 1]
        rng = np.random.default_rng(stable_seed("mix", seed, epoch, i))
        mine = [(a + int(s), 0, counts[a + int(s)]) for s in rng.permutation(b - a) if counts[a + int(s)] > 0]
        size = runs_size(mine)
        if want >= size:
            runs.extend(mine)
            continue
        start = int(rng.integers(size)) if size else 0
        # rotate the set's samples by `start` and take the first `want` of them
        rotated = _cut(mine, start, size) + _cut(mine, 0, start)
        runs.extend(_cut(rotated, 0, want))
    rng = np.random.default_rng(stable_seed("mix-order", seed, epoch))
    return [runs[int(i)] for i in rng.permutation(len(runs))]


def _cut(runs: list[Run], begin: int, end: int) -> list[Run]:
    """The samples begin..end-1 of the concatenated runs, as runs."""
    out: list[Run] = []
    pos = 0
    for shard, lo, hi in runs:
        a, b = max(begin, pos), min(end, pos + hi - lo)
        if a < b:
            out.append((shard, lo + a - pos, lo + b - pos))
        pos += hi - lo
    return out


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


def epoch_runs(
    counts: list[int], seed: int, epoch: int, base: dict | None, n_slots: int, mix: Mix | None = None,
) -> list[Run]:
    """The ordered data of an epoch: all shards (fresh) or what a saving run left (base).
    `n_slots` is the slot count of the run that starts the epoch fresh (it decides whether
    members are dealt instead of whole shards)."""
    if base is None:
        if mix is None:
            runs = [(s, 0, counts[s]) for s in shard_permutation(len(counts), seed, epoch) if counts[s] > 0]
        else:
            runs = mixed_runs(counts, seed, epoch, mix)
        return deal_members(runs, n_slots, seed, epoch)
    return remaining_runs(counts, seed, epoch, base, mix)


def node_groups(counts: list[int], seed: int, groups: int, mix: Mix | None = None) -> list[int]:
    """Which node group holds each shard when shards are staged to node-local disks.

    Fixed for a run (seed and group count only, never the epoch): a node keeps its shards
    across epochs. Shards are taken in a seeded order, each given to the group holding the
    fewest samples so far (of its own set, for a mix), so groups get equal data to within
    one shard. `groups=1`: every shard in group 0."""
    if groups <= 1:
        return [0] * len(counts)
    return list(_node_groups(tuple(counts), seed, groups, mix))


@functools.lru_cache(maxsize=8)
def _node_groups(counts: tuple[int, ...], seed: int, groups: int, mix: Mix | None) -> tuple[int, ...]:
    out = [0] * len(counts)
    bounds = list(mix.bounds) if mix is not None else [0, len(counts)]
    for a, b in zip(bounds, bounds[1:], strict=False):
        load = [0] * groups
        rng = np.random.default_rng(stable_seed("node-groups", seed, groups, a, b))
        for i in rng.permutation(b - a):
            s = a + int(i)
            g = min(range(groups), key=lambda k: (load[k], k))
            out[s] = g
            load[g] += counts[s]
    return tuple(out)


def epoch_slots(
    counts: list[int], seed: int, epoch: int, base: dict | None, n_slots: int, mix: Mix | None = None,
    groups: int = 1,
) -> list[list[Run]]:
    """The epoch's data cut into `n_slots` slot pieces. `groups` > 1 (staged shards): slots
    are dealt to node groups in order (group g: slots g*n_slots/groups ...), and a group's
    slots read only the shards of that group (`node_groups`); each group's share is planned
    like a whole set (permuted per epoch, members dealt when it has fewer shards than slots).
    `groups=1` is the plain plan."""
    if groups <= 1:
        return split_runs(epoch_runs(counts, seed, epoch, base, n_slots, mix), n_slots)
    per = n_slots // groups
    owner = node_groups(counts, seed, groups, mix)
    if base is not None:  # the saving run's leftovers, each given to the group now holding its shard
        left = remaining_runs(counts, seed, epoch, base, mix)
    out: list[list[Run]] = []
    for g in range(groups):
        if base is None:
            mine = [c if owner[s] == g else 0 for s, c in enumerate(counts)]
            runs = epoch_runs(mine, seed, epoch, None, per, mix)
        else:
            runs = [r for r in left if owner[r[0]] == g]
        out.extend(split_runs(runs, per))
    return out


def make_plan(
    counts: list[int], seed: int, epoch: int, base: dict | None, *, world_size: int, workers: int,
    batch_size: int, drop_last: bool, mix: Mix | None = None, groups: int = 1,
) -> EpochPlan:
    return EpochPlan(
        slots=epoch_slots(counts, seed, epoch, base, world_size * workers, mix, groups), world_size=world_size,
        workers=workers, batch_size=batch_size, drop_last=drop_last, generation=base_generation(base),
    )


def remaining_runs(counts: list[int], seed: int, epoch: int, base: dict, mix: Mix | None = None) -> list[Run]:
    """Samples of the epoch that the saving run (described by `base`) had not pulled.

    `base` = {"world_size", "workers", "shuffle_buffer", "cursors": per old slot, "base",
    "groups" (node groups of a staged run; absent: 1)}.
    The old slot's shuffle order is recomputed from counts alone; its first `cursor` outputs
    were consumed, everything else (the shuffle buffer's contents and all unread samples)
    is returned, in the old epoch order. Nothing is read from the shards.
    """
    n_slots = base["world_size"] * base["workers"]
    pieces = epoch_slots(counts, seed, epoch, base.get("base"), n_slots, mix, int(base.get("groups", 1)))
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

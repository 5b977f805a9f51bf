"""One DataLoader worker's stream: its slot of the epoch plan, read, shuffled and batched.

One job, for `pretrain_loader.PretrainLoader` (whose docstring states the epoch and resume
semantics): `StreamDataset` runs inside each worker (or in-process with num_workers=0) and
follows the plan epoch after epoch on its own; `SlotWorker` builds one slot's batches in one
epoch from a shuffle buffer, topping up from extra passes after skipped samples.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np
from torch.utils.data import IterableDataset, get_worker_info

from satfuse.data.reading.batch_ring import RingFeed
from satfuse.data.reading.sample_transform import (
    FatalDataError,
    SampleTransform,
    batch_fields,
    collate,
)
from satfuse.data.reading.stream_io import RawSample, ShardCache, read_shard
from satfuse.data.reading.stream_plan import (
    EpochPlan,
    Mix,
    Run,
    make_plan,
    runs_size,
    shuffle_order,
    slot_rng,
)

log = logging.getLogger(__name__)


@dataclass
class SlotTask:
    """What one worker must deliver in one epoch: its slot, where to start, how many batches."""

    worker: int
    slot: int
    runs: list[Run]
    cursor: int
    quota: int


@dataclass
class EpochSpec:
    urls: list[str]
    epoch: int
    seed: int
    generation: int
    n_slots: int
    batch_size: int
    shuffle_buffer: int
    drop_last: bool
    on_error: str
    transform: SampleTransform
    cache: ShardCache | None = None  # the worker's indexed shards, kept across epochs
    feed: RingFeed | None = None  # the worker's reused batch buffers (None: a fresh tensor per batch)


@dataclass
class StreamSpec:
    """Everything a worker needs to follow the plan on its own, epoch after epoch, from a
    starting position (a fresh start or a resumed state)."""

    urls: list[str]
    counts: list[int]
    seed: int
    rank: int
    world_size: int
    workers: int
    batch_size: int
    shuffle_buffer: int
    drop_last: bool
    on_error: str
    transform: SampleTransform
    epoch: int
    base: dict | None
    cursors: list[int]
    batches: list[int]
    mix: Mix | None = None
    groups: int = 1  # node groups of staged shards (stream_plan.epoch_slots)
    credits: list[Any] | None = None  # per worker, slot credits of the batch ring (batch_ring.py)
    main_pid: int = 0  # the process that reads the batches (a worker stops when it is gone)

    def plan(self, epoch: int, base: dict | None) -> EpochPlan:
        return make_plan(self.counts, self.seed, epoch, base, world_size=self.world_size, workers=self.workers,
                         batch_size=self.batch_size, drop_last=self.drop_last, mix=self.mix,
                         groups=self.groups)

    def epoch_spec(self, epoch: int, plan: EpochPlan, cache: ShardCache | None = None,
                   feed: RingFeed | None = None) -> EpochSpec:
        return EpochSpec(self.urls, epoch, self.seed, plan.generation, len(plan.slots), self.batch_size,
                         self.shuffle_buffer, self.drop_last, self.on_error, self.transform, cache, feed)


def read_in_order(spec: EpochSpec, runs: list[Run], order: np.ndarray, start: int) -> Iterator[RawSample]:
    """Samples order[start:], reading the slot's runs sequentially and holding at most
    `shuffle_buffer` samples; positions before `start` in the order are not read at all."""
    needed = np.zeros(len(order), dtype=bool)
    needed[order[start:]] = True
    stream = _read_needed(spec, runs, needed)
    store: dict[int, RawSample] = {}
    for pos in order[start:].tolist():
        while pos not in store:
            local, sample = next(stream)
            store[local] = sample
        yield store.pop(pos)


def _read_needed(spec: EpochSpec, runs: list[Run], needed: np.ndarray) -> Iterator[tuple[int, RawSample]]:
    offset = 0
    for shard, lo, hi in runs:
        local = np.nonzero(needed[offset : offset + hi - lo])[0]
        if len(local):
            wanted = {lo + int(i) for i in local}
            for sample in read_shard(spec.urls[shard], shard, wanted, max(wanted), spec.cache):
                yield offset + sample.index - lo, sample
        offset += hi - lo


class SlotWorker:
    """Builds the batches of one slot in one epoch, topping up from extra passes after
    skipped samples; yields `{"__error__": msg}` instead of raising (the main process raises).
    `stopped` is set when the main process closed the batch ring (nothing more is read)."""

    def __init__(self, spec: EpochSpec, task: SlotTask, errors: int = 0) -> None:
        self.spec, self.task = spec, task
        self.n = runs_size(task.runs)
        self.errors = errors
        self.stopped = False

    def batches(self) -> Iterator[dict[str, Any]]:
        spec, task = self.spec, self.task
        cursor, emitted, pending = task.cursor, 0, []
        if task.quota <= 0:
            return
        if self.n == 0:
            yield {"__error__": f"slot {task.slot} has no samples but must deliver {task.quota} batches"}
            return
        while True:
            pass_, start = divmod(cursor, self.n)
            rng = slot_rng(spec.seed, spec.epoch, spec.generation, task.slot, spec.n_slots, pass_)
            order = shuffle_order(self.n, spec.shuffle_buffer, rng)
            good = 0
            for raw in read_in_order(spec, task.runs, order, start):
                cursor += 1
                item = self._transform(raw)
                if isinstance(item, str):
                    yield {"__error__": item}
                    return
                if item is None:
                    continue
                good += 1
                pending.append(item)
                if len(pending) == spec.batch_size:
                    packed = self._pack(pending, cursor)
                    if packed is None:
                        return
                    yield packed
                    pending, emitted = [], emitted + 1
                    if emitted == task.quota:
                        return
            if pending and not spec.drop_last and pass_ == 0 and emitted == task.quota - 1:
                packed = self._pack(pending, cursor)
                if packed is not None:
                    yield packed
                return
            if start == 0 and good == 0:
                shards = sorted({spec.urls[s] for s, _, _ in task.runs})
                yield {"__error__": f"{shards[0]}: no readable sample in slot {task.slot}'s shards {shards}; "
                       "fix or re-create the shards"}
                return
            if pass_ == 0:
                log.warning("slot %d came up short after %d skipped samples; topping up from a re-read",
                            task.slot, self.errors)

    def _transform(self, raw: RawSample) -> dict[str, Any] | str | None:
        """The item, None for a skipped sample, or a fatal message."""
        url = self.spec.urls[raw.shard]
        try:
            return self.spec.transform(raw, self.spec.epoch)
        except FatalDataError as exc:
            return f"{url}: {exc}"
        except Exception as exc:  # noqa: BLE001 - any decode failure of untrusted bytes
            if self.spec.on_error == "fatal":
                return (f"{url}: sample {raw.key} failed to decode ({exc}); fix the shard or set "
                        "data.on_decode_error=skip")
            self.errors += 1
            log.warning("%s: skipping sample %s: %s", url, raw.key, exc)
            return None

    def _pack(self, items: list[dict[str, Any]], cursor: int) -> dict[str, Any] | None:
        """The batch; with a batch ring its tensors are written into a reused slot and only
        the slot's message travels (`_ring`). None: the ring was closed."""
        feed = self.spec.feed
        if feed is None:
            batch = collate(items)
        else:
            taken = feed.take(batch_fields(items))
            if taken is None:
                self.stopped = True
                return None
            out, msg = taken
            batch = {"key": collate(items, out=out)["key"], "_ring": msg}
        batch["_meta"] = (self.task.worker, self.spec.epoch, cursor, self.errors)
        return batch


class StreamDataset(IterableDataset):
    """A rank's endless stream; each DataLoader worker follows its own slot, epoch after epoch.

    Workers are started once per `iter()`, not per epoch (a spawned worker costs seconds).
    Per epoch every worker yields the same number of items - its batches, then padding
    markers - so torch's strict round-robin over workers reproduces the plan's schedule
    and the main process never buffers more than a few batches.
    """

    def __init__(self, spec: StreamSpec) -> None:
        super().__init__()
        self.spec = spec

    def __iter__(self) -> Iterator[dict[str, Any]]:
        info = get_worker_info()
        w = info.id if info is not None else 0
        sp = self.spec
        epoch, base, cursors, done = sp.epoch, sp.base, list(sp.cursors), list(sp.batches)
        errors = 0
        cache = ShardCache()  # this worker's shard indexes and maps, built once, used every epoch
        feed = RingFeed(sp.credits[w], sp.main_pid) if sp.credits is not None and info is not None else None
        while True:
            plan = sp.plan(epoch, base)
            sched = plan.schedule(sp.rank)
            left = [sched.count(v) - done[v] for v in range(sp.workers)]
            slot = plan.slot(sp.rank, w)
            task = SlotTask(w, slot, plan.slots[slot], cursors[w], left[w])
            worker = SlotWorker(sp.epoch_spec(epoch, plan, cache, feed), task, errors)
            for batch in worker.batches():
                yield batch
                if "__error__" in batch:
                    return
            if worker.stopped:
                return
            errors = worker.errors
            for _ in range(max(left, default=0) - max(left[w], 0)):
                yield {"_pad": True, "_meta": (w, epoch, None, errors)}
            epoch, base, cursors, done = epoch + 1, None, [0] * sp.workers, [0] * sp.workers


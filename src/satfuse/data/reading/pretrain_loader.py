"""Streaming pretraining loader over WebDataset shards, with exact and world-size-changing resume.

Why not a stock `wds.WebDataset(...)` pipeline: webdataset gives neither exact mid-epoch resume
nor equal batch counts per rank (its shard splitting leaves ranks with unequal counts, and its
resume is approximate). Here every epoch is a plan
computed from the manifest counts alone (`satfuse.data.reading.stream_plan`), so all ranks agree on
`steps_per_epoch` without communicating, and a checkpoint needs only a few integers per worker.

Epoch semantics
- Each epoch the shards are permuted (seed, epoch); the concatenated samples are cut into
  `world_size x workers` contiguous slots of equal size (+-1 sample), slot = rank * workers +
  worker. Slots are disjoint and together cover the whole shard set, so each rank sees a
  disjoint part of the data and the ranks' shares differ by at most `workers` samples even
  when shard sizes are uneven (a shard may be split between two neighbouring slots).
- Fewer shards than `world_size x workers` (4 shards on 2 ranks x 4 workers, or 1 shard):
  each shard is cut into `ceil(slots / shards)` contiguous member ranges and the ranges are
  permuted instead (`stream_plan.deal_members`); everything else - equal batches, disjoint
  ranks, seeded order, exact and world-size-changing resume - is the same. A worker then
  indexes the headers of a whole shard to read its range (local tars; a `pipe:` shard is
  streamed up to the range's end), which `satfuse bench loader` measures (`member_dealing`).
- Several shard sets (`data.shards=[a, b]`, optional `data.shard_weights`): one plan over
  all their shards; each epoch a set gives its weighted share (no weights: all its samples;
  with weights the epoch ends when the set the weights use up first has been read once, the
  others give a seeded, per-epoch different part), and the runs of all sets are permuted
  together (`stream_plan.mixed_runs`). Band sets must agree; stats are pooled
  (`STATS_POOLING`) and recorded under `normalization["mix"]` in checkpoints.
- Staged shards (`data.stage_dir`, `satfuse.data.reading.staging`): the shards are split once into one
  group per node (`stream_plan.node_groups`) and each group is planned as above for that node's
  ranks only (`stream_plan.epoch_slots`), so a node reads only its local copies, every epoch.
  On one node this is the plan above; the state records the group count, and a resume on
  another node count deals the epoch's leftovers to the nodes now holding their shards.
- A slot streams its samples through a shuffle buffer of `data.shuffle_buffer` raw samples
  (bytes only: samples are decoded when they leave the buffer) seeded by (seed, epoch, slot).
- Batches of `data.batch_size` are built in the worker; the rank interleaves its workers
  round robin. `steps_per_epoch` = min over ranks of the batches the rank can fill; every rank
  stops each epoch at exactly that many batches, so no rank waits at an epoch end.
- Samples not used in an epoch (with drop_last), per rank: the workers' incomplete last
  batches (<= workers x (batch_size - 1)) plus the batches cut to match the emptiest rank
  (<= workers x batch_size, since slot sizes differ by at most one sample); in all
  < world_size x workers x 2 x batch_size per epoch. The permutation changes each epoch, so
  they are different samples every epoch.
- Random crops (`data.crop`) and SimCLR views use an RNG seeded by (seed, epoch, key), so they
  do not depend on worker count or timing.
- DataLoader workers start once per `iter(loader)` and then follow the plan epoch after epoch
  on their own (a spawned worker costs seconds); every worker yields the same number of items
  per epoch (padding markers after its batches), so torch's strict round robin reproduces the
  plan's schedule. Labels are not read in pretraining. From local tars the shuffle buffer
  holds only member offsets (each worker indexes a shard's headers once and memory-maps it,
  `satfuse.data.reading.stream_io`), and only the crop's pixels are read, straight into the batch.
- With workers, batches are written into a small ring of reused shared-memory buffers per
  worker and handed to the trainer without a copy (`satfuse.data.reading.batch_ring`, which states the
  lifetime contract: a batch's buffer is reused only once nothing views it); on CUDA the
  buffers are page-locked in place, so `pin_memory` costs no copy either.

Resume (`state_dict` / `load_state_dict`)
- The state holds the epoch, the batches this rank consumed in it and, per worker, the cursor:
  how many samples the worker had pulled from its shuffle buffer when it built the last batch
  the trainer received. Prefetched batches are not counted, so they are produced again.
- Same world size, workers, batch size, buffer size, seed: exact. Each worker recomputes its
  shuffle order, skips `cursor` samples without decoding them (local tars: nothing is read
  but the shard's headers; wholly consumed shards are not opened), and the next batch is bitwise the one the
  uninterrupted run would have produced.
- Different world size (or workers/batch/buffer): the shuffle buffer's choices depend only on
  counts, so the new run recomputes exactly which samples every old slot had consumed (its
  first `cursor` outputs) without reading any data. The rest of the epoch - the samples that sat
  in the old shuffle buffers and everything not yet read - is cut into the new slots as above.
  No sample of the epoch is repeated; the samples skipped in that epoch are only those of the
  rule above applied to the remainder on the new world size: < new_world x new_workers x 2 x
  batch_size (tested for 2 -> 1, 2 -> 3 and 2 -> 3 -> 1 within one epoch). The next epoch is a
  normal one. Batch counts of the resumed epoch: `steps_this_epoch` (not steps_per_epoch).
  These bounds assume the shards hold what the manifest says (see decode errors).

Decode errors (`data.on_decode_error`)
- "fatal": the first undecodable sample (or truncated/unreadable tar) raises SatfuseError
  naming the shard and key.
- "skip": a warning naming shard and key, the `decode_errors` counter goes up, and the worker
  continues. A worker that runs out of samples before its quota (the plan was made from the
  manifest counts) tops up by re-reading its own slot in a new shuffle order (pass 1, 2, ...),
  so every rank still delivers `steps_per_epoch` batches: the topped-up samples are repeats
  within the epoch, at most as many as were skipped. A slot with no readable sample at all is
  a SatfuseError, never a hang.
"""


from __future__ import annotations

import logging
import os
from collections import deque
from collections.abc import Iterator
from typing import Any

import torch
from torch.utils.data import DataLoader

from satfuse.config import DataConfig
from satfuse.data.format.bands import manifest_bands
from satfuse.data.format.codecs import from_manifest
from satfuse.data.packing.normalize import BandStats
from satfuse.data.reading.batch_ring import RingConsumer, credit_queues, supported
from satfuse.data.reading.sample_transform import SampleTransform
from satfuse.data.reading.shard_sets import STATS_POOLING, ShardSet, patch_size
from satfuse.data.reading.staging import NodeLayout, node_layout, stage
from satfuse.data.reading.stream_plan import EpochPlan, make_plan
from satfuse.data.reading.stream_worker import StreamDataset, StreamSpec
from satfuse.utils import SatfuseError

log = logging.getLogger(__name__)

STATE_VERSION = 1
# Workers hand batches over through reused shared-memory buffers (batch_ring.py). False: a
# fresh shared-memory tensor per batch, the previous hand-off (kept for `satfuse bench loader`'s
# side-by-side rows).
BATCH_RING = True
RING_DEPTH = 3  # slots per worker to start with: the DataLoader's 2 prefetched batches + 1 in use


_NOTED: set[str] = set()  # shard sets already noted as read whole (once per process)


def note_whole_reads(shards: ShardSet) -> None:
    """One note per shard set packed without row blocks: read as before (each shard's sha256 on
    first open, whole members), so the crop-only read (`--compress zstd-blocks|blocks`) is off."""
    for part in shards.parts or [shards]:
        enc = from_manifest(part.manifest, part.spec)
        if not enc.blocked and part.spec not in _NOTED:
            _NOTED.add(part.spec)
            log.info("%s: packed without block checksums (--compress %s): crop-only reads are off, every shard is "
                     "read and sha256-checked whole on first open; re-shard with --compress zstd-blocks to read "
                     "only the crop's bytes", part.spec, enc.compress or "none")


class PretrainLoader:
    """Endless iterator of pretraining batches, epoch after epoch; see the module docstring."""

    def __init__(
        self, shards: ShardSet, cfg: DataConfig, *, rank: int, world_size: int, seed: int,
        method: str = "dual_simclr", simclr_input: str = "s2_rgb", drop_last: bool = True,
        pin_memory: bool = False, node: NodeLayout | None = None,
    ) -> None:
        self.shards, self.cfg = shards, cfg
        # data.stage_dir: each node reads only its own shards, from local copies (data/reading/staging.py)
        self.node = node_layout(cfg, rank, world_size, node)
        self.groups = self.node.nodes if self.node is not None else 1
        # batches in page-locked memory, so the trainer's non_blocking copy to a GPU overlaps
        # with compute (the trainer sets it when it trains on CUDA)
        self.pin_memory = pin_memory
        self.rank, self.world_size, self.seed = rank, world_size, seed
        self.method, self.drop_last = method, drop_last
        self.workers = max(1, cfg.num_workers)
        self._check(shards, cfg)
        note_whole_reads(shards)
        self.s1_stats = BandStats.from_manifest(shards.stats, "s1", cfg.s1_clip)
        self.s2_stats = BandStats.from_manifest(shards.stats, "s2", cfg.s2_clip)
        self.transform = SampleTransform(self.s1_stats, self.s2_stats, seed, cfg.crop, method, simclr_input)
        self.bands = manifest_bands(shards.manifest, shards.spec)  # the model's input channels follow these
        self.steps_per_epoch = self._plan(0, None).steps
        if self.steps_per_epoch == 0:
            raise SatfuseError(
                f"{shards.spec}: {shards.total} samples cannot fill one batch of {cfg.batch_size} per worker on "
                f"{world_size} ranks x {self.workers} workers; lower data.batch_size or data.num_workers"
            )
        self._epoch, self._step, self._base = 0, 0, None
        self._cursors, self._batches = [0] * self.workers, [0] * self.workers
        self._errors_before, self._errors_run = 0, [0] * self.workers
        if self.node is not None:  # last: a config error above is reported before a long copy
            self.shards = stage(shards, cfg.stage_dir, seed, self.node)

    def _check(self, shards: ShardSet, cfg: DataConfig) -> None:
        if not 0 <= self.rank < self.world_size:
            raise SatfuseError(f"rank {self.rank} is outside world size {self.world_size}")
        if cfg.batch_size < 1:
            raise SatfuseError(f"data.batch_size={cfg.batch_size}; it must be >= 1")
        if shards.mix is not None and cfg.crop > 0:  # the crop must fit the smallest patch of the mix
            for part in shards.parts:
                size = patch_size(part)
                if size is not None and cfg.crop > min(size):
                    raise SatfuseError(f"data.crop={cfg.crop} is larger than the {size[0]}x{size[1]} patches of "
                                       f"{part.spec} (one of the mixed data.shards); set data.crop <= {min(size)}")

    def _plan(self, epoch: int, base: dict | None) -> EpochPlan:
        return make_plan(
            self.shards.counts, self.seed, epoch, base, world_size=self.world_size, workers=self.workers,
            batch_size=self.cfg.batch_size, drop_last=self.drop_last, mix=self.shards.mix, groups=self.groups,
        )

    @property
    def normalization(self) -> dict:
        """Stored with checkpoints: how raw bands became model inputs."""
        out = {
            "s1": {**self.s1_stats.to_dict(), "bands": list(self.bands["s1"])},
            "s2": {**self.s2_stats.to_dict(), "bands": list(self.bands["s2"])},
            "crop": self.cfg.crop,
            "source": self.shards.spec,
        }
        if self.shards.mix is not None:
            out["mix"] = {
                "sets": [p.spec for p in self.shards.parts], "weights": list(self.shards.mix.weights),
                "samples_per_epoch": self.shards.mix.shares(self.shards.counts), "stats": STATS_POOLING,
                "stats_set_weights": self.shards.stats["s2"].get("set_weights"),
            }
        return out

    @property
    def decode_errors(self) -> int:
        """Samples skipped as undecodable so far (this run and the runs it resumed from)."""
        return self._errors_before + sum(self._errors_run)

    @property
    def epoch(self) -> int:
        return self._epoch

    @property
    def steps_this_epoch(self) -> int:
        """Batches of the current epoch (= steps_per_epoch except in an epoch resumed on a new world size)."""
        return self._plan(self._epoch, self._base).steps

    # -- iteration ---------------------------------------------------------------------------

    def __iter__(self) -> Iterator[dict[str, Any]]:
        """Batches from the current position on, forever. Each call starts workers afresh."""
        self._errors_before, self._errors_run = self.decode_errors, [0] * self.workers
        spec = StreamSpec(
            urls=self.shards.urls, counts=self.shards.counts, seed=self.seed, rank=self.rank,
            world_size=self.world_size, workers=self.workers, batch_size=self.cfg.batch_size,
            shuffle_buffer=self.cfg.shuffle_buffer, drop_last=self.drop_last, on_error=self.cfg.on_decode_error,
            transform=self.transform, epoch=self._epoch, base=self._base, cursors=list(self._cursors),
            batches=list(self._batches), mix=self.shards.mix, groups=self.groups,
        )
        ring = self._ring()
        if ring is not None:
            spec.credits, spec.main_pid = ring.credits, os.getpid()
        loader = DataLoader(StreamDataset(spec), batch_size=None, num_workers=self.cfg.num_workers,
                            pin_memory=self.pin_memory and ring is None)
        stream = iter(loader)
        ready: dict[int, deque] = {w: deque() for w in range(self.workers)}
        try:
            while True:
                schedule = self._plan(self._epoch, self._base).schedule(self.rank)
                for w in schedule[self._step :]:
                    while not ready[w]:
                        self._pull(stream, ready, ring)
                    yield self._deliver(ready[w].popleft(), w, len(schedule))
                if self._step >= len(schedule):
                    self._next_epoch()
        finally:  # normal close, an error or Ctrl-C: release waiting workers, then stop them
            if ring is not None:
                ring.close()
            del stream

    def _ring(self) -> RingConsumer | None:
        """The batch ring of this iterator's workers (None in-process or with BATCH_RING off)."""
        if self.cfg.num_workers <= 0 or not BATCH_RING:
            return None
        if not supported():
            log.warning("torch %s has no storage use count (torch._C._storage_Use_Count): workers hand "
                        "over each batch in a fresh shared-memory tensor instead of the batch ring", torch.__version__)
            return None
        pin = self.pin_memory and torch.cuda.is_available()  # a no-op on a machine without CUDA
        return RingConsumer(credit_queues(self.workers), RING_DEPTH, pin=pin)

    def _pull(self, stream: Iterator[dict[str, Any]], ready: dict[int, deque], ring: RingConsumer | None) -> None:
        if ring is not None:
            ring.ready_to_wait()
        batch = next(stream, None)
        if batch is None:
            raise SatfuseError(f"{self.shards.spec}: the loader's workers stopped early (rank {self.rank})")
        if "__error__" in batch:
            raise SatfuseError(batch["__error__"])
        w, _, _, errors = batch["_meta"]
        self._errors_run[w] = errors
        if "_ring" in batch:
            batch.update(ring.receive(w, batch.pop("_ring")))
        if not batch.get("_pad"):
            ready[w].append(batch)

    def _deliver(self, batch: dict[str, Any], w: int, steps: int) -> dict[str, Any]:
        _, epoch, cursor, errors = batch.pop("_meta")
        if epoch != self._epoch:
            raise SatfuseError(f"loader out of step: worker {w} sent epoch {epoch} during epoch {self._epoch}")
        self._cursors[w], self._errors_run[w] = cursor, errors
        self._batches[w] += 1
        self._step += 1
        batch["epoch"] = self._epoch
        if self._step == steps:
            self._next_epoch()
        return batch

    def _next_epoch(self) -> None:
        self._epoch, self._step, self._base = self._epoch + 1, 0, None
        self._cursors, self._batches = [0] * self.workers, [0] * self.workers

    # -- checkpoint state --------------------------------------------------------------------

    def state_dict(self) -> dict:
        """Where this rank is: small and JSON-able; save every rank's (see load_state_dict)."""
        return {
            "version": STATE_VERSION,
            "epoch": self._epoch,
            "step": self._step,
            "rank": self.rank,
            "world_size": self.world_size,
            "num_workers": self.workers,
            "batch_size": self.cfg.batch_size,
            "shuffle_buffer": self.cfg.shuffle_buffer,
            "drop_last": self.drop_last,
            "seed": self.seed,
            "cursors": list(self._cursors),
            "batches": list(self._batches),
            "samples_consumed": int(sum(self._cursors)),
            "decode_errors": self.decode_errors,
            "shards": self.shards.fingerprint(),
            "base": self._base,
            "groups": self.groups,
        }

    def load_state_dict(self, states: list[dict]) -> None:
        """Resume from the states of ALL ranks of the saving run, in rank order (then iter())."""
        first = self._validate(states)
        self._errors_before, self._errors_run = int(first.get("decode_errors", 0)), [0] * self.workers
        self._epoch = int(first["epoch"])
        same = (
            first["world_size"] == self.world_size and first["num_workers"] == self.workers
            and first["batch_size"] == self.cfg.batch_size and first["shuffle_buffer"] == self.cfg.shuffle_buffer
            and bool(first["drop_last"]) == self.drop_last and int(first.get("groups", 1)) == self.groups
        )
        if same:
            mine = states[self.rank]
            self._errors_before = int(mine.get("decode_errors", 0))
            self._step, self._base = int(mine["step"]), mine["base"]
            self._cursors, self._batches = list(mine["cursors"]), list(mine["batches"])
            return
        self._step, self._cursors, self._batches = 0, [0] * self.workers, [0] * self.workers
        if first["step"] == 0 and first["base"] is None:
            self._base = None
            return
        self._base = {
            "world_size": first["world_size"], "workers": first["num_workers"],
            "shuffle_buffer": first["shuffle_buffer"],
            "cursors": [int(c) for s in states for c in s["cursors"]], "base": first["base"],
            "groups": int(first.get("groups", 1)),
        }
        log.info("loader: resuming epoch %d (was %d ranks x %d workers, now %d x %d): %d batches left",
                 self._epoch, first["world_size"], first["num_workers"], self.world_size, self.workers,
                 self.steps_this_epoch)

    def _validate(self, states: list[dict]) -> dict:
        if not states or not isinstance(states, list):
            raise SatfuseError("loader state: empty; pass the list of every saving rank's state_dict()")
        first = states[0]
        if first.get("version") != STATE_VERSION:
            raise SatfuseError(f"loader state version {first.get('version')} is not {STATE_VERSION}; resume with the same satfuse")
        if len(states) != first["world_size"]:
            raise SatfuseError(f"loader state: got {len(states)} rank states for a world size of {first['world_size']}")
        if first["shards"] == self.shards.fingerprint(sha256s=False):
            # written before sha256s were in the fingerprint (names + counts; a state of this
            # satfuse never hashes to it): refusing it would strand every run checkpointed by
            # the previous satfuse (resume=auto) after an upgrade
            log.warning("loader state: this checkpoint predates shard sha256s in the loader state; shard names and "
                        "counts match %s, but whether the shards were re-packed since cannot be told", self.shards.spec)
        elif first["shards"] != self.shards.fingerprint():
            raise SatfuseError(f"loader state was written for another shard set than {self.shards.spec} (other shard "
                               "names, counts or sha256s: re-packed since?); resume with the same data.shards (or "
                               "checkpoint.resume=none)")
        if first["seed"] != self.seed:
            raise SatfuseError(f"loader state seed {first['seed']} != train.seed {self.seed}; resume with the same seed")
        for r, s in enumerate(states):
            if s["rank"] != r or s["epoch"] != first["epoch"] or s["step"] != first["step"]:
                raise SatfuseError(f"loader state of rank {r} is at epoch {s['epoch']} step {s['step']} (rank "
                                   f"{s['rank']}), rank 0 at {first['epoch']}/{first['step']}: inconsistent checkpoint")
        return first


"""Copy-free hand-off of batches from DataLoader workers to the trainer: a ring of reused
shared-memory buffers per worker, page-locked in place when the trainer runs on CUDA.

Why: a fresh shared-memory tensor per batch (torch's default hand-off) costs a new segment,
its page faults in the worker and again in the main process, and a file descriptor passed per
tensor - on a 2-core VM more than decoding the batch. Here every worker fills a few buffers
over and over; once both processes have touched a buffer, handing a batch over costs a slot
number through the DataLoader's queue and a few tensor views in the main process.

Protocol (one `RingFeed` per worker, one `RingConsumer` in the main process)
- Credits: the main process hands each worker slot numbers through the worker's queue
  (`credits`). A worker writes a batch only into a slot it holds a credit for. It allocates a
  slot's buffer - one shared-memory storage, the batch's tensors carved from it at 64-byte
  aligned offsets - the first time it uses the slot, or again when a batch needs more bytes
  than the slot holds, and then sends the storage along with the batch (torch passes its file
  descriptor); otherwise it sends only the slot number and the tensors' layout.
- Lifetime (the contract the trainer relies on): the trainer gets views of the slot's buffer
  and may keep them, or anything viewing them, as long as it likes (gradient accumulation
  holds several batches). A slot goes back to its worker only when no tensor or array outside
  the ring views its storage any more (the storage's use count is back to the ring's own) and,
  when pinned, once the CUDA work queued on the current stream by then has run, so a
  non-blocking copy from the batch has finished before the worker overwrites it. A consumer
  that holds more batches than a worker has slots makes the ring grow (a new slot number),
  never a deadlock and never an overwrite.
- Progress: before the main process waits for the next batch, every worker has at least one
  credit it has not returned a batch for (a batch in flight or a free slot), so whichever
  worker the DataLoader's round robin waits for can deliver.
- Pinned (CUDA present and asked for): the main process page-locks each slot's mapping in
  place (`cudaHostRegister`) when it first receives it and unregisters it when the iterator
  closes; without CUDA `pin` is refused, so the CPU path never touches the CUDA runtime.
- Shutdown: the storages are torch's `file_descriptor` shared memory (its default sharing
  strategy on Linux), whose /dev/shm name is unlinked as soon as it is created; a segment
  lives only as long as a process maps it, so nothing is left in /dev/shm after a normal end,
  a worker error, Ctrl-C or a killed main process (tested). `close()` sends each worker a stop
  marker, so a worker waiting for a credit returns at once; a worker whose main process is
  gone stops waiting within CREDIT_POLL_S.
"""

from __future__ import annotations

import contextlib
import logging
import os
import queue
from collections.abc import Callable
from typing import Any

import torch
import torch.multiprocessing as mp

log = logging.getLogger(__name__)

ALIGN = 64  # bytes: each tensor of a slot starts on a cache line
CREDIT_POLL_S = 1.0  # a worker waiting for a credit checks this often that the main process lives

Layout = tuple[tuple[str, str, tuple[int, ...], int], ...]  # (name, dtype, shape, byte offset)


def supported() -> bool:
    """Whether this torch exposes the storage use count the release check needs."""
    return hasattr(torch._C, "_storage_Use_Count")


def storage_users(storage: torch.UntypedStorage) -> int:
    """How many tensors (and the storage object itself) hold `storage`: torch counts every
    view, and numpy arrays made from a tensor hold that tensor. Private torch API, checked
    by the tests of this module."""
    return int(torch._C._storage_Use_Count(storage._cdata))


def layout_of(fields: dict[str, tuple[torch.dtype, tuple[int, ...]]]) -> tuple[Layout, int]:
    """Offsets of each field in one buffer, and the bytes it needs."""
    out, offset = [], 0
    for name, (dtype, shape) in fields.items():
        n = 1
        for d in shape:
            n *= int(d)
        out.append((name, str(dtype).removeprefix("torch."), tuple(int(d) for d in shape), offset))
        offset += -(-n * torch.empty((), dtype=dtype).element_size() // ALIGN) * ALIGN
    return tuple(out), offset


def views(storage: torch.UntypedStorage, layout: Layout) -> dict[str, torch.Tensor]:
    """The layout's tensors, as views of `storage` (no copy)."""
    out = {}
    for name, dtype_name, shape, offset in layout:
        dtype = getattr(torch, dtype_name)
        size = torch.empty((), dtype=dtype).element_size()
        out[name] = torch.empty(0, dtype=dtype).set_(storage, offset // size, shape)
    return out


class RingFeed:
    """A worker's side: waits for a credit, (re)allocates the slot's buffer when needed and
    returns where to write the batch."""

    def __init__(self, credits: Any, main_pid: int) -> None:
        self.credits, self.main_pid = credits, main_pid
        self.slots: dict[int, torch.UntypedStorage] = {}

    def take(self, fields: dict[str, tuple[torch.dtype, tuple[int, ...]]]) -> tuple[dict[str, torch.Tensor], dict] | None:
        """(tensors to fill, the message that tells the main process where they are), or None
        when the main process has stopped the ring."""
        slot = self._credit()
        if slot is None:
            return None
        layout, nbytes = layout_of(fields)
        storage, new = self.slots.get(slot), None
        if storage is None or storage.nbytes() < nbytes:
            storage = torch.empty(max(nbytes, 1), dtype=torch.uint8).share_memory_().untyped_storage()
            self.slots[slot] = new = storage
        return views(storage, layout), {"slot": slot, "storage": new, "layout": layout}

    def _credit(self) -> int | None:
        while True:
            try:
                return self.credits.get(timeout=CREDIT_POLL_S)
            except queue.Empty:
                if os.getppid() != self.main_pid:  # the main process is gone: nobody will read
                    return None


class RingConsumer:
    """The main process's side: turns slot messages into batch tensors, hands freed slots
    back to their workers and keeps every worker able to deliver (see the module docstring)."""

    def __init__(self, credits: list[Any], depth: int, pin: bool = False) -> None:
        if pin and not torch.cuda.is_available():
            raise ValueError("pinned batch buffers need CUDA; pass pin=False on a machine without it")
        self.credits, self.pin = credits, pin
        workers = len(credits)
        self.storages: list[dict[int, torch.UntypedStorage]] = [{} for _ in range(workers)]
        self.baseline: list[dict[int, int]] = [{} for _ in range(workers)]
        self.busy: list[set[int]] = [set() for _ in range(workers)]  # received, maybe still viewed
        self.draining: list[list[tuple[int, Any]]] = [[] for _ in range(workers)]  # freed, CUDA event pending
        self.outstanding = [0] * workers  # credits given minus batches received
        self.slots = [0] * workers  # slot numbers given out so far (the ring's size)
        self.pinned: list[int] = []  # data pointers registered with CUDA
        for w in range(workers):
            for _ in range(depth):
                self._grant(w, self._new_slot(w))

    def receive(self, w: int, msg: dict) -> dict[str, torch.Tensor]:
        """The batch's tensors from a worker's slot message."""
        slot = msg["slot"]
        if msg["storage"] is not None:
            self._register(w, slot, msg["storage"])
        self.outstanding[w] -= 1
        self.busy[w].add(slot)
        return views(self.storages[w][slot], msg["layout"])

    def ready_to_wait(self) -> None:
        """Call before waiting for a worker: recycle freed slots, then make sure every worker
        has a credit to deliver with (reclaiming a draining slot, or growing the ring)."""
        self.recycle()
        for w in range(len(self.credits)):
            if self.outstanding[w] > 0:
                continue
            if self.draining[w]:
                slot, event = self.draining[w].pop(0)
                event.synchronize()
                self._grant(w, slot)
                continue
            slot = self._new_slot(w)
            log.debug("batch ring of worker %d grows to %d slots (the consumer holds %d batches)",
                      w, self.slots[w], len(self.busy[w]))
            self._grant(w, slot)

    def recycle(self) -> None:
        """Give back every slot nobody views any more (after its CUDA work, when pinned)."""
        for w in range(len(self.credits)):
            for slot in sorted(self.busy[w]):
                if storage_users(self.storages[w][slot]) > self.baseline[w][slot]:
                    continue
                self.busy[w].discard(slot)
                if self.pin:
                    event = torch.cuda.Event()
                    event.record()  # after every copy the trainer queued from this batch
                    self.draining[w].append((slot, event))
                else:
                    self._grant(w, slot)
            while self.draining[w] and self.draining[w][0][1].query():
                self._grant(w, self.draining[w].pop(0)[0])

    def close(self) -> None:
        """Stop markers to the workers (one waiting for a credit returns at once); unpin."""
        for q in self.credits:
            with contextlib.suppress(OSError, ValueError):  # a queue already closed
                q.put(None)
                q.close()
                # a worker killed by Ctrl-C never reads it: the exit must not wait to flush it
                q.cancel_join_thread()
        if self.pinned:
            torch.cuda.current_stream().synchronize()  # copies queued from a batch still in use finish first
            cudart = torch.cuda.cudart()
            for ptr in self.pinned:
                cudart.cudaHostUnregister(ptr)
            self.pinned = []

    def _new_slot(self, w: int) -> int:
        self.slots[w] += 1
        return self.slots[w] - 1

    def _grant(self, w: int, slot: int) -> None:
        self.outstanding[w] += 1
        self.credits[w].put(slot)

    def _register(self, w: int, slot: int, storage: torch.UntypedStorage) -> None:
        old = self.storages[w].get(slot)
        if old is not None and self.pin:
            self._unpin(old)
        if self.pin:
            self._pin(storage)
        self.storages[w][slot] = storage
        self.baseline[w][slot] = storage_users(storage)

    def _pin(self, storage: torch.UntypedStorage) -> None:
        ptr = storage.data_ptr()
        err = torch.cuda.cudart().cudaHostRegister(ptr, storage.nbytes(), 0)
        if int(err) != 0:
            raise RuntimeError(f"cudaHostRegister of a {storage.nbytes()}-byte batch buffer failed ({err}); "
                               "raise the locked-memory limit (ulimit -l) or set data.num_workers=0")
        self.pinned.append(ptr)

    def _unpin(self, storage: torch.UntypedStorage) -> None:
        ptr = storage.data_ptr()
        if ptr in self.pinned:
            torch.cuda.cudart().cudaHostUnregister(ptr)
            self.pinned.remove(ptr)


def credit_queues(workers: int, context: Callable[[], Any] | None = None) -> list[Any]:
    """One credit queue per worker, from the multiprocessing context the DataLoader uses."""
    ctx = context() if context is not None else mp
    return [ctx.Queue() for _ in range(workers)]

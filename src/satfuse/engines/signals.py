"""Stop signals from SLURM (timeout, preemption) turned into one agreed decision per step.

Why a flag and not work in the handler: a signal can land in the middle of a collective or
a file write; the handler only records it (async-signal-safe), and the training loop asks
`should_stop()` at a step boundary, where every rank all-reduces the flag (MAX) so that all
ranks save the same step and exit together, even when SLURM signalled only one of them
(submitit #9: only global rank 0 gets `checkpoint()`).

The loop then exits with `REQUEUE_EXIT_CODE` (75, EX_TEMPFAIL) so a launcher can tell
"saved, requeue me" from a crash. SIGTERM is different: it is what `scancel` sends, and what
SLURM sends at the end of a time limit or preemption grace time (and then requeues a
preempted job itself). Following SLURM's and submitit's meaning, TERM means "save if there
is time and stop for good": the loop exits with `STOP_EXIT_CODE` (143, 128 + SIGTERM) and no
launcher requeues. If any rank saw TERM, every rank stops that way (cancel beats requeue).
A TERM also wins when it comes after the requeue signal (`scancel --signal=USR2 J; scancel J`,
or a site's preemption notice followed by a cancel): it replaces the recorded signal before the
agreement, turns the exit code into 143 when it lands during the save, and is remembered for
the whole process (`term_seen`) so the launcher does not requeue after the trainer returned.
The codes and the signal names live in the torch-free `satfuse.exit_codes`.
"""

from __future__ import annotations

import logging
import signal
import threading
from collections.abc import Iterable
from types import FrameType
from typing import Any

import torch.distributed as dist

from satfuse.distributed.collectives import agree_max
from satfuse.exit_codes import REQUEUE_EXIT_CODE, STOP_EXIT_CODE, STOP_SIGNALS

log = logging.getLogger(__name__)

DEFAULT_SIGNALS: tuple[str, ...] = tuple(f"SIG{name}" for name in STOP_SIGNALS)


def _to_signal(sig: str | int | signal.Signals) -> signal.Signals:
    if isinstance(sig, str):
        name = sig.upper()
        name = name if name.startswith("SIG") else f"SIG{name}"
        try:
            return signal.Signals[name]
        except KeyError as exc:
            raise ValueError(f"unknown signal {sig!r}; use e.g. SIGUSR1, USR2, SIGTERM") from exc
    return signal.Signals(sig)


def term_seen() -> bool:
    """Whether a `StopFlag` of this process caught SIGTERM at any time so far.

    Why process-wide: the trainer's handlers stay installed after it returns 75, while the
    launcher (`satfuse.launch.task`) tears down and requeues; a cancel landing there must win.
    """
    return StopFlag.term_seen


class StopFlag:
    """Records stop signals; `should_stop()` is the cross-rank agreement at a step boundary."""

    term_seen: bool = False  # class-wide on purpose: see `term_seen()`

    def __init__(self, signals: Iterable[str | int] | None = None) -> None:
        self.signals = [_to_signal(s) for s in (signals or DEFAULT_SIGNALS)]
        self.received: int | None = None  # signal number of the first stop signal seen
        self.terminate = False  # after should_stop(): some rank got SIGTERM (stop, do not requeue)
        self._previous: dict[signal.Signals, Any] = {}

    # The handler runs between bytecodes of the main thread: it must not log, allocate
    # tensors or touch the process group. Setting one attribute is safe.
    def _handler(self, signum: int, frame: FrameType | None) -> None:
        if signum == signal.SIGTERM:  # TERM replaces an earlier requeue signal: cancel wins
            StopFlag.term_seen = True
            self.received = signum
        elif self.received is None:
            self.received = signum

    def install(self) -> StopFlag:
        """Install the handlers (main thread only); previous handlers are kept for `uninstall`."""
        if threading.current_thread() is not threading.main_thread():
            raise RuntimeError("StopFlag.install() must be called from the main thread")
        for sig in self.signals:
            self._previous[sig] = signal.signal(sig, self._handler)
        return self

    def uninstall(self) -> None:
        """Give the signals back to whoever handled them before."""
        for sig, prev in self._previous.items():
            signal.signal(sig, prev)
        self._previous.clear()

    def __enter__(self) -> StopFlag:
        return self.install()

    def __exit__(self, *exc: object) -> None:
        self.uninstall()

    def set(self) -> None:
        """Ask for a stop from code (e.g. a submitit `checkpoint()` callback on rank 0)."""
        self.received = self.received or int(signal.SIGUSR1)

    @property
    def local(self) -> bool:
        """Whether this rank itself received a stop signal."""
        return self.received is not None

    @property
    def level(self) -> int:
        """This rank's stop level for the per-step agreement: 0 none, 1 requeue, 2 SIGTERM."""
        return 0 if not self.local else 2 if self.received == signal.SIGTERM else 1

    def agreed(self, level: int) -> bool:
        """Take the MAX of every rank's `level` (from the step's one reduction): True = stop."""
        self.terminate = level == 2
        if level:
            name = signal.Signals(self.received).name if self.received else "a peer rank"
            log.info("stop requested (%s): saving and exiting with %d", name, self.exit_code)
        return bool(level)

    def should_stop(self, group: dist.ProcessGroup | None = None) -> bool:
        """True on every rank if any rank got a stop signal. Collective: call on all ranks."""
        return self.agreed(agree_max([self.level], group)[0])

    @property
    def exit_code(self) -> int:
        """After a stop: 143 when TERM was agreed, or reached this rank since (during the save),
        so a cancel after the requeue decision still stops for good; else 75 (requeue me)."""
        return STOP_EXIT_CODE if self.terminate or self.level == 2 else REQUEUE_EXIT_CODE

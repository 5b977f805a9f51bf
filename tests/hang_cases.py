"""Tests that hang, run only by tests/test_suite_guards.py in a pytest of their own with a short
timeout (the file name has no `test_` prefix, so the suite does not collect it)."""

from __future__ import annotations

import signal
import threading
import time


def test_sleeps_past_its_timeout() -> None:
    threading.Thread(target=time.sleep, args=(30,), name="hang-case-helper", daemon=True).start()
    time.sleep(30)


def test_after_a_timeout_the_run_goes_on() -> None:
    pass


def test_blocks_where_sigalrm_cannot_reach() -> None:
    signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGALRM})  # as a thread stuck in C would be
    time.sleep(30)

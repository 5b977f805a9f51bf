"""Exit codes a satfuse training process ends with, for launchers (SLURM/submitit, `launch/`)
to tell "saved, requeue me" from "saved, stop for good" from a crash, and the signals the
trainer saves on. Torch-free, so the launcher side can import it without torch;
`satfuse.engines.signals` explains the meaning.
"""

REQUEUE_EXIT_CODE = 75  # EX_TEMPFAIL: a stop signal (preemption, time limit) was saved: requeue
STOP_EXIT_CODE = 143  # 128 + SIGTERM (scancel): saved, stop, do not requeue

# Every rank's trainer saves on these (`StopFlag`'s handlers); a cluster profile's `signal` must
# be one of them (not TERM: that is scancel), or a rank would die on it without a checkpoint.
STOP_SIGNALS: tuple[str, ...] = ("USR1", "USR2", "TERM", "HUP")

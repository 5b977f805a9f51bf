"""torchrun for `satfuse pretrain --nproc-per-node N`, returning the ranks' own exit status.

Plain torchrun turns any failing rank into exit status 1 and a `ChildFailedError` traceback.
satfuse's statuses mean something to the caller: 75 is "checkpoint saved after a stop signal,
requeue me" (a SLURM script or the user resumes), 2 is "bad input, see the one-line error".
So this runs torchrun's own `run()` in this process and maps its failures:

- every failed rank exited 75 -> 75 (torchrun stops the other ranks as soon as one exits, so
  ranks it stopped are not counted; they had already saved the checkpoint collectively);
- otherwise the first failing rank (exited before signalled, earliest, then lowest rank) that
  did not exit 75: its code
  (128 + N for a rank killed by signal N) and its one-line error, which each rank leaves in
  torchrun's per-rank error file (`record_rank_error`).

Usage is torchrun's: `python -m satfuse.engines.torchrun --standalone --nproc_per_node=2 -m ...`.
"""

from __future__ import annotations

import json
import logging
import sys
import time

from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
from torch.distributed.run import parse_args, run

from satfuse.distributed.launcher_env import torchelastic_error_file

log = logging.getLogger("satfuse")

REQUEUE = 75


def record_rank_error(message: str) -> None:
    """Leave this rank's one-line error where torchrun's agent reads it (no-op outside torchrun)."""
    path = torchelastic_error_file()
    if not path:
        return
    try:
        with open(path, "w") as fh:
            json.dump({"message": message, "timestamp": int(time.time())}, fh)
    except OSError:  # the error itself was already logged by the rank
        pass


def exit_status(failures: dict) -> tuple[int, str]:
    """(status, summary line) from torchrun's {rank: ProcessFailure} of a failed run."""
    codes = {rank: f.exitcode for rank, f in failures.items()}
    if all(c == REQUEUE for c in codes.values()):
        return REQUEUE, f"ranks {sorted(codes)} saved and exited {REQUEUE} (requeue me)"
    others = {r: f for r, f in failures.items() if f.exitcode != REQUEUE}
    # a rank that exited on its own beats one that torchrun's SIGTERM caught on its way out
    exited = {r: f for r, f in others.items() if f.exitcode > 0} or others
    rank, f = min(exited.items(), key=lambda kv: (kv[1].timestamp, kv[0]))
    code = f.exitcode if f.exitcode > 0 else 128 - f.exitcode
    msg = f.message.get("message", "") if isinstance(f.message, dict) else str(f.message)
    if not msg or msg.startswith("To enable traceback"):
        msg = "see its log above"
    return code, f"rank {rank} failed with exit status {code}: {msg}"


def main(argv: list[str] | None = None) -> int:
    try:
        run(parse_args(sys.argv[1:] if argv is None else argv))
    except ChildFailedError as exc:
        code, line = exit_status(exc.failures)
        logging.basicConfig(format="%(levelname)s %(message)s")
        (log.warning if code == REQUEUE else log.error)("%s", line)
        return code
    return 0


if __name__ == "__main__":
    sys.exit(main())

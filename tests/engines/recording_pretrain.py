"""`satfuse pretrain` with every rank's batch keys recorded, for tests that must see what each
rank trained on (the trainer logs no keys: a real run would not want them).

Run as `python -m tests.engines.recording_pretrain pretrain ...` (`start_ranks(entry=...)`);
each rank appends one JSON line per micro-batch, `{"epoch": E, "keys": [...]}`, to
`$RECORD_KEYS_DIR/rank<R>.jsonl`.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from typing import Any

from satfuse.cli import main
from satfuse.engines.trainer import Trainer

_train_step = Trainer.train_step


def _recording_step(self: Trainer, batch: dict[str, Any], metrics: bool = True) -> dict[str, Any]:
    """Append the batch's keys, then run the real step (opened per step: ranks end in os._exit)."""
    path = Path(os.environ["RECORD_KEYS_DIR"]) / f"rank{self.env.rank}.jsonl"
    with path.open("a") as f:
        f.write(json.dumps({"epoch": int(batch.get("epoch", -1)), "keys": list(batch["key"])}) + "\n")
    return _train_step(self, batch, metrics)


if __name__ == "__main__":
    Trainer.train_step = _recording_step  # type: ignore[method-assign]
    sys.exit(main())

"""Capture and restore every random number generator a training step touches.

Why: exact resume means the step after a restart draws the same dropout masks, crops and
shuffles as the uninterrupted run would have. Python's `random`, NumPy's global generator
and torch's CPU (and CUDA) generators are all captured, per rank.

The captured dict holds only ints, lists, strings and tensors, so it round-trips through
`torch.load(..., weights_only=True)` (no pickled NumPy arrays).
"""

from __future__ import annotations

import random
from typing import Any

import numpy as np
import torch

from satfuse.utils import SatfuseError

RNG_FORMAT = 1


def capture_rng() -> dict[str, Any]:
    """Snapshot of python, numpy, torch CPU and (when present) CUDA generator states."""
    version, internal, gauss = random.getstate()
    np_state = np.random.get_state(legacy=False)
    state: dict[str, Any] = {
        "format": RNG_FORMAT,
        "python": {"version": version, "internal": list(internal), "gauss": gauss},
        "numpy": {
            "bit_generator": np_state["bit_generator"],
            "key": torch.from_numpy(np.asarray(np_state["state"]["key"], dtype=np.int64)),
            "pos": int(np_state["state"]["pos"]),
            "has_gauss": int(np_state["has_gauss"]),
            "gauss": float(np_state["gauss"]),
        },
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng(state: dict[str, Any]) -> None:
    """Put every generator back exactly where `capture_rng` found it."""
    if not isinstance(state, dict) or state.get("format") != RNG_FORMAT:
        raise SatfuseError(
            "RNG state in the checkpoint has an unknown format; it was written by another "
            "satfuse version: resume with the version that wrote it or start a new run_dir"
        )
    py = state["python"]
    random.setstate((py["version"], tuple(py["internal"]), py["gauss"]))
    npd = state["numpy"]
    np.random.set_state(
        {
            "bit_generator": npd["bit_generator"],
            "state": {"key": npd["key"].numpy().astype(np.uint32), "pos": npd["pos"]},
            "has_gauss": npd["has_gauss"],
            "gauss": npd["gauss"],
        }
    )
    torch.set_rng_state(state["torch"])
    cuda = state.get("cuda")
    if cuda is not None and torch.cuda.is_available():
        if len(cuda) != torch.cuda.device_count():
            raise SatfuseError(
                f"checkpoint RNG has {len(cuda)} CUDA generators but this process sees "
                f"{torch.cuda.device_count()} GPUs: resume with the same GPUs per process"
            )
        torch.cuda.set_rng_state_all(cuda)

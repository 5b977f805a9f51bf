"""Shared pieces of every benchmark: the machine description and the JSON writer.

Every figure a benchmark reports is measured in the same run as its reference, and the
ratio is what a reader should compare: these machines are shared and noisy.
"""

from __future__ import annotations

import json
import os
import platform
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from satfuse.utils import atomic_write_text


def machine_info() -> dict[str, Any]:
    import torch  # lazy: --help stays fast

    cuda = torch.cuda.is_available()
    return {
        "cores": os.cpu_count(),
        "affinity_cores": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None,
        "python": platform.python_version(),
        "torch": torch.__version__,
        "device": torch.cuda.get_device_name(0) if cuda else "cpu",
        "platform": platform.platform(),
        "date": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }


def paper_scale(backbone: str) -> bool:
    """True for a registered backbone as wide as the authors' ResNet-50 (2048 features): the
    benchmarks give it the authors' 2048-2048-128 head and its own (smaller) batch; narrower
    trunks get small heads so a CPU row stays quick."""
    from satfuse.models.backbones import backbone_class  # lazy: `satfuse --help` stays torch-free

    return backbone_class(backbone).feature_dim >= 2048


def timed(fn: Callable[[], Any], repeats: int = 1) -> tuple[float, Any]:
    """Best-of-`repeats` wall time of fn() in seconds, and its last result."""
    best, out = float("inf"), None
    for _ in range(repeats):
        t0 = time.perf_counter()
        out = fn()
        best = min(best, time.perf_counter() - t0)
    return best, out


def write_result(result: dict[str, Any], out: str | Path | None) -> None:
    """Attach the machine, then write JSON atomically (if `out`) and log it."""
    result = {"machine": machine_info(), **result}
    text = json.dumps(result, indent=2, sort_keys=False)
    if out:
        atomic_write_text(Path(out), text + "\n")
    print(text)

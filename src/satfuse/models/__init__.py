"""satfuse.models: backbones, projection heads and the pretraining methods.

The names below are imported on first use (PEP 562 `__getattr__`), not with the package: the
torch-free `models/catalog.py` (the built-in names, for config checks on a login node) lives in
this package, and importing it must not import torch.
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "build_backbone": "satfuse.models.backbones",
    "DenseProjectionHead": "satfuse.models.heads",
    "ProjectionHead": "satfuse.models.heads",
    **dict.fromkeys(("MMA", "SIMCLR_CHANNELS", "DualSimCLR", "PretrainModel", "SimCLR",
                     "build_pretrain_model", "method_class", "method_title"), "satfuse.models.methods"),
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'satfuse.models' has no attribute {name!r}")

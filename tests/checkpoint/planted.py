"""A crafted checkpoint file: an object whose unpickling creates a marker file."""

from __future__ import annotations

import json
import zlib
from pathlib import Path

from satfuse.checkpoint.layout import META_NAME


class Planted:
    """Unpickling this creates `marker` (what a crafted checkpoint would do, harmlessly)."""

    def __init__(self, marker: Path) -> None:
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


def rerecord(ckpt: Path, name: str) -> None:
    """Update meta.json's size + crc32 of `name`: the crafted file passes verification, as a
    file crafted by whoever wrote the checkpoint would."""
    meta = json.loads((ckpt / META_NAME).read_text())
    data = (ckpt / name).read_bytes()
    meta["files"][name] = {"size": len(data), "crc32": f"{zlib.crc32(data) & 0xFFFFFFFF:08x}"}
    (ckpt / META_NAME).write_text(json.dumps(meta))

"""What a per-band dataset scan returns (SSL4EO-S12, BigEarthNet v1/v2, any `PER_BAND` entry of
`satfuse.data.sources.dataset`): the scanners fill it, `multiband` packs it. A module of its own so the scanners and the writer do not import each other."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from satfuse.data.sources.layout import Excluded


@dataclass
class BandSample:
    """One S1/S2 pair stored as per-band files: (canonical band name, file) in output order."""

    key: str
    s1: list[tuple[str, Path]]
    s2: list[tuple[str, Path]]
    meta: dict[str, Any] = field(default_factory=dict)  # dataset fields for the sample JSON

    @property
    def files(self) -> list[Path]:
        return [p for _, p in self.s1] + [p for _, p in self.s2]


@dataclass
class BandScan:
    """What a per-band dataset scan found."""

    dataset: str
    samples: list[BandSample]
    excluded: list[Excluded]
    ignored: list[dict[str, str]]  # {"path", "reason"}: files/folders not used
    bands: dict[str, list[str]]
    extras: dict[str, Any] = field(default_factory=dict)  # manifest fields of the dataset


def canonical_band(name: str) -> str:
    """`B01` -> `B1`, `B8A` -> `B8A`, `vv` -> `VV`: one spelling across datasets."""
    up = name.upper()
    return f"B{int(up[1:])}" if up.startswith("B") and up[1:].isdigit() else up

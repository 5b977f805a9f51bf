"""The dataset contract: what `satfuse shard` and `satfuse synth` need from a source dataset.

A dataset is one `SourceDataset` subclass plus one registration in `satfuse.registry.DATASETS`
(the built-ins in `satfuse.data.sources.catalog`; anyone else's in a plugin module named by
`SATFUSE_PLUGINS`). `satfuse shard --dataset NAME` looks the entry up, lets it refuse the flags
it does not use, asks it to scan `--src` in its published layout, and hands the scan to the
packer of its layout kind:

- `PAIRED` (SEN12MS, DFC2020, a pair list): one GeoTIFF per sensor and patch, S1/S2 (and the
  label) on one shared grid; the scan returns a `layout.ScanResult` of `layout.Pair`s and
  `shard_writer` packs S1 as 2 float32 bands, S2 as 13 uint16 bands (`layout.EXPECTED_BANDS`),
  the label layer named by `ScanResult.label` and the `ScanResult.aux` layers beside them.
- `PER_BAND` (SSL4EO-S12, BigEarthNet): one GeoTIFF per band at its native resolution; the scan
  returns a `band_scan.BandScan` whose `bands` name the S1/S2 bands in output order (any
  count), and `multiband` resamples them onto the reference 10 m grid.

Why a class with a kind and not one packer per dataset: the shard format, the plan, resume,
job arrays and the exact statistics are the same for every dataset; what differs is how a
published tree is read into pairs, which is exactly what an entry provides.
"""

from __future__ import annotations

import argparse
import json
from dataclasses import dataclass, fields
from pathlib import Path
from typing import ClassVar

from satfuse.data.sources.band_scan import BandScan
from satfuse.data.sources.layout import ScanResult
from satfuse.diskspace import writable_output
from satfuse.registry import DATASETS
from satfuse.utils import SatfuseError

PAIRED = "paired"  # per-sensor GeoTIFFs on one grid -> shard_writer
PER_BAND = "per-band"  # per-band GeoTIFFs at native resolutions -> multiband
KINDS = (PAIRED, PER_BAND)


@dataclass(frozen=True)
class ScanOptions:
    """The `satfuse shard` flags a scan may read (None = not given).

    Every field is one flag (`FLAGS`); a dataset lists the ones it reads in `SourceDataset.uses`
    and `check_options` refuses the rest, so a flag is never silently ignored.
    """

    split_file: Path | None = None  # --split-file: only the listed patches
    exclude_scenes: Path | None = None  # --exclude-scenes: a scene list to leave out
    pairs_file: Path | None = None  # --pairs-file: a CSV of s1,s2[,label] paths
    split: str | None = None  # --split: a named split of the dataset (train|val|test)
    s2_level: str | None = None  # --s2-level: which S2 product (l1c|l2a)
    max_gap_days: float | None = None  # --max-gap-days: largest S1/S2 date gap of a pair

    def given(self) -> list[str]:
        """The fields that were given, in declaration order."""
        return [f.name for f in fields(self) if getattr(self, f.name) is not None]


FLAGS = {f.name: "--" + f.name.replace("_", "-") for f in fields(ScanOptions)}


class SourceDataset:
    """One source dataset `satfuse shard` can pack (and, when it has one, its `satfuse synth` verb).

    Subclass, set the class attributes, implement `scan`, and register one instance under its
    `name`: `DATASETS.register(MyData.name, MyData())`.
    """

    name: ClassVar[str]
    """The `--dataset` value; recorded as `dataset` in the manifest and in every sample's JSON."""

    kind: ClassVar[str]
    """The layout kind, `PAIRED` or `PER_BAND`: which packer turns the scan into shards (module doc)."""

    uses: ClassVar[frozenset[str]] = frozenset()
    """The `ScanOptions` fields (shard flags) this dataset reads; any other given flag is refused."""

    colocation_tol_m: ClassVar[float] = 10.0
    """`PER_BAND` only: the default S1/S2 footprint tolerance in metres, as the dataset's
    co-registration is published (`--colocation-tol-m` overrides it; recorded in the manifest)."""

    def check_options(self, options: ScanOptions) -> None:
        """Refuse the given flags this dataset does not use, before anything is written.

        The default names each unused flag and the datasets that do read it; an entry may first
        raise a more specific message (e.g. `pairs` needs `--pairs-file`).
        """
        unused = [f for f in options.given() if f not in self.uses]
        if unused:
            flags = ", ".join(FLAGS[f] for f in unused)
            users = sorted({d.name for _, d in DATASETS.items() if set(unused) & d.uses})
            hint = f" (read by --dataset {', '.join(users)})" if users else ""
            raise SatfuseError(f"{flags}: not used by --dataset {self.name}{hint}; drop it")

    def scan(self, root: Path, options: ScanOptions) -> ScanResult | BandScan:
        """Read `root` in the dataset's published layout into pairs, by names (and side files) only.

        Returns a `ScanResult` (`PAIRED`) or a `BandScan` (`PER_BAND`) with the pairs sorted,
        every pair it could not form as `excluded` and every file or folder it did not use as
        `ignored`, each with a reason a user can act on; nothing under `root` is dropped without
        a word. The band files' pixels are read later by the packer.
        """
        raise NotImplementedError(f"dataset {self.name!r} does not implement scan()")

    def add_synth(self, verbs: argparse._SubParsersAction) -> argparse.ArgumentParser | None:
        """Add this dataset's `satfuse synth` verb with its own options and return it, or None when
        it has no synthetic generator. `add_synth_parser` adds the options every verb shares."""
        return None

    def synth(self, args: argparse.Namespace) -> int:
        """Write the synthetic tree `args` describes into `args.out` (the published layout, so
        `scan` reads it as a real download); return the number of pairs written."""
        raise NotImplementedError(f"dataset {self.name!r} has no synthetic generator")


def add_synth_parser(verbs: argparse._SubParsersAction, dataset: SourceDataset, verb: str, help_text: str) -> argparse.ArgumentParser:
    """A `satfuse synth VERB` parser with the shared options (--out, --seed, --overwrite) that
    runs `dataset.synth`; the dataset adds its own options to the returned parser."""
    parser = verbs.add_parser(verb, help=help_text)
    parser.add_argument("--out", type=Path, required=True, help="dataset root to write")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--overwrite", action="store_true", help="replace an existing dataset in --out")
    parser.set_defaults(func=lambda args: _run_synth(dataset, args))
    return parser


def _run_synth(dataset: SourceDataset, args: argparse.Namespace) -> int:
    with writable_output(args.out):
        n = dataset.synth(args)
    print(json.dumps({"dataset": args.synth_dataset, "out": str(args.out), "pairs": n}))
    return 0


def dataset_entry(name: str) -> SourceDataset:
    """The registered dataset `name` (an unknown one is a one-line error listing the choices)."""
    entry = DATASETS.get(name)
    if not isinstance(entry, SourceDataset) or entry.kind not in KINDS:
        raise SatfuseError(f"dataset {name!r} ({type(entry).__module__}) is not a SourceDataset of kind "
                           f"{' or '.join(KINDS)}; subclass satfuse.data.sources.dataset.SourceDataset")
    return entry


def names_of_kind(kind: str) -> list[str]:
    """The registered datasets of one layout kind, in registration order (for flag help and errors)."""
    return [n for n in DATASETS.in_order() if dataset_entry(n).kind == kind]

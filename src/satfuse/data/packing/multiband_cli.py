"""The `satfuse shard` options of the per-band datasets (`PER_BAND` entries of
`satfuse.data.sources.dataset`: resampling, co-location tolerance and their scan flags), kept here so
`commands.py` changes by a line. Their `satfuse synth` verbs are the entries' own (`catalog`)."""

from __future__ import annotations

import argparse
from typing import Any

from satfuse.data.packing.resample import DEFAULT_METHOD, METHODS
from satfuse.data.sources.dataset import PER_BAND, dataset_entry, names_of_kind
from satfuse.utils import SatfuseError


def add_shard_options(shard: argparse.ArgumentParser) -> None:
    """Options of `satfuse shard` for the per-band datasets (ssl4eo-s12, bigearthnet, ...)."""
    per_band = names_of_kind(PER_BAND)
    g = shard.add_argument_group(f"per-band datasets ({', '.join(per_band)})")
    g.add_argument("--resample", choices=list(METHODS), default=None, help=f"how 20/60 m bands (and S1) are resampled onto the 10 m grid (default {DEFAULT_METHOD}; recorded in the manifest)")
    g.add_argument("--s2-level", choices=["l1c", "l2a"], default=None, help="SSL4EO-S12: pack s2c (L1C, 13 bands; default) or s2a (L2A, 12 bands)")
    g.add_argument("--split", default=None, help="BigEarthNet: train|val|test (v1: bigearthnet-SPLIT.csv in --src; v2: the parquet's split column)")
    defaults = ", ".join(f"{d} {dataset_entry(d).colocation_tol_m:g} m" for d in per_band)
    g.add_argument("--colocation-tol-m", type=float, default=None,
                   help=f"footprint tolerance in metres, plus half the band's pixel; default per dataset as published: {defaults} "
                        "(SSL4EO-S12's S1 and S2 are separate exports a few 10 m pixels apart); each sample's offset is recorded")
    g.add_argument("--max-gap-days", type=float, default=None, help="SSL4EO-S12: largest S1/S2 date gap of a pair (default 30)")


BAND_OPTIONS = {"resample": "resample", "s2_level": "s2_level", "split": "split", "colocation_tol_m": "tol_m", "max_gap_days": "max_gap_days"}
PACKER_OPTIONS = ("resample", "colocation_tol_m")  # read by the per-band packer; the rest by the dataset's scan


def band_options(args: argparse.Namespace, band_dataset: bool) -> dict[str, Any]:
    """The per-band options given, as keyword arguments of `shard_dataset`; refuses the packer's
    (--resample, --colocation-tol-m) for other datasets (an option that would do nothing is an
    error, not a silent no-op); the scan flags are checked by the dataset entry itself."""
    given = {dest: getattr(args, flag) for flag, dest in BAND_OPTIONS.items() if getattr(args, flag, None) is not None}
    packer = [f for f in PACKER_OPTIONS if getattr(args, f, None) is not None]
    if packer and not band_dataset:
        flags = ", ".join("--" + f.replace("_", "-") for f in packer)
        raise SatfuseError(f"satfuse shard: {flags} only apply to --dataset {'|'.join(names_of_kind(PER_BAND))}; drop them")
    return given

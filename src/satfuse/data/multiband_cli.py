"""CLI pieces of the per-band datasets: `satfuse synth ssl4eo-s12|bigearthnet` and the
`satfuse shard` options that only they use (kept here so `commands.py` changes by a line)."""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

from satfuse.data.packing.resample import DEFAULT_METHOD, DEFAULT_TOL_M, METHODS
from satfuse.utils import SatfuseError


def register_synth(verbs: argparse._SubParsersAction) -> None:
    """Add `synth ssl4eo-s12` and `synth bigearthnet [--version 1|2]`."""
    ssl = verbs.add_parser("ssl4eo-s12", help="SSL4EO-S12 v1: s1/s2c/s2a per-band GeoTIFFs, 4 timestamps per location")
    ssl.add_argument("--locations", type=int, default=4, help="number of locations (4 timestamps each)")
    ssl.add_argument("--size", type=int, default=264, help="10 m patch size in pixels, a multiple of 6 (real data: 264)")
    ben = verbs.add_parser("bigearthnet", help="BigEarthNet-MM v1.0 or v2.0 (reBEN): per-band GeoTIFFs and side files")
    ben.add_argument("--version", type=int, choices=[1, 2], default=1, help="1 = BigEarthNet-MM v1.0, 2 = reBEN")
    ben.add_argument("--patches", type=int, default=12, help="number of S1/S2 pairs")
    ben.add_argument("--size", type=int, default=120, help="10 m patch size in pixels, a multiple of 6 (real data: 120)")
    for p in (ssl, ben):
        p.add_argument("--out", type=Path, required=True, help="dataset root to write")
        p.add_argument("--seed", type=int, default=0)
        p.add_argument("--overwrite", action="store_true", help="replace an existing dataset in --out")
        p.set_defaults(func=_cmd_synth)


def _cmd_synth(args: argparse.Namespace) -> int:
    from satfuse.data.sources import synth_multiband
    from satfuse.diskspace import writable_output

    with writable_output(args.out):
        if args.synth_dataset == "ssl4eo-s12":
            n = synth_multiband.write_ssl4eo(args.out, args.locations, args.seed, args.size, overwrite=args.overwrite)
        else:
            n = synth_multiband.write_bigearthnet(args.out, args.version, args.patches, args.seed, args.size, overwrite=args.overwrite)
    print(json.dumps({"dataset": args.synth_dataset, "out": str(args.out), "pairs": n}))
    return 0


def add_shard_options(shard: argparse.ArgumentParser) -> None:
    """Options of `satfuse shard` for ssl4eo-s12 / bigearthnet / bigearthnet-v2."""
    g = shard.add_argument_group("per-band datasets (ssl4eo-s12, bigearthnet, bigearthnet-v2)")
    g.add_argument("--resample", choices=list(METHODS), default=None, help=f"how 20/60 m bands (and S1) are resampled onto the 10 m grid (default {DEFAULT_METHOD}; recorded in the manifest)")
    g.add_argument("--s2-level", choices=["l1c", "l2a"], default=None, help="SSL4EO-S12: pack s2c (L1C, 13 bands; default) or s2a (L2A, 12 bands)")
    g.add_argument("--split", default=None, help="BigEarthNet: train|val|test (v1: bigearthnet-SPLIT.csv in --src; v2: the parquet's split column)")
    defaults = ", ".join(f"{d} {m:g} m" for d, m in DEFAULT_TOL_M.items())
    g.add_argument("--colocation-tol-m", type=float, default=None,
                   help=f"footprint tolerance in metres, plus half the band's pixel; default per dataset as published: {defaults} "
                        "(SSL4EO-S12's S1 and S2 are separate exports a few 10 m pixels apart); each sample's offset is recorded")
    g.add_argument("--max-gap-days", type=float, default=None, help="SSL4EO-S12: largest S1/S2 date gap of a pair (default 30)")


BAND_OPTIONS = {"resample": "resample", "s2_level": "s2_level", "split": "split", "colocation_tol_m": "tol_m", "max_gap_days": "max_gap_days"}


def band_options(args: argparse.Namespace, band_dataset: bool) -> dict[str, Any]:
    """The per-band options given, as keyword arguments of `shard_bands`; refuses them for
    other datasets (an option that would do nothing is an error, not a silent no-op)."""
    given = {dest: getattr(args, flag) for flag, dest in BAND_OPTIONS.items() if getattr(args, flag, None) is not None}
    if given and not band_dataset:
        flags = ", ".join("--" + f.replace("_", "-") for f in BAND_OPTIONS if getattr(args, f, None) is not None)
        raise SatfuseError(f"satfuse shard: {flags} only apply to --dataset ssl4eo-s12|bigearthnet|bigearthnet-v2; drop them")
    return given

"""CLI of the data layer: `satfuse synth ...`, `satfuse shard ...`, `satfuse shard verify|merge`.

`shard` packs by default and takes `verify DIR` / `merge DIR` as optional sub-verbs, so both
`satfuse shard --src data --dataset sen12ms --out shards/x` and `satfuse shard verify
shards/x` read naturally.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path

from satfuse.data.packing import multiband_cli
from satfuse.data.sources.dataset import PER_BAND, dataset_entry
from satfuse.distributed.launcher_env import slurm_array_defaults
from satfuse.registry import DATASETS
from satfuse.utils import SatfuseError

log = logging.getLogger(__name__)


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add `synth` and `shard` (with `verify`/`merge`) to the satfuse command."""
    _register_synth(subparsers)
    _register_shard(subparsers)


def _register_synth(subparsers: argparse._SubParsersAction) -> None:
    synth = subparsers.add_parser("synth", help="write synthetic SEN12MS / DFC2020 GeoTIFFs in the real layout")
    verbs = synth.add_subparsers(dest="synth_dataset", metavar="DATASET", required=True)
    for name in DATASETS.in_order():  # each dataset entry adds its own verb (if it has a generator)
        dataset_entry(name).add_synth(verbs)


def _register_shard(subparsers: argparse._SubParsersAction) -> None:
    shard = subparsers.add_parser(
        "shard",
        help="pack GeoTIFF pairs into WebDataset shards (also: shard verify DIR, shard merge DIR)",
        description="Pack co-located S1/S2 pairs into WebDataset shards; see shards/FORMAT.md.",
    )
    shard.add_argument("--src", type=Path, help="dataset root in its published layout (README: Datasets); for pairs: what --pairs-file paths are relative to")
    shard.add_argument("--dataset", choices=DATASETS.in_order(), help="the source's published layout (satfuse.registry.DATASETS)")
    shard.add_argument("--out", type=Path, help="output directory shards/NAME (NAME names the tars)")
    shard.add_argument("--maxcount", type=int, default=1000, help="samples per shard")
    shard.add_argument("--maxsize", type=int, default=None, help="bytes per shard (turned into a per-shard count)")
    shard.add_argument("--workers", type=int, default=1, help="worker processes (one shard per task)")
    shard.add_argument("--seed", type=int, default=0, help="seed of the pair permutation")
    shard.add_argument("--split-file", type=Path, default=None,
                       help="only the listed patches: *_observations.csv (with or without header), SEN12MS *_list.txt or *_list.pkl")
    shard.add_argument("--exclude-scenes", type=Path, default=None, help="scene list to leave out (SEN12MS_holdOutScenes.txt: ROIs1158_spring/s1_63 per line)")
    shard.add_argument("--strict-split", action="store_true", help="fail when a --split-file entry has no files under --src (default: list them)")
    shard.add_argument("--pairs-file", type=Path, default=None, help="--dataset pairs: CSV with columns s1,s2[,label], paths relative to --src")
    shard.add_argument("--shard-index", type=int, default=None, help="job-array part (default: SLURM_ARRAY_TASK_ID - MIN)")
    shard.add_argument("--num-shards", type=int, default=None, help="number of job-array parts (default: SLURM_ARRAY_TASK_COUNT)")
    shard.add_argument("--overwrite", action="store_true", help="replace a non-empty output that is not a shard dir")
    shard.add_argument("--labels", type=Path, default=None, help="--dataset sen12ms: labels/IGBP_probability_labels.pkl; each patch's 17 IGBP fractions go into its JSON (scene classification: finetune --benchmark sen12ms-igbp)")
    shard.add_argument("--exclude-bad", action="store_true", help="list corrupt/NaN/wrong-band files as excluded instead of failing")
    enc = shard.add_argument_group("encoding (bytes per pair; recorded in the manifest, read by every loader as is)")
    enc.add_argument("--compress", choices=["zstd", "lz4", "zstd-blocks", "blocks"], default=None,
                     help="lossless compression of the .npy members (s1.npy.zst / .lz4; zstd-blocks / blocks: checksummed row blocks that a crop reads alone, .zsb / .blk); shards/FORMAT.md has the webdataset decoder")
    enc.add_argument("--compress-level", type=int, default=None, help="codec level (zstd 1..22, default 3; lz4 0..16, default 0)")
    enc.add_argument("--s1-dtype", choices=["float32", "float16"], default=None,
                     help="store S1 dB as float16 (lossy: the manifest records the largest error in dB); default float32")
    enc.add_argument("--no-labels", action="store_true", help="leave out label members (lc/dfc/label): pretraining-only shards")
    multiband_cli.add_shard_options(shard)
    shard.set_defaults(func=_cmd_shard)
    verbs = shard.add_subparsers(dest="shard_verb", metavar="{verify,merge}")
    verify = verbs.add_parser("verify", help="re-read every shard: counts, checksums, arrays")
    verify.add_argument("dir", type=Path)
    verify.set_defaults(func=_cmd_verify)
    merge = verbs.add_parser("merge", help="join the part manifests of a job-array run")
    merge.add_argument("dir", type=Path)
    merge.set_defaults(func=_cmd_merge)



def _cmd_shard(args: argparse.Namespace) -> int:
    from satfuse.data.format.codecs import make_encoding  # lazy: --help stays fast
    from satfuse.data.format.manifest import MANIFEST_NAME, summary  # lazy: --help stays fast
    from satfuse.data.packing.shard_plan import quiet_gdal  # lazy: --help stays fast
    from satfuse.data.packing.shard_writer import shard_dataset  # lazy: --help stays fast
    from satfuse.diskspace import writable_output  # lazy: --help stays fast

    missing = [f"--{n}" for n in ("src", "dataset", "out") if getattr(args, n) is None]
    if missing:
        raise SatfuseError(f"satfuse shard needs {', '.join(missing)} (or use `satfuse shard verify DIR` / `satfuse shard merge DIR`)")
    quiet_gdal()
    index, num = args.shard_index, args.num_shards
    if index is None and num is None:
        index, num = slurm_array_defaults()
    with writable_output(args.out):
        result = shard_dataset(
            args.src, args.dataset, args.out, maxcount=args.maxcount, maxsize=args.maxsize,
            workers=args.workers, seed=args.seed, split_file=args.split_file, shard_index=index,
            num_shards=num, overwrite=args.overwrite, exclude_bad=args.exclude_bad,
            command=["satfuse", *sys.argv[1:]], exclude_scenes=args.exclude_scenes,
            pairs_file=args.pairs_file, strict_split=args.strict_split, igbp_labels=args.labels,
            encoding=make_encoding(args.compress, args.compress_level, args.s1_dtype, args.no_labels),
            **multiband_cli.band_options(args, dataset_entry(args.dataset).kind == PER_BAND),
        )  # fmt: skip
    if "records" in result:  # a job-array part
        n = sum(r["count"] for r in result["records"])
        log.info("part %d of %d: packed %d pairs into %d shards; run `satfuse shard merge %s` after the last part", result["part"], result["num_parts"], n, len(result["records"]), args.out)
        return 0
    log.info("%s -> %s", summary(result), args.out / MANIFEST_NAME)
    return 0


def _cmd_verify(args: argparse.Namespace) -> int:
    from satfuse.data.format.manifest import load_dir  # lazy: --help stays fast
    from satfuse.data.format.verify import verify  # lazy: --help stays fast

    problems = verify(args.dir)
    for p in problems:
        log.error("%s", p)
    if problems:
        log.error("%s: %d problem(s) found", args.dir, len(problems))
        return 1
    manifest = load_dir(args.dir)
    print(json.dumps({"dir": str(args.dir), "ok": True, "shards": len(manifest["shards"]), "samples": manifest["total_samples"]}))
    return 0


def _cmd_merge(args: argparse.Namespace) -> int:
    from satfuse.data.format.manifest import MANIFEST_NAME, summary  # lazy: --help stays fast
    from satfuse.data.packing.shard_dir import merge  # lazy: --help stays fast

    manifest = merge(args.dir, command=["satfuse", *sys.argv[1:]])
    log.info("merged: %s -> %s", summary(manifest), args.dir / MANIFEST_NAME)
    return 0

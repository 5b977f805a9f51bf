"""The built-in datasets of `satfuse shard` / `satfuse synth`, one `SourceDataset` entry each.

Each entry says which flags its scan reads, calls its layout's scanner (`tree_scan`,
`pairs_file`, `ssl4eo`, `bigearthnet`) and, where there is one, its synthetic generator
(`synth`, `synth_multiband`). The registrations at the end are in the order CLI choices and
messages list the datasets (`DATASETS.in_order()`), the order users know from earlier versions.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from satfuse.data.sources.band_scan import BandScan
from satfuse.data.sources.bigearthnet import scan_bigearthnet
from satfuse.data.sources.dataset import (
    PAIRED,
    PER_BAND,
    ScanOptions,
    SourceDataset,
    add_synth_parser,
)
from satfuse.data.sources.layout import ScanResult
from satfuse.data.sources.pairs_file import scan_pairs
from satfuse.data.sources.ssl4eo import scan_ssl4eo
from satfuse.data.sources.tree_scan import scan
from satfuse.registry import DATASETS
from satfuse.utils import SatfuseError


class _Sen12msTree(SourceDataset):
    """A SEN12MS-style tree (`layout`): ROI/sensor_scene folders, split and scene lists."""

    kind = PAIRED
    uses = frozenset({"split_file", "exclude_scenes"})

    def check_options(self, options: ScanOptions) -> None:
        if options.pairs_file is not None:
            raise SatfuseError(f"--pairs-file is for --dataset pairs, not {self.name}")
        super().check_options(options)

    def scan(self, root: Path, options: ScanOptions) -> ScanResult:
        return scan(root, self.name, options.split_file, options.exclude_scenes)


class Sen12ms(_Sen12msTree):
    """SEN12MS: s1/s2/lc patches of four seasons, the published split and hold-out lists."""

    name = "sen12ms"

    def add_synth(self, verbs: argparse._SubParsersAction) -> argparse.ArgumentParser:
        p = add_synth_parser(verbs, self, self.name, "SEN12MS: s1/s2/lc patches, the published split lists")
        p.add_argument("--scenes", type=int, default=8, help="number of scenes (round-robin over the 4 seasons)")
        p.add_argument("--patches-per-scene", type=int, default=25)
        p.add_argument("--size", type=int, default=256, help="patch size in pixels (real data: 256)")
        return p

    def synth(self, args: argparse.Namespace) -> int:
        from satfuse.data.sources import synth  # lazy: --help stays fast (rasterio)

        return synth.write_sen12ms(args.out, args.scenes, args.patches_per_scene, args.seed, args.size, overwrite=args.overwrite)


class Dfc2020(_Sen12msTree):
    """DFC2020: s1/s2/dfc (+ lc) patches of the validation and test ROIs, as downloaded."""

    name = "dfc2020"

    def add_synth(self, verbs: argparse._SubParsersAction) -> argparse.ArgumentParser:
        p = add_synth_parser(verbs, self, self.name,
                             "DFC2020: s1/s2/lc/dfc patches in the download's folders, validation/test split lists")
        p.add_argument("--n-validation", type=int, default=100, help="patches in ROIs0000_validation")
        p.add_argument("--n-test", type=int, default=200, help="patches in ROIs0000_test")
        p.add_argument("--validation-folders", choices=["validation", "0"], default="validation",
                       help="validation sensor folders as in the download (s1_validation) or renamed (s1_0)")
        p.add_argument("--size", type=int, default=256, help="patch size in pixels (real data: 256)")
        return p

    def synth(self, args: argparse.Namespace) -> int:
        from satfuse.data.sources import synth  # lazy: --help stays fast (rasterio)

        return synth.write_dfc2020(args.out, args.n_validation, args.n_test, args.seed, args.size,
                                   overwrite=args.overwrite, validation_folders=args.validation_folders)


class Pairs(SourceDataset):
    """A user's CSV of co-located S1/S2 (and label) files in any folder layout (`pairs_file`)."""

    name = "pairs"
    kind = PAIRED
    uses = frozenset({"pairs_file"})

    def check_options(self, options: ScanOptions) -> None:
        if options.pairs_file is None:
            raise SatfuseError("--dataset pairs needs --pairs-file FILE.csv (columns s1,s2[,label], paths relative to --src)")
        if options.split_file is not None or options.exclude_scenes is not None:
            raise SatfuseError("--dataset pairs takes its pairs from --pairs-file; drop --split-file / --exclude-scenes")
        super().check_options(options)

    def scan(self, root: Path, options: ScanOptions) -> ScanResult:
        assert options.pairs_file is not None  # check_options refused its absence
        return scan_pairs(root, options.pairs_file)


class Ssl4eoS12(SourceDataset):
    """SSL4EO-S12 v1: per-band s1/s2c/s2a GeoTIFFs, 4 timestamps per location (`ssl4eo`)."""

    name = "ssl4eo-s12"
    kind = PER_BAND
    uses = frozenset({"s2_level", "max_gap_days"})
    # S1 and S2 are separate Earth Engine exports of the same 2.64 km region, each sampled on its
    # own image's pixel grid, centre-cropped to 264 px and georeferenced from the region's bounds;
    # their footprints share the centre but differ by a few 10 m pixels (38.5 m between VV.tif and
    # B2.tif of the published location 0000200), so 50 m = 5 pixels (plus half the band's own
    # pixel, `resample`). A gross misplacement (a wrong export, ~1 km) stays far outside it.
    # docs/datasets.md has the why.
    colocation_tol_m = 50.0

    def check_options(self, options: ScanOptions) -> None:
        if options.split_file is not None or options.split is not None:
            raise SatfuseError("--split-file/--split do not apply to ssl4eo-s12 (it has no official splits); shard all locations")
        super().check_options(options)

    def scan(self, root: Path, options: ScanOptions) -> BandScan:
        max_gap_days = 30.0 if options.max_gap_days is None else options.max_gap_days
        return scan_ssl4eo(root, s2_level=options.s2_level or "l1c", max_gap_days=max_gap_days)

    def add_synth(self, verbs: argparse._SubParsersAction) -> argparse.ArgumentParser:
        p = add_synth_parser(verbs, self, self.name, "SSL4EO-S12 v1: s1/s2c/s2a per-band GeoTIFFs, 4 timestamps per location")
        p.add_argument("--locations", type=int, default=4, help="number of locations (4 timestamps each)")
        p.add_argument("--size", type=int, default=264, help="10 m patch size in pixels, a multiple of 6 (real data: 264)")
        return p

    def synth(self, args: argparse.Namespace) -> int:
        from satfuse.data.sources import synth_multiband  # lazy: --help stays fast (rasterio)

        return synth_multiband.write_ssl4eo(args.out, args.locations, args.seed, args.size, overwrite=args.overwrite)


class BigEarthNet(SourceDataset):
    """BigEarthNet-MM v1.0: per-band GeoTIFFs, JSON labels, the mapping and split CSVs (`bigearthnet`)."""

    name = "bigearthnet"
    kind = PER_BAND
    uses = frozenset({"split_file", "split"})
    colocation_tol_m = 10.0  # S1 was cut on the S2 patch's own UTM grid: one 10 m pixel is ample
    version = 1  # the published release this entry reads (1 = BigEarthNet-MM v1.0, 2 = reBEN)

    def check_options(self, options: ScanOptions) -> None:
        if options.s2_level is not None or options.max_gap_days is not None:
            raise SatfuseError(f"--s2-level/--max-gap-days apply to ssl4eo-s12 only ({self.name} is L2A with one date per pair); drop them")
        super().check_options(options)

    def scan(self, root: Path, options: ScanOptions) -> BandScan:
        return scan_bigearthnet(root, version=self.version, split_file=options.split_file, split=options.split)

    def add_synth(self, verbs: argparse._SubParsersAction) -> argparse.ArgumentParser:
        p = add_synth_parser(verbs, self, self.name, "BigEarthNet-MM v1.0 or v2.0 (reBEN): per-band GeoTIFFs and side files")
        p.add_argument("--version", type=int, choices=[1, 2], default=1, help="1 = BigEarthNet-MM v1.0, 2 = reBEN")
        p.add_argument("--patches", type=int, default=12, help="number of S1/S2 pairs")
        p.add_argument("--size", type=int, default=120, help="10 m patch size in pixels, a multiple of 6 (real data: 120)")
        return p

    def synth(self, args: argparse.Namespace) -> int:
        from satfuse.data.sources import synth_multiband  # lazy: --help stays fast (rasterio)

        return synth_multiband.write_bigearthnet(args.out, args.version, args.patches, args.seed, args.size, overwrite=args.overwrite)


class BigEarthNetV2(BigEarthNet):
    """BigEarthNet v2.0 (reBEN): per-band GeoTIFFs, pairs and labels from metadata.parquet;
    its synthetic tree is `satfuse synth bigearthnet --version 2`."""

    name = "bigearthnet-v2"
    version = 2

    def add_synth(self, verbs: argparse._SubParsersAction) -> None:
        return None


for _entry in (Sen12ms(), Dfc2020(), Pairs(), Ssl4eoS12(), BigEarthNet(), BigEarthNetV2()):
    DATASETS.register(_entry.name, _entry)

"""A toy dataset registered from outside src/: proof that a new dataset is one module plus one
registration (loaded with SATFUSE_PLUGINS=tests.extensions.toy_data).

Its published layout is its own: `{root}/tiles/{tile}/{vv,vh,blue,green,red,nir}.tif`, one
GeoTIFF per band on one 10 m UTM grid (S1 VV/VH float32 dB, S2 blue/green/red/nir uint16), so
it is a `PER_BAND` dataset with 4 S2 bands, not the 12 or 13 of the built-ins. A tile without
all six files is excluded, anything else under the root is ignored, each with a `toy:` reason.
Its `satfuse synth toy-bands` verb writes such a tree, the last `--incomplete` tiles without nir.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import rasterio
from rasterio.transform import from_origin

from satfuse.data.sources.band_scan import BandSample, BandScan
from satfuse.data.sources.dataset import PER_BAND, ScanOptions, SourceDataset, add_synth_parser
from satfuse.data.sources.layout import Excluded
from satfuse.registry import DATASETS

S1_FILES = {"VV": "vv.tif", "VH": "vh.tif"}
S2_FILES = {"B2": "blue.tif", "B3": "green.tif", "B4": "red.tif", "B8": "nir.tif"}


class ToyBands(SourceDataset):
    """tiles/{tile}/{band}.tif, four S2 bands, no splits."""

    name = "toy-bands"
    kind = PER_BAND
    uses = frozenset()
    colocation_tol_m = 7.0

    def scan(self, root: Path, options: ScanOptions) -> BandScan:
        samples, excluded, ignored = [], [], []
        for entry in sorted(Path(root).iterdir()):
            if entry.name != "tiles":
                ignored.append({"path": entry.name, "reason": "toy: not part of the layout (tiles/ only)"})
        for tile in sorted((Path(root) / "tiles").iterdir()):
            files = {**{b: tile / f for b, f in S1_FILES.items()}, **{b: tile / f for b, f in S2_FILES.items()}}
            missing = sorted(p.name for p in files.values() if not p.is_file())
            if missing:
                excluded.append(Excluded(f"toy_{tile.name}", f"toy: tile lacks {', '.join(missing)}", [str(tile)]))
                continue
            samples.append(BandSample(f"toy_{tile.name}", [(b, files[b]) for b in S1_FILES],
                                      [(b, files[b]) for b in S2_FILES], {"tile": tile.name}))
        bands = {"s1": list(S1_FILES), "s2": list(S2_FILES)}
        return BandScan(self.name, samples, excluded, ignored, bands, {"toy_layout": "tiles/{tile}/{band}.tif"})

    def add_synth(self, verbs: argparse._SubParsersAction) -> argparse.ArgumentParser:
        p = add_synth_parser(verbs, self, self.name, "toy: tiles/{tile}/{band}.tif")
        p.add_argument("--tiles", type=int, default=4)
        p.add_argument("--incomplete", type=int, default=0, help="the last N tiles lack nir.tif")
        p.add_argument("--size", type=int, default=16)
        return p

    def synth(self, args: argparse.Namespace) -> int:
        rng = np.random.default_rng(args.seed)
        for i in range(args.tiles):
            folder = Path(args.out) / "tiles" / f"t{i:03d}"
            folder.mkdir(parents=True, exist_ok=True)
            grid = from_origin(500_000 + 1000 * i, 5_000_000, 10, 10)
            for band, name in {**S1_FILES, **S2_FILES}.items():
                if name == "nir.tif" and i >= args.tiles - args.incomplete:
                    continue
                if band in S1_FILES:
                    data = rng.uniform(-25, -5, (args.size, args.size)).astype("float32")
                else:
                    data = rng.integers(500, 3000, (args.size, args.size)).astype("uint16")
                with rasterio.open(folder / name, "w", driver="GTiff", width=args.size, height=args.size, count=1,
                                   dtype=data.dtype, crs="EPSG:32633", transform=grid) as ds:
                    ds.write(data, 1)
        (Path(args.out) / "README.txt").write_text("toy dataset\n")
        return args.tiles - args.incomplete


DATASETS.register(ToyBands.name, ToyBands())

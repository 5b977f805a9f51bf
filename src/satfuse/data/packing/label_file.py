"""`satfuse shard --dataset sen12ms --labels IGBP_probability_labels.pkl`: each pair's 17 IGBP
fractions (SEN12MS scene-classification labels) looked up by its S2 file name, for the JSON
member of its sample, and the manifest's record of the file they came from.

Why the JSON: the vector is 17 numbers per patch, metadata-sized, and BigEarthNet's labels
live there too (`labels19`), so one reader serves both; the image members stay as they were.
"""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any

from satfuse.data.format.codecs import Encoding
from satfuse.data.sources.igbp_labels import LABELS_FILE, read_igbp_labels
from satfuse.data.sources.layout import MAX_SHOWN, Pair
from satfuse.utils import SatfuseError

LABEL_FILE_DATASETS = ("sen12ms",)  # the datasets whose label file --labels reads


def check_label_file_use(dataset: str, encoding: Encoding) -> None:
    """Refuse --labels where it would do nothing: another dataset, or with --no-labels."""
    if dataset not in LABEL_FILE_DATASETS:
        raise SatfuseError(f"--labels: only for --dataset {'|'.join(LABEL_FILE_DATASETS)} (its {LABELS_FILE}); "
                           f"drop it for --dataset {dataset}")
    if not encoding.labels:
        raise SatfuseError("--labels with --no-labels: the one packs label vectors, the other leaves labels out; "
                           "drop one of them")


def pair_vectors(path: Path, pairs: list[Pair]) -> dict[str, list[float]]:
    """Pair key -> its 17 fractions from the label file at `path`, by S2 file name. A pair the
    file has no entry for is refused (never packed without its label), naming the first few."""
    labels = read_igbp_labels(path)
    missing = [p.s2.name for p in pairs if p.s2.name not in labels]
    if missing:
        raise SatfuseError(f"{path}: no entry for {len(missing)} of the {len(pairs)} patches to pack (e.g. "
                           f"{', '.join(missing[:MAX_SHOWN])}); pass the label file of this tree, or a --split-file "
                           "that leaves them out")
    return {p.key: [float(v) for v in labels[p.s2.name]] for p in pairs}


def label_file_record(path: Path) -> dict[str, Any]:
    """What the manifest keeps about the label file: where it was and its sha256 (so a set says
    which labels it holds, and a changed file is a changed set)."""
    return {"file": str(path), "sha256": hashlib.sha256(Path(path).read_bytes()).hexdigest(), "classes": 17}

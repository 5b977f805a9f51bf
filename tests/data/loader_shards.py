"""Helpers of the loader tests: small shard sets written per the shard contract.

The shard writer is another module; these tests build shard sets directly with
`webdataset.TarWriter` (the contract's format) so they test the reader alone. Each sample's
S2 pixel [0, 0, 0] holds its global id, so a test can tell which sample a batch row is.
"""

from __future__ import annotations

import hashlib
import io
import json
from pathlib import Path

import numpy as np
import webdataset as wds

from satfuse.config import DataConfig

S1_STATS = {"mean": [-12.0, -19.0], "std": [4.0, 5.0], "min": [-30.0, -35.0], "max": [5.0, 0.0], "count": 1}
S2_STATS = {
    "mean": [1500.0 + 10 * b for b in range(13)],
    "std": [600.0 + b for b in range(13)],
    "min": [0.0] * 13,
    "max": [10000.0] * 13,
    "count": 1,
}


def npy(arr: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, arr, allow_pickle=False)
    return buf.getvalue()


def sample_key(gid: int) -> str:
    return f"ROIs1158_spring_{gid // 1000}_p{gid % 1000}"


def make_sample(gid: int, hw: int, label: bool = False) -> dict:
    rng = np.random.default_rng(gid)
    s1 = rng.uniform(-30, 5, size=(2, hw, hw)).astype(np.float32)
    s2 = rng.integers(0, 10000, size=(13, hw, hw), dtype=np.uint16)
    s2[0, 0, 0] = gid
    out = {"__key__": sample_key(gid), "s1.npy": npy(s1), "s2.npy": npy(s2),
           "json": json.dumps({"key": sample_key(gid)}).encode()}
    if label:
        out["dfc.npy"] = npy(np.full((1, hw, hw), 1 + gid % 10, dtype=np.uint8))
    return out


def make_shards(
    root: Path, counts: list[int], hw: int = 16, name: str = "synth", corrupt: frozenset[int] = frozenset(),
    label: bool = False, first_id: int = 0,
) -> Path:
    """Write shards NAME-%06d.tar with the given sample counts and a manifest; return the dir.
    Samples whose global id is in `corrupt` get an s2.npy that is not a valid .npy. Ids start
    at `first_id` (distinct ranges tell mixed sets apart)."""
    out = root / name
    out.mkdir(parents=True, exist_ok=True)
    gid, entries = first_id, []
    for i, count in enumerate(counts):
        fname = f"{name}-{i:06d}.tar"
        with wds.TarWriter(str(out / fname)) as tw:
            for _ in range(count):
                sample = make_sample(gid, hw, label)
                if gid in corrupt:
                    sample["s2.npy"] = b"this is not an npy file"
                tw.write(sample)
                gid += 1
        data = (out / fname).read_bytes()
        entries.append({"name": fname, "count": count, "bytes": len(data), "sha256": hashlib.sha256(data).hexdigest()})
    manifest = {"format": "satfuse-shards/1", "name": name, "dataset": "sen12ms", "seed": 0,
                "shards": entries, "total_samples": gid - first_id, "excluded": [],
                "stats": {"s1": S1_STATS, "s2": S2_STATS}, "label": None}
    (out / "manifest.json").write_text(json.dumps(manifest))
    return out


def sample_ids(batch: dict) -> list[int]:
    """Global ids of a batch's rows, from their keys."""
    out = []
    for key in batch["key"]:
        scene, patch = key.split("_")[2], key.split("_p")[-1]
        out.append(int(scene) * 1000 + int(patch))
    return out


def data_cfg(**kw) -> DataConfig:
    base = {"batch_size": 4, "num_workers": 0, "shuffle_buffer": 8, "crop": 8}
    base.update(kw)
    return DataConfig(**base)


def truncate(path: Path, fraction: float = 0.5, record: bool = True) -> None:
    """Cut a tar file short, as an interrupted copy would. With `record`, the manifest beside
    it is made to list the cut bytes (size and sha256), so what runs is the reader's own
    handling of a short tar; without, the loader's sha256 check refuses the whole shard."""
    from satfuse.data.reading.stream_io import _digests

    data = path.read_bytes()[: int(path.stat().st_size * fraction)]
    path.write_bytes(data)
    manifest = path.parent / "manifest.json"
    if record and manifest.is_file():
        doc = json.loads(manifest.read_text())
        for entry in doc["shards"]:
            if entry["name"] == path.name:
                entry.update(bytes=len(data), sha256=hashlib.sha256(data).hexdigest())
        manifest.write_text(json.dumps(doc))
    _digests.cache_clear()  # keyed by the manifest's mtime, which may not tick between two quick writes


def run_rank(loader, steps: int) -> list[dict]:
    """The next `steps` batches of a loader's iterator (a fresh iterator from its state)."""
    it = iter(loader)
    return [next(it) for _ in range(steps)]


def gather_report(report: dict, world: int, rank: int, out: str) -> None:
    """End of a test rank: every rank's report to rank 0, which writes them as JSON to `out`;
    then the group is left to the exit (`satfuse.distributed.env.teardown`)."""
    import torch.distributed as dist

    from satfuse.distributed.env import teardown

    reports: list = [None] * world
    dist.all_gather_object(reports, report)
    if rank == 0:
        Path(out).write_text(json.dumps(reports))
    teardown()

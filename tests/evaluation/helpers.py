"""Helpers of the evaluation tests: small DFC2020-like shard sets written per the shard
contract with webdataset.TarWriter, and a randomly initialised backbones export.

The patches carry a real (learnable) signal: every DFC class has its own S2 spectrum and S1
backscatter, so a classifier trained for a few epochs must beat chance on them.
"""

from __future__ import annotations

import hashlib
import io
import json
from pathlib import Path

import numpy as np
import torch
import webdataset as wds

# DFC2020 classes 1..10 present in the fixtures (Savanna 3 and Snow 8 are left to the map tests)
DFC_USED = np.array([1, 2, 4, 5, 6, 7, 9, 10], dtype=np.uint8)


def _npy(a: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, a, allow_pickle=False)
    return buf.getvalue()


def make_patch(rng: np.random.Generator, size: int, dominant: int) -> tuple[np.ndarray, ...]:
    """A label map mostly of `dominant` (DFC code) with a second class in one corner."""
    dfc = np.full((size, size), dominant, dtype=np.uint8)
    other = int(rng.choice(DFC_USED))
    h = int(rng.integers(size // 4, size // 2))
    dfc[:h, :h] = other
    s2_base = (np.arange(13, dtype=np.float32)[:, None, None] * 150 + dfc[None] * 600.0)
    s2 = np.clip(s2_base + rng.normal(0, 150, (13, size, size)), 0, 10000).astype(np.uint16)
    s1 = (-22.0 + dfc[None].astype(np.float32) * 1.5 + np.array([0, -6], np.float32)[:, None, None]
          + rng.normal(0, 1.0, (2, size, size))).astype(np.float32)
    return s1, s2, dfc[None]


def write_dfc_shards(out: Path, n: int, size: int, seed: int, roi: str = "ROIs0000_validation",
                     per_shard: int = 20, dominant: list[int] | None = None, with_stats: bool = True) -> Path:
    """Write `out/NAME-00000k.tar` + manifest.json (contract format) with n labelled patches."""
    out.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    name = out.name
    shards, s1_all, s2_all = [], [], []
    for k in range(0, n, per_shard):
        tar = out / f"{name}-{k // per_shard:06d}.tar"
        with wds.TarWriter(str(tar)) as w:
            for i in range(k, min(n, k + per_shard)):
                dom = int(dominant[i % len(dominant)]) if dominant else int(DFC_USED[i % len(DFC_USED)])
                s1, s2, dfc = make_patch(rng, size, dom)
                s1_all.append(s1)
                s2_all.append(s2)
                key = f"{roi}_0_p{i + 1}"
                meta = {"key": key, "dataset": "dfc2020", "roi": roi, "season": "validation", "scene": 0,
                        "patch": i + 1, "crs": "EPSG:32632", "transform": [10, 0, 0, 0, -10, 0],
                        "height": size, "width": size, "sources": {}}
                w.write({"__key__": key, "s1.npy": _npy(s1), "s2.npy": _npy(s2), "dfc.npy": _npy(dfc),
                         "json": json.dumps(meta).encode()})
        shards.append({"name": tar.name, "count": min(n, k + per_shard) - k, "bytes": tar.stat().st_size,
                       "sha256": hashlib.sha256(tar.read_bytes()).hexdigest()})
    manifest = {"format": "satfuse-shards/1", "name": name, "dataset": "dfc2020", "seed": seed,
                "shards": shards, "total_samples": n, "excluded": [], "label": "dfc"}
    if with_stats and n:
        s1a, s2a = np.stack(s1_all).astype(np.float64), np.stack(s2_all).astype(np.float64)
        manifest["stats"] = {
            s: {"mean": a.mean(axis=(0, 2, 3)).tolist(), "std": a.std(axis=(0, 2, 3)).tolist(),
                "min": a.min(axis=(0, 2, 3)).tolist(), "max": a.max(axis=(0, 2, 3)).tolist(),
                "count": int(a.shape[0] * a.shape[2] * a.shape[3])}
            for s, a in (("s1", s1a), ("s2", s2a))}
    (out / "manifest.json").write_text(json.dumps(manifest))
    return out


def make_export(path: Path, backbone: str = "tiny", method: str = "dual_simclr",
                in_channels: dict[str, int] | None = None, normalization: dict | None = None,
                seed: int = 0) -> Path:
    """A randomly initialised export file in the `satfuse-backbones/1` format."""
    from satfuse.models.backbones import build_backbone

    torch.manual_seed(seed)
    in_channels = in_channels or {"s1": 2, "s2": 13}
    state = {k: build_backbone(backbone, c).state_dict() for k, c in in_channels.items()}
    torch.save({"format": "satfuse-backbones/1", "method": method, "backbone": backbone,
                "in_channels": in_channels, "state_dicts": state, "normalization": normalization,
                "step": 7, "source": "tests"}, path)
    return path

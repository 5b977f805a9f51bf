"""Linear probes on cached frozen features (`model.feature_cache`): each shard set's features
computed once per (weights, shard set, crop, inputs, normalisation) and reused by every label
fraction and seed of a sweep.

Why: a linear probe's backbone never changes, so every epoch of every run of a sweep pushes
the same patches through the same frozen network; the head is all that learns. With the
cache the backbone sees each patch once (centre crop, as validation and test always did)
and the runs train the head on stored features through the same `Trainer` (a `HeadOnly`
model and `FeatureBatcher`s in place of the image batchers). Off by default: a probe then
trains on random crops, as before (DFC2020's numbers unchanged).

Files: `<feature_cache>/<role>-<key>.npz` (features, single and multi targets), written
atomically; the key hashes the weights' identity, the shard set's tar digests, crop,
benchmark, inputs and band statistics, so another checkpoint or re-packed shards are another
file. A file that does not load or does not fit (a stale or damaged cache) is recomputed with
a warning, never trusted. `FEATURE_PASSES` counts the passes computed in this process (what
the cache saves; `tests/evaluation/test_probe_cache.py` measures it over a sweep).
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from satfuse.evaluation.benchmark import benchmark_class
from satfuse.utils import SatfuseError, atomic_write_bytes

log = logging.getLogger(__name__)

FEATURE_PASSES: Counter[str] = Counter()  # role -> feature passes computed (not loaded) in this process


@dataclass
class Features:
    """One shard set's frozen features (N, D) and the targets of the same centre crops."""

    feats: np.ndarray
    single: np.ndarray
    multi: np.ndarray


def shard_digest(manifest: dict[str, Any]) -> str:
    """The identity of a shard set's contents: its tars' names, counts and sha256s."""
    tars = [[s.get("name"), s.get("count"), s.get("sha256")] for s in manifest.get("shards", [])]
    return hashlib.sha256(json.dumps(tars).encode()).hexdigest()


def cache_key(parts: dict[str, Any]) -> str:
    """A file-name-safe hash of everything the features depend on."""
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:32]


def _load(path: Path, n: int, key: str) -> Features:
    with np.load(path, allow_pickle=False) as z:
        if str(z["key"]) != key:
            raise ValueError(f"written for key {z['key']}")
        f = Features(z["feats"].astype(np.float32), z["single"].astype(np.int64), z["multi"].astype(np.float32))
    if f.feats.ndim != 2 or len(f.feats) != n or len(f.single) != n or len(f.multi) != n:
        raise ValueError(f"holds {len(f.feats)} rows for {n} patches")
    return f


@torch.no_grad()
def compute(model: nn.Module, batcher: Any, n: int, batch_size: int) -> Features:
    """Frozen features of patches 0..n-1 of `batcher`'s split (centre crops) and their targets."""
    model.eval()
    feats, singles, multis = [], [], []
    for start in range(0, n, batch_size):
        s1, s2, single, multi = batcher(np.arange(start, min(n, start + batch_size)), None)
        feats.append(model.features(s1, s2).float().cpu().numpy())
        singles.append(single.cpu().numpy())
        multis.append(multi.cpu().numpy())
    return Features(np.concatenate(feats), np.concatenate(singles), np.concatenate(multis))


def features(model: nn.Module, batcher: Any, n: int, batch_size: int, cache_dir: Path, role: str,
             parts: dict[str, Any]) -> Features:
    """`role`'s features from `cache_dir` when a fitting file is there, else computed and stored."""
    key = cache_key({**parts, "role": role})
    path = Path(cache_dir) / f"{role}-{key}.npz"
    if path.exists():
        try:
            return _load(path, n, key)
        except Exception as exc:  # noqa: BLE001 - any unreadable/unfitting file is recomputed the same way
            log.warning("%s: feature cache unusable (%s); recomputing it", path, exc)
    out = compute(model, batcher, n, batch_size)
    FEATURE_PASSES[role] += 1
    buf = io.BytesIO()
    np.savez(buf, feats=out.feats, single=out.single, multi=out.multi, key=np.array(key))
    atomic_write_bytes(path, buf.getvalue())
    log.info("%s features of %d patches -> %s", role, n, path)
    return out


class FeatureBatcher:
    """The `Batcher` interface over stored features: (features, features, single, multi) of
    `idx` (the second slot is unused by `HeadOnly`; `rng` is ignored: crops were fixed)."""

    def __init__(self, f: Features, n_classes: int, device: torch.device) -> None:
        self.f, self.device = f, device
        self.split = type("SplitInfo", (), {"n_classes": n_classes})()

    def __call__(self, idx: np.ndarray, rng: np.random.Generator | None):
        t = lambda a: torch.from_numpy(np.ascontiguousarray(a[idx])).to(self.device)  # noqa: E731
        x = t(self.f.feats)
        return x, x, t(self.f.single), t(self.f.multi)


class HeadOnly(nn.Module):
    """A classifier's linear head on stored features, with the `Classifier` training interface;
    it shares the head's parameters, so training it trains the classifier's head."""

    def __init__(self, head: nn.Linear) -> None:
        super().__init__()
        self.head = head

    def forward(self, feats: torch.Tensor, _unused: torch.Tensor) -> torch.Tensor:
        return self.head(feats)

    def param_groups(self, lr: float, backbone_lr: float, weight_decay: float) -> list[dict]:
        """The head's group only (the backbone is frozen and not here)."""
        return [{"params": list(self.head.parameters()), "lr": lr, "weight_decay": weight_decay, "name": "head"}]


def cached_probe(cfg: Any, model: nn.Module, sets: dict[str, tuple[Any, int]], make_batcher: Callable[[Any, int], Any],
                 stats: dict[str, Any], ckpt_info: dict[str, Any], device: torch.device) -> tuple[nn.Module, tuple]:
    """A linear probe on cached features for the run `cfg` (a FinetuneConfig): the head to train
    and the (train, val, test) feature batchers. `sets`: role -> (split or None, centre crop);
    `make_batcher(split, crop)`: the run's image batcher; `stats`: its band statistics."""
    if cfg.model.mode != "linear":
        raise SatfuseError(f"model.feature_cache={cfg.model.feature_cache}: only for model.mode=linear (a fine-tuned "
                           "backbone changes its features); drop it or set model.mode=linear")
    dc = cfg.data
    parts = {"weights": ckpt_info.get("weights") or f"scratch seed {cfg.train.seed}", "backbone": cfg.model.backbone,
             "modalities": cfg.model.modalities, "fusion": cfg.model.fusion, "benchmark": dc.benchmark,
             "min_fraction": dc.multi_label_min_fraction, "stats": stats, "crop": dc.crop}  # test: cropped at load
    n_classes = benchmark_class(dc.benchmark).n_classes()
    fb = {}
    for role, (split, crop) in sets.items():
        if split is not None:
            f = features(model, make_batcher(split, crop), len(split), dc.eval_batch_size, Path(cfg.model.feature_cache),
                         role, {**parts, "shards": shard_digest(split.manifest)})
            fb[role] = FeatureBatcher(f, n_classes, device)
    return HeadOnly(model.head), (fb["train"], fb.get("val", fb["train"]), fb["test"])

"""One downstream run: fine-tune or linear-probe on a benchmark (DFC2020 by default), early-stop,
score on test.

One job (a single run: its config, model, training loop and result record); the benchmark
(classes, label members, tasks, headline metric) is a registered
`satfuse.evaluation.benchmark.Benchmark` named by `data.benchmark`; the sweep, the report and
the data live beside it.

Protocol (the authors', for DFC2020, unless stated): train on the DFC2020 *validation* split minus a
stratified held-out part for early stopping (`data.val_fraction`, the same patches for
every label fraction of a seed, so fractions differ only in training labels), test on the
DFC2020 *test* split (centre crop). Adam, weight decay, lr x0.1 once at `train.lr_drop_at`
of the epochs; head lr and backbone lr separate; cross-entropy with ignore index 255
(single-label) or sigmoid + BCE with threshold 0.5 (multi-label). Class-balanced sampling
(the authors oversample to balance classes) unless `data.balanced: false`.

Normalisation: a pretrained model sees its pretraining statistics (stored in the export);
a model from scratch uses the training shards' manifest statistics.

Crops whose label map has no valid pixel carry no target: masked out of the loss in
training, dropped (and counted in result.json) from validation and test scoring.
"""

from __future__ import annotations

import copy
import json
import logging
import math
import re
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import numpy as np
import torch
from torch import nn

from satfuse.checkpoint.export import weights_identity
from satfuse.config import LogConfig, dump_yaml, load_config, to_dict
from satfuse.data.format.manifest import shared_shards
from satfuse.data.packing.normalize import BandStats, normalize
from satfuse.engines.metrics_sinks import MetricSinks
from satfuse.engines.rundir import FINETUNE_RUN, check_run_dir_kind
from satfuse.evaluation import data as D
from satfuse.evaluation import probe_cache
from satfuse.evaluation.benchmark import DEFAULT_BENCHMARK, Benchmark, benchmark_class, check_task
from satfuse.evaluation.metrics import multi_label_metrics, single_label_metrics
from satfuse.evaluation.models import Classifier, build_classifier, scratch_branches
from satfuse.evaluation.plain_weights import load_for_finetune
from satfuse.evaluation.pretrained import pretrained_branches
from satfuse.evaluation.targets import IGNORE, batch_targets, vector_targets
from satfuse.models.methods import method_title
from satfuse.run_layout import RunLayout
from satfuse.utils import SatfuseError, atomic_write_text

log = logging.getLogger(__name__)

RESULT_FORMAT = "satfuse-finetune/1"


@dataclass
class FtDataConfig:
    """The benchmark, its labelled shards and how they are split, sampled and batched."""

    benchmark: str = DEFAULT_BENCHMARK  # the downstream benchmark (satfuse.registry.BENCHMARKS): classes, label members, tasks, metric
    train_shards: str = "shards/dfc2020-train"  # the DFC2020 validation split (authors train on it)
    test_shards: str = "shards/dfc2020-test"  # the DFC2020 test split, scored once at the end
    val_shards: str = ""  # an early-stopping set of its own (BigEarthNet's val split); empty: hold val_fraction of train_shards out
    val_fraction: float = 0.2  # held out of train_shards for early stopping (stratified); unused with val_shards
    crop: int = 224  # random crop (train) / centre crop (val, test); authors 224 of 256
    label_fraction: float = 1.0  # share of the labelled training patches used (stratified by class)
    keep_every_class: bool = True  # ceil per class (>= 1 example each) vs floor (may drop)
    balanced: bool = True  # class-balanced sampling (authors oversample)
    min_epoch_samples: int = 0  # an epoch draws max(n_train, this) samples
    multi_label_min_fraction: float = 0.1  # multi-label: a class is a target from this share of the valid pixels
    batch_size: int = 32  # training batch
    eval_batch_size: int = 128  # validation/test batch (no gradients)
    s1_clip: list[float] = field(default_factory=lambda: [-25.0, 0.0])  # S1 dB range kept before normalising
    s2_clip: list[float] = field(default_factory=lambda: [0.0, 10000.0])  # S2 reflectance range kept before normalising


@dataclass
class FtModelConfig:
    """The classifier: which backbone weights, which inputs, fine-tuned or linear."""

    checkpoint: str = "none"  # export file, checkpoint dir, or none (supervised from scratch)
    trust_checkpoint: bool = False  # read checkpoint-dir files that are not plain data (may run code)
    backbone: str = "resnet50"  # trunk per branch, a name in satfuse.registry.BACKBONES
    mode: Literal["finetune", "linear"] = "finetune"  # train the backbone too, or only the head
    modalities: Literal["s1", "s2", "s1s2"] = "s1s2"  # inputs the classifier sees
    fusion: Literal["early", "late"] = "late"  # s1s2: one trunk on stacked bands, or one per modality
    decoder: str = "auto"  # segmentation only: a name in satfuse.registry.DECODERS (unet, upernet); auto = the follow-up's pairing
    # a plain (torchvision-named) single-modality state dict: which input it takes (s1, s2,
    # s2_rgb, s1s2); empty = the one whose band count its conv1 has
    checkpoint_modality: str = ""  # plain weights: the input they take (empty: by conv1's bands)
    # JSON of band mean/std/clip for plain weights (export's .normalization.json); empty =
    # a .safetensors file's metadata, else the one beside the weights (if it names them),
    # else the training shards' statistics
    normalization: str = ""  # plain weights: band statistics JSON (empty: embedded, beside them, else the shards')
    # mode=linear: a directory of frozen features (satfuse.evaluation.probe_cache), computed once
    # per checkpoint and shard set and reused by every fraction and seed; empty = random-crop probe
    feature_cache: str = ""  # linear probe on cached centre-crop features in this directory (empty: off)


@dataclass
class FtTrainConfig:
    """The fine-tuning loop: task, epochs, learning rates, early stopping."""

    task: Literal["single", "multi", "seg"] = "single"  # single-label (cross-entropy), multi-label (BCE), or seg (per-pixel, data.benchmark=dfc2020-seg)
    epochs: int = 50  # at most this many epochs (early stopping may end sooner)
    patience: int = 10  # epochs without val improvement before stopping (0 = never stop early)
    early_stop_on: Literal["loss", "metric"] = "loss"  # metric: the benchmark's headline (DFC2020: AA single / macro F1 multi)
    lr: float = 1e-5  # head
    backbone_lr: float = 1e-5  # backbone (model.mode=finetune)
    weight_decay: float = 1e-3  # Adam weight decay (L2)
    lr_drop_at: float = 0.5  # lr x0.1 after this fraction of the epochs (0 = never)
    threshold: float = 0.5  # multi-label decision threshold
    seed: int = 42  # split, label subset, sampling and head initialisation
    threads: int = 0  # torch intra-op threads; 0 = leave torch's setting
    device: Literal["auto", "cpu", "cuda"] = "auto"  # auto: CUDA when visible


@dataclass
class FinetuneConfig:
    """Everything `satfuse finetune` reads (one benchmark run), one section per component."""

    data: FtDataConfig = field(default_factory=FtDataConfig)  # labelled shards, split, sampling
    model: FtModelConfig = field(default_factory=FtModelConfig)  # weights, inputs, fusion, mode
    train: FtTrainConfig = field(default_factory=FtTrainConfig)  # the loop
    # empty = runs/finetune/<method>/<task>/frac<F>/seed<S>, the layout of a sweep, so that runs
    # of different methods, fractions or seeds never share a result.json
    run_dir: str = ""  # where result.json and the curves go (empty: the sweep layout, below)
    label: str = ""  # method name in reports; empty = derived from the config
    log: LogConfig = field(default_factory=LogConfig)  # TensorBoard / W&B curves per epoch


DEFAULT_RUNS_ROOT = "runs/finetune"  # where runs without run_dir go (and `satfuse report` reads)


def load_finetune_config(path: str | None, overrides: list[str] | None = None) -> FinetuneConfig:
    return load_config(FinetuneConfig, path, overrides)


def method_label(model: FtModelConfig, method: str | None = None, label: str = "") -> str:
    """A readable method name for tables: 'Dual-SimCLR (fine-tune)', 'Supervised late fusion'.
    `label` (the config's top-level `label`) wins when given; else it is said from the `model`
    section and the pretraining `method` of the checkpoint (None: trained from scratch)."""
    if label:
        return label
    mod = model.modalities
    what = {"s1": "S1", "s2": "S2"}.get(mod, f"{model.fusion} fusion")
    if method is None:
        base = f"Supervised {what}"
        return base if model.mode == "finetune" else f"Random-init {what} (linear)"
    name = method_title(method)
    suffix = "" if mod == "s1s2" else f" {what}"
    return f"{name}{suffix} ({'fine-tune' if model.mode == 'finetune' else 'linear'})"


def slug(text: str) -> str:
    """Directory-safe form of a method label ('Dual-SimCLR (fine-tune)' -> 'dual-simclr_fine-tune')."""
    return re.sub(r"[^a-z0-9.-]+", "_", text.lower()).strip("_") or "method"


def run_subdir(label: str, task: str, fraction: float, seed: int) -> Path:
    """`<method>/<task>/frac<F>/seed<S>`: one directory per run, shared by sweeps and single runs."""
    return Path(slug(label)) / task / f"frac{fraction:g}" / f"seed{seed}"


# --------------------------------------------------------------------------------------------
# Data preparation
# --------------------------------------------------------------------------------------------


@dataclass
class Prepared:
    train: D.LabeledSplit
    test: D.LabeledSplit
    train_idx: np.ndarray
    val_idx: np.ndarray
    strat: np.ndarray
    info: dict
    val: D.LabeledSplit | None = None  # data.val_shards' set (val_idx index it), else None (val_idx index train)


def _stats_from_arrays(split: D.LabeledSplit, s1_clip: list[float], s2_clip: list[float]) -> dict:
    out = {}
    for name, arr, clip in (("s1", split.s1, s1_clip), ("s2", split.s2, s2_clip)):
        a = np.clip(arr.astype(np.float32), clip[0], clip[1])
        out[name] = BandStats(tuple(a.mean(axis=(0, 2, 3)).tolist()),
                              tuple(np.maximum(a.std(axis=(0, 2, 3)), 1e-6).tolist()),
                              (float(clip[0]), float(clip[1])))
    return out


def band_stats(data: FtDataConfig, train: D.LabeledSplit, pretrained_stats: dict | None) -> tuple[dict, str]:
    """Pretraining statistics when fine-tuning a pretrained model, else the train manifest's
    (clipped to the `data` section's s1_clip/s2_clip)."""
    if pretrained_stats and {"s1", "s2"} <= set(pretrained_stats):
        return pretrained_stats, "checkpoint"
    stats = train.manifest.get("stats") or {}
    if {"s1", "s2"} <= set(stats):
        return {"s1": BandStats.from_manifest(stats, "s1", data.s1_clip),
                "s2": BandStats.from_manifest(stats, "s2", data.s2_clip)}, "train_manifest"
    log.warning("%s: manifest has no stats; measuring them on the training patches", train.source)
    return _stats_from_arrays(train, data.s1_clip, data.s2_clip), "train_arrays"


def prepare_data(dc: FtDataConfig, seed: int) -> Prepared:
    """Load both splits of the `data` section, hold out the early-stopping part, draw the label
    fraction (`seed` is train.seed: the split and the subset are the run's, reproducibly)."""
    if dc.crop < 0:
        raise SatfuseError(f"data.crop={dc.crop} must be >= 0 (0 = whole patch)")
    train = D.load_split_cached(dc.train_shards, 0, dc.benchmark)
    if dc.crop > min(train.s1.shape[-2:]):
        raise SatfuseError(f"data.crop={dc.crop} is larger than the {train.s1.shape[-1]}px patches of "
                           f"{dc.train_shards}; set data.crop <= {min(train.s1.shape[-2:])}")
    test = D.load_split_cached(dc.test_shards, dc.crop, dc.benchmark, "test")
    shared = shared_shards(train.manifest, test.manifest)
    if shared:  # the report calls test scores held-out: say so when they are not
        log.warning("data.test_shards=%s shares %d shard(s) with data.train_shards=%s (same bytes): its scores are "
                    "not held-out; point data.test_shards at a disjoint shard set", dc.test_shards, len(shared),
                    dc.train_shards)
    strat = train.patch_labels()
    val = D.load_split_cached(dc.val_shards, dc.crop, dc.benchmark, "val") if dc.val_shards else None
    D.check_same_dataset(benchmark_class(dc.benchmark), {"train": train, "val": val, "test": test})
    if val is not None:  # the benchmark's own val split: every labelled train patch is in the pool
        pool, val_idx = np.flatnonzero(strat != IGNORE), np.flatnonzero(val.patch_labels() != IGNORE)
    else:
        pool, val_idx = D.train_val_split(strat, dc.val_fraction, seed)
    train_idx = D.label_fraction_subset(strat, pool, dc.label_fraction, seed,
                                        dc.keep_every_class)
    if train_idx.size == 0:
        raise SatfuseError(f"{dc.train_shards}: label fraction {dc.label_fraction} leaves no "
                           "training patch; use a larger data.label_fraction")
    info = _class_report(strat, pool, train_idx, val_idx, test, dc)
    return Prepared(train, test, train_idx, val_idx, strat, info, val)


def _class_report(strat, pool, train_idx, val_idx, test, dc) -> dict:
    names = benchmark_class(dc.benchmark).class_names
    n = len(names)
    test_lab = test.patch_labels()
    test_counts = np.bincount(test_lab[test_lab < n], minlength=n)
    train_counts = np.bincount(strat[train_idx], minlength=n)
    pool_counts = np.bincount(strat[pool][strat[pool] < n], minlength=n)
    missing = [names[c] for c in range(n) if train_counts[c] == 0 and test_counts[c] > 0]
    dropped = [names[c] for c in range(n) if train_counts[c] == 0 and pool_counts[c] > 0]
    if missing:
        log.warning("label fraction %g: no training example of %s (present in the test split); "
                    "those classes can only be mispredicted", dc.label_fraction, ", ".join(missing))
    if dropped:
        log.warning("label fraction %g with keep_every_class=false dropped %s from training",
                    dc.label_fraction, ", ".join(dropped))
    return {
        "n_pool": int(pool.size), "n_train": int(train_idx.size), "n_val": int(val_idx.size),
        "n_unlabelled_train_patches": int((strat == IGNORE).sum()),
        "class_counts_train": train_counts.tolist(), "class_counts_pool": pool_counts.tolist(),
        "class_counts_test": test_counts.tolist(),
        "classes_missing_in_train": missing, "classes_dropped_by_fraction": dropped,
        "classes_absent_in_test": [names[c] for c in range(n) if test_counts[c] == 0],
    }


# --------------------------------------------------------------------------------------------
# Training
# --------------------------------------------------------------------------------------------


class Batcher:
    """Crops, normalises and builds targets for index batches of an in-memory split."""

    def __init__(self, split: D.LabeledSplit, stats: dict, crop: int, min_fraction: float,
                 device: torch.device) -> None:
        self.split, self.stats, self.crop = split, stats, crop
        self.min_fraction, self.device = min_fraction, device

    def __call__(self, idx: np.ndarray, rng: np.random.Generator | None):
        if self.split.per_sample:  # scene labels: crops cut the images only
            s1, s2 = D.crop_batch([self.split.s1, self.split.s2], idx, self.crop, rng)
            single, multi = vector_targets(self.split.labels[idx], self.min_fraction)
        else:
            s1, s2, lab = D.crop_batch([self.split.s1, self.split.s2, self.split.labels], idx, self.crop, rng)
            single, multi = batch_targets(lab, self.min_fraction, self.split.n_classes)
        s2n = normalize(s2, self.stats["s2"])
        if self.split.s2_missing:  # bands the shards lack: the band mean (0), whatever the statistics
            s2n[:, list(self.split.s2_missing)] = 0.0
        t = lambda a: torch.from_numpy(np.ascontiguousarray(a)).to(self.device)  # noqa: E731
        return t(normalize(s1, self.stats["s1"])), t(s2n), t(single), t(multi)


def _loss(task: str, logits: torch.Tensor, single: torch.Tensor, multi: torch.Tensor) -> torch.Tensor:
    if task == "single":
        if bool((single != IGNORE).any()):
            return nn.functional.cross_entropy(logits, single, ignore_index=IGNORE)
        return logits.sum() * 0.0
    valid = (single != IGNORE).float()[:, None]
    per = nn.functional.binary_cross_entropy_with_logits(logits, multi, reduction="none")
    return (per * valid).sum() / (valid.sum() * logits.shape[1]).clamp_min(1.0)


@torch.no_grad()
def predict(model: Classifier, batcher: Batcher, idx: np.ndarray, batch_size: int, task: str) -> dict:
    """Scores of `idx` (centre crops) with their targets; crops without a valid pixel dropped."""
    model.eval()
    outs, singles, multis, losses, n = [], [], [], 0.0, 0
    for start in range(0, idx.size, batch_size):
        s1, s2, single, multi = batcher(idx[start : start + batch_size], None)
        logits = model(s1, s2)
        keep = single != IGNORE
        if keep.any():
            losses += float(_loss(task, logits[keep], single[keep], multi[keep])) * int(keep.sum())
            n += int(keep.sum())
        outs.append(logits[keep].float().cpu())
        singles.append(single[keep].cpu())
        multis.append(multi[keep].cpu())
    n_classes = batcher.split.n_classes
    logits = torch.cat(outs) if outs else torch.zeros(0, n_classes)
    return {"logits": logits, "single": torch.cat(singles).numpy() if singles else np.zeros(0, np.int64),
            "multi": torch.cat(multis).numpy() if multis else np.zeros((0, n_classes)),
            "loss": losses / max(n, 1), "n_dropped": int(idx.size - n)}


def score(task: str, pred: dict, threshold: float, bench: type[Benchmark]) -> dict:
    """The task's metrics of `pred`, per class under the benchmark's class names."""
    if task == "single":
        out = single_label_metrics(pred["single"], pred["logits"].argmax(1).numpy(), bench.n_classes(),
                                   bench.class_names)
        return {**out, **bench.extra_metrics(task, pred["single"], torch.softmax(pred["logits"], 1).numpy())}
    scores = torch.sigmoid(pred["logits"]).numpy()
    out = multi_label_metrics(pred["multi"], scores, threshold, bench.class_names)
    return {**out, **bench.extra_metrics(task, pred["multi"], scores)}


def _device(name: str) -> torch.device:
    if name == "cuda" or (name == "auto" and torch.cuda.is_available()):
        if not torch.cuda.is_available():
            raise SatfuseError("train.device=cuda but no CUDA device is visible; use train.device=cpu")
        return torch.device("cuda")
    return torch.device("cpu")


def build_model(mc: FtModelConfig, seed: int, n_classes: int | None = None,
                img_size: int | None = None) -> tuple[Classifier, dict | None, dict]:
    """Classifier of the `model` section with `n_classes` outputs (None: the default benchmark's),
    its new layers drawn from `seed` (train.seed), its backbones sized for crops of `img_size`
    (data.crop; ViT/Swin need it); returns (model, pretraining stats or None, checkpoint info)."""
    frozen = mc.mode == "linear"
    n_classes = n_classes or benchmark_class(DEFAULT_BENCHMARK).n_classes()
    if mc.checkpoint.lower() in ("", "none"):
        specs = scratch_branches(mc.modalities, mc.fusion)
        _seed_everything(seed)
        return build_classifier(specs, mc.backbone, n_classes, frozen, img_size=img_size), None, {"method": None}
    pre = load_for_finetune(mc.checkpoint, mc.backbone, mc.checkpoint_modality, mc.normalization,
                            trust=mc.trust_checkpoint, img_size=img_size)
    specs = pretrained_branches(pre, mc.backbone, mc.modalities, mc.fusion)
    # seeded after loading: building a pretraining model from a checkpoint directory draws from
    # torch's RNG, so seeding before it would start the head elsewhere than for an export file
    _seed_everything(seed)
    model = build_classifier(specs, mc.backbone, n_classes, frozen, pre.state_dicts, pre.path, img_size=img_size)
    info = {"method": pre.method, "step": pre.step, "source": pre.source, "path": pre.path,
            "branches": [s.name for s in specs]}
    if pre.adapted or model.weight_notes:  # e.g. position embeddings resampled to the crop's grid
        info["weights_adapted"] = pre.adapted + model.weight_notes
    if mc.modalities == "s1s2":  # what runs: one backbone on stacked S1+S2 is early fusion
        info["fusion"] = "early" if len(specs) == 1 else "late"
    return model, pre.band_stats(), info


class Trainer:
    """Epoch loop with val-based early stopping and a single x0.1 lr drop. Segmentation's loop
    subclasses it (its own `_epoch` and `_validate`)."""

    metric_tag = "val_metric"  # the TensorBoard/metrics name of the early-stopping metric

    def __init__(self, cfg: FinetuneConfig, model: nn.Module, prep: Prepared, stats: dict,
                 device: torch.device, batchers: tuple | None = None) -> None:
        self.cfg, self.model, self.prep, self.device = cfg, model, prep, device
        self.bench = benchmark_class(cfg.data.benchmark)
        tc = cfg.train
        self.opt = torch.optim.Adam(model.param_groups(tc.lr, tc.backbone_lr, tc.weight_decay))
        self.batcher = Batcher(prep.train, stats, cfg.data.crop, cfg.data.multi_label_min_fraction, device)
        self.val_batcher = (Batcher(prep.val, stats, cfg.data.crop, cfg.data.multi_label_min_fraction, device)
                            if prep.val is not None else self.batcher)
        if batchers is not None:  # a probe on cached features (probe_cache): (train, val) feature batchers
            self.batcher, self.val_batcher = batchers
        self.rng = np.random.default_rng([tc.seed, 7])
        self.curves: dict[str, list] = {"epoch": [], "train_loss": [], "val_loss": [], "val_metric": [],
                                        "lr_head": [], "seconds": []}
        # start_step=1: a re-run of an unfinished run starts over; its curves replace the old ones
        self.sinks = MetricSinks(cfg.log, Path(cfg.run_dir), start_step=1, config=to_dict(cfg),
                                 kind="finetune")

    def _drop_lr(self, epoch: int) -> None:
        at = self.cfg.train.lr_drop_at
        if at > 0 and epoch == max(1, math.ceil(at * self.cfg.train.epochs)):
            for g in self.opt.param_groups:
                g["lr"] *= 0.1

    def _epoch(self) -> float:
        dc, task = self.cfg.data, self.cfg.train.task
        order = D.epoch_order(self.prep.train_idx, self.prep.strat, self.rng, dc.balanced,
                              dc.min_epoch_samples)
        self.model.train()
        total, n = 0.0, 0
        for start in range(0, order.size, dc.batch_size):
            s1, s2, single, multi = self.batcher(order[start : start + dc.batch_size], self.rng)
            loss = _loss(task, self.model(s1, s2), single, multi)
            self.opt.zero_grad(set_to_none=True)
            loss.backward()
            self.opt.step()
            total += loss.item() * s1.shape[0]
            n += s1.shape[0]
        return total / max(n, 1)

    def _validate(self) -> tuple[float, float]:
        """(loss, headline metric) on the early-stopping split; the metric is NaN without labels."""
        tc, task = self.cfg.train, self.cfg.train.task
        pred = predict(self.model, self.val_batcher, self.prep.val_idx, self.cfg.data.eval_batch_size, task)
        metric = score(task, pred, tc.threshold, self.bench)[self.bench.metrics[task]] if pred["single"].size else float("nan")
        return pred["loss"], metric

    def fit(self) -> dict:
        tc = self.cfg.train
        has_val = self.prep.val_idx.size > 0
        best = {"epoch": 0, "value": math.inf, "state": copy.deepcopy(self.model.state_dict())}
        stale = 0
        for epoch in range(1, tc.epochs + 1):
            t0 = time.perf_counter()
            self._drop_lr(epoch)
            train_loss = self._epoch()
            val_loss, val_metric = self._validate() if has_val else (float("nan"), float("nan"))
            self._log(epoch, train_loss, val_loss, val_metric, time.perf_counter() - t0)
            value = (val_loss if tc.early_stop_on == "loss" else -val_metric) if has_val else -epoch
            if value < best["value"]:
                best = {"epoch": epoch, "value": value, "state": copy.deepcopy(self.model.state_dict())}
                stale = 0
            else:
                stale += 1
                if tc.patience and stale >= tc.patience:
                    log.info("early stop at epoch %d (best %d)", epoch, best["epoch"])
                    break
        self.model.load_state_dict(best["state"])
        if self.sinks is not None:
            self.sinks.close()
        return {"best_epoch": best["epoch"], "epochs_run": len(self.curves["epoch"]),
                "early_stopping": "val_" + tc.early_stop_on if has_val else "none (no val split)"}

    def _log(self, epoch: int, train_loss: float, val_loss: float, val_metric: float, secs: float) -> None:
        c = self.curves
        c["epoch"].append(epoch)
        c["train_loss"].append(train_loss)
        c["val_loss"].append(val_loss if math.isfinite(val_loss) else None)
        c["val_metric"].append(val_metric if math.isfinite(val_metric) else None)
        c["lr_head"].append(self.opt.param_groups[0]["lr"])
        c["seconds"].append(round(secs, 3))
        if self.sinks is not None:  # None on the ranks that write nothing (segmentation under DDP)
            self.sinks.scalars(epoch, {"finetune/train_loss": train_loss, "finetune/val_loss": val_loss,
                                       f"finetune/{self.metric_tag}": val_metric,
                                       "finetune/lr_head": c["lr_head"][-1], "finetune/epoch_s": secs})
        log.debug("epoch %d train_loss %.4f val_loss %.4f %s %.4f", epoch, train_loss,
                  val_loss, self.metric_tag, val_metric)


def _seed_everything(seed: int) -> None:
    torch.manual_seed(seed)
    np.random.seed(seed % (2**32))


def check_learning(tc: FtTrainConfig, mode: str, train_loss: list[float], n_classes: int) -> str | None:
    """A warning when the training loss neither fell nor left the chance level (`tc`: the
    `train` section; `mode`: model.mode, whether the backbone's lr is part of the advice;
    `n_classes`: the benchmark's).

    Why: with the authors' lr (1e-5) on a small data set the head barely moves and every
    score sits at chance; without a word the table looks like a result. "Fell" is the mean
    of the later half of the epochs at least 10 % below the first epoch (epoch-to-epoch noise
    of a small balanced sample is ~5 %); a run that learnt within its first epoch is already
    well below chance (ln C for C classes single-label, ln 2 per class multi-label).
    """
    losses = [v for v in train_loss if v is not None and math.isfinite(v)]
    if len(losses) < 2:
        return None
    later = losses[len(losses) // 2:] if len(losses) > 2 else losses[1:]
    mean_later = sum(later) / len(later)
    chance = math.log(n_classes) if tc.task == "single" else math.log(2)
    if mean_later < 0.9 * losses[0] or mean_later < 0.5 * chance:
        return None
    lrs = f"train.lr={tc.lr:g}" + (f", train.backbone_lr={tc.backbone_lr:g}" if mode == "finetune" else "")
    return (f"training loss did not fall ({losses[0]:.4f} in epoch 1, {mean_later:.4f} later; chance "
            f"{chance:.2f}) with {lrs}: the classifier is not learning and its scores may be at chance; "
            "try a larger train.lr (e.g. 1e-3 on small data) or more epochs")


def adopt_checkpoint(mc: FtModelConfig, ckpt_info: dict, weights: str | None) -> None:
    """Record the weights' identity in `ckpt_info` and run the fusion the checkpoint fixes (one
    backbone on stacked S1+S2 is early fusion whatever was asked), with a warning when it differs;
    both the classification and the segmentation loop start this way."""
    if mc.checkpoint.lower() not in ("", "none"):
        ckpt_info["weights"] = weights or weights_identity(mc.checkpoint)
    if ckpt_info.get("fusion", mc.fusion) != mc.fusion:
        log.warning("model.fusion=%s asked, but %s has one backbone on stacked S1+S2: this runs (and "
                    "records) %s fusion", mc.fusion, mc.checkpoint, ckpt_info["fusion"])
        mc.fusion = ckpt_info["fusion"]


def run_finetune(cfg: FinetuneConfig, overwrite: bool = False, weights: str | None = None) -> dict:
    """Train, early-stop, test; write RUN_DIR/result.json (atomic) and return the result.

    An existing RUN_DIR/result.json (another run's result) is refused unless `overwrite`.
    `weights`: the identity of model.checkpoint's contents (`weights_identity`) when the caller
    (a sweep: once for all its runs) has it; recorded in result.json as checkpoint.weights, so a
    sweep reuses the result only for the same weights, whatever the path.
    """
    t_start = time.perf_counter()
    if cfg.train.threads > 0:
        torch.set_num_threads(cfg.train.threads)
    bench = benchmark_class(cfg.data.benchmark)  # an unknown name or task fails before any directory is claimed
    check_task(bench, cfg.train.task)
    if bench.run is not None:  # a benchmark with a loop of its own (dfc2020-seg)
        return bench.run(cfg, overwrite, weights)
    if cfg.model.decoder != "auto":
        raise SatfuseError(f"model.decoder={cfg.model.decoder!r} applies to segmentation benchmarks only; "
                           f"{bench.name!r} classifies: leave model.decoder=auto")
    if cfg.run_dir:
        _claim(Path(cfg.run_dir), overwrite)
    device = _device(cfg.train.device)
    model, pre_stats, ckpt_info = build_model(cfg.model, cfg.train.seed, bench.n_classes(), img_size=cfg.data.crop)
    adopt_checkpoint(cfg.model, ckpt_info, weights)
    if not cfg.run_dir:
        cfg.run_dir = str(Path(DEFAULT_RUNS_ROOT) / run_subdir(
            method_label(cfg.model, ckpt_info["method"], cfg.label), cfg.train.task, cfg.data.label_fraction, cfg.train.seed))
        _claim(Path(cfg.run_dir), overwrite)
    run_dir = Path(cfg.run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    dump_yaml(cfg, RunLayout(run_dir).config)
    model.to(device)
    prep = prepare_data(cfg.data, cfg.train.seed)
    stats, stats_source = band_stats(cfg.data, prep.train, pre_stats)
    t_loaded = time.perf_counter()
    probe = probe_cache.cached_probe(
        cfg, model, {"train": (prep.train, cfg.data.crop), "val": (prep.val, cfg.data.crop), "test": (prep.test, 0)},
        lambda split, crop: Batcher(split, stats, crop, cfg.data.multi_label_min_fraction, device),
        {k: v.to_dict() for k, v in stats.items()}, ckpt_info, device) if cfg.model.feature_cache else None
    trainer = Trainer(cfg, probe[0] if probe else model, prep, stats, device, probe[1][:2] if probe else None)
    fit = trainer.fit()
    t_trained = time.perf_counter()
    test_batcher = probe[1][2] if probe else Batcher(prep.test, stats, 0, cfg.data.multi_label_min_fraction, device)
    pred = predict(probe[0] if probe else model, test_batcher, np.arange(len(prep.test)), cfg.data.eval_batch_size,
                   cfg.train.task)
    if pred["single"].size == 0:
        raise SatfuseError(f"{cfg.data.test_shards}: no test patch has a valid label in its "
                           f"{cfg.data.crop}px centre crop; nothing to score")
    metrics = score(cfg.train.task, pred, cfg.train.threshold, bench)
    warning = check_learning(cfg.train, cfg.model.mode, trainer.curves["train_loss"], bench.n_classes())
    if warning:
        log.warning("%s: %s", run_dir, warning)
    t_end = time.perf_counter()
    result = {
        "format": RESULT_FORMAT, "benchmark": bench.describe(),
        "method": method_label(cfg.model, ckpt_info["method"], cfg.label),
        "task": cfg.train.task, "mode": cfg.model.mode, "modalities": cfg.model.modalities,
        "fusion": cfg.model.fusion, "label_fraction": cfg.data.label_fraction, "seed": cfg.train.seed,
        **prep.info, "n_test": int(pred["single"].size), "n_test_dropped_no_label": pred["n_dropped"],
        "metrics": {k: v for k, v in metrics.items() if k != "per_class"},
        "per_class": metrics["per_class"], "curves": trainer.curves, **fit,
        "normalization": stats_source, "checkpoint": ckpt_info,
        "n_params": sum(p.numel() for p in model.parameters()),
        "n_trainable": sum(p.numel() for p in model.parameters() if p.requires_grad),
        "timings": {"load_s": round(t_loaded - t_start, 3), "train_s": round(t_trained - t_loaded, 3),
                    "test_s": round(t_end - t_trained, 3), "total_s": round(t_end - t_start, 3)},
        "threads": torch.get_num_threads(), "config": to_dict(cfg),
        "warnings": [warning] if warning else [],
    }
    atomic_write_text(RunLayout(run_dir).result, json.dumps(result, indent=1) + "\n")
    log.info("%s on %s frac %g seed %d: %s (%.1fs) -> %s", result["method"], bench.title, cfg.data.label_fraction,
             cfg.train.seed, _summary(cfg.train.task, metrics), t_end - t_start, RunLayout(run_dir).result)
    return result


def _claim(run_dir: Path, overwrite: bool) -> None:
    """Refuse another kind's directory (a pretraining run, shards, a source tree: its
    config.yaml and curves would be replaced or mixed), and a finished run unless `overwrite`."""
    check_run_dir_kind(run_dir, FINETUNE_RUN, "pass another --run-dir (run_dir=...)")
    if RunLayout(run_dir).result.exists() and not overwrite:
        raise SatfuseError(_exists_msg(run_dir))


def _exists_msg(run_dir: Path) -> str:
    return (f"{RunLayout(run_dir).result} exists (a finished run); pass --overwrite to replace it, or "
            "another --run-dir / --seed")


def _summary(task: str, m: dict) -> str:
    if task == "single":
        return f"OA {m['oa']:.3f} AA {m['aa']:.3f} F1 {m['f1_macro']:.3f}"
    return f"F1 macro {m['f1_macro']:.3f} micro {m['f1_micro']:.3f} mAP {m['map']:.3f}"

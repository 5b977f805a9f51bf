"""DFC2020 land-cover segmentation (registered `dfc2020-seg`), the dense half of the seed authors'
follow-up (Scheibenreif et al., CVPR EarthVision 2022), and its training loop.

Why a loop of its own beside `finetune`: the targets are per-pixel maps, the head is a dense
decoder and the scores come from a pixel confusion matrix; everything else is the
classification path's, reused: the config (`FinetuneConfig`; `train.task=seg`), the splits
(train on the DFC2020 *validation* split minus the stratified early-stopping part, nested label
fractions, test on the *test* split, centre crop), the band statistics, the models' branches and
weights (`finetune.build_model`), the method labels and run layout, result.json.

Targets: the `dfc` member only (the 256 px contest maps; SEN12MS `lc` maps are coarse IGBP
labels, not the contest's), mapped as for classification (`targets.dfc_to_classes`: 8 classes,
Savanna, Snow/Ice and no-data are ignore 255, left out of loss and scores).

Distributed: under torchrun (`torchrun --nproc-per-node N -m satfuse finetune ...`) every rank
joins the process group, trains a DistributedDataParallel copy on its share of each batch and
scores its share of the val/test patches; the confusion matrices are summed over ranks, so the
scores equal a one-process run's, and rank 0 writes the run directory.
"""

from __future__ import annotations

import dataclasses
import io
import json
import logging
import time
from pathlib import Path

import numpy as np
import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from satfuse.config import dump_yaml, to_dict
from satfuse.data.packing.normalize import S2_RGB, normalize
from satfuse.distributed import collectives as C
from satfuse.distributed.env import init_distributed
from satfuse.engines.metrics_sinks import MetricSinks
from satfuse.evaluation import data as D
from satfuse.evaluation.benchmark import Benchmark, benchmark_class, check_task
from satfuse.evaluation.dfc2020 import DFC2020
from satfuse.evaluation.finetune import (
    DEFAULT_RUNS_ROOT,
    RESULT_FORMAT,
    FinetuneConfig,
    Prepared,
    Trainer,
    _claim,
    _device,
    adopt_checkpoint,
    band_stats,
    build_model,
    check_learning,
    method_label,
    prepare_data,
    run_subdir,
)
from satfuse.evaluation.seg_metrics import confusion, seg_metrics
from satfuse.evaluation.seg_model import Segmenter, check_crop
from satfuse.evaluation.targets import CLASS_NAMES, IGNORE, dfc_to_classes
from satfuse.registry import BENCHMARKS
from satfuse.run_layout import RunLayout
from satfuse.utils import SatfuseError, atomic_write_bytes, atomic_write_text

log = logging.getLogger(__name__)

N_SAMPLES = 4  # test patches kept for the report's picture (S2 RGB, label map, prediction)


class SegBatcher:
    """Crops (one window shared by S1, S2 and the map), normalises, and returns label maps."""

    def __init__(self, split: D.LabeledSplit, stats: dict, crop: int, device: torch.device) -> None:
        self.split, self.stats, self.crop, self.device = split, stats, crop, device

    def __call__(self, idx: np.ndarray, rng: np.random.Generator | None):
        s1, s2, lab = D.crop_batch([self.split.s1, self.split.s2, self.split.labels], idx, self.crop, rng)
        t = lambda a: torch.from_numpy(np.ascontiguousarray(a)).to(self.device)  # noqa: E731
        return t(normalize(s1, self.stats["s1"])), t(normalize(s2, self.stats["s2"])), t(lab.astype(np.int64))


def pixel_loss(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Cross-entropy over the labelled pixels (ignore 255); zero, still in the graph, without any."""
    if bool((target != IGNORE).any()):
        return nn.functional.cross_entropy(logits, target, ignore_index=IGNORE)
    return logits.sum() * 0.0


@torch.no_grad()
def evaluate(model: Segmenter, batcher: SegBatcher, idx: np.ndarray, batch_size: int) -> dict:
    """This rank's share of `idx` (centre crops) scored, summed over ranks: the pixel confusion
    matrix and the mean loss over labelled pixels."""
    model.eval()
    n = batcher.split.n_classes
    mine = idx[C.rank()::C.world()]
    conf = torch.zeros(n, n, dtype=torch.int64, device=batcher.device)
    sums = torch.zeros(2, dtype=torch.float64, device=batcher.device)  # loss x pixels, pixels
    for start in range(0, mine.size, batch_size):
        s1, s2, lab = batcher(mine[start : start + batch_size], None)
        logits = model(s1, s2)
        valid = int((lab != IGNORE).sum())
        if valid:
            sums[0] += float(pixel_loss(logits, lab)) * valid
            sums[1] += valid
        conf += confusion(lab, logits.argmax(1), n)
    conf, sums = C.all_reduce_sum(conf), C.all_reduce_sum(sums)
    return {"confusion": conf.cpu().numpy(), "loss": float(sums[0] / max(float(sums[1]), 1.0)),
            "n_pixels": int(sums[1])}


class SegTrainer(Trainer):
    """The classification loop's protocol (`finetune.Trainer`: early stopping on the val split,
    one x0.1 lr drop) with per-pixel batches and loss, DDP over the ranks of a process group."""

    metric_tag = "val_miou"

    def __init__(self, cfg: FinetuneConfig, model: Segmenter, prep: Prepared, stats: dict, side: int,
                 device: torch.device) -> None:
        """Not `Trainer.__init__`: pixel batches, a DDP wrapper for the step, sinks on rank 0 only."""
        self.cfg, self.model, self.prep, self.device = cfg, model, prep, device
        self.bench = benchmark_class(cfg.data.benchmark)
        tc = cfg.train
        self.opt = torch.optim.Adam(model.param_groups(tc.lr, tc.backbone_lr, tc.weight_decay))
        self.step_model: nn.Module = model
        if C.is_distributed():
            ids = [device.index] if device.type == "cuda" else None
            self.step_model = DistributedDataParallel(model, device_ids=ids)
        self.batcher = SegBatcher(prep.train, stats, side, device)
        self.rng = np.random.default_rng([tc.seed, 7])  # the same on every rank: one global order
        self.curves: dict[str, list] = {"epoch": [], "train_loss": [], "val_loss": [], "val_metric": [],
                                        "lr_head": [], "seconds": []}
        self.sinks = (MetricSinks(cfg.log, Path(cfg.run_dir), start_step=1, config=to_dict(cfg), kind="finetune")
                      if C.is_main() else None)

    def _epoch(self) -> float:
        dc, world, rank = self.cfg.data, C.world(), C.rank()
        order = D.epoch_order(self.prep.train_idx, self.prep.strat, self.rng, dc.balanced, dc.min_epoch_samples)
        self.step_model.train()
        sums = torch.zeros(2, dtype=torch.float64)
        for start in range(0, order.size, dc.batch_size):
            batch = order[start : start + dc.batch_size]
            if batch.size < world:  # a last batch too small to give every rank a patch
                continue
            s1, s2, lab = self.batcher(batch[rank::world], self.rng)
            loss = pixel_loss(self.step_model(s1, s2), lab)
            self.opt.zero_grad(set_to_none=True)
            loss.backward()
            self.opt.step()
            sums += torch.tensor([loss.item() * s1.shape[0], s1.shape[0]], dtype=torch.float64)
        sums = C.all_reduce_sum(sums.to(self.device)).cpu()
        return float(sums[0] / max(float(sums[1]), 1.0))

    def _validate(self) -> tuple[float, float]:
        """(pixel loss, mIoU) on the early-stopping patches, summed over ranks."""
        ev = evaluate(self.model, self.batcher, self.prep.val_idx, self.cfg.data.eval_batch_size)
        miou = seg_metrics(ev["confusion"], self.bench.class_names)["miou"] if ev["n_pixels"] else float("nan")
        return ev["loss"], miou


@torch.no_grad()
def sample_maps(model: Segmenter, batcher: SegBatcher, n: int) -> bytes:
    """npz bytes of the first `n` test patches: S2 RGB (uint8, 2-98 % stretch per patch), the
    label map and the prediction (class indices, 255 = ignore)."""
    model.eval()
    idx = np.arange(min(n, len(batcher.split)))
    s1, s2, lab = batcher(idx, None)
    pred = model(s1, s2).argmax(1).to(torch.uint8).cpu().numpy()
    rgb = batcher.split.s2[idx][:, S2_RGB].astype(np.float32)
    lo, hi = np.percentile(rgb, 2, axis=(1, 2, 3), keepdims=True), np.percentile(rgb, 98, axis=(1, 2, 3), keepdims=True)
    rgb = (np.clip((rgb - lo) / np.maximum(hi - lo, 1e-6), 0, 1) * 255).astype(np.uint8).transpose(0, 2, 3, 1)
    buf = io.BytesIO()
    np.savez_compressed(buf, rgb=rgb, label=lab.to(torch.uint8).cpu().numpy(), pred=pred,
                        names=np.array(batcher.split.keys)[idx])
    return buf.getvalue()


def run_segmentation(cfg: FinetuneConfig, overwrite: bool = False, weights: str | None = None) -> dict:
    """Train, early-stop, test one segmentation run; rank 0 writes RUN_DIR/result.json (atomic)
    and RUN_DIR/seg_samples.npz. Arguments as `finetune.run_finetune`'s (which hands
    `dfc2020-seg` runs here)."""
    t_start = time.perf_counter()
    if cfg.train.threads > 0:
        torch.set_num_threads(cfg.train.threads)
    bench = benchmark_class(cfg.data.benchmark)
    check_task(bench, cfg.train.task)
    init_distributed()  # joins torchrun's process group; one process: no group
    device = _device(cfg.train.device)
    clf, pre_stats, ckpt_info = build_model(cfg.model, cfg.train.seed, bench.n_classes(), img_size=cfg.data.crop)
    model = Segmenter(clf, cfg.model.backbone, cfg.model.decoder, bench.n_classes())
    adopt_checkpoint(cfg.model, ckpt_info, weights)
    prep = prepare_data(cfg.data, cfg.train.seed)
    side = check_crop(cfg.data.crop, min(prep.train.s1.shape[-2:]), model.max_stride, cfg.model.backbone)
    check_crop(0, min(prep.test.s1.shape[-2:]), model.max_stride, cfg.model.backbone)  # test: centre crops
    label = method_label(cfg.model, ckpt_info["method"], cfg.label)
    if not cfg.run_dir:
        cfg.run_dir = str(Path(DEFAULT_RUNS_ROOT) / run_subdir(label, cfg.train.task, cfg.data.label_fraction,
                                                               cfg.train.seed))
    run_dir = Path(cfg.run_dir)
    if C.is_main():
        _claim(run_dir, overwrite)
        run_dir.mkdir(parents=True, exist_ok=True)
        dump_yaml(cfg, RunLayout(run_dir).config)
    C.barrier()
    model.to(device)
    stats, stats_source = band_stats(cfg.data, prep.train, pre_stats)
    t_loaded = time.perf_counter()
    trainer = SegTrainer(cfg, model, prep, stats, side, device)
    fit = trainer.fit()
    t_trained = time.perf_counter()
    test_batcher = SegBatcher(prep.test, stats, 0, device)
    ev = evaluate(model, test_batcher, np.arange(len(prep.test)), cfg.data.eval_batch_size)
    if ev["n_pixels"] == 0:
        raise SatfuseError(f"{cfg.data.test_shards}: no test pixel carries a valid label in the "
                           f"centre crops; nothing to score")
    metrics = seg_metrics(ev["confusion"], bench.class_names)
    warning = check_learning(dataclasses.replace(cfg.train, task="single"), cfg.model.mode,
                             trainer.curves["train_loss"], bench.n_classes())  # per-pixel CE: chance is ln C
    t_end = time.perf_counter()
    result = {
        "format": RESULT_FORMAT, "benchmark": bench.describe(), "method": label,
        "task": cfg.train.task, "mode": cfg.model.mode, "modalities": cfg.model.modalities,
        "fusion": cfg.model.fusion, "decoder": model.decoder_name, "label_fraction": cfg.data.label_fraction,
        "seed": cfg.train.seed, **prep.info, "n_test": len(prep.test), "n_test_pixels": metrics["n_pixels"],
        "metrics": {k: v for k, v in metrics.items() if k != "per_class"}, "per_class": metrics["per_class"],
        "confusion": ev["confusion"].tolist(), "curves": trainer.curves, **fit,
        "normalization": stats_source, "checkpoint": ckpt_info,
        "n_params": sum(p.numel() for p in model.parameters()),
        "n_trainable": sum(p.numel() for p in model.parameters() if p.requires_grad),
        "timings": {"load_s": round(t_loaded - t_start, 3), "train_s": round(t_trained - t_loaded, 3),
                    "test_s": round(t_end - t_trained, 3), "total_s": round(t_end - t_start, 3)},
        "threads": torch.get_num_threads(), "world_size": C.world(), "config": to_dict(cfg),
        "warnings": [warning] if warning else [],
    }
    if C.is_main():
        if warning:
            log.warning("%s: %s", run_dir, warning)
        atomic_write_bytes(RunLayout(run_dir).seg_samples, sample_maps(model, test_batcher, N_SAMPLES))
        atomic_write_text(RunLayout(run_dir).result, json.dumps(result, indent=1) + "\n")
        log.info("%s on %s frac %g seed %d: mIoU %.3f OA %.3f AA %.3f (%.1fs) -> %s", label, bench.title,
                 cfg.data.label_fraction, cfg.train.seed, metrics["miou"], metrics["oa"], metrics["aa"],
                 t_end - t_start, RunLayout(run_dir).result)
    C.barrier()
    return result


@BENCHMARKS.register("dfc2020-seg")
class DFC2020Seg(Benchmark):
    """The follow-up's DFC2020 land-cover segmentation (8 classes per pixel, mIoU)."""

    name, title, dataset = "dfc2020-seg", "DFC2020 segmentation", "dfc2020"
    splits = DFC2020.splits
    label_members = ("dfc",)
    class_names = CLASS_NAMES
    tasks = ("seg",)
    metrics = {"seg": "miou"}
    run = staticmethod(run_segmentation)

    @classmethod
    def label_map(cls, member: str, array: np.ndarray) -> np.ndarray:
        return dfc_to_classes(array[0] if array.ndim == 3 else array)

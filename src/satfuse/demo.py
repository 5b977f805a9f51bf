"""`satfuse demo`: the whole story on the embedded default, one command (the README's first).

synthetic SEN12MS + DFC2020 (real layout) -> shards -> 2-process Dual-SimCLR pretraining ->
export -> fine-tuning at several label fractions beside the supervised baselines -> a small
DFC2020 segmentation comparison (`seg_config`) -> tables + plots.

Every stage is resumable: a stage whose output is complete is skipped on a rerun, so an
interrupted demo continues where it stopped. Sizes are set for ~20 minutes on 2 CPU cores;
`satfuse demo key=value` overrides them (e.g. `scenes=8` for a quick look).

Everything is written under `--out DIR` (default `./satfuse-demo`: data, shards, runs and the
report), never into the working directory's `data/` or `reports/`, so the demo runs from any
directory with an installed satfuse (its configs are the packaged ones).
"""

from __future__ import annotations

import argparse
import json
import logging
import time
from dataclasses import dataclass
from pathlib import Path

from satfuse.checkpoint.layout import read_latest
from satfuse.config import load_config
from satfuse.engines.commands import launch_local
from satfuse.utils import SatfuseError

log = logging.getLogger("satfuse.demo")


@dataclass
class DemoConfig:
    """`satfuse demo`: the whole pipeline on synthetic data, sized for a laptop."""

    out: str = "satfuse-demo"  # everything the demo writes goes under this directory
    seed: int = 0  # synthetic scenes, the shard plan and pretraining (train.seed)
    patch_size: int = 128  # real patches are 256; the demo halves them to fit 2 cores
    scenes: int = 20  # SEN12MS scenes (every 5th is held out for retrieval accuracy)
    patches_per_scene: int = 100  # synthetic patches per scene
    dfc_validation: int = 400  # labelled training patches (the real DFC2020 has 986)
    dfc_test: int = 1000  # test patches (real: 5,128)
    maxcount: int = 100  # samples per shard
    shard_workers: int = 2  # processes packing the shards
    nproc: int = 2  # pretraining ranks
    pretrain_config: str = "hpc/pretrain/demo.yaml"  # the pretraining config of the demo
    finetune_config: str = "hpc/finetune/demo_sweep.yaml"  # the fine-tuning sweep of the demo
    seg_config: str = "hpc/finetune/demo_seg_sweep.yaml"  # the segmentation comparison (its own stage); empty: skip it
    report: str = ""  # table + plot directory; empty: <out>/reports
    ben_patches: int = 120  # synthetic BigEarthNet v2 patches of the BigEarthNet-19 stage (~70 % clean: 1/2 train, 1/4 val, 1/4 test)
    ben_patch_size: int = 60  # their size in px (real: 120; halved like the DFC2020 patches, a multiple of 6)
    ben_sweep_config: str = "hpc/finetune/demo_bigearthnet19.yaml"  # the BigEarthNet-19 sweep of the demo


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("demo", help="run the whole pipeline end to end on synthetic data (README)")
    p.add_argument("--out", default=None, metavar="DIR",
                   help="write everything under DIR (default ./satfuse-demo); same as out=DIR")
    p.add_argument("overrides", nargs="*", help="key=value overrides of the demo sizes")
    p.set_defaults(func=cmd_demo)


def cmd_demo(args: argparse.Namespace) -> int:
    overrides = [*args.overrides, *([f"out={args.out}"] if args.out else [])]
    cfg = load_config(DemoConfig, None, overrides)
    run_demo(cfg)
    return 0


class Stages:
    """Numbered stages with timing; the summary goes to `<out>/demo_timings.json`."""

    def __init__(self, total: int) -> None:
        self.total, self.n, self.timings = total, 0, {}

    def run(self, name: str, fn) -> object:
        self.n += 1
        log.info("[%d/%d] %s", self.n, self.total, name)
        t0 = time.perf_counter()
        result = fn()
        self.timings[name] = round(time.perf_counter() - t0, 1)
        log.info("[%d/%d] %s done in %.1fs", self.n, self.total, name, self.timings[name])
        return result


def run_demo(cfg: DemoConfig) -> dict:
    out = Path(cfg.out)
    stages = Stages(total=8 if cfg.seg_config else 7)
    stages.run("synthesise SEN12MS and DFC2020 (real layout)", lambda: synthesise(cfg, out))
    stages.run("pack WebDataset shards", lambda: make_shards(cfg, out))
    ckpt = stages.run(f"pretrain Dual-SimCLR on {cfg.nproc} ranks", lambda: pretrain(cfg, out))
    backbone = stages.run("export pretrained backbones", lambda: export(ckpt, out))
    runs = stages.run("fine-tune vs supervised baselines", lambda: finetune(cfg, out, backbone))
    runs += stages.run("BigEarthNet-19: Dual-SimCLR vs supervised early fusion",
                       lambda: bigearthnet19(cfg, out, backbone))
    if cfg.seg_config:  # timed alone in demo_timings.json: what segmentation adds to the demo
        runs += stages.run("segmentation: pretrained vs supervised", lambda: segment(cfg, out, backbone))
    pre_run = out / "runs" / "pretrain"
    summary = stages.run("report: table + label-fraction plot + pretraining curves",
                         lambda: report(cfg, out, [pre_run, *runs]))
    stages.timings["total"] = round(sum(stages.timings.values()), 1)
    (out / "demo_timings.json").write_text(json.dumps(stages.timings, indent=2) + "\n")
    log.info("stage timings (s): %s", stages.timings)
    return summary


def synthesise(cfg: DemoConfig, out: Path) -> None:
    from satfuse.data.sources.synth import write_dfc2020, write_sen12ms  # lazy: --help stays fast

    raw = out / "raw"
    if not (raw / "sen12ms" / "test_list.txt").exists():
        write_sen12ms(raw / "sen12ms", cfg.scenes, cfg.patches_per_scene, cfg.seed,
                      size=cfg.patch_size, overwrite=True)
    if not (raw / "dfc2020" / "test_observations.csv").exists():
        write_dfc2020(raw / "dfc2020", cfg.dfc_validation, cfg.dfc_test, cfg.seed + 1,
                      size=cfg.patch_size, overwrite=True)


def make_shards(cfg: DemoConfig, out: Path) -> None:
    from satfuse.data.packing.shard_writer import shard_dataset  # lazy: --help stays fast

    raw, shards = out / "raw", out / "shards"
    jobs = [
        ("sen12ms", raw / "sen12ms", "train_list.txt", "sen12ms"),
        ("sen12ms", raw / "sen12ms", "test_list.txt", "sen12ms-heldout"),
        ("dfc2020", raw / "dfc2020", "validation_observations.csv", "dfc2020-train"),
        ("dfc2020", raw / "dfc2020", "test_observations.csv", "dfc2020-test"),
    ]
    for dataset, src, split, name in jobs:
        if (shards / name / "manifest.json").exists():
            continue
        maxcount = cfg.maxcount if name == "sen12ms" else max(8, cfg.maxcount // 4)
        shard_dataset(src, dataset, shards / name, maxcount=maxcount, workers=cfg.shard_workers,
                      seed=cfg.seed, split_file=src / split)


def pretrain(cfg: DemoConfig, out: Path) -> Path:
    run_dir = out / "runs" / "pretrain"
    overrides = [f"data.shards={out / 'shards' / 'sen12ms'}",
                 f"data.val_shards={out / 'shards' / 'sen12ms-heldout'}",
                 f"train.run_dir={run_dir}", f"train.seed={cfg.seed}"]
    code = launch_local(cfg.pretrain_config, overrides, cfg.nproc)
    if code != 0:
        raise SatfuseError(f"pretraining failed (exit {code}); see the log above and {run_dir}")
    ckpt = read_latest(run_dir)
    if ckpt is None:
        raise SatfuseError(f"pretraining ended without a checkpoint in {run_dir}; see the log above")
    return ckpt


def export(ckpt: Path, out: Path) -> Path:
    from satfuse.checkpoint.export import export_backbones  # lazy: --help stays fast

    target = out / "runs" / "pretrain" / "backbone.pt"
    # replaced on purpose: the demo's own export of the checkpoint just resumed or trained (the
    # same bytes when nothing was retrained, so the fine-tuning stage keeps its runs)
    export_backbones(ckpt, target, overwrite=True)
    return target


def finetune(cfg: DemoConfig, out: Path, backbone: Path) -> list[Path]:
    from satfuse.evaluation.sweep import load_sweep_config, run_sweep  # lazy: --help stays fast

    sweep = load_sweep_config(cfg.finetune_config, [
        f"checkpoint={backbone}",
        f"train_shards={out / 'shards' / 'dfc2020-train'}",
        f"test_shards={out / 'shards' / 'dfc2020-test'}",
        f"out={out / 'runs' / 'finetune'}",
    ])
    # a rerun reuses every run made from the same weights and config (a finished pretraining
    # exports the same bytes again); runs made from weights the export stage has since replaced
    # (retrained) are stale results of this demo's own directory, so they are redone, not refused
    return run_sweep(sweep, overwrite=True)


def segment(cfg: DemoConfig, out: Path, backbone: Path) -> list[Path]:
    """The small segmentation comparison (dfc2020-seg on the demo's DFC2020 shards)."""
    from satfuse.evaluation.sweep import load_sweep_config, run_sweep  # lazy: --help stays fast

    sweep = load_sweep_config(cfg.seg_config, [
        f"checkpoint={backbone}",
        f"train_shards={out / 'shards' / 'dfc2020-train'}",
        f"test_shards={out / 'shards' / 'dfc2020-test'}",
        f"out={out / 'runs' / 'segmentation'}",
    ])
    return run_sweep(sweep, overwrite=True)  # as finetune(): stale runs of this demo are redone


def bigearthnet19(cfg: DemoConfig, out: Path, backbone: Path) -> list[Path]:
    """A small BigEarthNet-19 comparison (synthetic reBEN tree, official splits): the pretrained
    Dual-SimCLR backbone fine-tuned and linear-probed (on cached features) beside supervised
    early fusion, through the benchmark sweep; each step skipped when its output is complete."""
    from satfuse.data.packing.shard_writer import shard_dataset  # lazy: --help stays fast
    from satfuse.data.sources.bigearthnet import V2_SNOW_CLOUD  # lazy: --help stays fast
    from satfuse.data.sources.synth_multiband import write_bigearthnet  # lazy: --help stays fast
    from satfuse.evaluation.sweep import load_sweep_config, run_sweep  # lazy: --help stays fast

    raw, shards, runs = out / "raw" / "bigearthnet-v2", out / "shards", out / "runs" / "bigearthnet19"
    if not (raw / V2_SNOW_CLOUD).exists():  # the synthesiser's last file
        write_bigearthnet(raw, version=2, patches=cfg.ben_patches, seed=cfg.seed + 2, size=cfg.ben_patch_size,
                          overwrite=True)
    for split in ("train", "val", "test"):
        if not (shards / f"ben19-{split}" / "manifest.json").exists():
            shard_dataset(raw, "bigearthnet-v2", shards / f"ben19-{split}", maxcount=max(8, cfg.maxcount // 4),
                          workers=cfg.shard_workers, seed=cfg.seed, split=split)
    sweep = load_sweep_config(cfg.ben_sweep_config, [
        f"checkpoint={backbone}", f"out={runs}",
        *(f"{role}_shards={shards / f'ben19-{role}'}" for role in ("train", "val", "test")),
    ])
    for m in sweep.methods:  # linear probes train their head on features computed once per shard set
        if m.mode == "linear":
            m.overrides.append(f"model.feature_cache={runs / 'features'}")
    return run_sweep(sweep, overwrite=True)  # as in `finetune`: runs from replaced weights are redone


def report(cfg: DemoConfig, out: Path, runs: list[Path]) -> dict:
    from satfuse.evaluation.curves import make_full_report  # lazy: --help stays fast

    where = Path(cfg.report) if cfg.report else out / "reports"
    summary = make_full_report(runs, where)
    for table in (where / "table.md", where / "segmentation.md"):
        if table.exists():
            print(table.read_text())
    log.info("report written to %s (table.md, label_fractions.png, pretrain_curves.png, segmentation.md, "
             "seg_label_fractions.png, seg_examples.png; "
             "TensorBoard: tensorboard --logdir %s)", where, out / "runs")
    return summary

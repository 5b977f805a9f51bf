"""A grid of downstream runs: methods x label fractions x seeds x tasks, resumable.

Why a sweep command and not a shell loop: the paper's claims are about *differences between
methods at equal labels*, so every method of a sweep must see the same base config, the same
seeds and the same label subsets (nested per seed). Each run has its own directory
`OUT/<method>/<task>/frac<F>/seed<S>/` and a run whose `result.json` exists is skipped, so an
interrupted sweep (a killed job, a preempted node) continues where it stopped. Skipped only
when the config recorded in that `result.json` equals the run's config now: a sweep whose
config changed (more epochs, another checkpoint) would otherwise report old results as new.
Such runs are refused up front naming the differing keys, or rerun with `overwrite`
(`--overwrite`); runs whose config is unchanged are still kept.

The demo and `satfuse finetune sweep` both go through `run_sweep`; `checkpoint` of the sweep
is substituted wherever a method says `checkpoint: pretrained`.
"""

from __future__ import annotations

import contextlib
import json
import logging
import multiprocessing
import os
import time
from concurrent.futures import ProcessPoolExecutor, as_completed
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from tqdm import tqdm

from satfuse.checkpoint.export import weights_identity
from satfuse.config import (
    ConfigError,
    from_dict,
    load_config,
    parse_override,
    read_yaml,
    set_dotted,
    to_dict,
)
from satfuse.evaluation.benchmark import DEFAULT_BENCHMARK, benchmark_class, check_task
from satfuse.evaluation.finetune import FinetuneConfig, run_finetune, run_subdir, slug  # noqa: F401
from satfuse.resources import ConfigNotFound, resolve_config
from satfuse.run_layout import RunLayout
from satfuse.utils import SatfuseError, setup_logging

log = logging.getLogger(__name__)


@dataclass
class SweepMethod:
    """One line of the paper's table: a label and what differs from the base config."""

    label: str  # the method's name in the table (runs/<label>/...)
    checkpoint: str = "none"  # none | pretrained (the sweep's checkpoint) | a path
    mode: str = "finetune"  # model.mode of its runs: finetune | linear
    modalities: str = "s1s2"  # model.modalities of its runs: s1 | s2 | s1s2
    fusion: str = "late"  # model.fusion of its runs: early | late
    overrides: list[str] = field(default_factory=list)  # extra key=value for this method


@dataclass
class SweepConfig:
    """`satfuse finetune sweep`: methods x label fractions x seeds x tasks of benchmark runs
    (`base: {data: {benchmark: ...}}` picks the benchmark; DFC2020 by default)."""

    out: str = "runs/finetune_sweep"  # every run's directory goes under this
    base_config: str = ""  # a finetune YAML (hpc/finetune/...), applied first
    base: dict[str, Any] = field(default_factory=dict)  # finetune config keys over base_config
    checkpoint: str = "none"  # the pretrained export/ckpt dir behind `checkpoint: pretrained`
    train_shards: str = ""  # non-empty: overrides data.train_shards of every run
    test_shards: str = ""  # non-empty: overrides data.test_shards of every run
    val_shards: str = ""  # non-empty: overrides data.val_shards of every run (a benchmark's own val split)
    methods: list[SweepMethod] = field(default_factory=list)  # the table's rows (see SweepMethod)
    label_fractions: list[float] = field(default_factory=lambda: [0.01, 0.05, 0.1, 0.25, 0.5, 1.0])  # shares of labelled patches
    multi_label_fractions: list[float] = field(default_factory=list)  # empty = label_fractions
    seeds: list[int] = field(default_factory=lambda: [40, 41, 42])  # one run per seed (mean ± std in the report)
    tasks: list[str] = field(default_factory=lambda: ["single", "multi"])  # single- and/or multi-label classification (or seg: segmentation)
    workers: int = 1  # runs in parallel (processes); each gets cores // workers torch threads


def load_sweep_config(path: str | None, overrides: list[str] | None = None) -> SweepConfig:
    """`load_config(SweepConfig, ...)`; `base_config` may also be relative to the sweep YAML."""
    cfg = load_config(SweepConfig, path, overrides)
    if cfg.base_config and path and not Path(cfg.base_config).is_file():
        candidate = Path(path).parent / cfg.base_config
        if candidate.is_file():
            cfg.base_config = str(candidate)
        else:  # a packaged finetune name or the packaged copy of hpc/finetune/... (satfuse.resources)
            with contextlib.suppress(ConfigNotFound):  # plan_sweep reports a missing base_config
                cfg.base_config = str(resolve_config(cfg.base_config, "finetune"))
    return cfg


@dataclass
class PlannedRun:
    method: SweepMethod
    task: str
    fraction: float
    seed: int
    run_dir: Path
    cfg: FinetuneConfig
    weights: str | None = None  # identity of model.checkpoint's contents (None: none or missing)


def _run_config(sweep: SweepConfig, m: SweepMethod, task: str, frac: float, seed: int,
                run_dir: Path) -> FinetuneConfig:
    raw: dict[str, Any] = read_yaml(sweep.base_config) if sweep.base_config else {}
    for key, value in _flatten(sweep.base):
        set_dotted(raw, key, value)
    for key, value in (("data.train_shards", sweep.train_shards), ("data.test_shards", sweep.test_shards),
                       ("data.val_shards", sweep.val_shards)):
        if value:
            set_dotted(raw, key, value)
    ckpt = sweep.checkpoint if m.checkpoint == "pretrained" else m.checkpoint
    if m.checkpoint == "pretrained" and ckpt.lower() in ("", "none"):
        raise SatfuseError(f"method {m.label!r} wants the pretrained checkpoint but the sweep's "
                           "`checkpoint` is not set; pass checkpoint=PATH")
    for key, value in (("model.checkpoint", ckpt), ("model.mode", m.mode),
                       ("model.modalities", m.modalities), ("model.fusion", m.fusion),
                       ("train.task", task), ("data.label_fraction", frac), ("train.seed", seed),
                       ("run_dir", str(run_dir)), ("label", m.label)):
        set_dotted(raw, key, value)
    for item in m.overrides:
        set_dotted(raw, *parse_override(item))
    return from_dict(FinetuneConfig, raw, where=f"sweep method {m.label!r}")


def _flatten(d: dict[str, Any], prefix: str = "") -> list[tuple[str, Any]]:
    out = []
    for k, v in d.items():
        if isinstance(v, dict):
            out.extend(_flatten(v, f"{prefix}{k}."))
        else:
            out.append((f"{prefix}{k}", v))
    return out


def plan_sweep(sweep: SweepConfig) -> list[PlannedRun]:
    """Every run of the grid with its resolved config (all configs are checked up front)."""
    if sweep.base_config and not Path(sweep.base_config).is_file():
        raise SatfuseError(f"{sweep.base_config}: base_config not found; give a path relative to "
                           "the working directory (e.g. hpc/finetune/demo.yaml)")
    if not sweep.methods:
        raise SatfuseError("sweep has no methods; list them under `methods:` (see hpc/finetune/demo_sweep.yaml)")
    labels = [m.label for m in sweep.methods]
    if len(set(map(slug, labels))) != len(labels):
        raise SatfuseError(f"sweep method labels {labels} are not unique; give each a distinct label")
    bad = [t for t in sweep.tasks if t not in ("single", "multi", "seg")]
    if bad:
        raise SatfuseError(f"sweep tasks {bad} unknown; use single and/or multi (or seg with benchmark dfc2020-seg)")
    runs = []
    identities: dict[str, str | None] = {}  # one hash per checkpoint, however many runs use it
    for task in sweep.tasks:
        fracs = sweep.multi_label_fractions if task == "multi" and sweep.multi_label_fractions else sweep.label_fractions
        for m in sweep.methods:
            for frac in fracs:
                for seed in sweep.seeds:
                    d = Path(sweep.out) / run_subdir(m.label, task, frac, seed)
                    try:
                        cfg = _run_config(sweep, m, task, frac, seed, d)
                    except ConfigError as exc:
                        raise SatfuseError(str(exc)) from exc
                    check_task(benchmark_class(cfg.data.benchmark), cfg.train.task)
                    ckpt = cfg.model.checkpoint
                    if ckpt.lower() not in ("", "none") and ckpt not in identities:
                        identities[ckpt] = weights_identity(ckpt)
                    runs.append(PlannedRun(m, task, frac, seed, d, cfg, identities.get(ckpt)))
    return runs


# keys that differ between a finished run's recorded config and its planned one by construction:
# run_dir is where the result lies (OUT may be spelled another way)
SAME_BY_CONSTRUCTION = ("run_dir",)
# the pseudo-key naming a change of model.checkpoint's contents (same path, other weights)
WEIGHTS_KEY = "model.checkpoint (weights)"


def config_changes(run: PlannedRun) -> list[tuple[str, Any, Any]] | None:
    """None when the run has no result.json yet; else the (key, recorded, planned) values that
    differ between the config its result.json records and the one planned now ([] = same)."""
    path = RunLayout(run.run_dir).result
    if not path.is_file():
        return None
    try:
        recorded = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise SatfuseError(f"{path}: unreadable ({exc}); remove it to rerun that run") from None
    old = recorded.get("config") if isinstance(recorded, dict) else None
    if not isinstance(old, dict):
        return [("config", "(not recorded)", "(this sweep's)")]
    new = json.loads(json.dumps(to_dict(run.cfg)))  # as result.json stores it (lists, not tuples)
    before, after = dict(_flatten(old)), dict(_flatten(new))
    before.setdefault("data.benchmark", DEFAULT_BENCHMARK)  # results from before the key existed: the only benchmark then
    ckpt = recorded.get("checkpoint") if isinstance(recorded.get("checkpoint"), dict) else {}
    if ckpt.get("fusion") and before.get("model.fusion") == ckpt["fusion"]:
        # run_finetune records the fusion that ran (one stacked S1+S2 backbone is early fusion)
        before["model.fusion"] = after.get("model.fusion")
    diffs = [(k, before.get(k, "(unset)"), after.get(k, "(unset)")) for k in sorted(set(before) | set(after))
             if k not in SAME_BY_CONSTRUCTION and before.get(k) != after.get(k)]
    if run.cfg.model.checkpoint.lower() not in ("", "none"):
        # results made before checkpoint.weights was recorded cannot show which weights they used
        old_weights = ckpt.get("weights") or "(not recorded)"
        now = run.weights or "(not found)"
        if old_weights != now:
            diffs.append((WEIGHTS_KEY, old_weights, now))
    return diffs


def _changed_message(out: str, changed: list[tuple[PlannedRun, list[tuple[str, Any, Any]]]]) -> str:
    """One line: how many finished runs differ, in which keys (old -> new), an example dir."""
    keys: dict[str, tuple[Any, Any, int]] = {}
    for _, diffs in changed:
        for k, old, new in diffs:
            seen = keys.get(k)
            keys[k] = (old, new, 1) if seen is None else (seen[0], seen[1], seen[2] + 1)
    n = len(changed)
    what = "; ".join(f"{k}: {old!r} -> {new!r}" + (f" ({c} of them)" if c != n else "")
                     for k, (old, new, c) in list(keys.items())[:8])
    more = f"; +{len(keys) - 8} more keys" if len(keys) > 8 else ""
    return (f"{out}: {n} finished run(s) were made with another config ({what}{more}; e.g. "
            f"{changed[0][0].run_dir}); rerun them with --overwrite, or choose another --out")


def run_sweep(cfg: SweepConfig, progress: bool = True, overwrite: bool = False) -> list[Path]:
    """Run every missing run of the grid; return all run directories (done before or now).

    A finished run (result.json) is kept when its recorded config equals the planned one;
    one that differs is refused before anything runs, naming the keys, unless `overwrite`
    (`--overwrite`), which reruns those (and only those).

    With `workers > 1` the runs go to a pool of spawned processes, each with
    cores // workers torch threads: the small demo models do not scale to 2 threads
    (measured: 2 single-threaded runs side by side beat one 2-thread run), so on 2 cores two
    single-threaded runs finish the grid sooner. Results do not depend on the worker count.
    """
    if cfg.workers < 1:
        raise SatfuseError(f"sweep workers={cfg.workers} must be >= 1")
    runs = plan_sweep(cfg)
    states = [(r, config_changes(r)) for r in runs]
    changed = [(r, d) for r, d in states if d]
    if changed and not overwrite:
        raise SatfuseError(_changed_message(cfg.out, changed))
    todo = [r for r, d in states if d is None or d]
    log.info("sweep %s: %d runs, %d already done", cfg.out, len(runs), len(runs) - len(todo))
    if changed:
        log.warning("sweep %s: --overwrite: rerunning %d finished run(s) made with another config",
                    cfg.out, len(changed))
    t0 = time.perf_counter()
    bar = tqdm(total=len(todo), desc="fine-tuning runs", unit="run", disable=not progress)
    if cfg.workers == 1 or len(todo) <= 1:
        for r in todo:
            bar.set_postfix_str(f"{r.method.label[:28]} {r.task} {r.fraction:g} s{r.seed}")
            run_finetune(r.cfg, overwrite=overwrite, weights=r.weights)
            bar.update(1)
    else:
        _run_parallel(todo, cfg.workers, bar, overwrite)
    bar.close()
    log.info("sweep %s: %d runs in %.1fs", cfg.out, len(todo), time.perf_counter() - t0)
    return [r.run_dir for r in runs]


def _worker_init(threads: int, level: int) -> None:
    torch.set_num_threads(threads)
    setup_logging(level, rank=0)


def _run_parallel(todo: list[PlannedRun], workers: int, bar: tqdm, overwrite: bool = False) -> None:
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    threads = max(1, cores // workers)
    ctx = multiprocessing.get_context("spawn")  # no fork of a process holding torch threads
    level = logging.getLogger("satfuse").getEffectiveLevel()
    with ProcessPoolExecutor(workers, mp_context=ctx, initializer=_worker_init,
                             initargs=(threads, level)) as pool:
        futures = {pool.submit(run_finetune, r.cfg, overwrite, r.weights): r for r in todo}
        try:
            for fut in as_completed(futures):
                r = futures[fut]
                fut.result()  # a failed run stops the sweep with its own error
                bar.set_postfix_str(f"{r.method.label[:28]} {r.task} {r.fraction:g} s{r.seed}")
                bar.update(1)
        except BrokenProcessPool as exc:
            raise SatfuseError(
                "a sweep worker process died (killed for memory, or the calling script has no "
                "`if __name__ == '__main__':` guard, which spawned workers need); finished runs "
                "are kept: re-run the sweep, with workers=1 if it happens again") from exc
        except BaseException:
            for f in futures:
                f.cancel()
            raise

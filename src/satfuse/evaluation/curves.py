"""Pretraining curves for `satfuse report`: loss and retrieval top-1 vs step, runs overlaid.

Why in the report: the downstream table says how good the backbone is; the curves say
whether pretraining converged (or diverged, or plateaued) and how runs compare, from the
same `metrics.jsonl` every pretraining run writes on rank 0 — no TensorBoard needed.

A run that was requeued appends to its metrics.jsonl, so a step may appear twice (logged
before the preemption and again after the resume): the later record wins, as that is the
history the final checkpoint descends from.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

from matplotlib.figure import Figure

from satfuse.evaluation.report import make_report, png_bytes
from satfuse.evaluation.seg_report import make_seg_report
from satfuse.run_layout import METRICS, RunLayout
from satfuse.utils import SatfuseError, atomic_write_bytes

log = logging.getLogger(__name__)

PLOT = "pretrain_curves.png"


def is_pretrain_run(path: str | Path) -> bool:
    """A pretraining run dir (holds metrics.jsonl) or a metrics.jsonl file."""
    p = Path(path)
    run = RunLayout(p)
    return (p.is_file() and p.name == METRICS) or (p.is_dir() and run.metrics.is_file()
                                                  and not run.result.is_file())


def read_curves(path: str | Path) -> dict[str, Any]:
    """{"steps", "loss", "top1", "heldout": (step, top1) | None} of one run's metrics.jsonl."""
    p = Path(path)
    f = p if p.is_file() else RunLayout(p).metrics
    by_step: dict[int, dict[str, Any]] = {}
    heldout = None
    for n, line in enumerate(f.read_text().splitlines(), 1):
        if not line.strip():
            continue
        try:
            rec = json.loads(line)
        except json.JSONDecodeError:
            # the last line of a run killed mid-write may be cut short: skip it, say so
            log.warning("%s line %d: not JSON (a write cut short?); skipped", f, n)
            continue
        if "heldout_retrieval_top1" in rec:
            if rec["heldout_retrieval_top1"] is not None:
                heldout = (int(rec["step"]), float(rec["heldout_retrieval_top1"]))
            continue
        if "step" in rec and "loss" in rec:
            by_step[int(rec["step"])] = rec
    steps = sorted(by_step)
    if not steps:
        raise SatfuseError(f"{f}: no training records (step, loss); is it a pretraining run's metrics.jsonl?")
    return {"steps": steps, "loss": [by_step[s]["loss"] for s in steps],
            "top1": [by_step[s].get("retrieval_top1") for s in steps], "heldout": heldout}


def _labels(paths: list[Path]) -> list[str]:
    dirs = [p.parent if p.is_file() else p for p in paths]
    names = [d.name for d in dirs]
    if len(set(names)) == len(names):
        return names
    return [f"{d.parent.name}/{d.name}" for d in dirs]


def plot_pretrain_curves(runs: list[str | Path]) -> bytes:
    """PNG bytes: loss (left) and in-batch retrieval top-1 (right) vs step, one line per run;
    held-out retrieval top-1 at the end as a star of the run's colour."""
    paths = [Path(r) for r in runs]
    fig = Figure(figsize=(10, 4), dpi=120)
    ax_l, ax_t = fig.subplots(1, 2)
    for path, label in zip(paths, _labels(paths), strict=True):
        c = read_curves(path)
        (line,) = ax_l.plot(c["steps"], c["loss"], label=label)
        pts = [(s, 100 * t) for s, t in zip(c["steps"], c["top1"], strict=True) if t is not None]
        if pts:
            ax_t.plot([s for s, _ in pts], [t for _, t in pts], color=line.get_color(),
                      label=f"{label} (in-batch)")
        if c["heldout"] is not None:
            ax_t.plot([c["heldout"][0]], [100 * c["heldout"][1]], marker="*", markersize=12,
                      linestyle="none", color=line.get_color(), label=f"{label} (held-out)")
    ax_l.set_xlabel("step")
    ax_l.set_ylabel("contrastive loss")
    ax_l.set_title("pretraining loss")
    ax_t.set_xlabel("step")
    ax_t.set_ylabel("S1 -> S2 retrieval top-1 (%)")
    ax_t.set_title("retrieval accuracy")
    for ax in (ax_l, ax_t):
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize=8, loc="best")
    return png_bytes(fig)


def make_full_report(runs: list[str | Path], out: str | Path) -> dict[str, Any]:
    """`satfuse report`: pretraining runs -> OUT/pretrain_curves.png; fine-tuning runs ->
    the tables and label-fraction plots of `report.make_report`."""
    out = Path(out)
    pre = [r for r in runs if is_pretrain_run(r)]
    rest = [r for r in runs if not is_pretrain_run(r)]
    summary: dict[str, Any] = {"n_runs": 0, "files": {}}
    if rest:
        summary = make_report(rest, out)
        # the segmentation runs (task seg) among them, if any: their own tables, plot and picture
        summary.setdefault("files", {}).update(make_seg_report(summary.get("own_report_runs", []), out))
    if pre:
        atomic_write_bytes(out / PLOT, plot_pretrain_curves(pre))
        summary["files"]["pretrain_curves"] = str(out / PLOT)
        summary["pretrain_runs"] = [str(r) for r in pre]
        log.info("report: pretraining curves of %d run(s) -> %s", len(pre), out / PLOT)
    return summary

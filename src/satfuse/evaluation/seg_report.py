"""`satfuse report`'s segmentation part: table, mIoU-vs-label-fraction plot and a picture of test
patches (S2 RGB, label map, each method's prediction), from finished `dfc2020-seg` runs.

Why beside `report.py` rather than in it: the classification report owns the paper's tables;
segmentation results (task `seg`) share its aggregation (`report.aggregate`: mean ± std over
seeds per method and fraction) and plot, and add what only maps have: per-class IoU and the
picture, read from each run's `seg_samples.npz` (a user would rather look than read).
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
from matplotlib.colors import ListedColormap
from matplotlib.figure import Figure
from matplotlib.patches import Patch

from satfuse.evaluation.report import (
    _fmt,
    _fraction_table,
    _table,
    aggregate,
    find_results,
    load_results,
    plot_fractions,
    png_bytes,
)
from satfuse.evaluation.targets import IGNORE
from satfuse.run_layout import RunLayout
from satfuse.utils import atomic_write_bytes, atomic_write_text

log = logging.getLogger(__name__)

TASK = "seg"
SEG_COLS = [("miou", "mIoU"), ("oa", "OA"), ("aa", "AA")]
TABLE, PLOT, PICTURE = "segmentation.md", "seg_label_fractions.png", "seg_examples.png"
# one colour per class (DFC2020 order: Forest, Shrubland, Grassland, Wetlands, Croplands, Urban, Barren, Water)
PALETTE = ["#009900", "#c6b044", "#b6ff05", "#27ff87", "#c24f44", "#a5a5a5", "#f9ffa4", "#1c0dff"]


def render_seg_markdown(agg_seg: dict, results: list[dict]) -> str:
    """The segmentation tables: per fraction (mIoU, OA, AA), mIoU vs fraction, per-class IoU at the
    largest fraction."""
    names = results[0]["per_class"]["names"]
    out = ["# DFC2020 land-cover segmentation", "",
           f"{len(results)} runs; cells are mean ± std (sample std) over seeds, in %. mIoU and AA (average "
           "pixel accuracy) average over the classes present in the test labels; OA is overall pixel accuracy.", ""]
    fracs = sorted({f for m in agg_seg.values() for f in m}, reverse=True)
    for frac in fracs:
        out += [f"## Segmentation, {100 * frac:g} % of the labels", ""] + _table(agg_seg, frac, SEG_COLS) + [""]
    out += ["## Segmentation: mIoU vs label fraction", ""] + _fraction_table(agg_seg, "miou") + [""]
    out += [f"## Per-class IoU, {100 * fracs[0]:g} % of the labels", "",
            "| Method | " + " | ".join(names) + " |", "|" + "---|" * (len(names) + 1)]
    for method in agg_seg:
        rs = [r for r in results if r["method"] == method and float(r["label_fraction"]) == fracs[0]]
        cells = []
        for c in range(len(names)):
            vals = [r["per_class"]["iou"][c] for r in rs if r["per_class"]["iou"][c] is not None]
            cell = {"iou": {"mean": float(np.mean(vals)), "std": float(np.std(vals, ddof=1)) if len(vals) > 1 else 0.0,
                            "n": len(vals)}} if vals else None
            cells.append(_fmt(cell, "iou"))
        if rs:
            out.append(f"| {method} | " + " | ".join(cells) + " |")
    return "\n".join(out) + "\n"


def plot_examples(samples: dict[str, dict[str, np.ndarray]], class_names: list[str]) -> bytes:
    """PNG: one row per test patch, columns S2 RGB, label map, then each method's prediction."""
    first = next(iter(samples.values()))
    n = first["rgb"].shape[0]
    cols = 2 + len(samples)
    fig = Figure(figsize=(2.2 * cols, 2.2 * n + 0.8), dpi=100)
    axes = np.atleast_2d(fig.subplots(n, cols, squeeze=False))
    cmap = ListedColormap(PALETTE[: len(class_names)]).with_extremes(bad="black")

    def show(ax, m: np.ndarray) -> None:
        ax.imshow(np.ma.masked_where(m == IGNORE, m), cmap=cmap, vmin=-0.5, vmax=len(class_names) - 0.5,
                  interpolation="nearest")

    for i in range(n):
        axes[i, 0].imshow(first["rgb"][i])
        show(axes[i, 1], first["label"][i])
        for j, s in enumerate(samples.values()):
            show(axes[i, 2 + j], s["pred"][i])
    for j, title in enumerate(["S2 RGB", "label map", *samples]):
        axes[0, j].set_title(title, fontsize=8)
    for ax in axes.ravel():
        ax.set_xticks([])
        ax.set_yticks([])
    handles = [Patch(color=PALETTE[c], label=name) for c, name in enumerate(class_names)]
    handles.append(Patch(color="black", label="ignore / no data"))
    fig.legend(handles=handles, loc="lower center", ncol=min(5, len(handles)), fontsize=7)
    fig.tight_layout(rect=(0, 0.08, 1, 1))
    return png_bytes(fig)


def _samples(results: list[dict]) -> dict[str, dict[str, np.ndarray]]:
    """Per method: the saved test patches of its run at the largest fraction, lowest seed."""
    chosen: dict[str, dict] = {}
    for r in sorted(results, key=lambda r: (-float(r["label_fraction"]), r["seed"])):
        path = RunLayout(Path(r["_path"]).parent).seg_samples
        if r["method"] not in chosen and path.is_file():
            chosen[r["method"]] = r
    out = {}
    for method, r in chosen.items():
        with np.load(RunLayout(Path(r["_path"]).parent).seg_samples, allow_pickle=False) as z:
            out[method] = {k: z[k] for k in ("rgb", "label", "pred")}
    keys = {s["label"].shape for s in out.values()}
    if len(keys) > 1:  # runs of different crops: show the first method's size only
        first = next(iter(out.values()))["label"].shape
        out = {m: s for m, s in out.items() if s["label"].shape == first}
    return out


def make_seg_report(runs: list[str | Path], out: str | Path) -> dict[str, str]:
    """OUT/segmentation.md, OUT/seg_label_fractions.png, OUT/seg_examples.png from the `seg`
    results among `runs`; returns {file key: path} (empty: no segmentation run)."""
    out = Path(out)
    results = [r for r in load_results(find_results(runs)) if r["task"] == TASK]
    if not results:
        return {}
    agg = aggregate(results)[TASK]
    atomic_write_text(out / TABLE, render_seg_markdown(agg, results))
    atomic_write_bytes(out / PLOT, plot_fractions(agg, "miou", "mIoU (%)", "DFC2020 segmentation"))
    files = {"seg_table": str(out / TABLE), "seg_plot": str(out / PLOT)}
    samples = _samples(results)
    if samples:
        atomic_write_bytes(out / PICTURE, plot_examples(samples, results[0]["per_class"]["names"]))
        files["seg_examples"] = str(out / PICTURE)
    else:
        log.warning("report: no seg_samples.npz beside the segmentation results; %s not drawn", PICTURE)
    log.info("report: %d segmentation runs -> %s", len(results), out / TABLE)
    return files

"""The paper's tables and the label-fraction plot, from finished runs' result.json files.

Layout follows Scheibenreif et al. 2022: rows are methods, columns the single-label metrics
(OA, AA, macro F1) and the multi-label metrics (macro/micro F1, precision, recall, mAP), first
with 100 % of the labels, then one table per smaller fraction, and a compact table of average
accuracy vs label fraction. Every cell is mean ± std over seeds (sample std, ddof=1; a
single run shows no ±), with the number of runs; the plot shows the same means with the std
as error bars on a log-x axis.

One table and plot set per benchmark (each result.json records its `benchmark`): the columns
are the benchmark's `report_columns` (DFC2020: the paper's above), the plot its headline
metric. DFC2020's (or, without DFC2020 runs, the only benchmark's) files are OUT/table.md,
OUT/label_fractions*.png and OUT/summary.json as ever; every other benchmark's go to
OUT/<benchmark>/, and OUT/summary.json lists them under `benchmarks`.
"""

from __future__ import annotations

import io
import json
import logging
import math
from collections import defaultdict
from pathlib import Path

import numpy as np
from matplotlib.figure import Figure

from satfuse.evaluation.benchmark import DEFAULT_BENCHMARK, Benchmark, benchmark_class
from satfuse.run_layout import RESULT, RunLayout
from satfuse.utils import SatfuseError, atomic_write_bytes, atomic_write_text

log = logging.getLogger(__name__)

SINGLE_COLS = list(Benchmark.report_columns["single"])  # DFC2020's (the contract's default)
MULTI_COLS = list(Benchmark.report_columns["multi"])
METRIC_NAMES = {"aa": "average accuracy", "oa": "overall accuracy", "f1_macro": "macro F1", "map": "mAP"}  # plot/table wording


def find_results(runs: list[str | Path]) -> list[Path]:
    """result.json files of run dirs / sweep roots / files; a missing path is an error."""
    found: list[Path] = []
    for r in runs:
        p = Path(r)
        if not p.exists():
            raise SatfuseError(f"{p}: run not found; pass run directories, sweep roots or result.json files")
        if p.is_file():
            found.append(p)
        elif RunLayout(p).result.is_file():
            found.append(RunLayout(p).result)
        else:
            hits = sorted(p.rglob(RESULT))
            if not hits:
                raise SatfuseError(f"{p}: no result.json under it; the run has not finished "
                                   "(re-run it, or leave it out of the report)")
            found.extend(hits)
    return sorted(set(found))


def load_results(paths: list[Path]) -> list[dict]:
    out = []
    for p in paths:
        try:
            res = json.loads(p.read_text())
        except json.JSONDecodeError as exc:
            raise SatfuseError(f"{p}: not valid JSON ({exc.msg}); delete it and re-run that run") from exc
        missing = [k for k in ("method", "task", "label_fraction", "seed", "metrics") if k not in res]
        if missing:
            raise SatfuseError(f"{p}: not a satfuse fine-tuning result (lacks {', '.join(missing)})")
        res["_path"] = str(p)
        out.append(res)
    return out


def aggregate(results: list[dict]) -> dict:
    """{task: {method: {fraction: {metric: {mean, std, n, values}}}}}, methods in first-seen order."""
    groups: dict = defaultdict(lambda: defaultdict(lambda: defaultdict(list)))
    for r in results:
        groups[r["task"]][r["method"]][float(r["label_fraction"])].append(r)
    agg: dict = {}
    for task, methods in groups.items():
        agg[task] = {}
        for method, fracs in methods.items():
            agg[task][method] = {}
            for frac, rs in sorted(fracs.items()):
                seeds = [r["seed"] for r in rs]
                if len(set(seeds)) != len(seeds):
                    raise SatfuseError(f"{rs[0]['_path']}: method {method!r} {task} fraction {frac:g} "
                                       f"has repeated seeds {seeds}; report each sweep once")
                cell = {}
                for key in rs[0]["metrics"]:
                    vals = [r["metrics"].get(key) for r in rs]
                    if all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in vals):
                        arr = np.asarray(vals, dtype=float)
                        cell[key] = {"mean": float(np.mean(arr)),
                                     "std": float(np.std(arr, ddof=1)) if arr.size > 1 else 0.0,
                                     "n": int(arr.size), "values": [float(v) for v in arr]}
                cell["_seeds"] = sorted(seeds)
                cell["_n_train"] = sorted({int(r.get("n_train", -1)) for r in rs})
                agg[task][method][frac] = cell
    return agg


def _fmt(cell: dict | None, key: str) -> str:
    if not cell or key not in cell:
        return "–"
    c = cell[key]
    if not math.isfinite(c["mean"]):
        return "n/a"
    if c["n"] > 1:
        return f"{100 * c['mean']:.1f} ± {100 * c['std']:.1f}"
    return f"{100 * c['mean']:.1f}"


def _table(agg_task: dict, frac: float, cols: list[tuple[str, str]]) -> list[str]:
    head = "| Method | runs | n train | " + " | ".join(c[1] for c in cols) + " |"
    lines = [head, "|" + "---|" * (len(cols) + 3)]
    for method, fracs in agg_task.items():
        cell = fracs.get(frac)
        if cell is None:
            continue
        n = max((v["n"] for k, v in cell.items() if not k.startswith("_")), default=0)
        ntr = "/".join(str(x) for x in cell["_n_train"])
        lines.append(f"| {method} | {n} | {ntr} | " + " | ".join(_fmt(cell, k) for k, _ in cols) + " |")
    return lines


def _fraction_table(agg_task: dict, key: str) -> list[str]:
    fracs = sorted({f for m in agg_task.values() for f in m})
    lines = ["| Method | " + " | ".join(f"{100 * f:g} %" for f in fracs) + " |",
             "|" + "---|" * (len(fracs) + 1)]
    for method, cells in agg_task.items():
        lines.append(f"| {method} | " + " | ".join(_fmt(cells.get(f), key) for f in fracs) + " |")
    return lines


def render_markdown(agg: dict, n_runs: int, bench: type[Benchmark] | None = None) -> str:
    """The tables of one benchmark's aggregated runs (`bench` None: DFC2020)."""
    bench = bench or benchmark_class(DEFAULT_BENCHMARK)
    out = [f"# {bench.title} downstream results", "",
           f"{n_runs} runs; cells are mean ± std (sample std) over seeds, in %. "
           "AA = mean per-class accuracy over the classes present in the test split; "
           "multi-label macro scores and mAP average over classes with test positives.", ""]
    for task, title in (("single", "Single-label"), ("multi", "Multi-label")):
        if task not in agg:
            continue
        cols = list(bench.report_columns.get(task, Benchmark.report_columns[task]))
        key = bench.metrics.get(task, cols[0][0])
        kname = METRIC_NAMES.get(key, key)
        fracs = sorted({f for m in agg[task].values() for f in m}, reverse=True)
        for frac in fracs:
            out += [f"## {title} classification, {100 * frac:g} % of the labels", ""]
            out += _table(agg[task], frac, cols) + [""]
        out += [f"## {title}: {kname} vs label fraction", ""] + _fraction_table(agg[task], key) + [""]
    return "\n".join(out)


def plot_fractions(agg_task: dict, key: str, ylabel: str, title: str, bench_title: str = "DFC2020") -> bytes:
    """PNG bytes: metric vs label fraction, one line per method, std error bars, log-x."""
    fig = Figure(figsize=(7, 4.5), dpi=120)
    ax = fig.subplots()
    for method, cells in agg_task.items():
        fr = sorted(f for f in cells if key in cells[f])
        if not fr:
            continue
        mean = [100 * cells[f][key]["mean"] for f in fr]
        std = [100 * cells[f][key]["std"] for f in fr]
        style = "-" if "supervised" not in method.lower() else "--"
        ax.errorbar([100 * f for f in fr], mean, yerr=std, marker="o", linestyle=style, capsize=3, label=method)
    ax.set_xscale("log")
    ticks = sorted({100 * f for cells in agg_task.values() for f in cells})
    ax.set_xticks(ticks, [f"{t:g} %" for t in ticks])
    ax.minorticks_off()
    ax.set_xlabel(f"labelled training patches (% of the {bench_title} train split)")
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8, loc="best")
    return png_bytes(fig)


def png_bytes(fig: Figure) -> bytes:
    """A matplotlib figure laid out and rendered as PNG bytes (the caller writes them atomically).
    Figures are made with matplotlib's object API, not pyplot: no GUI backend is chosen and no
    figure is kept in pyplot's global list, so none needs closing."""
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    return buf.getvalue()


def benchmark_of(result: dict) -> str:
    """The benchmark a result.json was scored on (DFC2020 for results from before the record)."""
    bench = result.get("benchmark")
    return str(bench.get("name") or DEFAULT_BENCHMARK) if isinstance(bench, dict) else DEFAULT_BENCHMARK


def _write_benchmark(results: list[dict], out: Path, bench: type[Benchmark]) -> dict:
    """One benchmark's table.md, label-fraction plot(s) and summary.json in `out`; the summary."""
    agg = aggregate(results)
    files = {"table": str(out / "table.md")}
    atomic_write_text(out / "table.md", render_markdown(agg, len(results), bench) + "\n")
    for task in ("single", "multi"):
        if task not in agg:
            continue
        key = bench.metrics.get(task, "aa" if task == "single" else "f1_macro")
        label = METRIC_NAMES.get(key, key)
        png = plot_fractions(agg[task], key, f"{label} (%)", f"{bench.title} {task}-label", bench.title)
        name = "label_fractions_multi.png" if task == "multi" and "single" in agg else "label_fractions.png"
        atomic_write_bytes(out / name, png)
        files["plot" if task == "single" else "plot_multi"] = str(out / name)
    return {"n_runs": len(results), "files": files,
            "results": {t: {m: {f"{f:g}": c for f, c in fr.items()} for m, fr in ms.items()}
                        for t, ms in agg.items()},
            "runs": [r["_path"] for r in results]}


def make_report(runs: list[str | Path], out: str | Path) -> dict:
    """Write OUT/table.md, OUT/label_fractions.png (+ _multi.png), OUT/summary.json (and the same
    in OUT/<benchmark>/ for each further benchmark, module doc); return the summary."""
    out = Path(out)
    # classification results only: a benchmark with a loop of its own (`Benchmark.run`,
    # segmentation) writes its own report (`curves.make_full_report` calls it)
    loaded = load_results(find_results(runs))
    results = [r for r in loaded if benchmark_class(benchmark_of(r)).run is None]
    own = [r["_path"] for r in loaded if benchmark_class(benchmark_of(r)).run is not None]
    if not results:
        return {"n_runs": 0, "files": {}, "runs": [], "own_report_runs": own}
    groups: dict[str, list[dict]] = defaultdict(list)
    for r in results:
        groups[benchmark_of(r)].append(r)
    first = DEFAULT_BENCHMARK if DEFAULT_BENCHMARK in groups else next(iter(groups))
    summary = _write_benchmark(groups.pop(first), out, benchmark_class(first))
    if groups:
        summary["benchmarks"] = {}
        for name, rs in groups.items():
            sub = _write_benchmark(rs, out / name, benchmark_class(name))
            atomic_write_text(out / name / "summary.json", json.dumps(sub, indent=1) + "\n")
            summary["benchmarks"][name] = sub
    atomic_write_text(out / "summary.json", json.dumps(summary, indent=1) + "\n")
    log.info("report: %d runs -> %s", len(results), out)
    summary["own_report_runs"] = own  # the runs whose benchmark reports them itself (segmentation)
    return summary

"""Before/after tables, PNG plots and atomic JSON for eval results and training runs.

All functions take results shaped as `run_eval` returns them, one dict per model:
`{model_label: {metric_name: value}}`. Plots use matplotlib's object API with the
Agg canvas (no pyplot global state, no display needed); files are written to a temp
name beside the target and renamed into place, so a reader never sees half a file.
"""

from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Sequence

from posttrain.data.formats import read_jsonl
from posttrain.fileio import atomic_write, write_json_atomic  # noqa: F401  (re-exported)


def _fmt(value: float | None, signed: bool = False) -> str:
    if value is None:
        return "-"
    if math.isnan(value) or math.isinf(value):
        return str(value)
    spec = ".4f" if abs(value) < 100 else ".2f"
    return format(value, ("+" if signed else "") + spec)


def _metrics_of(results: dict[str, dict[str, float]], columns: Sequence[str]) -> list[str]:
    """Every metric of the shown models, in first-seen order."""
    seen: dict[str, None] = {}
    for label in columns:
        seen.update(dict.fromkeys(results[label]))
    return list(seen)


def format_table(results: dict[str, dict[str, float]], columns: Sequence[str] | None = None) -> str:
    """A plain-text table: one row per metric, one column per model label.

    `columns` picks and orders the model labels (default: all, in dict order). With
    exactly two columns a `delta` column shows second minus first, so pass them as
    [before, after] (e.g. [base, tuned]). Missing values show as "-".
    """
    columns = list(columns) if columns is not None else list(results)
    missing = [c for c in columns if c not in results]
    if missing:
        raise KeyError(f"no results for model label(s) {missing}; have {list(results)}")
    if not columns:
        raise ValueError("format_table needs at least one model's results")
    header = ["metric", *columns] + (["delta"] if len(columns) == 2 else [])
    lines = []
    for metric in _metrics_of(results, columns):
        values = [results[c].get(metric) for c in columns]
        row = [metric, *(_fmt(v) for v in values)]
        if len(columns) == 2:
            a, b = values
            row.append(_fmt(b - a, signed=True) if a is not None and b is not None else "-")
        lines.append(row)
    widths = [max(len(r[i]) for r in [header, *lines]) for i in range(len(header))]

    def render(row: list[str]) -> str:
        cells = [row[0].ljust(widths[0])] + [cell.rjust(w) for cell, w in zip(row[1:], widths[1:])]
        return "  ".join(cells).rstrip()

    rule = "  ".join("-" * w for w in widths)
    return "\n".join([render(header), rule, *(render(r) for r in lines)])


def bar_chart(results: dict[str, dict[str, float]], path: str | os.PathLike,
              columns: Sequence[str] | None = None, title: str | None = None) -> Path:
    """Grouped bars: one panel per metric (each on its own scale), one bar per model.

    Metrics live on different scales (accuracy in [0, 1], perplexity in the tens), so
    each gets its own small axes rather than sharing one y-axis.
    """
    from matplotlib.figure import Figure

    columns = list(columns) if columns is not None else list(results)
    if not columns:
        raise ValueError("bar_chart needs at least one model's results")
    metrics = _metrics_of(results, columns)
    if not metrics:
        raise ValueError("bar_chart: the results hold no metrics")
    ncols = min(4, len(metrics))
    nrows = -(-len(metrics) // ncols)
    fig = Figure(figsize=(3.2 * ncols, 2.8 * nrows), layout="constrained")
    axes = fig.subplots(nrows, ncols, squeeze=False).ravel()
    colors = [f"C{i % 10}" for i in range(len(columns))]
    for ax, metric in zip(axes, metrics):
        values = [results[c].get(metric) for c in columns]
        heights = [v if v is not None else 0.0 for v in values]
        bars = ax.bar(range(len(columns)), heights, color=colors)
        for bar, v in zip(bars, values):
            ax.annotate(_fmt(v), (bar.get_x() + bar.get_width() / 2, bar.get_height()), ha="center",
                        va="bottom", fontsize=8, xytext=(0, 2), textcoords="offset points")
        ax.set_title(metric, fontsize=10)
        ax.set_xticks(range(len(columns)), columns, fontsize=8, rotation=15)
        ax.margins(y=0.15)
    for ax in axes[len(metrics):]:
        ax.set_visible(False)
    if title:
        fig.suptitle(title)
    return atomic_write(Path(path), lambda tmp: fig.savefig(tmp, format="png", dpi=100))


def read_metrics(path: str | os.PathLike) -> tuple[list[tuple[float, float]], list[tuple[float, float]]]:
    """(train [(step, loss)], eval [(step, eval_loss)]) from a run's metrics.jsonl."""
    path = Path(path)
    train, evals = [], []
    for lineno, row in read_jsonl(path):
        for key, out in (("loss", train), ("eval_loss", evals)):
            if key not in row:
                continue
            step, value = row.get("step"), row[key]
            if not isinstance(step, (int, float)) or isinstance(step, bool):
                raise ValueError(f"{path}:{lineno}:step: a row with '{key}' needs a numeric step")
            if not isinstance(value, (int, float)) or isinstance(value, bool):
                raise ValueError(f"{path}:{lineno}:{key}: expected a number, got {value!r}")
            out.append((step, float(value)))
    return train, evals


def loss_curve(metrics_jsonl_path: str | os.PathLike, png_path: str | os.PathLike, title: str | None = None) -> Path:
    """Train loss vs step (and eval loss when the run logged it) as a PNG."""
    from matplotlib.figure import Figure

    train, evals = read_metrics(metrics_jsonl_path)
    if not train and not evals:
        raise ValueError(f"{metrics_jsonl_path}: no rows with 'loss' or 'eval_loss' to plot")
    fig = Figure(figsize=(6, 3.6), layout="constrained")
    ax = fig.subplots()
    if train:
        ax.plot(*zip(*train), label="train loss", color="C0", linewidth=1)
    if evals:
        ax.plot(*zip(*evals), label="eval loss", color="C1", marker="o", linewidth=1.5)
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    ax.grid(alpha=0.3)
    ax.legend()
    ax.set_title(title or Path(metrics_jsonl_path).parent.name or "loss")
    return atomic_write(Path(png_path), lambda tmp: fig.savefig(tmp, format="png", dpi=100))


def metric_curves(metrics_jsonl_path: str | os.PathLike, png_path: str | os.PathLike, keys: list[str],
                  title: str | None = None) -> Path:
    """One panel per metric vs step (RL runs: reward, KL, length...); keys no row has are left out."""
    from matplotlib.figure import Figure

    rows = [row for _, row in read_jsonl(Path(metrics_jsonl_path))]
    series = {k: [(r["step"], float(r[k])) for r in rows if isinstance(r.get(k), (int, float))] for k in keys}
    series = {k: v for k, v in series.items() if v}
    if not series:
        raise ValueError(f"{metrics_jsonl_path}: no rows with any of {keys} to plot")
    fig = Figure(figsize=(4.2 * len(series), 3.4), layout="constrained")
    axes = fig.subplots(1, len(series), squeeze=False)[0]
    for ax, (key, points) in zip(axes, series.items()):
        ax.plot(*zip(*points), color="C0", linewidth=1.2, marker="." if len(points) < 40 else None)
        ax.set_xlabel("step")
        ax.set_title(key)
        ax.grid(alpha=0.3)
    fig.suptitle(title or Path(metrics_jsonl_path).parent.name)
    return atomic_write(Path(png_path), lambda tmp: fig.savefig(tmp, format="png", dpi=100))

"""Before/after tables, PNG plots and atomic JSON for eval results and training runs.

All functions take results shaped as `run_eval` returns them, one dict per model:
`{model_label: {metric_name: value}}`. Plots use matplotlib's object API with the
Agg canvas (no pyplot global state, no display needed); files are written to a temp
name beside the target and renamed into place, so a reader never sees half a file.
"""

from __future__ import annotations

import base64
import html
import json
import math
import os
import re
from datetime import datetime, timezone
from pathlib import Path
from typing import Collection, Sequence

from posttrain.data.formats import read_jsonl
from posttrain.fileio import atomic_write, write_text_atomic


def _fmt(value: float | None, signed: bool = False) -> str:
    if value is None:
        return "-"
    if math.isnan(value) or math.isinf(value):
        return str(value)
    spec = ".4f" if abs(value) < 100 else ".2f"
    return format(value, ("+" if signed else "") + spec)


def _is_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


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

    series: dict[str, list[tuple[float, float]]] = {k: [] for k in keys}
    for lineno, row in read_jsonl(Path(metrics_jsonl_path)):
        for key in keys:
            if _is_number(row.get(key)):
                if not _is_number(row.get("step")):
                    raise ValueError(f"{metrics_jsonl_path}:{lineno}:step: a row with '{key}' needs a numeric step")
                series[key].append((row["step"], float(row[key])))
    series = {k: v for k, v in series.items() if v}
    if not series:
        raise ValueError(f"{metrics_jsonl_path}: no rows with any of {keys} to plot")
    ncols = min(4, len(series))  # wrap: a DPO run logs loss plus four reward panels
    nrows = -(-len(series) // ncols)
    fig = Figure(figsize=(4.2 * ncols, 3.4 * nrows), layout="constrained")
    axes = fig.subplots(nrows, ncols, squeeze=False).ravel()
    for ax in axes[len(series):]:
        ax.set_visible(False)
    for ax, (key, points) in zip(axes, series.items()):
        ax.plot(*zip(*points), color="C0", linewidth=1.2, marker="." if len(points) < 40 else None)
        ax.set_xlabel("step")
        ax.set_title(key)
        ax.grid(alpha=0.3)
    fig.suptitle(title or Path(metrics_jsonl_path).parent.name)
    return atomic_write(Path(png_path), lambda tmp: fig.savefig(tmp, format="png", dpi=100))


# ---------------------------------------------------------------------------------------------
# Pipeline report: one self-contained HTML page per pipeline run (`posttrain report DIR`)
# ---------------------------------------------------------------------------------------------

DASH = "\u2014"
_CURVE_WORDS = ("loss", "reward", "margin", "acc", "kl", "score")  # metrics.jsonl keys worth a curve
_CURVE_SKIP = ("kl_coef", "loss_tokens")
_LOWER_IS_BETTER = ("ppl", "perplexity", "loss")  # names that read "lower is better" in the delta colours

_CSS = """
body{font:14px/1.45 -apple-system,"Segoe UI",Roboto,"DejaVu Sans",sans-serif;color:#1f2328;margin:0;background:#f6f8fa}
main{max-width:1180px;margin:0 auto;padding:24px 28px 48px;background:#fff;min-height:100vh}
h1{font-size:24px;margin:0 0 6px}h2{font-size:18px;margin:30px 0 10px;border-bottom:1px solid #d0d7de;padding-bottom:4px}
h3{font-size:15px;margin:18px 0 6px}
.meta{color:#59636e;margin:0 0 4px}
table{border-collapse:collapse;margin:6px 0 12px;font-size:13px}
th,td{border:1px solid #d0d7de;padding:4px 9px;text-align:left;vertical-align:top}
th{background:#f0f3f6;font-weight:600}td.num{text-align:right;font-variant-numeric:tabular-nums;white-space:nowrap}
tr:nth-child(even) td{background:#fafbfc}
.badge{display:inline-block;white-space:nowrap;padding:1px 8px;border-radius:10px;font-size:12px;font-weight:600;color:#fff;background:#6e7781}
.done,.passed{background:#1a7f37}.skipped{background:#0969da}.failed_gate,.error,.failed{background:#cf222e}
.not_reached,.running{background:#9a6700}
.delta{display:block;font-size:11px;color:#59636e}.better{color:#1a7f37}.worse{color:#cf222e}
.msg{font-family:ui-monospace,Menlo,Consolas,monospace;font-size:12px;white-space:pre-wrap;word-break:break-word;color:#82071e}
.gate{margin:1px 0}.row{display:flex;flex-wrap:wrap;gap:0 28px}.note{color:#59636e;font-size:12px}
img{max-width:100%;height:auto;border:1px solid #eaeef2;margin:4px 0 10px}
"""


def _esc(value) -> str:
    return html.escape(str(value), quote=True)


def _num(value, signed: bool = False) -> str:
    return _esc(_fmt(float(value), signed)) if _is_number(value) else (DASH if value is None else _esc(value))


def _secs(n) -> str:
    return f"{n:,.1f}" if _is_number(n) else DASH


def _mb(n) -> str:
    return f"{n / 1e6:,.1f} MB" if _is_number(n) else DASH


def _badge(status: str) -> str:
    cls = re.sub(r"[^a-z_]", "", status.lower().replace(" ", "_"))
    return f'<span class="badge {cls}">{_esc(status.replace("_", " "))}</span>'


def _img(path: Path, alt: str) -> str:
    data = base64.b64encode(path.read_bytes()).decode("ascii")
    return f'<img src="data:image/png;base64,{data}" alt="{_esc(alt)}">'


def _table(header: list[str], rows: list[list[str]], numeric: set[int] = frozenset()) -> str:
    """Cells are HTML already (escaped by the caller); columns in `numeric` are right-aligned."""
    head = "".join(f"<th>{_esc(h)}</th>" for h in header)
    body = "".join("<tr>" + "".join(f'<td class="num">{c}</td>' if i in numeric else f"<td>{c}</td>"
                                    for i, c in enumerate(row)) + "</tr>" for row in rows)
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def _safe_name(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]", "_", name) or "stage"


def _numeric(metrics) -> dict[str, float]:
    return {k: float(v) for k, v in (metrics or {}).items() if _is_number(v)} if isinstance(metrics, dict) else {}


def load_pipeline_state(out: Path) -> dict:
    path = out / "pipeline.json"
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no pipeline.json; is {out} the output_dir of a `posttrain run`?")
    try:
        state = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise ValueError(f"{path}:{exc.lineno}: not valid JSON ({exc.msg})") from None
    if not isinstance(state, dict) or not isinstance(state.get("stages"), dict):
        raise ValueError(f"{path}: field 'stages' must be an object of stage name -> record")
    for name, record in state["stages"].items():
        if not isinstance(record, dict):
            raise ValueError(f"{path}: stages.{name}: expected an object, got {type(record).__name__}")
    return state


def stage_rows(state: dict) -> list[tuple[str, dict]]:
    """(name, record) for every stage in run order; planned stages the run never reached get a stub."""
    rows = list(state["stages"].items())
    for item in state.get("plan") or []:
        if isinstance(item, dict) and item.get("stage") not in state["stages"]:
            rows.append((str(item.get("stage")), {"verb": item.get("verb", DASH), "status": "not_reached"}))
    return rows


def overall_status(rows: list[tuple[str, dict]]) -> tuple[str, str]:
    """(status key for the badge, sentence) of the whole run."""
    for name, record in rows:
        status = record.get("status")
        if status in ("error", "failed_gate", "running"):
            return status, {"error": f"error in stage {name}", "failed_gate": f"stopped by a gate after stage {name}",
                            "running": f"interrupted in stage {name}"}[status]
    if any(r.get("status") == "not_reached" for _, r in rows):
        return "not_reached", "incomplete"
    return "done", "done"


def _gate_cell(record: dict) -> str:
    gates = record.get("gates")
    if not gates:
        if record.get("status") == "failed_gate":  # a pipeline.json written before gates were recorded
            return f'{_badge("failed")}<div class="msg">{_esc(record.get("error", ""))}</div>'
        return DASH if record.get("status") in ("not_reached", "error") else "none"
    lines = []
    for g in gates:
        bounds = " ".join(f"{op} {g[k]}" for k, op in (("min", "\u2265"), ("max", "\u2264")) if g.get(k) is not None)
        label = g.get("label") or g.get("metric", "?")
        lines.append(f'<div class="gate">{_badge("passed" if g.get("passed") else "failed")} '
                     f'{_esc(label)} = {_num(g.get("value"))} (needs {_esc(bounds)})</div>')
    if record.get("status") == "failed_gate" and record.get("error"):
        lines.append(f'<div class="msg">{_esc(record["error"])}</div>')
    return "".join(lines)


def _stage_table(rows: list[tuple[str, dict]]) -> str:
    body = []
    for name, r in rows:
        seconds = r.get("seconds")
        shown = _secs(seconds)
        if r.get("status") == "skipped" and _is_number(seconds):
            shown = f'{DASH} <span class="note">(reused; took {_secs(seconds)} s)</span>'
        error = r.get("error") if r.get("status") == "error" else None
        status = _badge(str(r.get("status", "unknown"))) + (f'<div class="msg">{_esc(error)}</div>' if error else "")
        body.append([_esc(name), _esc(r.get("verb", DASH)), status, shown, _gate_cell(r)])
    return _table(["stage", "verb", "status", "seconds", "gates"], body, {3})


def _data_section(out: Path, state: dict) -> str | None:
    """The pipeline's data-prep records (`data:` in the pipeline YAML), when it has any."""
    data = state.get("data")
    if not isinstance(data, dict) or not data:
        return None
    body = []
    for name, r in data.items():
        r = r if isinstance(r, dict) else {}
        path = str(r.get("path", DASH))
        try:
            path = str(Path(path).relative_to(out))
        except ValueError:
            pass
        body.append([_esc(name), _badge(str(r.get("status", "unknown"))),
                     *(_esc(f"{r[k]:,}") if _is_number(r.get(k)) else DASH for k in ("rows", "kept", "dropped")),
                     _secs(r.get("seconds")), _esc(path)])
    return _table(["data", "status", "rows", "kept", "dropped", "seconds", "path"], body, {2, 3, 4, 5})


def metric_table(state: dict) -> dict[str, dict[str, float]]:
    """{column: metrics}: the input model (the first stage's eval before), then each stage's eval after."""
    table: dict[str, dict[str, float]] = {}
    for name, record in state["stages"].items():
        if not table and record.get("metrics_before"):
            table["input"] = record["metrics_before"]
        if record.get("metrics"):
            table[name] = record["metrics"]
    return table


def _metric_section(state: dict, report_dir: Path, pngs: dict[str, Path]) -> str:
    """Input model (first stage's eval_before), then each stage's eval_after, each with its delta."""
    results = {col: _numeric(m) for col, m in metric_table(state).items() if _numeric(m)}
    if not results:
        return f"<p>{DASH} (no stage recorded eval metrics)</p>"
    columns = list(results)
    body = []
    for metric in _metrics_of(results, columns):
        cells, previous = [_esc(metric)], None
        for col in columns:
            value = results[col].get(metric)
            cell = _num(value)
            if value is not None and previous is not None:
                delta = value - previous
                lower = any(w in metric.lower() for w in _LOWER_IS_BETTER)
                tone = "" if delta == 0 else ("better" if (delta < 0) == lower else "worse")
                cell += f'<span class="delta {tone}">{_esc(_fmt(delta, signed=True))}</span>'
            previous = value if value is not None else previous
            cells.append(cell)
        body.append(cells)
    html_out = _table(["metric", *columns], body, set(range(1, len(columns) + 1)))
    html_out += ('<p class="note">Each delta is against the column before it that has the metric; green/red '
                 f'assume lower is better for names containing {", ".join(_LOWER_IS_BETTER)}, higher otherwise.</p>')
    pngs["metrics"] = bar_chart(results, report_dir / "metrics.png", columns, title="eval metrics by stage")
    return html_out + _img(pngs["metrics"], "eval metrics by stage")


def curve_keys(path: Path) -> list[str]:
    seen: dict[str, None] = {}
    for _, row in read_jsonl(path):
        seen.update((k, None) for k, v in row.items() if _is_number(v))
    return pick_curve_keys(seen)


def pick_curve_keys(keys) -> list[str]:
    """The metrics.jsonl keys worth a curve (losses, rewards, margins, accuracies, KL), loss first, at most 8."""
    keys = [k for k in keys if any(w in k.lower() for w in _CURVE_WORDS) and k not in _CURVE_SKIP]
    return sorted(keys, key=lambda k: (k != "loss", k != "eval_loss"))[:8]  # loss first; sort is stable


def _curves_section(out: Path, rows: list[tuple[str, dict]], report_dir: Path, pngs: dict[str, Path]) -> str:
    parts = []
    for name, r in rows:
        if r.get("status") == "not_reached":
            continue
        path = out / name / "metrics.jsonl"
        train = (r.get("outputs") or {}).get("train") if isinstance(r.get("outputs"), dict) else None
        summary = ""
        if isinstance(train, dict):
            bits = [f"{label} {spec.format(train[k])}" for k, label, spec in
                    (("steps", "steps", "{:d}"), ("train_loss", "final train loss", "{:.4f}"),
                     ("best_eval_loss", "best eval loss", "{:.4f}"), ("tokens_per_s", "tokens/s", "{:,.0f}"))
                    if _is_number(train.get(k)) and (k != "steps" or isinstance(train[k], int))]
            summary = f'<p class="note">{_esc(", ".join(bits))}</p>' if bits else ""
        if not path.is_file():
            if summary:
                parts.append(f"<h3>{_esc(name)}</h3>{summary}<p>{DASH} (no metrics.jsonl)</p>")
            continue
        try:
            keys = curve_keys(path)
            png = metric_curves(path, report_dir / f"curves-{_safe_name(name)}.png", keys or ["loss"],
                                title=f"{name} ({r.get('verb', '?')})")
        except ValueError as exc:  # a broken or empty log: say so in the page, the rest still renders
            parts.append(f'<h3>{_esc(name)}</h3>{summary}<p>{DASH} <span class="msg">{_esc(exc)}</span></p>')
            continue
        pngs[png.stem] = png
        parts.append(f"<h3>{_esc(name)}</h3>{summary}{_img(png, f'{name} training curves')}")
    return "".join(parts) or f"<p>{DASH} (no stage logged metrics.jsonl)</p>"


def _compression_points(r: dict) -> tuple[str, list[tuple[str, float | None, dict[str, float]]]]:
    """(size unit, [(label, size, quality metrics)]) of a quantize/prune/distill stage record."""
    o = r.get("outputs") if isinstance(r.get("outputs"), dict) else {}
    before, after = _numeric(r.get("metrics_before")), _numeric(r.get("metrics"))
    verb = r.get("verb")
    if verb == "quantize":
        return "weight MB", [("before", _mb_value(o.get("weight_bytes_before")), before),
                             ("after", _mb_value(o.get("weight_bytes_after")), after)]
    if verb == "prune":
        p = o.get("pruning") if isinstance(o.get("pruning"), dict) else {}
        m = lambda n: n / 1e6 if _is_number(n) else None  # noqa: E731
        points = [("unpruned", m(p.get("params_before")), {**before, **_numeric({"eval_loss": o.get("L0")})}),
                  ("pruned", m(p.get("nonzero_params_after")), _numeric({"eval_loss": o.get("loss_after_prune")}))]
        rec = o.get("recovery") if isinstance(o.get("recovery"), dict) else {}
        if rec or after:
            points.append(("recovered", m(p.get("nonzero_params_after")),
                           {**after, **_numeric({"eval_loss": rec.get("best_eval_loss")})}))
        return "nonzero params (M)", points
    total = (o.get("trainable") or {}).get("total") if isinstance(o.get("trainable"), dict) else None
    size = total / 1e6 if _is_number(total) else None
    points = [("student before", size, before), ("student after", size, after)]
    if _numeric(o.get("eval_teacher")):
        points.append(("teacher", None, _numeric(o.get("eval_teacher"))))
    return "student params (M)", points


def _mb_value(n) -> float | None:
    return n / 1e6 if _is_number(n) else None


def _compression_section(rows: list[tuple[str, dict]], report_dir: Path, pngs: dict[str, Path],
                         compress_verbs: Collection[str]) -> str:
    """Size vs quality before/after each compression stage: a table and one scatter panel per stage x metric."""
    from matplotlib.figure import Figure

    stages = [(n, r) for n, r in rows if r.get("verb") in compress_verbs and r.get("status") != "not_reached"]
    if not stages:
        return f"<p>{DASH} (no quantize, prune or distill stage)</p>"
    parts, panels = [], []
    for name, r in stages:
        unit, points = _compression_points(r)
        metrics = list(dict.fromkeys(k for _, _, q in points for k in q))
        body = [[_esc(label), _num(size), *(_num(q.get(k)) for k in metrics)] for label, size, q in points]
        table = _table(["point", unit, *metrics], body, set(range(1, len(metrics) + 2)))
        parts.append(f"<div><h3>{_esc(name)} ({_esc(r.get('verb'))})</h3>{table}</div>")
        for metric in metrics:
            xy = [(label, size, q[metric]) for label, size, q in points if size is not None and metric in q]
            if xy:
                panels.append((f"{name}: {metric}", unit, xy))
    parts = [f'<div class="row">{"".join(parts)}</div>']
    if panels:
        ncols = min(3, len(panels))
        nrows = -(-len(panels) // ncols)
        fig = Figure(figsize=(4.2 * ncols, 3.4 * nrows), layout="constrained")
        axes = fig.subplots(nrows, ncols, squeeze=False).ravel()
        for ax in axes[len(panels):]:
            ax.set_visible(False)
        for ax, (title, unit, xy) in zip(axes, panels):
            xs, ys = [p[1] for p in xy], [p[2] for p in xy]
            ax.plot(xs, ys, color="C7", linewidth=1, linestyle="--", zorder=1)
            for i, (label, x, y) in enumerate(xy):
                ax.scatter([x], [y], color=f"C{i}", s=40, zorder=2)
                ax.annotate(f"{label}\n{_fmt(y)}", (x, y), fontsize=8, xytext=(4, 4), textcoords="offset points")
            ax.set_xlabel(unit)
            ax.set_title(title, fontsize=10)
            ax.grid(alpha=0.3)
            ax.margins(x=0.25, y=0.25)
        fig.suptitle("compression: size vs quality")
        pngs["compression"] = atomic_write(report_dir / "compression.png",
                                           lambda tmp: fig.savefig(tmp, format="png", dpi=100))
        parts.append(_img(pngs["compression"], "compression: size vs quality"))
    else:
        parts.append(f"<p>{DASH} (no stage recorded both a size and a quality metric to plot)</p>")
    return "".join(parts)


def _export_section(out: Path, rows: list[tuple[str, dict]]) -> str:
    body = []
    for name, r in rows:
        if r.get("verb") != "export" or not isinstance(r.get("outputs"), dict):
            continue
        for fmt, entry in r["outputs"].items():
            if not isinstance(entry, dict):
                continue
            path = str(entry.get("path", DASH))
            try:
                path = str(Path(path).relative_to(out))
            except ValueError:
                pass  # outside the output dir: show it whole
            check = entry.get("check")
            shown = ", ".join(f"{k}={_fmt(float(v)) if _is_number(v) else v}" for k, v in check.items()
                              if _is_number(v) or isinstance(v, (str, bool))) if isinstance(check, dict) else DASH
            body.append([_esc(name), _esc(fmt), _esc(path), _esc(_mb(entry.get("size_bytes"))), _esc(shown or DASH)])
    if not body:
        return f"<p>{DASH} (no export stage finished)</p>"
    return _table(["stage", "format", "path (under the output dir)", "size", "round-trip check"], body, {3})


def write_pipeline_report(output_dir: str | os.PathLike, compress_verbs: Collection[str]) -> Path:
    """Write `<output_dir>/report/report.html` (+ the same figures as PNGs) from pipeline.json and the
    stage run dirs; `compress_verbs` (the stage registry's compress role) get the trade-offs section. The page embeds its PNGs as data: URIs and has no script or external URL, so it
    can be mailed or archived as one file. Missing pieces show as a dash rather than failing."""
    out = Path(output_dir)
    state = load_pipeline_state(out)
    rows = stage_rows(state)
    report_dir = out / "report"
    report_dir.mkdir(parents=True, exist_ok=True)
    pngs: dict[str, Path] = {}
    data = list(state["data"].values()) if isinstance(state.get("data"), dict) else []
    ran = [r.get("seconds") for r in [*data, *(r for _, r in rows)]
           if isinstance(r, dict) and r.get("status") not in ("skipped", "not_reached")]
    total = sum(s for s in ran if _is_number(s))
    overall_key, overall = overall_status(rows)
    name = str(state.get("name", out.name))
    updated = datetime.fromtimestamp((out / "pipeline.json").stat().st_mtime, timezone.utc)
    sections = [
        ("Data", _data_section(out, state)),
        ("Stages", _stage_table(rows)),
        ("Eval metrics before and after each stage", _metric_section(state, report_dir, pngs)),
        ("Training curves", _curves_section(out, rows, report_dir, pngs)),
        ("Compression trade-offs", _compression_section(rows, report_dir, pngs, compress_verbs)),
        ("Export", _export_section(out, rows)),
    ]
    for stale in report_dir.glob("*.png"):  # figures of stages no longer in the run
        if stale not in pngs.values():
            stale.unlink()
    page = [
        "<!DOCTYPE html>", '<html lang="en"><head><meta charset="utf-8">',
        '<meta name="viewport" content="width=device-width, initial-scale=1">',
        f"<title>{_esc(name)} \u2014 pipeline report</title><style>{_CSS}</style></head><body><main>",
        f"<h1>Pipeline {_esc(name)} {_badge(overall_key)}</h1>",
        f'<p class="meta">status: <b>{_esc(overall)}</b> \u00b7 total time {_secs(total)} s '
        f'(work done this time; skipped steps not counted) \u00b7 {len(rows)} stage(s)</p>',
        f'<p class="meta">pipeline.json updated {updated:%Y-%m-%d %H:%M:%S} UTC \u00b7 report generated '
        f'{datetime.now(timezone.utc):%Y-%m-%d %H:%M:%S} UTC \u00b7 output dir {_esc(out)}</p>',
        *(f"<h2>{_esc(title)}</h2>{body}" for title, body in sections if body is not None),
        "</main></body></html>",
    ]
    return write_text_atomic(report_dir / "report.html", "\n".join(page) + "\n")

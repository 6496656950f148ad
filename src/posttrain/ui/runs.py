"""Run directories under the studio's root: finding them, their summaries, their details.

A stage run is a directory whose config.yaml names a stage (stage.prepare_run_dir writes it
first); a pipeline run is an output_dir holding pipeline.json; either may also hold ui/, what
the studio wrote when it started the run (ui/job.json: the command, its process and exit code;
ui/log.txt: its output). Everything here reads; nothing is written.

Every path a request names goes through `inside`: resolved (symlinks followed) and refused
unless it stays under the root.
"""

from __future__ import annotations

import json
import math
import os
import time
from pathlib import Path
from typing import Any

import yaml

from posttrain.eval.report import load_pipeline_state, metric_table, overall_status, pick_curve_keys, stage_rows
from posttrain.ui.forms import flatten

SKIP_DIRS = {"checkpoints", "final", "tensorboard", "plots", "report", "ui", "input_merged", "node_modules",
             "__pycache__", "site-packages", "deploy"}
MAX_DEPTH = 4  # root/a/b/c/d: runs/pipeline/stage is three
MAX_DIRS = 20000  # a root with more directories than this is scanned only this far
JOB_DIR = "ui"


class PathError(ValueError):
    """A path that leaves the root (or names nothing usable there)."""


def inside(root: Path, rel: str | os.PathLike) -> Path:
    """root/rel with symlinks resolved; PathError unless it is the root or under it."""
    rel = str(rel)
    if "\x00" in rel:
        raise PathError("path contains a NUL byte")
    target = (root / Path(rel).expanduser()).resolve()
    if target != root and root not in target.parents:
        raise PathError(f"{rel}: outside the studio's root {root}")
    return target


def relative(root: Path, path: Path) -> str:
    return path.resolve().relative_to(root).as_posix() or "."


def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None


def _read_yaml(path: Path) -> Any:
    try:
        return yaml.safe_load(path.read_text(encoding="utf-8"))
    except (OSError, ValueError, yaml.YAMLError):
        return None


def run_kind(path: Path) -> str | None:
    """'stage', 'pipeline' or None for a directory that is neither."""
    if (path / "pipeline.json").is_file():
        return "pipeline"
    config = path / "config.yaml"
    if config.is_file():
        data = _read_yaml(config)
        if isinstance(data, dict) and "stage" in data and "output_dir" in data:
            return "stage"
    job = _read_json(path / JOB_DIR / "job.json")
    if isinstance(job, dict):
        return "pipeline" if job.get("verb") == "run" else "stage"
    return None


def find_runs(root: Path) -> list[Path]:
    """Every run directory under root, breadth first to MAX_DEPTH; hidden directories, virtual
    environments and a run's own subdirectories (checkpoints, final, ...) are not entered, except
    a pipeline's, whose stages are runs of their own."""
    found, queue, seen = [], [(root, 0)], 0
    while queue and seen < MAX_DIRS:
        path, depth = queue.pop(0)
        seen += 1
        kind = run_kind(path) if path != root else None
        if kind:
            found.append(path)
            if kind == "stage":
                continue
        if depth >= MAX_DEPTH or (path / "pyvenv.cfg").exists():
            continue
        try:
            children = sorted(os.scandir(path), key=lambda e: e.name)
        except OSError:
            continue
        for entry in children:
            if entry.name.startswith(".") or entry.name in SKIP_DIRS or not entry.is_dir(follow_symlinks=False):
                continue
            queue.append((Path(entry.path), depth + 1))
    return found


def _number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _parse_started(text) -> float | None:
    try:
        return time.mktime(time.strptime(str(text), "%Y-%m-%dT%H:%M:%S"))
    except ValueError:
        return None


def last_row(path: Path) -> dict | None:
    """The last complete row of a metrics.jsonl, read from its end."""
    try:
        with open(path, "rb") as fh:
            fh.seek(0, os.SEEK_END)
            size = fh.tell()
            fh.seek(max(0, size - 8192))
            lines = fh.read().split(b"\n")
    except OSError:
        return None
    for line in reversed(lines[1:] if len(lines) > 1 else lines):
        try:
            row = json.loads(line)
        except ValueError:
            continue
        if isinstance(row, dict):
            return row
    return None


def _key_metrics(manifest: dict | None, metrics_path: Path) -> dict[str, float]:
    out: dict[str, float] = {}
    outputs = (manifest or {}).get("outputs") if isinstance(manifest, dict) else None
    if isinstance(outputs, dict):
        train = outputs.get("train") if isinstance(outputs.get("train"), dict) else {}
        for key in ("steps", "train_loss", "best_eval_loss"):
            if _number(train.get(key)):
                out[key] = train[key]
        after = outputs.get("eval_after") if isinstance(outputs.get("eval_after"), dict) else {}
        for key, value in list(after.items())[:4]:
            if _number(value):
                out[key] = value
    if not out and metrics_path.is_file():
        row = last_row(metrics_path) or {}
        for key in ("step", "loss", "eval_loss", "reward"):
            if _number(row.get(key)):
                out[key] = row[key]
    return out


def summarize(root: Path, path: Path, job: dict | None) -> dict:
    """One row of the runs table: kind, stage, model, status, started, seconds, key metrics."""
    kind = run_kind(path) or "stage"
    now = time.time()
    row: dict[str, Any] = {"path": relative(root, path), "kind": kind, "job": job}
    if kind == "pipeline":
        state = None
        try:
            state = load_pipeline_state(path)
        except (OSError, ValueError):
            pass
        rows = stage_rows(state) if state else []
        status = overall_status(rows)[0] if rows else "incomplete"
        ran = [r.get("seconds") for _, r in rows if _number(r.get("seconds")) and r.get("status") != "skipped"]
        started = (job or {}).get("started") or _mtime(path / "pipeline.json")
        table = metric_table(state) if state else {}
        last = list(table.values())[-1] if table else {}
        row.update(stage="pipeline", model=(state or {}).get("name", path.name), started=started,
                   seconds=sum(ran) if ran else None, metrics={k: v for k, v in list(last.items())[:4] if _number(v)},
                   stages=[{"name": n, "verb": r.get("verb"), "status": r.get("status")} for n, r in rows])
    else:
        config = _read_yaml(path / "config.yaml") or {}
        manifest = _read_json(path / "manifest.json")
        model = (config.get("model") or {}).get("name") if isinstance(config.get("model"), dict) else None
        started = _parse_started(manifest.get("started")) if isinstance(manifest, dict) else None
        started = started or (job or {}).get("started") or _mtime(path / "config.yaml")
        seconds = manifest.get("seconds") if isinstance(manifest, dict) else None
        status = "done" if isinstance(manifest, dict) else "incomplete"
        if not isinstance(manifest, dict) and (path / "metrics.jsonl").is_file() and job is None \
                and now - _mtime(path / "metrics.jsonl") < 60:
            status = "running"  # started elsewhere, still writing
        row.update(stage=config.get("stage"), model=model, started=started, seconds=seconds,
                   metrics=_key_metrics(manifest, path / "metrics.jsonl"),
                   resumable=(path / "checkpoints").is_dir() and not isinstance(manifest, dict))
    if job is not None:
        if job["state"] == "running":
            status = "running"
        elif job["state"] in ("failed", "stopped", "lost") and status != "done":
            status = job["state"]
        if job["state"] == "running" and row.get("seconds") is None:
            row["seconds"] = now - job["started"]
        elif row.get("seconds") is None and job.get("ended"):
            row["seconds"] = job["ended"] - job["started"]
    row["status"] = status
    return row


def _mtime(path: Path) -> float | None:
    try:
        return path.stat().st_mtime
    except OSError:
        return None


# ---------------------------------------------------------------------------------- one run


def detail(root: Path, path: Path, job: dict | None) -> dict:
    """Everything the run page shows but the curves and the log (those stream)."""
    summary = summarize(root, path, job)
    out: dict[str, Any] = {"summary": summary, "artifacts": artifacts(root, path),
                           "has_log": (path / JOB_DIR / "log.txt").is_file(),
                           "has_metrics": (path / "metrics.jsonl").is_file()}
    if summary["kind"] == "pipeline":
        out["pipeline_yaml"] = _text(path / JOB_DIR / "pipeline.yaml")
        if not (path / "pipeline.json").is_file():  # just started: preparing its data
            out.update(stages=[], metric_table={})
            return out
        try:
            state = load_pipeline_state(path)
        except (OSError, ValueError) as exc:
            out["pipeline_error"] = str(exc)
            return out
        out["stages"] = [{"name": n, "verb": r.get("verb"), "status": r.get("status"), "seconds": r.get("seconds"),
                          "gates": r.get("gates") or [], "error": r.get("error"),
                          "run": relative(root, path / n) if (path / n).is_dir() else None}
                         for n, r in stage_rows(state)]
        out["metric_table"] = metric_table(state)
        return out
    out["config"] = _text(path / "config.yaml")
    manifest = _read_json(path / "manifest.json")
    out["manifest"] = manifest
    evals = {}
    for name in ("before", "after"):
        value = _read_json(path / f"eval_{name}.json")
        if value is None and isinstance(manifest, dict):
            value = (manifest.get("outputs") or {}).get(f"eval_{name}")
        if isinstance(value, dict) and value:
            evals[name] = {k: v for k, v in value.items() if _number(v)}
    out["eval"] = evals
    record = _read_json(path / "pipeline_stage.json")
    out["gates"] = record.get("gates") if isinstance(record, dict) else None
    out["pipeline"] = relative(root, path.parent) if (path.parent / "pipeline.json").is_file() else None
    return out


def _text(path: Path, limit: int = 200_000) -> str | None:
    try:
        return path.read_text(encoding="utf-8", errors="replace")[:limit]
    except OSError:
        return None


def artifacts(root: Path, path: Path) -> list[dict]:
    """The run dir's files (two levels; each checkpoint as one entry), with sizes."""
    items = []
    for entry in sorted(path.iterdir()):
        if entry.name == "checkpoints" and entry.is_dir():
            for ckpt in sorted(entry.iterdir()):
                items.append({"path": relative(root, ckpt), "size": _size(ckpt), "dir": True})
        elif entry.is_dir():
            children = sorted(entry.iterdir())
            if entry.name in ("tensorboard",) or len(children) > 30:
                items.append({"path": relative(root, entry), "size": _size(entry), "dir": True})
            else:
                items += [{"path": relative(root, c), "size": _size(c), "dir": c.is_dir()} for c in children]
        else:
            items.append({"path": relative(root, entry), "size": _size(entry), "dir": False})
    return items


def _size(path: Path) -> int:
    if path.is_file():
        return path.stat().st_size
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


# ------------------------------------------------------------------------------ metrics files


def read_rows(path: Path, offset: int = 0, limit: int = 4 << 20) -> tuple[list[dict], int]:
    """Complete JSON rows of a JSONL file from byte `offset` (at most `limit` bytes), and the offset
    after the last complete line: a line still being written is left for the next read."""
    try:
        with open(path, "rb") as fh:
            fh.seek(offset)
            chunk = fh.read(limit)
    except OSError:
        return [], offset
    end = chunk.rfind(b"\n")
    if end < 0:
        return [], offset
    rows = []
    for line in chunk[:end].split(b"\n"):
        try:
            row = json.loads(line)
        except ValueError:
            continue  # a broken line: the curves skip it (report.read_metrics names it)
        if isinstance(row, dict):
            rows.append({k: v for k, v in row.items() if _number(v)})
    return rows, offset + end + 1


def curve_keys_of(rows: list[dict]) -> list[str]:
    seen: dict[str, None] = {}
    for row in rows:
        seen.update(dict.fromkeys(row))
    return pick_curve_keys(seen)


def config_diff(configs: dict[str, dict]) -> dict:
    """{keys: every dotted key, differ: keys whose values differ, values: {run: {key: value}}}."""
    flat = {run: flatten(cfg or {}) for run, cfg in configs.items()}
    keys = list(dict.fromkeys(k for f in flat.values() for k in f))
    differ = [k for k in keys if len({json.dumps(f[k], default=str) if k in f else "(missing)"
                                      for f in flat.values()}) > 1]
    return {"keys": keys, "differ": differ, "values": flat}

"""Accuracy against compute: run strategies on a task, tabulate, plot accuracy vs tokens.

Compute is what the strategies report: generated tokens per question (the x axis),
model calls, and wall seconds. Scoring uses the task's `check` (the reference answer,
or for Game-of-24 the expression checker).
"""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Any, Sequence

from posttrain.fileio import atomic_write
from posttrain.reason.strategies import ReasonConfig, run_strategy
from posttrain.reason.tasks import Example, Task


def evaluate_strategies(model, tokenizer, task: Task, examples: list[Example], strategies: Sequence[str],
                        cfg: ReasonConfig | None = None) -> dict[str, dict[str, Any]]:
    """{strategy: {accuracy, answered, tokens_per_q, calls_per_q, prompt_tokens_per_q, seconds, n,
    rungs (router), predictions}} for each strategy on the same examples."""
    cfg = cfg or ReasonConfig()
    results: dict[str, dict[str, Any]] = {}
    for name in strategies:
        start = time.perf_counter()
        answers = run_strategy(name, model, tokenizer, task, examples, cfg)
        seconds = time.perf_counter() - start
        n = len(examples)
        preds = []
        for ex, a in zip(examples, answers):
            preds.append({"line": ex.get("line"), "prompt": ex["prompt"], "reference": ex.get("answer"),
                          "answer": a.answer, "correct": bool(task.check(a.answer, ex)), "tokens": a.tokens,
                          "calls": a.calls, "rung": a.rung, "text": a.text,
                          "detail": {k: v for k, v in a.detail.items() if k not in ("logprobs", "token_ids")}})
        row = {"n": n, "accuracy": sum(p["correct"] for p in preds) / n,
               "answered": sum(p["answer"] is not None for p in preds) / n,
               "tokens_per_q": sum(a.tokens for a in answers) / n, "calls_per_q": sum(a.calls for a in answers) / n,
               "prompt_tokens_per_q": sum(a.prompt_tokens for a in answers) / n, "seconds": seconds}
        if any(a.rung for a in answers):
            row["rungs"] = {r: sum(a.rung == r for a in answers) for r in dict.fromkeys(a.rung for a in answers)}
        row["predictions"] = preds
        results[name] = row
    return results


def format_results(results: dict[str, dict[str, dict[str, Any]]]) -> str:
    """One line per (task, strategy): accuracy, answered share, tokens and calls per question, seconds."""
    header = ["task", "strategy", "n", "accuracy", "answered", "tokens/q", "calls/q", "seconds", "rungs"]
    rows = []
    for task, per in results.items():
        for strat, r in per.items():
            rungs = " ".join(f"{k}:{v}" for k, v in r.get("rungs", {}).items())
            rows.append([task, strat, str(r["n"]), f"{r['accuracy']:.3f}", f"{r['answered']:.2f}",
                         f"{r['tokens_per_q']:.1f}", f"{r['calls_per_q']:.1f}", f"{r['seconds']:.1f}", rungs])
    widths = [max(len(x[i]) for x in [header, *rows]) for i in range(len(header))]
    lines = ["  ".join(c.ljust(w) if i < 2 or i == 8 else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths)))
             for r in [header, *rows]]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(line.rstrip() for line in lines)


def plot_accuracy_vs_tokens(results: dict[str, dict[str, dict[str, Any]]], path: str | os.PathLike,
                            title: str | None = None) -> Path:
    """One panel per task: accuracy vs mean generated tokens per question (log x), one
    labelled point per strategy, joined in order of cost."""
    from matplotlib.figure import Figure

    if not results:
        raise ValueError("no results to plot")
    fig = Figure(figsize=(4.6 * len(results), 3.8), layout="constrained")
    axes = fig.subplots(1, len(results), squeeze=False)[0]
    for ax, (task, per) in zip(axes, results.items()):
        points = sorted((max(r["tokens_per_q"], 1e-3), r["accuracy"], s) for s, r in per.items())
        ax.plot([p[0] for p in points], [p[1] for p in points], color="0.7", linewidth=1, zorder=1)
        for i, (x, y, s) in enumerate(points):
            ax.scatter([x], [y], color=f"C{i}", zorder=2)
            ax.annotate(s, (x, y), textcoords="offset points", xytext=(4, 4), fontsize=8)
        ax.set_xscale("log")
        ax.set_ylim(-0.03, 1.03)
        ax.set_xlabel("generated tokens per question (log)")
        ax.set_ylabel("accuracy")
        ax.set_title(f"{task} (n={next(iter(per.values()))['n']})")
        ax.grid(alpha=0.3)
    if title:
        fig.suptitle(title)
    return atomic_write(Path(path), lambda tmp: fig.savefig(tmp, format="png", dpi=100))

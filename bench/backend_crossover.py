"""Where `backend: auto` should switch from the native decoder to the torch forward.

Greedy generation of 32 tokens for the first B harmful-test prompts (chat template) with the
default model in bf16, on the native decoder and on the torch forward, each run once to warm up
and once timed, interleaved per batch size. Prints seconds and the torch/native ratio;
`generate/backends.py` AUTO_TORCH_BATCH is set from it. Run: `python bench/backend_crossover.py`.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import RESULTS_DIR, finish, load_average, run_context  # noqa: E402


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--batches", default="1,4,8,16,32,50")
    ap.add_argument("--max-new-tokens", type=int, default=32)
    ap.add_argument("--quick", action="store_true", help="batches 1 and 16 only; no JSON")
    args = ap.parse_args(argv)
    from posttrain.data.answers import load_checkable
    from posttrain.generate.engine import GenerationConfig, generate
    from posttrain.models import load_model

    load_before = load_average()
    model, tok = load_model("default")
    prompts = [r["prompt"] for r in load_checkable("data/safety/harmful_test.jsonl", need_answer=False)]
    batches = [1, 16] if args.quick else [int(b) for b in args.batches.split(",")]
    rows = []
    for b in batches:
        seconds = {}
        for backend in ("native", "torch"):
            cfg = GenerationConfig(max_new_tokens=args.max_new_tokens, chat=True, backend=backend)
            generate(model, tok, prompts[:b], cfg)  # warm-up (native: packs the weights once)
            start = time.perf_counter()
            generate(model, tok, prompts[:b], cfg)
            seconds[backend] = time.perf_counter() - start
        rows.append({"batch": b, "native_s": round(seconds["native"], 3), "torch_s": round(seconds["torch"], 3),
                     "torch_over_native": round(seconds["torch"] / seconds["native"], 2)})
    result = {"max_new_tokens": args.max_new_tokens, "rows": rows,
              **run_context(load_before, load_average(), "transformers")}

    def table(r):
        print("| batch | native s | torch s | torch / native |\n|---|---|---|---|")
        for row in r["rows"]:
            print(f"| {row['batch']} | {row['native_s']} | {row['torch_s']} | {row['torch_over_native']} |")

    return finish(result, RESULTS_DIR / "backend_crossover.json", args.quick, table)


if __name__ == "__main__":
    main()

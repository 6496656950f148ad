"""Batch-1 decode speed of a few compressed variants, interleaved round by round.

bench/compression.py times each row once, one row after the other; on a shared 2-core
machine single timings of equal-size models differed by up to ±20% there. This script
loads the variants once and times them in turns (best of N rounds each), so a slow
minute hits every variant alike.

  python bench/decode_interleaved.py --rounds 5 --extra depth25=runs/compress/depth25-before
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from bench.common import RESULTS_DIR, machine_info  # noqa: E402
from bench.compression import PROMPT, build  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rows", default="bf16,int8,int4-g32")
    ap.add_argument("--extra", action="append", default=[], metavar="LABEL=MODEL")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--tokens", type=int, default=128)
    ap.add_argument("--out", default=str(RESULTS_DIR / "decode_interleaved.json"))
    args = ap.parse_args()
    from posttrain.fileio import write_json_atomic
    from posttrain.generate.engine import GenerationConfig, generate

    variants = {r: build(r, None)[:2] for r in args.rows.split(",") if r}
    variants.update({lab: build(lab, spec)[:2] for lab, spec in (e.split("=", 1) for e in args.extra)})
    cfg = GenerationConfig(max_new_tokens=args.tokens, ignore_eos=True, backend="native")
    times: dict[str, list[float]] = {k: [] for k in variants}
    for model, tok in variants.values():
        generate(model, tok, [PROMPT], GenerationConfig(max_new_tokens=4, backend="native"))
    for _ in range(args.rounds):
        for label, (model, tok) in variants.items():
            start = time.perf_counter()
            generate(model, tok, [PROMPT], cfg)
            times[label].append(time.perf_counter() - start)
    base = args.tokens / min(times["bf16"]) if "bf16" in times else None
    rows = []
    for label, ts in times.items():
        tps = args.tokens / min(ts)
        med = args.tokens / sorted(ts)[len(ts) // 2]
        rows.append({"variant": label, "best_tokens_per_s": tps, "median_tokens_per_s": med,
                     "speedup_vs_bf16": tps / base if base else None})
        print(f"{label:<14} best {tps:7.1f} tok/s  median {med:7.1f}" + (f"  {tps / base:5.2f}x bf16" if base else ""))
    write_json_atomic(Path(args.out), {"rows": rows, "rounds": args.rounds, "tokens": args.tokens,
                                       "machine": machine_info()})


if __name__ == "__main__":
    main()

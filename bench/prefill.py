"""Time to first token: the native decoder's prefill against the PyTorch forward.

For prompts of 32-2048 tokens (general text, default model in bf16), the seconds from the
prompt's ids to the first token's logits, best of `--repeats`, interleaved per length:

- `native`: the native decoder's own prefill (AMX matmuls where the CPU has them, else the
  vdpbf16ps kernels, per-row attention in C);
- `ours`: what the engine does (`NativeRows.start`): native below `TORCH_PREFILL_MIN` tokens, from
  there the torch forward with its K/V copied into the native cache, where decoding goes on;
- `torch`: the torch forward (oneDNN GEMM, SDPA attention) with a KV cache, the peer.

Goal (issue 19): ours at or below torch at every length. Run from the repo root:
`python bench/prefill.py`.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import RESULTS_DIR, finish, load_average, run_context  # noqa: E402


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--lengths", default="32,128,512,2048")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--quick", action="store_true", help="lengths 32 and 512 only; no JSON")
    args = ap.parse_args(argv)
    from posttrain.eval.tasks import load_texts
    from posttrain.generate.backends import TORCH_PREFILL_MIN, NativeRows, TorchRows
    from posttrain.generate.native import amx_available, native_lm
    from posttrain.models import load_model

    load_before = load_average()
    model, tok = load_model("default", dtype="bf16")
    model.eval()
    text = " ".join(load_texts("data/general/text.jsonl"))
    ids = tok(text)["input_ids"]
    lengths = [32, 512] if args.quick else [int(n) for n in args.lengths.split(",")]
    if max(lengths) > len(ids):
        raise SystemExit(f"the general text has {len(ids)} tokens; the longest prompt asked for is {max(lengths)}")
    lm = native_lm(model, required=True)
    rows = []
    with torch.inference_mode():
        for n in lengths:
            prompt = [ids[:n]]
            best = {"native": float("inf"), "ours": float("inf"), "torch": float("inf")}
            for _ in range(args.repeats + 1):  # the first round warms up (and packs the weights once)
                for name in best:
                    start = time.perf_counter()
                    if name == "torch":
                        rows_ = TorchRows(model, prompt, tok.pad_token_id)
                    else:
                        rows_ = NativeRows(lm, prompt, 1, torch_prefill_min=10 ** 9 if name == "native" else None)
                    rows_.start()
                    best[name] = min(best[name], time.perf_counter() - start)
            rows.append({"tokens": n, "native_s": round(best["native"], 4), "ours_s": round(best["ours"], 4),
                         "torch_s": round(best["torch"], 4),
                         "torch_over_native": round(best["torch"] / best["native"], 2),
                         "torch_over_ours": round(best["torch"] / best["ours"], 2)})
            print(rows[-1], flush=True)
    result = {"amx": amx_available(), "repeats": args.repeats, "torch_prefill_min": TORCH_PREFILL_MIN, "rows": rows,
              **run_context(load_before, load_average(), "transformers")}

    def table(r):
        print(f"time to first token, default model bf16 (native matmuls on AMX: {r['amx']}; ours hands "
              f"prompts of {r['torch_prefill_min']}+ tokens to the torch forward)")
        print("| prompt tokens | native s | ours s | torch s | torch / native | torch / ours |\n|---|---|---|---|---|---|")
        for row in r["rows"]:
            print(f"| {row['tokens']} | {row['native_s']} | {row['ours_s']} | {row['torch_s']} | "
                  f"{row['torch_over_native']} | {row['torch_over_ours']} |")

    return finish(result, RESULTS_DIR / "prefill.json", args.quick, table)


if __name__ == "__main__":
    main()

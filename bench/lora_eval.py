"""Evaluating a LoRA model: per-batch generation time, base vs LoRA unfolded vs LoRA folded.

The default model (bf16) answers an eval task's prompts (data/quickstart/test.jsonl, batch 16,
16 new tokens, greedy: what `eval:` in the demo pipeline runs), three ways:

  base            the plain model (`backend=auto` -> the native decoder)
  lora_unfolded   the same model under PEFT LoRA r16 all-linear (fp32 adapters, as training
                  leaves it) on PEFT's own forward: what `backend=auto` ran before LoRA was
                  folded into the native decoder's packed weights (`native.unsupported_reason`
                  refused PEFT models)
  lora_folded     the same LoRA model with `backend=auto` now: native, LoRA folded at pack time

The adapter is a trained one (`--adapter runs/pipeline_demo/sft`: the demo's SFT stage) or, by
default, fresh LoRA with seeded random B matrices (a fresh LoRA has B = 0: every answer would be
the base model's). Folded and unfolded differ only by rounding (bf16 W + BA once, against bf16
W x plus fp32 B A x); the script prints how many prompts got identical token ids, the tokens
generated and each way's exact-match score. Folding and
packing the weights (once per weight change: once per eval after training) is timed apart.
The three ways run batch by batch in turn (two model copies), so load from other processes
slows them alike. `--ignore-eos` makes every row generate 16 tokens (equal work per batch for
the base and a tuned model that answers in 3). Run from the repo root: `python bench/lora_eval.py`.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import RESULTS_DIR, best_matmul_peak, finish, run_context  # noqa: E402

from posttrain.adapters import AdapterConfig, apply_adapter  # noqa: E402
from posttrain.eval.tasks import load_task, score_prediction  # noqa: E402
from posttrain.generate.backends import NativeRows, make_rows  # noqa: E402
from posttrain.generate.engine import GenerationConfig, generate  # noqa: E402
from posttrain.generate.native import native_lm  # noqa: E402
from posttrain.models import load_model  # noqa: E402

TASK = "data/quickstart/test.jsonl"


def run_interleaved(ways: dict, tok, batches, ignore_eos: bool = False) -> dict:
    """Seconds per batch and the outputs of each way (name -> (model, backend)), batch by batch in
    turn, so a busy minute on a shared machine slows every way alike; which backend ran is recorded."""
    rows = {}
    for name, (model, backend) in ways.items():
        ran = type(make_rows(model, [[1]], tok.pad_token_id, 1, backend)).__name__
        rows[name] = {"backend": backend, "ran_on": "native" if ran == NativeRows.__name__ else "torch",
                      "per_batch_s": [], "ids": [], "texts": []}
    for prompts in batches:
        for name, (model, backend) in ways.items():
            cfg = GenerationConfig(max_new_tokens=16, do_sample=False, chat=True, backend=backend,  # as eval does
                                   ignore_eos=ignore_eos)
            t = time.perf_counter()
            out = generate(model, tok, prompts, cfg)
            rows[name]["per_batch_s"].append(time.perf_counter() - t)
            rows[name]["ids"] += out.token_ids
            rows[name]["texts"] += out.texts
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--batches", type=int, default=4, help="batches of 16 prompts")
    ap.add_argument("--b-std", type=float, default=0.2, help="std of the seeded random LoRA B matrices")
    ap.add_argument("--adapter", help="a trained LoRA adapter dir or run dir (default: seeded random B matrices)")
    ap.add_argument("--ignore-eos", action="store_true",
                    help="every row generates 16 tokens: equal work per batch for base and a tuned model")
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--out", default=str(RESULTS_DIR / "lora_eval.json"))
    args = ap.parse_args()
    load_before = os.getloadavg()
    peak = best_matmul_peak()["flops"]
    examples = load_task(TASK, 16 * args.batches)
    batches = [[e["prompt"] for e in examples[i:i + 16]] for i in range(0, len(examples), 16)]

    base, tok = load_model("default", dtype="auto")
    if args.adapter:  # a trained adapter, e.g. the demo's SFT stage (fp32 adapters over the bf16 base)
        lora, _ = load_model(args.adapter, dtype="auto")
    else:
        model, _ = load_model("default", dtype="auto")
        lora = apply_adapter(model, AdapterConfig(method="lora", r=16, alpha=32, target_modules="all-linear"), tok)
        with torch.no_grad():
            gen = torch.Generator().manual_seed(0)
            for name, p in lora.named_parameters():
                if "lora_B" in name:
                    p.copy_(torch.randn(p.shape, generator=gen) * args.b_std)
    before = {k: v.clone() for k, v in lora.state_dict().items()}
    trainable = [n for n, p in lora.named_parameters() if p.requires_grad]
    t = time.perf_counter()
    native_lm(lora, required=True)  # what the first eval batch after training pays once
    pack_s = time.perf_counter() - t
    rows = run_interleaved({"base": (base, "auto"), "lora_unfolded": (lora, "torch"), "lora_folded": (lora, "auto")},
                           tok, batches, args.ignore_eos)
    assert all(torch.equal(before[k], v) for k, v in lora.state_dict().items()), "generation changed the model"
    assert trainable == [n for n, p in lora.named_parameters() if p.requires_grad], "trainable set changed"

    for r in rows.values():
        scores = [score_prediction(t, e["answer"], "exact_match")[1] for t, e in zip(r["texts"], examples)]
        r["exact_match"] = sum(scores) / len(scores)
        r["median_batch_s"] = round(statistics.median(r["per_batch_s"]), 3)
        r["tokens"] = sum(len(i) for i in r["ids"])
        r["per_batch_s"] = [round(s, 3) for s in r["per_batch_s"]]
    same = sum(a == b for a, b in zip(rows["lora_folded"]["ids"], rows["lora_unfolded"]["ids"]))
    changed = sum(a != b for a, b in zip(rows["lora_folded"]["ids"], rows["base"]["ids"]))
    result = {"task": TASK, "ignore_eos": args.ignore_eos, "adapter": args.adapter or f"random B, std {args.b_std}", "prompts": len(examples), "batch_size": 16, "max_new_tokens": 16,
              "folded_vs_unfolded_identical": same, "folded_vs_base_different": changed,
              "bf16_matmul_peak_tflops": round(peak / 1e12, 3), "fold_and_pack_s": round(pack_s, 2),
              "rows": {k: {kk: vv for kk, vv in v.items() if kk not in ("ids", "texts")} for k, v in rows.items()},
              **run_context(load_before, os.getloadavg(), "transformers", "peft")}

    def table(r):
        base = r["rows"]["base"]["median_batch_s"]
        print(f"{r['prompts']} prompts of {TASK}, batch 16, 16 new tokens, greedy; bf16 matmul peak "
              f"{r['bf16_matmul_peak_tflops']} TFLOP/s; load {r['load_average_before'][0]:.2f} -> "
              f"{r['load_average_after'][0]:.2f}")
        print(f"adapter: {r['adapter']}; {'every row 16 tokens (ignore_eos)' if r['ignore_eos'] else 'EOS ends a row'}")
        print("| model | ran on | s/batch (median) | vs base | tokens generated | exact match |")
        print("|---|---|---|---|---|---|")
        for name, row in r["rows"].items():
            print(f"| {name} | {row['ran_on']} | {row['median_batch_s']:.2f} | {row['median_batch_s'] / base:.2f}x | "
                  f"{row['tokens']} | {row['exact_match']:.2f} |")
        print(f"folding LoRA and packing the weights (once per weight change): {r['fold_and_pack_s']:.2f} s")
        print(f"folded vs unfolded: {r['folded_vs_unfolded_identical']}/{r['prompts']} identical token ids; "
              f"the adapter changed {r['folded_vs_base_different']}/{r['prompts']} answers vs base")

    finish(result, args.out, args.quick, table)


if __name__ == "__main__":
    main()

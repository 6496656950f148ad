"""The native decoder with its matmuls on AMX tiles against its vdpbf16ps kernels, same process.

Two measurements, each AMX on / off interleaved (`NativeLM.amx`), default model:
- decode steps at batch 1, 8 and 100 (bf16, 32 steps after one warm-up);
- prefill of the first 100 quickstart test prompts (chat template, ~4000 tokens) and 15 greedy
  decode steps after it, on the int8 model of `--int8` (a quantize run dir) when given.
Run from the repo root: `python bench/native_amx.py [--int8 runs/pipeline_demo/quantize]`.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import RESULTS_DIR, finish, load_average, run_context  # noqa: E402


def decode_steps(lm, batch: int, steps: int = 32) -> dict:
    out = {}
    lm.allocate(batch, steps + 8)
    toks = [100 + i for i in range(batch)]
    for amx in (False, True, False, True):
        lm.amx = amx
        lm.forward(toks, list(range(batch)), [0] * batch, list(range(batch)))
        start = time.perf_counter()
        for step in range(1, steps + 1):
            lm.forward(toks, list(range(batch)), [step] * batch, list(range(batch)))
        ms = (time.perf_counter() - start) / steps * 1000
        key = "amx_ms" if amx else "vdpbf16ps_ms"
        out[key] = round(min(out.get(key, ms), ms), 2)
    return out


def prompts_and_decode(lm, ids: list[list[int]]) -> dict:
    from posttrain.generate.backends import NativeRows

    out = {}
    for amx in (False, True, False, True):
        lm.amx = amx
        start = time.perf_counter()
        rows = NativeRows(lm, ids, 16)
        logits = rows.start()
        mid = time.perf_counter()
        nxt = logits.argmax(-1)
        for _ in range(15):
            nxt = rows.extend([[int(t)] for t in nxt]).squeeze(1).argmax(-1)
        end = time.perf_counter()
        tag = "amx" if amx else "vdpbf16ps"
        out[f"{tag}_prefill_s"] = round(min(out.get(f"{tag}_prefill_s", mid - start), mid - start), 3)
        out[f"{tag}_decode15_s"] = round(min(out.get(f"{tag}_decode15_s", end - mid), end - mid), 3)
    return out


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--int8", help="a quantize run dir (int8 weights) for the prompt-batch measurement")
    ap.add_argument("--quick", action="store_true", help="batch 1 and 100 only; no JSON")
    args = ap.parse_args(argv)
    from posttrain.generate.engine import encode_prompts
    from posttrain.generate.native import amx_available, native_lm
    from posttrain.models import load_model

    if not amx_available():
        raise SystemExit("this CPU has no AMX tiles (or Linux refused them): nothing to compare")
    load_before = load_average()
    model, tok = load_model("default", dtype="bf16")
    records = [json.loads(line) for line in open("data/quickstart/test.jsonl")][:100]
    ids = encode_prompts(tok, [[{"role": "user", "content": r["prompt"]}] for r in records], chat=True)
    result = {"threads": torch.get_num_threads(), "prompt_tokens": sum(map(len, ids)), "decode": {}, "prompts": {}}
    int8 = load_model(args.int8, dtype="auto")[0] if args.int8 else None
    with torch.inference_mode():
        lm = native_lm(model.eval(), required=True)
        for batch in ([1, 100] if args.quick else [1, 8, 100]):
            result["decode"][batch] = decode_steps(lm, batch)
            print(batch, result["decode"][batch], flush=True)
        result["prompts"]["bf16"] = prompts_and_decode(lm, ids)
        if int8 is not None:
            result["prompts"]["int8"] = prompts_and_decode(native_lm(int8.eval(), required=True), ids)
    result.update(run_context(load_before, load_average(), "transformers"))

    def table(r):
        print(f"decode step, default model bf16, {r['threads']} threads (ms)")
        print("| batch | vdpbf16ps | AMX | speed-up |\n|---|---|---|---|")
        for b, d in r["decode"].items():
            print(f"| {b} | {d['vdpbf16ps_ms']} | {d['amx_ms']} | {d['vdpbf16ps_ms'] / d['amx_ms']:.2f}x |")
        print(f"100 prompts ({r['prompt_tokens']} tokens): prefill, then 15 greedy steps (s)")
        print("| weights | prefill vdpbf16ps | prefill AMX | decode vdpbf16ps | decode AMX |\n|---|---|---|---|---|")
        for w, p in r["prompts"].items():
            print(f"| {w} | {p['vdpbf16ps_prefill_s']} | {p['amx_prefill_s']} | {p['vdpbf16ps_decode15_s']} | "
                  f"{p['amx_decode15_s']} |")

    return finish(result, RESULTS_DIR / "native_amx.json", args.quick, table)


if __name__ == "__main__":
    main()

"""Compression table: bytes, perplexity, task accuracy, batch-1 decode and prefill per variant.

Every row is the default model (SmolLM2-135M-Instruct) in one form: fp32, bf16, our PTQ
modes (quantized in this process from the same bf16 weights), torchao's CPU weight-only
modes as the peer (if torchao is installed), and any trained variant given with
--extra LABEL=MODEL (QAT, pruned before/after recovery, distilled students: run dirs
from the recipes). Decoding is our engine (native CPU decoder where it supports the
model, else the PyTorch forward; the `backend` column says which); torchao rows decode
with HF `generate`, the way torchao models are used.

  python bench/compression.py --extra qat-int4=runs/qat-int4 --extra depth25=runs/prune-depth25 \
      --p2 runs/p2-fit/p2_fit.json

Writes bench/results/compression.json (rows + the summary figures the issue names).
"""

from __future__ import annotations

import argparse
import gc
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from bench.common import RESULTS_DIR, library_versions, machine_info  # noqa: E402

PTQ = {
    "int8": {"weights": "int8"},
    "int8-g64": {"weights": "int8", "group_size": 64},
    "int8dyn": {"weights": "int8", "activations": "int8"},
    "int4-g32": {"weights": "int4", "group_size": 32},
    "int4-g64": {"weights": "int4", "group_size": 64},
    "int4-g192": {"weights": "int4", "group_size": 192},
}
PROMPT = "Write a short story about a robot who learns to paint, with a beginning, a middle and an end."


def build(label: str, spec: str | None):
    from posttrain.compress.quantize import QuantSpec, quantize_model
    from posttrain.models import load_model

    if spec is not None:
        return (*load_model(spec, dtype="bf16"), "ours")
    if label in ("fp32", "bf16"):
        return (*load_model("default", dtype=label), "ours")
    if label in PTQ:
        model, tok = load_model("default", dtype="bf16")
        return quantize_model(model, QuantSpec(**PTQ[label])), tok, "ours"
    if label.startswith("torchao-"):
        from torchao.quantization import Int8WeightOnlyConfig, quantize_

        model, tok = load_model("default", dtype="bf16")
        if label == "torchao-int8wo":
            quantize_(model, Int8WeightOnlyConfig())
        elif label.startswith("torchao-int4-g"):  # torchao's CPU int4 path (its main int4 config needs a GPU)
            from torchao.prototype.quantization.int4 import PrototypeInt4WeightOnlyConfig

            quantize_(model, PrototypeInt4WeightOnlyConfig(group_size=int(label.rsplit("g", 1)[1])))
        else:
            raise ValueError(f"unknown torchao row {label}")
        return model, tok, "torchao"
    raise ValueError(f"unknown row {label!r}")


def torchao_bytes(model) -> int:
    total, seen = 0, set()
    for t in list(model.parameters()) + list(model.buffers()):
        inner = [getattr(t, a) for a in ("qdata", "scale", "zero_point", "int_data") if hasattr(t, a)] or [t]
        for x in inner:
            if isinstance(x, torch.Tensor) and x.data_ptr() not in seen:
                seen.add(x.data_ptr())
                total += x.numel() * x.element_size()
    return total


def decode(model, tok, who: str, n_tokens: int) -> tuple[float, float, str]:
    """(tokens/s at batch 1, prefill seconds for a ~256-token prompt, backend)."""
    from posttrain.generate.engine import GenerationConfig, generate
    from posttrain.generate.native import unsupported_reason

    long_prompt = " ".join([PROMPT] * 12)
    if who == "torchao":
        ids = tok(PROMPT, return_tensors="pt").input_ids
        model.generate(ids, max_new_tokens=4, do_sample=False)
        best = min(_timed(lambda: model.generate(ids, max_new_tokens=n_tokens, min_new_tokens=n_tokens,
                                                 do_sample=False)) for _ in range(3))
        lids = tok(long_prompt, return_tensors="pt").input_ids
        prefill = min(_timed(lambda: model(lids)) for _ in range(3))
        return n_tokens / best, prefill, "hf"
    backend = "native" if unsupported_reason(model) is None else "torch"
    cfg = GenerationConfig(max_new_tokens=n_tokens, ignore_eos=True)
    generate(model, tok, [PROMPT], GenerationConfig(max_new_tokens=4))
    best = min(_timed(lambda: generate(model, tok, [PROMPT], cfg)) for _ in range(3))
    prefill = min(_timed(lambda: generate(model, tok, [long_prompt], GenerationConfig(max_new_tokens=1)))
                  for _ in range(3))
    return n_tokens / best, prefill, backend


def _timed(fn) -> float:
    start = time.perf_counter()
    with torch.inference_mode():
        fn()
    return time.perf_counter() - start


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rows", default="fp32,bf16,int8,int8-g64,int8dyn,int4-g32,int4-g64,int4-g192,torchao-int8wo,torchao-int4-g64",
                    help="built-in rows, comma-separated")
    ap.add_argument("--extra", action="append", default=[], metavar="LABEL=MODEL",
                    help="a trained variant: run dir or model dir (repeatable)")
    ap.add_argument("--ppl-data", default="data/general/text.jsonl", help="held-out text JSONL")
    ap.add_argument("--task", default="data/quickstart/test.jsonl", help="accuracy task (prompt/answer JSONL)")
    ap.add_argument("--task-limit", type=int, default=100)
    ap.add_argument("--tokens", type=int, default=64, help="decoded tokens per timing")
    ap.add_argument("--p2", help="JSON written by `posttrain scaling-fit` (for p2_r2)")
    ap.add_argument("--out", default=str(RESULTS_DIR / "compression.json"))
    args = ap.parse_args()

    from posttrain.compress.quantize import weight_bytes
    from posttrain.eval.tasks import evaluate_perplexity, evaluate_task
    from posttrain.fileio import write_json_atomic

    rows = [(r, None) for r in args.rows.split(",") if r]
    rows += [tuple(e.split("=", 1)) for e in args.extra]
    results = []
    print(f"{'variant':<16} {'MB':>7} {'x fp32':>7} {'ppl':>8} {'acc':>6} {'tok/s':>7} {'prefill s':>9}  backend")
    for label, spec in rows:
        try:
            model, tok, who = build(label, spec)
        except ImportError as exc:
            print(f"{label:<16} skipped: {exc}")
            continue
        model.eval()
        nbytes = torchao_bytes(model) if who == "torchao" else weight_bytes(model)
        ppl = evaluate_perplexity(model, tok, args.ppl_data, name="ppl").score
        acc = evaluate_task(model, tok, args.task, metric="exact_match", limit=args.task_limit,
                            extract="last_number").score if who == "ours" else None
        tps, prefill, backend = decode(model, tok, who, args.tokens)
        row = {"variant": label, "model": spec or "default", "weight_bytes": nbytes, "ppl": ppl, "accuracy": acc,
               "decode_tokens_per_s": tps, "prefill_s": prefill, "backend": backend}
        results.append(row)
        fp32 = results[0]["weight_bytes"] if results and results[0]["variant"] == "fp32" else None
        ratio = f"{nbytes / fp32:7.3f}" if fp32 else "      -"
        acc_s = f"{acc:6.2f}" if acc is not None else "     -"
        print(f"{label:<16} {nbytes / 1e6:7.1f} {ratio} {ppl:8.3f} {acc_s} {tps:7.1f} {prefill:9.3f}  {backend}",
              flush=True)
        del model
        gc.collect()

    by = {r["variant"]: r for r in results}
    summary = {}
    if {"fp32", "bf16", "int8"} <= set(by):
        summary.update({
            "int8_bytes_ratio_vs_fp32": by["int8"]["weight_bytes"] / by["fp32"]["weight_bytes"],
            "int8_ppl_increase": by["int8"]["ppl"] / by["fp32"]["ppl"] - 1,
            "int8_ppl_increase_vs_bf16": by["int8"]["ppl"] / by["bf16"]["ppl"] - 1,
            "int8_decode_speedup_vs_bf16": by["int8"]["decode_tokens_per_s"] / by["bf16"]["decode_tokens_per_s"],
        })
    for qat in (r for r in results if r["variant"].startswith("qat-int4")):
        summary["qat_int4_ppl"] = qat["ppl"]
        group = json.loads((Path(qat["model"]) / "final" / "quantization.json").read_text())["spec"]["group_size"]
        if f"int4-g{group}" in by:
            summary["ptq_int4_ppl"] = by[f"int4-g{group}"]["ppl"]
            summary["qat_ptq_group_size"] = group
    for label, r in by.items():
        if label.startswith("depth") and "bf16" in by:
            summary[f"{label}_decode_speedup_vs_bf16"] = r["decode_tokens_per_s"] / by["bf16"]["decode_tokens_per_s"]
    if args.p2:
        fit = json.loads(Path(args.p2).read_text())
        summary["p2_r2"] = fit["fit"]["r2"]
        summary["p2_average_slope_difference"] = fit["fit"]["asd"]
        if fit.get("heldout"):
            summary["p2_r2_held_out"] = fit["heldout"]["r2"]
            summary["p2_held_out_runs"] = fit["heldout_runs"]
    out = {"rows": results, "summary": summary, "machine": machine_info(),
           "versions": library_versions("torch", "transformers", "torchao")}
    write_json_atomic(Path(args.out), out)
    print(json.dumps(summary, indent=2))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()

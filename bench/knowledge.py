"""Knowledge injection on a fictional domain: closed-book vs RAG vs domain-adapted vs both.

The domain is the island of Vessarin (data/domain/text.jsonl, 23 paragraphs written for this
project, so the default model cannot know it). The 48 questions are split 24/24
(data/domain/qa_train.jsonl / qa_test.jsonl); every figure below is on the 24 held-out test
questions, whose facts are in the documents but never in a training answer.

Conditions (greedy, chat template, at most 32 new tokens, the same prompts for every model):
  closed-book       the question alone ("Give a short answer.")
  RAG               BM25 top-3 chunks of the documents, numbered [1]..[3], "cite like [1]"
  domain            continued pre-training (LoRA, merged) on the documents, then SFT (LoRA) on
                    the 24 train questions, each twice: closed-book -> "answer", and with its
                    BM25 passages -> "answer [n]" (n = the gold passage's number, when retrieved)
  domain + RAG      the domain model with the RAG prompt
Also the CPT-only model (before the QA SFT) both ways, and RAG over documents + triples.

Metrics: token F1 and exact match on the reply's first line (citation markers removed),
contains (the answer's words appear in the reply), citation rate (replies citing a passage),
cited-gold (the cited passage is the gold one). Retrieval recall@k of the gold paragraph for
BM25, dense (all-MiniLM-L6-v2) and hybrid (reciprocal-rank fusion) on all 48 questions.

    python bench/knowledge.py     # ~8 min on 2 cores
    python bench/knowledge.py --quick                             # 6 questions, 1 epoch, no JSON
"""

from __future__ import annotations

import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # see bench/sft_throughput.py

import argparse
import json
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import RESULTS_DIR, finish, load_average, run_context  # noqa: E402

from posttrain.reason import knowledge as K  # noqa: E402

DOMAIN = ROOT / "data" / "domain"
K_TOP = 3
METHODS = ("bm25", "dense", "hybrid")


def sft_rows(kb: K.KnowledgeBase, qa: list[dict]) -> list[dict]:
    """Each train question twice: closed-book and with its retrieved passages (cited answer)."""
    rows = []
    for ex in qa:
        rows.append({"messages": [{"role": "user", "content": K.rag_prompt(ex["prompt"], [])},
                                  {"role": "assistant", "content": ex["answer"]}]})
        hits = K.search(kb, ex["prompt"], K_TOP)
        gold = [h.rank for h in hits if K.is_gold(h.chunk.id, ex["gold"])]
        reply = ex["answer"] + (f" [{gold[0]}]" if gold else "")
        rows.append({"messages": [{"role": "user", "content": K.rag_prompt(ex["prompt"], hits)},
                                  {"role": "assistant", "content": reply}]})
    return rows


def train_domain_model(kb: K.KnowledgeBase, qa_train: list[dict], out: Path, cpt_epochs: float,
                       sft_epochs: float) -> tuple[Path, Path, dict]:
    """CPT (LoRA, merged into a full model dir), then SFT (LoRA) over it. Returns (cpt dir, sft run, seconds)."""
    from posttrain.fileio import write_text_atomic
    from posttrain.models import load_model, save_model
    from posttrain.train.sft import SFTConfig, run_sft

    seconds = {}
    t = time.perf_counter()
    cpt = SFTConfig.model_validate({
        "stage": "pretrain", "output_dir": str(out / "cpt"), "model": {"name": "default"},
        "adapter": {"method": "lora", "r": 64, "alpha": 128}, "data": {"train": str(DOMAIN / "text.jsonl"),
                                                                   "max_length": 512},
        "train": {"epochs": cpt_epochs, "lr": 5e-4, "max_tokens": 512, "progress": False, "log_every": 10},
        "eval": {"before": False}})
    run_sft(cpt, overwrite=True)
    model, tok = load_model(out / "cpt", merge_adapter=True)
    save_model(model, tok, out / "cpt_merged")
    del model
    seconds["cpt"] = time.perf_counter() - t

    t = time.perf_counter()
    data = out / "sft_train.jsonl"
    write_text_atomic(data, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in sft_rows(kb, qa_train)))
    sft = SFTConfig.model_validate({
        "stage": "sft", "output_dir": str(out / "sft"), "model": {"name": str(out / "cpt_merged")},
        "adapter": {"method": "lora", "r": 16, "alpha": 32}, "data": {"train": str(data), "max_length": 1024},
        "train": {"epochs": sft_epochs, "lr": 5e-4, "max_tokens": 1024, "progress": False, "log_every": 10},
        "eval": {"before": False}})
    run_sft(sft, overwrite=True)
    seconds["sft"] = time.perf_counter() - t
    return out / "cpt_merged", out / "sft", seconds


def evaluate(label: str, model, tok, qa: list[dict], kb, results: dict, timings: dict) -> None:
    t = time.perf_counter()
    res = K.evaluate_qa(model, tok, qa, kb, k=K_TOP, method="bm25", max_new_tokens=32)
    timings[label] = round(time.perf_counter() - t, 1)
    results[label] = res
    short = {k: round(v, 3) for k, v in res.items() if isinstance(v, float)}
    print(f"  {label}: {short}  ({timings[label]} s)", flush=True)


def print_table(result: dict) -> None:
    print(f"\nretrieval recall of the gold paragraph ({result['n_recall']} questions, train + test; documents only)")
    print(f"{'method':8s} " + " ".join(f"{'R@' + str(k):>6s}" for k in result["recall_ks"]))
    for m, rec in result["recall"].items():
        print(f"{m:8s} " + " ".join(f"{rec[str(k)]:6.3f}" for k in result["recall_ks"]))
    print(f"\nheld-out domain QA ({result['n_test']} questions), greedy, BM25 top-{K_TOP}")
    cols = ("f1", "exact", "contains", "cited", "cited_gold")
    print(f"{'condition':34s} " + " ".join(f"{c:>10s}" for c in cols))
    for label, res in result["conditions"].items():
        cells = [f"{res[c]:10.3f}" if c in res else f"{'-':>10s}" for c in cols]
        print(f"{label:34s} " + " ".join(cells))


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="6 questions, 1 epoch each stage; no JSON")
    ap.add_argument("--work", default=str(ROOT / "runs" / "knowledge_bench"), help="run directories")
    ap.add_argument("--cpt-epochs", type=float, default=12)
    ap.add_argument("--sft-epochs", type=float, default=8)
    ap.add_argument("--out", default=str(RESULTS_DIR / "knowledge.json"))
    args = ap.parse_args(argv)
    load_before = load_average()
    from posttrain.models import load_model

    qa_test, qa_train = K.load_qa(DOMAIN / "qa_test.jsonl"), K.load_qa(DOMAIN / "qa_train.jsonl")
    if args.quick:
        qa_test, args.cpt_epochs, args.sft_epochs = qa_test[:6], 1, 1

    docs = K.build_kb([DOMAIN / "text.jsonl"], dense=True)
    both = K.build_kb([DOMAIN / "text.jsonl"], [DOMAIN / "triples.tsv"])
    ks = (1, 3, 5)
    recall = {m: {str(k): v for k, v in K.retrieval_recall(docs, qa_test + qa_train, ks, m).items()} for m in METHODS}
    recall_test = {m: {str(k): v for k, v in K.retrieval_recall(docs, qa_test, ks, m).items()} for m in METHODS}
    print(f"recall ({len(qa_test) + len(qa_train)} questions): {recall}", flush=True)

    results, timings = {}, {}
    model, tok = load_model("default")
    evaluate("base, closed-book", model, tok, qa_test, None, results, timings)
    evaluate("base + RAG", model, tok, qa_test, docs, results, timings)
    evaluate("base + RAG (docs + triples)", model, tok, qa_test, both, results, timings)
    del model

    cpt_dir, sft_dir, train_seconds = train_domain_model(docs, qa_train, Path(args.work), args.cpt_epochs,
                                                        args.sft_epochs)
    model, tok = load_model(cpt_dir)
    evaluate("CPT only, closed-book", model, tok, qa_test, None, results, timings)
    evaluate("CPT only + RAG", model, tok, qa_test, docs, results, timings)
    del model
    model, tok = load_model(sft_dir, merge_adapter=True)
    evaluate("domain (CPT + SFT), closed-book", model, tok, qa_test, None, results, timings)
    evaluate("domain (CPT + SFT) + RAG", model, tok, qa_test, docs, results, timings)
    evaluate("domain, closed-book, TRAIN questions", model, tok, qa_train, None, results, timings)

    result = {
        "bench": "knowledge", "quick": args.quick, "n_test": len(qa_test),
        "n_recall": len(qa_test) + len(qa_train), "k": K_TOP, "recall_ks": list(ks),
        "recall": recall, "recall_test_only": recall_test,
        "conditions": {label: {k: v for k, v in res.items() if k != "predictions"} for label, res in results.items()},
        "predictions": {label: res["predictions"] for label, res in results.items()},
        "training": {"cpt": {"method": "lora r64 alpha128, merged", "epochs": args.cpt_epochs, "lr": 5e-4,
                             "max_tokens": 512},
                     "sft": {"method": "lora r16 alpha32", "epochs": args.sft_epochs, "lr": 5e-4, "max_tokens": 1024,
                             "rows": 2 * len(qa_train)},
                     "seconds": {k: round(v, 1) for k, v in train_seconds.items()}},
        "eval_seconds": timings,
        "context": run_context(load_before, load_average(), "torch", "transformers", "peft", "bm25s",
                               "sentence-transformers"),
    }
    return finish(result, args.out, args.quick, print_table)


if __name__ == "__main__":
    main()

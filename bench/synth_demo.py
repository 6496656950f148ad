"""Does SFT on verified synthetic data beat the base model on a held-out checkable task?

STaR-style self-improvement on the quickstart arithmetic task, end to end:

1. the default model (the teacher is the student) samples k answers for each of the first
   N *training* prompts of data/quickstart/train.jsonl (`recipes/synth_rejection.yaml`:
   the prompt gets " Answer with only the number." while sampling; the rows keep the plain
   prompt), and every answer is checked (last number == reference);
2. datasets from the same samples: `verified` (verified answers, one per prompt) and
   `unverified` (one sample per prompt whatever its answer, subsampled to the same size:
   only the verifier differs);
3. LoRA SFT on each (the quickstart recipe's settings, a fixed number of epochs);
4. greedy answers to the 200 held-out test prompts (never used above) from the base, the
   base prompted with the suffix, and both SFT models; scored as accuracy of the last
   number in the reply and as exact match of the whole reply.

    python bench/synth_demo.py        # writes bench/results/synth_demo.json
    python bench/synth_demo.py --quick                               # tiny smoke run, no JSON
    # the same two datasets (runs/synth_demo/*.jsonl) trained again with other SFT seeds:
    python bench/synth_demo.py --reuse-data --train-seeds 1,2 \
        --out bench/results/synth_demo_seeds.json
"""

from __future__ import annotations

import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import argparse
import json
import random
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import RESULTS_DIR, finish, load_average, run_context  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
TEST = "data/quickstart/test.jsonl"


def sft(train_path: str, out_dir: str, epochs: float, quick: bool, seed: int = 0) -> dict:
    from posttrain.config import build_config
    from posttrain.train.sft import SFTConfig, run_sft

    overrides = [f"data.train={train_path}", f"output_dir={out_dir}", "train.max_steps=null",
                 f"train.epochs={epochs}", "train.save_every=null", "eval.tasks=[]", "eval.forgetting=null",
                 "eval.before=false", "train.progress=false", f"train.seed={seed}"]
    if quick:
        overrides.append("train.max_steps=2")
    cfg = build_config(SFTConfig, REPO / "recipes/quickstart.yaml", overrides)
    manifest = run_sft(cfg, overwrite=True)
    return manifest["outputs"]["train"]


def evaluate(model, tok, path: str, limit: int | None, max_new_tokens: int) -> dict:
    """One greedy pass; two scores from the same replies."""
    from posttrain.data.answers import exact_match
    from posttrain.eval.tasks import evaluate_task

    res = evaluate_task(model, tok, path, metric="accuracy", extract="last_number", max_new_tokens=max_new_tokens,
                        batch_size=32, limit=limit)
    em = sum(exact_match(p["prediction"], p["answer"]) for p in res.predictions) / res.n
    return {"accuracy_last_number": round(res.score, 4), "exact_match": round(em, 4), "n": res.n,
            "examples": [{"prompt": p["prompt"], "reply": p["prediction"], "answer": p["answer"]}
                         for p in res.predictions[:3]]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--prompts", type=int, default=400, help="training prompts to sample from")
    ap.add_argument("--k", type=int, default=4)
    ap.add_argument("--epochs", type=float, default=3.0)
    ap.add_argument("--test-limit", type=int, default=None, help="held-out rows (default all 200)")
    ap.add_argument("--eval-tokens", type=int, default=32)
    ap.add_argument("--work", default="runs/synth_demo")
    ap.add_argument("--train-seeds", default="0", help="comma-separated SFT seeds (each trains both sets)")
    ap.add_argument("--reuse-data", action="store_true",
                    help="train on WORK/verified.jsonl and WORK/unverified.jsonl from an earlier run: no "
                         "sampling, no base evaluation")
    ap.add_argument("--quick", action="store_true", help="8 prompts, 2 SFT steps, 16 test rows; no JSON")
    ap.add_argument("--out", default=str(RESULTS_DIR / "synth_demo.json"))
    args = ap.parse_args()
    if args.quick:
        args.prompts, args.test_limit = 8, 16

    from posttrain.config import build_config
    from posttrain.data.answers import load_checkable
    from posttrain.fileio import write_text_atomic
    from posttrain.generate.synth import SynthConfig, sample_candidates, select_rejection, write_dataset
    from posttrain.models import load_model

    load_before = load_average()
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    cfg = build_config(SynthConfig, REPO / "recipes/synth_rejection.yaml",
                       [f"rejection.limit={args.prompts}", f"rejection.k={args.k}",
                        f"output={work / 'verified.jsonl'}"])
    rc = cfg.rejection
    items = load_checkable(REPO / rc.prompts, rc.limit, allow_empty_answer=False)
    times, scores = {}, {}
    if args.reuse_data:
        reports = {name: json.loads(Path(f"{work / name}.jsonl.report.json").read_text())
                   for name in ("verified", "unverified")}
        synthesis = {name: {k: v for k, v in r.items() if k != "output"} for name, r in reports.items()}
        rows = [json.loads(line) for line in (work / "unverified.jsonl").read_text().splitlines()]
        synthesis["unverified"]["rows_with_correct_answer"] = sum(r["provenance"]["verified"] for r in rows)
    else:
        model, tok = load_model("default")
        t = time.perf_counter()
        candidates = sample_candidates(model, tok, items, rc)
        times["sampling_s"] = round(time.perf_counter() - t, 1)

        verified = select_rejection(items, candidates, rc, teacher="default", source=rc.prompts, verified_only=True)
        unverified = select_rejection(items, candidates, rc, teacher="default", source=rc.prompts,
                                      verified_only=False)
        n = len(verified.rows)
        if n == 0:
            raise SystemExit(f"no verified sample among {len(candidates)}: nothing to train on")
        unverified.rows = random.Random(0).sample(unverified.rows, n)  # same size: only the verifier differs
        unverified.report.update(kept=n, subsampled_to=n,
                                 rows_with_correct_answer=sum(r["provenance"]["verified"] for r in unverified.rows))
        write_dataset(verified, work / "verified.jsonl")
        write_dataset(unverified, work / "unverified.jsonl")
        synthesis = {"verified": verified.report, "unverified": unverified.report}

        # held-out test prompts with the sampling suffix: what prompting alone gets
        prompted = work / "test_prompted.jsonl"
        write_text_atomic(prompted, "".join(json.dumps({"prompt": e["prompt"] + rc.prompt_suffix,
                                                        "answer": e["answer"]}) + "\n"
                                            for e in load_checkable(REPO / TEST)))
        t = time.perf_counter()
        scores["base"] = evaluate(model, tok, str(REPO / TEST), args.test_limit, args.eval_tokens)
        scores["base + suffix prompt"] = evaluate(model, tok, str(prompted), args.test_limit, args.eval_tokens)
        times["eval_base_s"] = round(time.perf_counter() - t, 1)
        del model

    train_summaries = {}
    seeds = [int(x) for x in args.train_seeds.split(",")]
    for seed in seeds:
        for name in ("verified", "unverified"):
            tag = name if seeds == [0] else f"{name}, seed {seed}"
            t = time.perf_counter()
            train_summaries[tag] = sft(str(work / f"{name}.jsonl"), str(work / f"sft_{name}_{seed}"), args.epochs,
                                       args.quick, seed)
            times[f"sft {tag} s"] = round(time.perf_counter() - t, 1)
            m, tk = load_model(str(work / f"sft_{name}_{seed}"), merge_adapter=True)
            t = time.perf_counter()
            scores[f"SFT on {name} samples" + ("" if seeds == [0] else f" (seed {seed})")] = evaluate(
                m, tk, str(REPO / TEST), args.test_limit, args.eval_tokens)
            times[f"eval {tag} s"] = round(time.perf_counter() - t, 1)
            del m

    result = {
        "setup": {"teacher": "default (SmolLM2-135M-Instruct, bf16)", "source": rc.prompts, "prompts": len(items),
                  "k": rc.k, "prompt_suffix": rc.prompt_suffix, "sampling": rc.sampling.model_dump(),
                  "sft": "recipes/quickstart.yaml (LoRA r16, lr 1e-3) with train.epochs=%g" % args.epochs,
                  "test": TEST, "eval": f"greedy, {args.eval_tokens} new tokens"},
        "synthesis": synthesis, "train_seeds": seeds, "reused_data": args.reuse_data,
        "train": {k: {kk: v.get(kk) for kk in ("steps", "tokens", "train_loss", "seconds") if kk in v}
                  for k, v in train_summaries.items()},
        "held_out": scores,
        "times": times,
        **run_context(load_before, load_average(), "torch", "transformers", "peft"),
    }

    def table(r: dict) -> None:
        s = r["synthesis"]["verified"]
        print(f"sampled {s['generated']} answers for {s['prompts']} train prompts: {s['verified']} verified "
              f"({s['verified_rate']:.1%}), {s['prompts_with_verified']} prompts with one; kept {s['kept']} rows")
        print(f"unverified set: {r['synthesis']['unverified']['kept']} rows, "
              f"{r['synthesis']['unverified']['rows_with_correct_answer']} of them correct")
        n_test = next(iter(r["held_out"].values()))["n"]
        print(f"{'held-out (' + str(n_test) + ' test prompts)':<36} {'acc (last number)':>18} "
              f"{'exact match':>12}")
        for name, v in r["held_out"].items():
            print(f"{name:<36} {v['accuracy_last_number']:>18.3f} {v['exact_match']:>12.3f}")
        print("times (s):", r["times"])

    finish(result, args.out, args.quick, table)


if __name__ == "__main__":
    main()

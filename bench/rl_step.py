"""Where a GRPO step's time goes, and what SAM-Decoding does for rollouts.

One GRPO configuration on the default model (SmolLM2-135M-Instruct, bf16 base, LoRA r16 on
all linear layers, fp32 adapters), local backend: 8 prompts x 4 samples, up to 64 new
tokens at temperature 1, prompts from data/preference/train.jsonl (chat requests, replies
of tens of tokens), reward = a length rule (cheap on purpose: the reward phase of a
reward-model run is a forward like the log-prob phase). Each step is the driver's
`rl_step`: rollout (sampling from the LoRA-folded rollout copy on the native decoder),
reward, old + reference log-probs (one packed forward each, no grad), actor update (one
packed forward + backward). `--warmup` steps, then `--steps` timed steps; the share of each
phase is the mean over the timed steps.

OpenRLHF reports rollout at about 80% of a step for its stack; the goal here is <= 60%.

SAM rollouts: the same 8 prompts decoded greedily (one reply per distinct prompt), plain
(the 8 prompts in one batch) against SAM speculative decoding (one prompt at a time, the
dynamic suffix automaton of prompt + reply as drafter), both on the rollout copy; the
tokens must be identical. Also plain at batch 1, the setting speculative decoding is made for.

    python bench/rl_step.py           # full run, writes bench/results/rl_step.json
    python bench/rl_step.py --quick   # smoke run, no JSON
"""

from __future__ import annotations

import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # as the other benches: no spinning on 2 shared cores

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import RESULTS_DIR, finish, load_average, run_context  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
PHASES = ("rollout", "reward", "logprobs", "actor_update")


def config(out_dir: str, prompts: str, max_new_tokens: int, prompts_per_step: int, k: int):
    from posttrain.rl.controller import RLConfig

    return RLConfig.model_validate({
        "stage": "grpo", "output_dir": out_dir, "model": {"name": "default", "dtype": "auto"},
        "adapter": {"method": "lora", "r": 16, "alpha": 32, "target_modules": "all-linear"},
        "data": {"prompts": prompts},
        "reward": {"type": "length", "min_length": 8, "max_length": 40, "unit": "tokens", "penalty": 0.05},
        "rollout": {"prompts_per_step": prompts_per_step, "samples_per_prompt": k, "max_new_tokens": max_new_tokens,
                    "temperature": 1.0},
        "algo": {"kl_coef": 0.02},
        "train": {"max_steps": 100, "lr": 1e-5, "progress": False, "max_tokens": 8192},
    })


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--prompts-per-step", type=int, default=8)
    ap.add_argument("--samples", type=int, default=4)
    ap.add_argument("--max-new-tokens", type=int, default=64)
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--steps", type=int, default=4)
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--out", default=str(RESULTS_DIR / "rl_step.json"))
    args = ap.parse_args()
    if args.quick:
        args.warmup, args.steps, args.max_new_tokens = 1, 1, 16

    from posttrain.data.formats import load_records
    from posttrain.rl.controller import build_groups, prompt_batch, rl_step

    load_before = load_average()
    records = load_records(REPO / "data" / "preference" / "train.jsonl", kind="prompt").records
    records = [r for r in records if r["category"] in ("harmful", "benign", "word_problem")]  # replies of some length
    with tempfile.TemporaryDirectory() as tmp:
        cfg = config(tmp, str(REPO / "data" / "preference" / "train.jsonl"), args.max_new_tokens,
                     args.prompts_per_step, args.samples)
        t0 = time.perf_counter()
        groups = build_groups(cfg, torch.get_num_threads())
        load_s = time.perf_counter() - t0
        steps = []
        n = args.prompts_per_step
        for step in range(args.warmup + args.steps):
            chosen = records[step * n:(step + 1) * n]
            t = time.perf_counter()
            batch, m = rl_step(groups, cfg, prompt_batch(chosen, args.samples), cfg.algo.kl_coef, seed=step)
            total = time.perf_counter() - t
            row = {p: m[f"time/{p}"] for p in PHASES} | {"total": total,
                                                         "tokens": int(batch["mask"].sum()),
                                                         "drift_max": m["drift/max_abs"]}
            print(f"step {step}{' (warm-up)' if step < args.warmup else ''}: "
                  + " ".join(f"{k} {v:.2f}s" for k, v in row.items() if k in PHASES or k == "total")
                  + f"  {row['tokens']} response tokens", flush=True)
            if step >= args.warmup:
                steps.append(row)
        mean = {k: statistics.mean(s[k] for s in steps) for k in (*PHASES, "total", "tokens")}
        shares = {p: mean[p] / mean["total"] for p in PHASES}

        # SAM vs plain greedy rollouts on the rollout copy
        actor = groups.actor.workers[0]
        sam_prompts = records[-n:]
        timing = {}
        outputs = {}
        for label, decoding, per_prompt in (("plain_batched", "plain", False), ("plain_batch1", "plain", True),
                                            ("sam", "sam", True)):
            actor.cfg.rollout.decoding = decoding
            parts = [[r] for r in sam_prompts] if per_prompt else [sam_prompts]
            best = float("inf")
            for _ in range(2):  # best of two: the first run also packs the native weights
                t = time.perf_counter()
                done = [actor.generate(prompt_batch(p, 1), greedy=True) for p in parts]
                best = min(best, time.perf_counter() - t)
            outputs[label] = [ids for b in done for ids in b["response_ids"]]
            timing[label] = best
        actor.cfg.rollout.decoding = "plain"
        tokens = sum(len(x) for x in outputs["plain_batched"])
    identical = outputs["sam"] == outputs["plain_batched"] == outputs["plain_batch1"]
    result = {
        "config": {"prompts_per_step": n, "samples_per_prompt": args.samples, "max_new_tokens": args.max_new_tokens,
                   "model": "default (SmolLM2-135M-Instruct), bf16, LoRA r16 all-linear", "backend": "local",
                   "warmup_steps": args.warmup, "timed_steps": args.steps},
        "load_s": load_s,
        "steps": steps,
        "mean_phase_s": mean,
        "phase_share": shares,
        "rollout_share": shares["rollout"],
        "greedy_rollout_s": timing,
        "greedy_tokens": tokens,
        "sam_rollout_speedup": timing["plain_batched"] / timing["sam"],
        "sam_speedup_vs_plain_batch1": timing["plain_batch1"] / timing["sam"],
        "sam_identical_to_plain": identical,
        "context": run_context(load_before, load_average(), "torch", "transformers", "peft"),
    }

    def table(r):
        print(f"\nGRPO step, {n} prompts x {args.samples} samples, <= {args.max_new_tokens} new tokens, "
              f"{mean['tokens']:.0f} response tokens per step (mean of {args.steps} steps):")
        for p in PHASES:
            print(f"  {p:13s} {mean[p]:6.2f} s  {shares[p]:6.1%}")
        print(f"  {'total':13s} {mean['total']:6.2f} s")
        print(f"rollout share {r['rollout_share']:.1%} (goal <= 60%; OpenRLHF reports ~80%)")
        print(f"\ngreedy rollouts of {n} prompts ({tokens} tokens): "
              + ", ".join(f"{k} {v:.2f} s ({tokens / v:.0f} tok/s)" for k, v in timing.items()))
        print(f"SAM vs plain batched: {r['sam_rollout_speedup']:.2f}x; vs plain at batch 1: "
              f"{r['sam_speedup_vs_plain_batch1']:.2f}x; identical tokens: {identical}")

    finish(result, args.out, args.quick, table)


if __name__ == "__main__":
    main()

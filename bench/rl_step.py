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

Rollout modes (the async row): the GRPO demo (recipes/grpo.yaml: arithmetic prompts, the
last-number verifier, 16 prompts x 8 samples, <= 8 new tokens; from the default model when the
recipe's SFT model is absent) on the Ray backend in each of rollout.mode sync (the actor
samples, then trains), one_step_off (a rollout worker samples batch k+1 while the actor trains
on batch k; the LoRA adapter is pushed after each update) and async (up to max_staleness = 2
batches ahead), on the same prompts in the same order, in one run: step time, the trainer's
idle share (the step's wall time outside the reference log-probs and the update) and the mean
fresh-sample reward over the same number of samples. The first --warmup steps of each mode
(model load, native weight packing, the queue filling) are not timed. Goal: async step time
<= 0.7x sync at equal reward after the same number of samples (over --mode-steps steps; the
demo's own 60 steps: --mode-steps 59).

    python bench/rl_step.py           # full run, writes bench/results/rl_step.json
    python bench/rl_step.py --quick   # smoke run, no JSON
    python bench/rl_step.py --only-modes --mode-steps 59  # just the rollout-mode rows -> rl_step_modes.json
"""

from __future__ import annotations

import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # as the other benches: no spinning on 2 shared cores

import argparse
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


def config(out_dir: str, prompts: str, max_new_tokens: int, prompts_per_step: int, k: int, mode: str = "sync",
           backend: str = "local", max_steps: int = 100):
    from posttrain.rl.controller import RLConfig

    return RLConfig.model_validate({
        "stage": "grpo", "output_dir": out_dir, "model": {"name": "default", "dtype": "auto"}, "backend": backend,
        "adapter": {"method": "lora", "r": 16, "alpha": 32, "target_modules": "all-linear"},
        "data": {"prompts": prompts},
        "reward": {"type": "length", "min_length": 8, "max_length": 40, "unit": "tokens", "penalty": 0.05},
        "rollout": {"prompts_per_step": prompts_per_step, "samples_per_prompt": k, "max_new_tokens": max_new_tokens,
                    "temperature": 1.0, "mode": mode},
        # off-policy modes: truncated importance weights against the rollout's log-probs (needs the
        # old-log-prob pass); sync keeps the bench's historical configuration
        "algo": {"kl_coef": 0.02, **({"tis_cap": 2.0} if mode != "sync" else {})},
        "train": {"max_steps": max_steps, "lr": 1e-5, "progress": False, "max_tokens": 8192},
    })


def demo_config(out_dir: str, mode: str, max_steps: int, args):
    """The GRPO demo (recipes/grpo.yaml: arithmetic prompts, last-number verifier, 16 prompts x 8
    samples, <= 8 new tokens, LoRA r16, lr 2e-4) on the Ray backend in rollout mode `mode`,
    without its evaluations; from the recipe's SFT model when it exists, else the default model.
    Off-policy modes add truncated importance weights (tis_cap 2) against the rollout's log-probs."""
    from posttrain.config import load_yaml
    from posttrain.rl.controller import RLConfig

    raw = load_yaml(REPO / "recipes" / "grpo.yaml")
    if not (REPO / raw["model"]["name"]).exists():
        raw["model"]["name"] = "default"
    raw.update(output_dir=out_dir, backend="ray", eval_every=None, eval={})
    raw["data"]["prompts"] = str(REPO / raw["data"]["prompts"])
    raw["rollout"].update(mode=mode, **({"prompts_per_step": args.mode_prompts} if args.mode_prompts else {}),
                          **({"samples_per_prompt": args.mode_samples} if args.mode_samples else {}))
    raw["train"].update(max_steps=max_steps, progress=False)
    if mode != "sync":
        raw["algo"]["tis_cap"] = 2.0
    return RLConfig.model_validate(raw)


def mode_rows(mode: str, args, threads: int) -> dict:
    """`args.warmup + args.mode_steps` steps of the GRPO demo in one rollout mode on the Ray
    backend; the prompts of step j are the same in every mode (the demo's seeded order). Its
    workers are killed at the end (memory)."""
    import ray

    from posttrain.data.formats import load_records
    from posttrain.rl.controller import (async_step, build_groups, prompt_batch, reap_pushes, rl_step,
                                         start_rollouts, step_seed)
    from posttrain.rl.rollout import prompt_batches

    total = args.warmup + args.mode_steps
    with tempfile.TemporaryDirectory() as tmp:
        cfg = demo_config(tmp, mode, total, args)
        k = cfg.rollout.samples_per_prompt
        rounds = prompt_batches(load_records(cfg.data.prompts, kind="prompt").records, cfg.rollout.prompts_per_step,
                                cfg.train.seed)
        groups = build_groups(cfg, threads)
        queue, pushed = start_rollouts(groups, cfg)
        steps = []
        for step in range(total):
            if queue is None:
                batch, m = rl_step(groups, cfg, prompt_batch(next(rounds), k), cfg.algo.kl_coef,
                                   seed=step_seed(cfg, step))
            else:
                batch, m = async_step(groups, cfg, queue, cfg.algo.kl_coef, step, pushed,
                                      lambda: prompt_batch(next(rounds), k))
            row = {"step_s": m["time/step"], "trainer_idle_s": m["time/trainer_idle"],
                   "rollout_s": m.get("time/rollout", m.get("time/rollout_wait")),
                   "logprobs_s": m["time/logprobs"], "update_s": m["time/actor_update"],
                   "reward": batch["scores"].mean().item(), "tokens": int(batch["mask"].sum()),
                   "staleness": m.get("async/staleness_max", 0.0)}
            print(f"{mode} step {step}{' (warm-up)' if step < args.warmup else ''}: {row['step_s']:.2f}s "
                  f"(rollout{' wait' if queue is not None else ''} {row['rollout_s']:.2f}, log-probs "
                  f"{row['logprobs_s']:.2f}, update {row['update_s']:.2f}), trainer idle {row['trainer_idle_s']:.2f}s, "
                  f"reward {row['reward']:.3f}, staleness {row['staleness']:.0f}", flush=True)
            steps.append(row)
        reap_pushes(pushed, wait=True)
        for group in groups.unique():
            for worker in group.workers:
                ray.kill(worker)
    timed = steps[args.warmup:]
    return {"model": cfg.model.name, "prompts_per_step": cfg.rollout.prompts_per_step, "samples_per_prompt": k,
            "steps": steps, "step_s": statistics.mean(r["step_s"] for r in timed),
            "trainer_idle_share": sum(r["trainer_idle_s"] for r in timed) / sum(r["step_s"] for r in timed),
            "reward_mean": statistics.mean(r["reward"] for r in steps),  # every sample drawn, warm-up included
            "reward_last_half": statistics.mean(r["reward"] for r in steps[len(steps) // 2:]),
            "tokens_per_step": statistics.mean(r["tokens"] for r in timed)}


def modes_table(modes: dict) -> dict:
    """The async row: each mode's step time against sync's."""
    base = modes.get("sync", {}).get("step_s")
    print("\nrollout modes on Ray (same prompts, mean of the timed steps):")
    print(f"  {'mode':13s} {'step s':>7s} {'vs sync':>8s} {'trainer idle':>13s} {'reward (all)':>13s} "
          f"{'reward (2nd half)':>18s}")
    ratios = {}
    for mode, r in modes.items():
        ratio = r["step_s"] / base if base else float("nan")
        ratios[mode] = ratio
        print(f"  {mode:13s} {r['step_s']:7.2f} {ratio:7.2f}x {r['trainer_idle_share']:12.1%} "
              f"{r['reward_mean']:13.3f} {r['reward_last_half']:18.3f}")
    if "async" in ratios and base:
        print(f"async step time {ratios['async']:.2f}x sync (goal <= 0.7x)")
    return ratios


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--prompts-per-step", type=int, default=8)
    ap.add_argument("--samples", type=int, default=4)
    ap.add_argument("--max-new-tokens", type=int, default=64)
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--steps", type=int, default=4)
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--modes", default="sync,one_step_off,async", help="the async row: rollout modes on Ray")
    ap.add_argument("--mode-steps", type=int, default=6, help="timed steps per rollout mode (after --warmup)")
    ap.add_argument("--mode-threads", type=int, default=0, help="torch threads per Ray worker (0: all cores each)")
    ap.add_argument("--mode-prompts", type=int, default=0, help="rollout-mode rows: prompts per step (0: the demo's)")
    ap.add_argument("--mode-samples", type=int, default=0, help="rollout-mode rows: samples per prompt (0: the demo's)")
    ap.add_argument("--only-modes", action="store_true",
                    help="only the rollout-mode rows (writes bench/results/rl_step_modes.json)")
    ap.add_argument("--out", default=None,
                    help="JSON to write (default: bench/results/rl_step.json, or rl_step_modes.json with --only-modes)")
    args = ap.parse_args()
    if args.quick:
        args.warmup, args.steps, args.max_new_tokens, args.mode_steps = 1, 1, 16, 2
        args.mode_prompts, args.mode_samples = args.mode_prompts or 4, args.mode_samples or 4

    from posttrain.data.formats import load_records
    from posttrain.rl.controller import build_groups, prompt_batch, rl_step

    load_before = load_average()
    records = load_records(REPO / "data" / "preference" / "train.jsonl", kind="prompt").records
    records = [r for r in records if r["category"] in ("harmful", "benign", "word_problem")]  # replies of some length
    modes = {}
    if args.modes:
        import ray

        ray.init(num_cpus=os.cpu_count(), include_dashboard=False, log_to_driver=False)
        for mode in args.modes.split(","):
            modes[mode] = mode_rows(mode, args, args.mode_threads or torch.get_num_threads())
        ray.shutdown()
    if args.only_modes:  # just the async row: its own JSON, so the full run's file keeps its other rows
        only = {"config": {"recipe": "recipes/grpo.yaml", "backend": "ray", "warmup_steps": args.warmup,
                           "timed_steps": args.mode_steps,
                           "threads_per_worker": args.mode_threads or torch.get_num_threads(),
                           "async_max_staleness": 2, "off_policy_tis_cap": 2.0},
                **modes, "context": run_context(load_before, load_average(), "torch", "ray")}

        def only_table(r):
            r["step_time_vs_sync"] = modes_table(modes)

        finish(only, Path(args.out or RESULTS_DIR / "rl_step_modes.json"), args.quick, only_table)
        return
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
        "rollout_modes": {"config": {"recipe": "recipes/grpo.yaml", "backend": "ray", "warmup_steps": args.warmup,
                                     "timed_steps": args.mode_steps,
                                     "threads_per_worker": args.mode_threads or torch.get_num_threads(),
                                     "async_max_staleness": 2, "off_policy_tis_cap": 2.0},
                          **modes},
        "context": run_context(load_before, load_average(), "torch", "transformers", "peft", "ray"),
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
        if modes:
            r["rollout_modes"]["step_time_vs_sync"] = modes_table(modes)

    finish(result, Path(args.out or RESULTS_DIR / "rl_step.json"), args.quick, table)


if __name__ == "__main__":
    main()

"""Multi-turn tool-use GRPO on the default model: held-out accuracy and tool-call validity, before and after.

(a) Evaluates the recipe's starting model on data/tools/test.jsonl (100 held-out problems):
    greedy episodes with the recipe's environment (python tool in the sandbox), its max_turns and
    per-turn max_new_tokens -> accuracy (final answer correct), tool-call validity (well-formed
    calls of a known tool / attempted calls), calls and turns per episode, accuracy per kind.
(b) Runs recipes/grpo_tools.yaml (GRPO, LoRA r16, 8 prompts x 8 episodes per step, 40 steps).
(c) Evaluates the trained model (the run's final adapter folded into the base) the same way.
Writes bench/results/tool_grpo.json (before, after, the run's per-step figures, times, machine)
and bench/results/tool_grpo.png (the run's curves: reward, env reward, valid rate, calls,
turns, held-out accuracy).

    nice -n 19 env OMP_NUM_THREADS=2 python bench/tool_grpo.py            # the full run
    nice -n 19 env OMP_NUM_THREADS=1 python bench/tool_grpo.py --smoke    # 2 steps, 8 test rows, 2x4 episodes

    python bench/tool_grpo.py --from-run runs/bench_tool_grpo  # report a run stopped before its end

--from-run reports a stopped run from its files: the curves and the in-run held-out evaluations
(eval.held_out_reward every eval_every steps on the recipe's 32 rows); no after-evaluation on all
100, since a stopped run has no final adapter.

--smoke writes its JSON and PNG into its run directory (not bench/results) and prints an
estimate of the full run's time scaled from its own phase times (`--set` overrides apply to
both the smoke run and the run it estimates).

Runtime (2026-12-05, 2-core AMX Xeon under load 3-3.7 from other jobs, OMP_NUM_THREADS=1, nice 19):
one full-size step (8 x 8 episodes, up to 3 turns of 64 tokens) took 117 s (rollout 39, log-probs
22, update 57), the same 1.84 s per episode as the 2 x 4 smoke; a greedy held-out episode 0.8 s.
So the full run is ~40 x 117 s of training + ~390 held-out episodes = ~83 min at one thread;
two quiet threads should take roughly half.
"""

from __future__ import annotations

import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # as the other benches: no spinning on shared cores

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import RESULTS_DIR, ROOT, load_average, run_context, write_json  # noqa: E402

CURVES = ["reward", "reward/env", "tools/valid_rate", "tools/calls", "tools/turns", "held_out/accuracy", "kl",
          "response_length"]
SMOKE = ["train.max_steps=2", "rollout.prompts_per_step=2", "rollout.samples_per_prompt=4",
         "eval.held_out_reward.limit=4", "eval_every=null"]


def evaluate(model_spec: str, cfg, records: list[dict]) -> dict:
    from posttrain.models import load_model
    from posttrain.rl.tools import evaluate_tool_use

    start = time.perf_counter()
    model, tokenizer = load_model(model_spec, dtype=cfg.model.dtype, merge_adapter=True)
    out = evaluate_tool_use(model, tokenizer, records, cfg.env, cfg.rollout.max_turns, cfg.rollout.max_new_tokens)
    out["seconds"] = round(time.perf_counter() - start, 1)
    return out


def run_rows(run_dir: Path) -> list[dict]:
    """The run's metrics.jsonl rows (a bad line is named by file and line)."""
    from posttrain.data.formats import read_jsonl

    return [row for _, row in read_jsonl(run_dir / "metrics.jsonl")]


def per_step(rows: list[dict]) -> list[dict]:
    return [{k: r.get(k) for k in ["step", *CURVES, "step_s"] if k in r} for r in rows]


def report_stopped_run(run_dir: Path) -> dict:
    """The curves and in-run held-out figures of a run stopped before max_steps (no final adapter, so
    no 100-problem evaluation after): bench/results/tool_grpo.json with "stopped_at_step"."""
    from posttrain.config import load_yaml
    from posttrain.eval.report import metric_curves

    rows = run_rows(run_dir)
    if not rows:
        raise ValueError(f"{run_dir}/metrics.jsonl: no steps logged")
    before = json.loads((run_dir / "eval_before.json").read_text())
    held_out_rows = load_yaml(run_dir / "config.yaml")["eval"]["held_out_reward"]["limit"]
    evals = [{k: r[k] for k in r if k == "step" or k.startswith("held_out/")} for r in rows
             if r.get("held_out/accuracy") is not None]
    out_json = RESULTS_DIR / "tool_grpo.json"
    with tempfile.TemporaryDirectory() as tmp:  # the run's own before-evaluation as step 0 of the held-out panel
        curves = Path(tmp) / "metrics.jsonl"
        curves.write_text("".join(json.dumps(r) + "\n" for r in [{"step": 0, **before}, *rows]))
        png = metric_curves(curves, out_json.with_suffix(".png"), CURVES,
                            title=f"tool-use GRPO (python env): {len(rows)} steps (stopped); held-out: {held_out_rows} rows")
    step_s = [r["step_s"] for r in rows]
    result = {"run": {"dir": str(run_dir), "stopped_at_step": rows[-1]["step"],
                      "median_step_seconds": round(sorted(step_s)[len(step_s) // 2], 1),
                      "per_step": per_step(rows)},
              "held_out_in_run": {"rows": held_out_rows, "before": before, "evaluations": evals}, "plot": str(png),
              **run_context(None, load_average(), "torch", "transformers", "peft")}
    for e in [{"step": 0, **before}, *evals]:
        print(f"step {e['step']:>3}: held-out accuracy {e['held_out/accuracy']:.3f}  valid calls "
              f"{e.get('held_out/valid_rate')}  calls/episode {e.get('held_out/calls')}")
    write_json(out_json, result)
    print(f"wrote {out_json} and {png}")
    return result


def line(name: str, r: dict) -> str:
    rate = "-" if r["valid_rate"] is None else f"{r['valid_rate']:.2f}"
    return (f"{name:<8} accuracy {r['accuracy']:.3f}  valid calls {rate}  calls/episode {r['calls']:.2f}  "
            f"turns {r['turns']:.2f}  ({r['n']} problems, {r['seconds']:.0f} s)")


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--recipe", default=str(ROOT / "recipes" / "grpo_tools.yaml"))
    ap.add_argument("--test", default=str(ROOT / "data" / "tools" / "test.jsonl"), help="held-out problems")
    ap.add_argument("--limit", type=int, default=None, help="held-out rows (default: all; --smoke: 8)")
    ap.add_argument("--run-dir", default=None, help="default: runs/bench_tool_grpo[_smoke]")
    ap.add_argument("--smoke", action="store_true", help="2 steps, 8 test rows, 2 prompts x 4 episodes")
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="recipe override (repeatable)")
    ap.add_argument("--from-run", default=None, metavar="DIR",
                    help="no training: report a run that was stopped before its end from its metrics.jsonl "
                         "(in-run held-out evaluations only; its final adapter was never written)")
    args = ap.parse_args(argv)
    if args.from_run:
        return report_stopped_run(Path(args.from_run))

    from posttrain.config import build_config
    from posttrain.data.formats import load_records
    from posttrain.eval.report import metric_curves
    from posttrain.rl.controller import RLConfig, run_rl

    run_dir = Path(args.run_dir or ROOT / "runs" / ("bench_tool_grpo_smoke" if args.smoke else "bench_tool_grpo"))
    overrides = [*(SMOKE if args.smoke else []), *args.set, f"output_dir={run_dir}"]
    cfg = build_config(RLConfig, args.recipe, overrides)
    if cfg.env is None:
        raise ValueError(f"{args.recipe}: no env section; this benchmark measures tool use")
    limit = args.limit or (8 if args.smoke else None)
    records = load_records(args.test, kind="prompt").records[:limit]
    load_before = load_average()
    threads = torch.get_num_threads()
    print(f"{len(records)} held-out problems, {cfg.train.max_steps} GRPO steps of {cfg.rollout.prompts_per_step} x "
          f"{cfg.rollout.samples_per_prompt} episodes, {threads} threads")

    before = evaluate(cfg.model.name, cfg, records)
    print(line("before", before))
    start = time.perf_counter()
    manifest = run_rl(cfg, overwrite=True)
    train_s = time.perf_counter() - start
    torch.set_num_threads(threads)
    after = evaluate(str(run_dir), cfg, records)
    print(line("before", before))
    print(line("after", after))

    rows = run_rows(run_dir)
    out_json = run_dir / "tool_grpo.json" if args.smoke else RESULTS_DIR / "tool_grpo.json"
    png = metric_curves(run_dir / "metrics.jsonl", out_json.with_suffix(".png"), CURVES,
                        title="tool-use GRPO (python env): " + ("smoke" if args.smoke else f"{len(rows)} steps"))
    step_s = [r["step_s"] for r in rows]
    result = {
        "recipe": str(Path(args.recipe).relative_to(ROOT)) if Path(args.recipe).is_relative_to(ROOT) else args.recipe,
        "overrides": overrides[:-1], "smoke": args.smoke, "held_out": {"path": args.test, "n": len(records)},
        "before": before, "after": after,
        "run": {"dir": str(run_dir), "steps": len(rows), "train_seconds": round(train_s, 1),
                "mean_step_seconds": round(sum(step_s) / len(step_s), 2),
                **{k: manifest["outputs"][k] for k in ("mean_phase_s", "reward_first5", "reward_last5",
                                                       "eval_before", "eval_after")},
                "per_step": per_step(rows)},
        "plot": str(png),
        **run_context(load_before, load_average(), "torch", "transformers", "peft"),
    }
    if args.smoke:  # scale this run's phases to the recipe's full size
        full = build_config(RLConfig, args.recipe, [*args.set, f"output_dir={run_dir}"])
        eval_per_episode = (before["seconds"] + after["seconds"]) / (2 * len(records))
        episodes = cfg.rollout.prompts_per_step * cfg.rollout.samples_per_prompt
        step_per_episode = (sum(step_s) / len(step_s)) / episodes
        full_test = len(load_records(args.test, kind="prompt").records)
        in_run = 0
        if full.eval.held_out_reward is not None:  # before + after + every eval_every
            n_evals = 2 + (full.train.max_steps // full.eval_every if full.eval_every else 0)
            in_run = n_evals * (full.eval.held_out_reward.limit or full_test)
        estimate = (eval_per_episode * (2 * full_test + in_run)
                    + step_per_episode * full.train.max_steps * full.rollout.prompts_per_step
                    * full.rollout.samples_per_prompt)
        result["full_run_estimate_minutes"] = round(estimate / 60, 1)
        print(f"estimate for the full run: {estimate / 60:.0f} min (eval {eval_per_episode:.2f} s/episode, "
              f"training {step_per_episode:.2f} s/episode, scaled linearly; batching makes larger steps "
              f"cheaper per episode, so this leans high)")
    write_json(out_json, result)
    print(f"wrote {out_json} and {png}")
    return result


if __name__ == "__main__":
    main()

"""DPO vs KTO vs ORPO: the same start, data, steps and learning rate, before/after side by side.

Each objective trains a LoRA adapter on the default model (SmolLM2-135M-Instruct) through the
`dpo` stage (`run_dpo`) from its shipped recipe (recipes/dpo.yaml: sigmoid DPO + RPO alpha 1;
recipes/kto.yaml; recipes/orpo.yaml), with the recipe's objective settings and the same
overrides for all three: `--steps` optimizer steps of 8 (pairs for DPO/ORPO; unpaired
examples for KTO, which reads each shipped pair as a desirable and an undesirable completion,
so a KTO step holds 8 completions + 8 KL rows = the 16 sequences of 8 pairs), lr `--lr`
cosine, seed 0, no checkpoints, no mid-run evaluation.

Measured on the start model once and on each trained policy:
- held-out pair accuracy on `--pairs` pairs of data/preference/test.jsonl: "logp" = share of
  pairs whose chosen reply has the higher summed log-prob; "reward" = the loss's own implicit
  reward margin > 0: beta x (policy - reference) log-ratio for DPO and KTO (all ties, shown
  "-", before training), lambda x per-token mean log-prob for ORPO;
- refusal rate on data/safety/harmful_test.jsonl and benign_test.jsonl, 50 prompts each,
  greedy, 32 new tokens (as recipes/pipeline_demo.yaml evaluates; one batch of 50 per task);
- seconds per optimizer step (the loop's wall time / steps; the machine is shared, so the
  load average is recorded with the figures), and, because the three stage runs are minutes
  apart under a changing load, the median time of one forward+backward of each objective on
  the same 8 pairs with the methods taking turns (3 rounds after a warm-up).

    python bench/preference_objectives.py            # ~15 min on the shared 2-core CPU
    python bench/preference_objectives.py --quick    # 2 steps, 16 pairs, 8 prompts: a smoke run
"""

from __future__ import annotations

import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # as the other bench scripts (shared cores)

import argparse
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import RESULTS_DIR, finish, load_average, run_context  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
METHODS = {"dpo": "recipes/dpo.yaml", "kto": "recipes/kto.yaml", "orpo": "recipes/orpo.yaml"}
SAFETY = {"refusal_harmful": "data/safety/harmful_test.jsonl", "refusal_benign": "data/safety/benign_test.jsonl"}


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", type=int, default=25)
    p.add_argument("--lr", type=float, default=5e-4)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--pairs", type=int, default=100, help="held-out pairs for the accuracy")
    p.add_argument("--prompts", type=int, default=50, help="harmful and benign prompts each")
    p.add_argument("--methods", nargs="+", default=list(METHODS), choices=list(METHODS))
    p.add_argument("--quick", action="store_true")
    p.add_argument("--out", type=Path, default=RESULTS_DIR / "preference_objectives.json")
    args = p.parse_args(argv)
    if args.quick:
        args.steps, args.pairs, args.prompts = 2, 16, 8
    return args


def eval_config(prompts: int):
    from posttrain.train.preference import DPOEvalConfig

    return DPOEvalConfig.model_validate({"tasks": [
        {"name": name, "path": str(REPO / path), "metric": "refusal_rate", "max_new_tokens": 32, "batch_size": 50,
         "limit": prompts} for name, path in SAFETY.items()]})


@torch.no_grad()
def pair_logps(model, pairs: list[dict], pad: int, batch_size: int = 16) -> tuple[torch.Tensor, torch.Tensor]:
    """Summed completion log-probs [N, 2] (chosen, rejected) and token counts [N, 2]."""
    from posttrain.data.collate import collate_pairs
    from posttrain.train.dpo import completion_logps

    was = model.training
    model.eval()
    logps, counts = [], []
    for i in range(0, len(pairs), batch_size):
        chunk = pairs[i:i + batch_size]
        lp, n = completion_logps(model, collate_pairs(chunk, pad))
        b = len(chunk)
        logps.append(torch.stack([lp[:b], lp[b:]], 1).float())
        counts.append(torch.stack([n[:b], n[b:]], 1))
    model.train(was)
    return torch.cat(logps), torch.cat(counts)


def accuracies(policy: torch.Tensor, counts: torch.Tensor, reference: torch.Tensor | None, method: str | None) -> dict:
    """logp accuracy, and the implicit-reward accuracy of `method` (None before training)."""
    out = {"logp_acc": (policy[:, 0] > policy[:, 1]).float().mean().item(),
           "logp_margin": (policy[:, 0] - policy[:, 1]).mean().item()}
    if method == "orpo" or (method is None and reference is None):  # lambda x mean log-prob
        mean = policy / counts.clamp(min=1)
        out["reward_acc"] = (mean[:, 0] > mean[:, 1]).float().mean().item()
    elif method is not None:  # beta x log-ratio: chosen over rejected
        ratio = policy - reference
        out["reward_acc"] = (ratio[:, 0] > ratio[:, 1]).float().mean().item()
    return out


def train_one(method: str, args, run_dir: Path) -> dict:
    from posttrain.config import load_yaml
    from posttrain.train.preference import DPOConfig, run_dpo

    raw = load_yaml(REPO / METHODS[method])
    raw["output_dir"] = str(run_dir)
    raw["data"] = {**raw["data"], "train": str(REPO / raw["data"]["train"]), "eval": None}
    raw["train"] = {**raw["train"], "max_steps": args.steps, "lr": args.lr, "batch_size": args.batch_size,
                    "eval_every": None, "save_every": None, "progress": False, "seed": 0}
    raw["eval"] = {"tasks": eval_config(args.prompts).model_dump()["tasks"], "before": False}
    cfg = DPOConfig.model_validate(raw)
    t0 = time.perf_counter()
    manifest = run_dpo(cfg, overwrite=True)
    train = manifest["outputs"]["train"]
    return {"settings": cfg.dpo.model_dump(), "train_seconds": train["seconds"], "steps": train["steps"],
            "seconds_per_step": train["seconds"] / train["steps"], "stage_seconds": time.perf_counter() - t0,
            "train_loss_last": train["train_loss"], "refusal_after": manifest["outputs"]["eval_after"],
            "reference": manifest["outputs"]["reference"], "data": manifest["outputs"]["data"]}


def interleaved_step_times(methods: list[str], args, rounds: int = 3) -> dict:
    """Median seconds of one forward+backward of each objective on the same 8 pairs (KTO: their 8
    pairs' 8 unpaired examples with their KL rows), the methods taking turns, so a
    change in the machine's load hits all of them alike (the stage runs are minutes apart)."""
    from posttrain.adapters import AdapterConfig, apply_adapter
    from posttrain.config import load_yaml
    from posttrain.data.collate import collate_pairs, collate_unpaired
    from posttrain.data.templates import add_kl_completions
    from posttrain.models import load_model
    from posttrain.data.examples import load_pairs, load_unpaired
    from posttrain.train.preference import DPOSettings

    model, tokenizer = load_model("default")
    recipes = {m: load_yaml(REPO / METHODS[m]) for m in methods}
    model = apply_adapter(model, AdapterConfig.model_validate(recipes[methods[0]]["adapter"]), tokenizer)
    train = str(REPO / "data/preference/train.jsonl")
    pairs, _ = load_pairs(tokenizer, train, 256, False)
    unpaired = [e for group in load_unpaired(tokenizer, train, 256, False)[0] for e in group]
    add_kl_completions(unpaired, 0, 256)
    n = args.batch_size
    batches = {"pairs": collate_pairs(pairs[:n], tokenizer.pad_token_id, packed=True),
               "unpaired": collate_unpaired(unpaired[:n], tokenizer.pad_token_id, packed=True)}
    jobs = {}
    for m in methods:
        settings = DPOSettings.model_validate(recipes[m]["dpo"])
        jobs[m] = (settings.objective(), batches["unpaired" if settings.unpaired else "pairs"])
    times: dict[str, list[float]] = {m: [] for m in methods}
    for r in range(rounds + 1):  # round 0 warms up
        for m, (objective, batch) in jobs.items():
            t = time.perf_counter()
            loss, _ = objective(model, batch)
            loss.backward()
            model.zero_grad(set_to_none=True)
            if r:
                times[m].append(time.perf_counter() - t)
    return {m: {"median_s": sorted(v)[len(v) // 2], "all_s": v,
                "sequences": int(2 * n), "tokens": int(jobs[m][1]["input_ids"].numel())} for m, v in times.items()}


def print_table(result: dict) -> None:
    before = result["before"]
    methods = list(result["methods"])
    rows = [("held-out pair acc, logp (chosen > rejected)", "logp_acc"),
            ("held-out pair acc, implicit reward", "reward_acc"),
            ("mean logp margin (chosen - rejected)", "logp_margin"),
            ("refusal, harmful (higher is better)", "refusal_harmful"),
            ("refusal, benign (lower is better)", "refusal_benign")]
    head = "| metric | before | " + " | ".join(f"{m.upper()} after" for m in methods) + " |"
    print(head)
    print("|" + "---|" * (2 + len(methods)))

    def fmt(v):
        return "-" if v is None else f"{v:.3f}"

    for label, key in rows:
        b = before.get(key)
        if key == "reward_acc":
            b = None  # DPO/KTO: every margin is 0 before training; ORPO's is shown in its column's note
        cells = [fmt(result["methods"][m]["after"].get(key)) for m in methods]
        print(f"| {label} | {fmt(b)} | " + " | ".join(cells) + " |")
    print("| seconds per step (stage run) | - | " + " | ".join(f"{result['methods'][m]['seconds_per_step']:.2f}"
                                                             for m in methods) + " |")
    timed = result.get("interleaved_step_s", {})
    print("| seconds per fwd+bwd, interleaved, same 8 pairs | - | "
          + " | ".join(f"{timed[m]['median_s']:.2f}" if m in timed else "-" for m in methods) + " |")
    print(f"(ORPO's implicit reward before training: per-token mean logp accuracy {fmt(before.get('reward_acc'))})")


def main(argv=None) -> dict:
    args = parse_args(argv)
    from posttrain.models import load_model
    from posttrain.data.examples import load_pairs
    from posttrain.eval.suite import evaluate_all

    load_before = load_average()
    print(f"load average before: {load_before}")
    started = time.perf_counter()
    model, tokenizer = load_model("default")
    pad = tokenizer.pad_token_id
    held, _ = load_pairs(tokenizer, str(REPO / "data/preference/test.jsonl"), 256, False)
    held = held[:args.pairs]
    base_logps, counts = pair_logps(model, held, pad)
    before = {**accuracies(base_logps, counts, None, None), **evaluate_all(model, tokenizer, eval_config(args.prompts))}
    print(f"before: {before}")
    del model
    result = {"before": before, "methods": {}}
    with tempfile.TemporaryDirectory() as tmp:
        for method in args.methods:
            out = train_one(method, args, Path(tmp) / method)
            policy, _ = load_model(Path(tmp) / method)
            logps, _ = pair_logps(policy, held, pad)
            out["after"] = {**accuracies(logps, counts, base_logps, method), **out.pop("refusal_after")}
            print(f"{method}: {out['after']} ({out['seconds_per_step']:.2f} s/step)")
            out["load_average_after"] = load_average()
            result["methods"][method] = out
            del policy
    result["interleaved_step_s"] = interleaved_step_times(args.methods, args, rounds=1 if args.quick else 3)
    print(f"interleaved: { {m: round(v['median_s'], 2) for m, v in result['interleaved_step_s'].items()} }")
    result.update({
        "command": "python bench/preference_objectives.py" + (" --quick" if args.quick else ""),
        "settings": {"steps": args.steps, "lr": args.lr, "batch_size": args.batch_size, "held_out_pairs": len(held),
                     "prompts_each": args.prompts, "schedule": "cosine (recipes' warmup 0.05)",
                     "model": "default (SmolLM2-135M-Instruct), LoRA r16/alpha32 all-linear (the recipes')"},
        "wall_seconds": time.perf_counter() - started,
        **run_context(load_before, load_average(), "torch", "transformers", "peft"),
    })
    return finish(result, args.out, args.quick, print_table)


if __name__ == "__main__":
    main()

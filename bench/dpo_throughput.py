"""LoRA DPO throughput: posttrain's loop vs TRL's DPOTrainer, same pairs, same budget, one process.

Both train a LoRA adapter (r16 / alpha 32 / dropout 0 on all linear layers, fp32 adapter
weights, PEFT's own init from the same seed) on the default model (SmolLM2-135M-Instruct,
bf16 frozen base) with the sigmoid DPO loss, beta 0.1, the reference being the same model with
its adapter disabled, computed in each step (neither side precomputes). Same pairs in the same
order (no shuffling), `--batch-size` pairs per optimizer step (chosen and rejected in one
concatenated, right-padded forward on both sides), AdamW at a constant lr, weight decay 0,
grad-norm clip 1, no gradient checkpointing, no autocast (bf16 base and fp32 LoRA as loaded).

Inputs are identical token for token: pairs are encoded once with
`posttrain.data.templates.encode_preference` (chat template, prompt masked, completion =
assistant content + `<|im_end|>`), cut after the last completion token (the template's trailing
newline carries no loss and cannot change an earlier token's log-prob), and TRL gets the same
ids as `prompt_ids` / `chosen_ids` / `rejected_ids`. TRL 1.16 has no switch for pre-tokenized
preference data, so `_prepare_dataset` (its tokenize/map step, run once before training) is
overridden to pass them through; nothing in its training step changes. Its own tokenization
of the same chats would differ only by counting that trailing newline as a completion token.

Pairs/s counts the pairs of the timed steps only: `--warmup` steps first, then `--steps` timed
steps, the clock read at the end of each optimizer step. Loss check: the first step's loss is
ln 2 on both sides by construction (LoRA B starts at zero, so policy = reference), so the
script also compares the first batch's policy log-probs, the first step's grad norm and the
per-step loss over the whole run (same init, same data and optimizer => same trajectory up to
bf16 rounding).

    python bench/dpo_throughput.py            # full run (a few minutes), writes results JSON
    python bench/dpo_throughput.py --quick    # a short smoke run, JSON not written
"""

from __future__ import annotations

import os

# Idle OpenMP threads sleep instead of spinning (see bench/sft_throughput.py: on this shared
# 2-core machine spinning threads that lose their core stall every parallel region).
# Must be set before torch loads; it applies to both trainers alike.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import argparse
import gc
import json
import math
import random
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import RESULTS_DIR, finish, load_average, run_context  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
DATA_FILES = (REPO / "data" / "preference" / "train.jsonl", REPO / "data" / "samples" / "preference.jsonl")
LORA = {"r": 16, "alpha": 32, "dropout": 0.0, "target_modules": "all-linear"}
BETA = 0.1
DTYPES = {"bf16": torch.bfloat16, "fp32": torch.float32}


# ----------------------------------------------------------------------------- data


def load_pairs(tokenizer, n: int, max_length: int, seed: int = 0) -> tuple[list[dict], str]:
    """`n` encoded pairs (cycled if the file has fewer), in a seeded order, cut after the completion."""
    from posttrain.data.formats import load_records
    from posttrain.data.templates import IGNORE, encode_preference

    path = next((p for p in DATA_FILES if p.is_file()), None)
    if path is None:
        raise FileNotFoundError(f"no preference data: looked for {', '.join(str(p) for p in DATA_FILES)}")
    records = load_records(path).records
    pairs = []
    for r in records:  # DPO needs only the texts (aspect names would need a head index map)
        e = encode_preference(tokenizer, {k: r[k] for k in ("prompt", "chosen", "rejected")}, max_length)
        if e is None:
            continue
        for side in ("chosen", "rejected"):
            labels = e[f"{side}_labels"]
            last = max(i for i, t in enumerate(labels) if t != IGNORE)
            e[f"{side}_input_ids"], e[f"{side}_labels"] = e[f"{side}_input_ids"][: last + 1], labels[: last + 1]
        pairs.append(e)
    if not pairs:
        raise ValueError(f"{path}: no pair survived encoding at max_length {max_length}")
    random.Random(seed).shuffle(pairs)
    pairs = (pairs * math.ceil(n / len(pairs)))[:n]
    return pairs, f"{path.relative_to(REPO)} ({len(records)} records)"


def trl_row(e: dict) -> dict:
    """The same pair as TRL's pre-tokenized columns; the completion = our label tokens exactly."""
    from posttrain.data.templates import IGNORE

    starts = []
    for side in ("chosen", "rejected"):
        ids, labels = e[f"{side}_input_ids"], e[f"{side}_labels"]
        start = next(i for i, t in enumerate(labels) if t != IGNORE)
        if any(t == IGNORE for t in labels[start:]) or labels[start:] != ids[start:]:
            raise ValueError("a pair's completion is not one contiguous labelled span; TRL could not mask it the same")
        starts.append(start)
    p = starts[0]
    if starts[1] != p or e["chosen_input_ids"][:p] != e["rejected_input_ids"][:p]:
        raise ValueError("chosen and rejected do not share the same prompt tokens")
    return {"prompt_ids": e["chosen_input_ids"][:p], "chosen_ids": e["chosen_input_ids"][p:],
            "rejected_ids": e["rejected_input_ids"][p:]}


# ----------------------------------------------------------------------------- shared pieces


def timed_rate(stamps: list[float], pairs_per_step: int, warmup: int) -> tuple[float, int, float]:
    """(pairs/s, pairs, seconds) over steps warmup+1..end; stamps[k] = end of step k+1."""
    seconds = stamps[-1] - stamps[warmup - 1]
    n = pairs_per_step * (len(stamps) - warmup)
    return n / seconds, n, seconds


def lora_fingerprint(model) -> float:
    """Sum of the first LoRA A matrix: equal on both sides iff PEFT drew the same init."""
    for name, p in model.named_parameters():
        if "lora_A" in name:
            return float(p.detach().double().sum())
    raise ValueError("no LoRA parameter found")


def count_params(model) -> int:
    return sum(p.numel() for p in model.parameters())


# ----------------------------------------------------------------------------- ours


def run_ours(pairs: list[dict], args) -> dict:
    """posttrain: load_model -> apply_adapter(LoRA) -> train(make_dpo_objective('sigmoid'))."""
    from accelerate.state import AcceleratorState

    from posttrain.adapters import AdapterConfig, apply_adapter
    from posttrain.config import TrainConfig
    from posttrain.models import load_model
    from posttrain.train.dpo import make_dpo_objective
    from posttrain.train.loop import train

    model, tokenizer = load_model("default", dtype=DTYPES[args.dtype])
    torch.manual_seed(args.seed)  # the state TRL's set_seed leaves before its get_peft_model
    model = apply_adapter(model, AdapterConfig(method="lora", trainable_dtype="fp32", **LORA))
    fingerprint = lora_fingerprint(model)
    n_params = count_params(model)
    dpo = make_dpo_objective("sigmoid", beta=BETA)
    seen: list[dict] = []

    def objective(m, batch):  # records the objective's metrics (the loop logs only the loss)
        loss, metrics = dpo(m, batch)
        seen.append(metrics)
        return loss, metrics

    # packed (our DPO default): a step's pairs in one row without padding, exactly batch_size pairs per step
    cfg = TrainConfig(max_steps=args.warmup + args.steps, packing=not args.no_packing, max_tokens=1 << 20,
                      batch_size=args.batch_size, shuffle=False,
                      lr=args.lr, schedule="constant", warmup_ratio=0.0, weight_decay=0.0, max_grad_norm=1.0,
                      seed=args.seed, progress=False, log_every=1)
    # accelerate keeps one process-wide state; a TRL run with bf16=True before this one left it at
    # mixed_precision="bf16", which the loop's Accelerator(mixed_precision="no") refuses to change.
    # transformers' TrainingArguments resets it the same way before building its own.
    AcceleratorState._reset_state(reset_partial_state=True)
    with tempfile.TemporaryDirectory() as run_dir:
        t0 = time.perf_counter()
        model, _ = train(model, objective, pairs, cfg, run_dir, pad_token_id=tokenizer.pad_token_id)
        wall = time.perf_counter() - t0
        rows = [json.loads(line) for line in (Path(run_dir) / "metrics.jsonl").read_text().splitlines()]
    # the loop logs cumulative tokens and cumulative tokens/s since its start: recover step end times
    stamps = [r["tokens"] / r["tokens_per_s"] for r in rows]
    pairs_s, n_pairs, secs = timed_rate(stamps, args.batch_size, args.warmup)
    tokens = rows[-1]["tokens"] - rows[args.warmup - 1]["tokens"]
    return {
        "pairs_per_s": pairs_s, "timed_pairs": n_pairs, "timed_seconds": secs, "wall_seconds": wall,
        "tokens_per_s": tokens / secs, "losses": [r["loss"] for r in rows],
        "grad_norms": [r.get("grad_norm") for r in rows],
        "first_batch": {"logps/chosen": seen[0]["logps/chosen"], "logps/rejected": seen[0]["logps/rejected"]},
        "last_step": {k: seen[-1][k] for k in ("rewards/margin", "rewards/accuracy")},
        "lora_fingerprint": fingerprint, "params": n_params,
        "settings": (f"load_model {args.dtype}, apply_adapter LoRA (fp32 adapter weights), "
                     f"loop.train(packing={not args.no_packing}, shuffle=False) + make_dpo_objective('sigmoid', "
                     "beta=0.1), reference = PEFT base with the "
                     "adapter disabled; head only at completion tokens, fused LoRA/RMSNorm/rotary (bf16 only); "
                     "torch AdamW"),
    }


# ----------------------------------------------------------------------------- TRL


def run_trl(pairs: list[dict], args, *, autocast: bool = True) -> dict:
    """TRL DPOTrainer on the same token ids, PEFT LoRA via peft_config, sequential sampling."""
    import peft
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, TrainerCallback
    from trl import DPOConfig, DPOTrainer

    from posttrain.models import default_model_dir, load_tokenizer

    class PreTokenizedDPOTrainer(DPOTrainer):
        """DPOTrainer that takes prompt_ids/chosen_ids/rejected_ids as given (no re-tokenization)."""

        def _prepare_dataset(self, dataset, processing_class, args, dataset_name):
            if not {"prompt_ids", "chosen_ids", "rejected_ids"} <= set(dataset.column_names):
                raise ValueError("expected pre-tokenized prompt_ids/chosen_ids/rejected_ids")
            return dataset

    path = str(default_model_dir())
    model = AutoModelForCausalLM.from_pretrained(path, dtype=DTYPES[args.dtype])
    tokenizer = load_tokenizer(path)
    dataset = Dataset.from_list([trl_row(e) for e in pairs])
    stamps: list[float] = []

    class Clock(TrainerCallback):
        def on_step_end(self, a, state, control, **kw):
            stamps.append(time.perf_counter())

    with tempfile.TemporaryDirectory() as out:
        config = DPOConfig(
            output_dir=out, use_cpu=True, bf16=autocast, max_steps=args.warmup + args.steps,
            per_device_train_batch_size=args.batch_size, gradient_accumulation_steps=1, max_length=args.max_length,
            beta=BETA, loss_type=["sigmoid"], precompute_ref_log_probs=False, train_sampling_strategy="sequential",
            learning_rate=args.lr, lr_scheduler_type="constant", warmup_steps=0, max_grad_norm=1.0,
            weight_decay=0.0, gradient_checkpointing=False, logging_steps=1, save_strategy="no",
            report_to=[], seed=args.seed, dataloader_num_workers=0, disable_tqdm=True,
        )
        pcfg = peft.LoraConfig(r=LORA["r"], lora_alpha=LORA["alpha"], lora_dropout=LORA["dropout"],
                               target_modules=LORA["target_modules"], task_type="CAUSAL_LM")
        trainer = PreTokenizedDPOTrainer(model=model, args=config, train_dataset=dataset, processing_class=tokenizer,
                                         peft_config=pcfg, callbacks=[Clock()])
        fingerprint = lora_fingerprint(trainer.model)
        n_params = count_params(trainer.model)
        t0 = time.perf_counter()
        trainer.train()
        wall = time.perf_counter() - t0
        logs = [h for h in trainer.state.log_history if "loss" in h]
        optim = getattr(trainer.args.optim, "value", trainer.args.optim)
    pairs_s, n_pairs, secs = timed_rate(stamps, args.batch_size, args.warmup)
    tokens = sum(len(e["chosen_input_ids"]) + len(e["rejected_input_ids"])
                 for e in pairs[args.warmup * args.batch_size : (args.warmup + args.steps) * args.batch_size])
    return {
        "pairs_per_s": pairs_s, "timed_pairs": n_pairs, "timed_seconds": secs, "wall_seconds": wall,
        "tokens_per_s": tokens / secs, "losses": [h["loss"] for h in logs],
        "grad_norms": [h.get("grad_norm") for h in logs],
        "first_batch": {"logps/chosen": logs[0]["logps/chosen"], "logps/rejected": logs[0]["logps/rejected"]},
        "last_step": {"rewards/margin": logs[-1]["rewards/margins"], "rewards/accuracy": logs[-1]["rewards/accuracies"]},
        "lora_fingerprint": fingerprint, "params": n_params,
        "settings": (f"DPOTrainer (pre-tokenized ids, _prepare_dataset passthrough), peft_config LoRA (fp32 adapter "
                     f"weights: PEFT autocast_adapter_dtype), {args.dtype} base, bf16={autocast} "
                     f"({'autocast' if autocast else 'no autocast'}), reference = adapter disabled, "
                     f"precompute_ref_log_probs=False, fused LM head (TRL default), gradient_checkpointing=False, "
                     f"train_sampling_strategy=sequential, optim {optim}"),
    }


# ----------------------------------------------------------------------------- main


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", type=int, default=10, help="timed optimizer steps per trainer")
    p.add_argument("--no-packing", action="store_true", help="ours on padded pair batches (TRL's layout)")
    p.add_argument("--warmup", type=int, default=2, help="untimed optimizer steps first")
    p.add_argument("--batch-size", type=int, default=8, help="pairs per optimizer step (2x rows per forward)")
    p.add_argument("--max-length", type=int, default=512, help="max tokens of prompt + completion, both sides")
    p.add_argument("--dtype", choices=sorted(DTYPES), default="bf16", help="base weights of both sides")
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's, = cores)")
    p.add_argument("--lr", type=float, default=1e-4)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--loss-tol", type=float, default=1e-3, help="max |loss difference| for agreement")
    p.add_argument("--trl-no-autocast", action="store_true",
                   help="run TRL with bf16=False (no autocast) instead of its default bf16=True")
    p.add_argument("--skip-trl", action="store_true")
    p.add_argument("--skip-fp32-check", action="store_true", help="skip the short fp32 run of both sides")
    p.add_argument("--quick", action="store_true", help="1 warm-up + 3 timed steps of 4 pairs; no JSON")
    p.add_argument("--out", type=Path, default=RESULTS_DIR / "dpo_throughput.json")
    args = p.parse_args(argv)
    if args.quick:
        args.steps, args.warmup, args.batch_size = 3, 1, 4
    if args.warmup < 1 or args.steps < 1 or args.batch_size < 1:
        p.error("--warmup, --steps and --batch-size must be >= 1")
    return args


def fp32_check(pairs: list[dict], args) -> dict:
    """Both sides for 4 steps of 4 pairs (--quick: 2 of 2) on an fp32 base: the same computation must give the same losses.

    In bf16 the two sides' kernels round differently (ours: fused RMSNorm/rotary/LoRA; TRL:
    transformers' modules under autocast), and a DPO log-ratio is a small difference of sums
    over the completion, so per-step losses after step 1 drift apart by ~1e-2 there; in fp32
    that noise is gone and any difference left is a difference in what is computed.
    """
    steps, size = (1, 2) if args.quick else (3, 4)
    small = argparse.Namespace(**{**vars(args), "dtype": "fp32", "steps": steps, "warmup": 1, "batch_size": size})
    ours = run_ours(pairs, small)
    gc.collect()
    trl = run_trl(pairs, small, autocast=False)
    gc.collect()
    diffs = [abs(a - b) for a, b in zip(ours["losses"], trl["losses"])]
    keep = ("losses", "grad_norms", "first_batch", "pairs_per_s")
    return {
        "config": f"fp32 base, fp32 LoRA, no autocast, 1 + {steps} steps of {size} pairs, same pairs and lr",
        "ours": {k: ours[k] for k in keep}, "trl": {k: trl[k] for k in keep},
        "lora_init_same": ours["lora_fingerprint"] == trl["lora_fingerprint"],
        "per_step_loss_max_abs_diff": max(diffs),
        "first_batch_logps_max_abs_diff": max(abs(ours["first_batch"][k] - trl["first_batch"][k])
                                              for k in ours["first_batch"]),
        "agrees": max(diffs) <= args.loss_tol,
    }


def main(argv=None) -> dict:
    args = parse_args(argv)
    from posttrain.models import load_tokenizer

    if args.threads:
        torch.set_num_threads(args.threads)
    load_before = load_average()
    print(f"load average before: {load_before}")
    tokenizer = load_tokenizer("default")
    n_pairs = (args.warmup + args.steps) * args.batch_size
    pairs, source = load_pairs(tokenizer, n_pairs, args.max_length, args.seed)
    lengths = [len(e["chosen_input_ids"]) + len(e["rejected_input_ids"]) for e in pairs]
    longest = max(max(len(e["chosen_input_ids"]), len(e["rejected_input_ids"])) for e in pairs)
    print(f"data: {source}: {len(pairs)} pairs used, mean {sum(lengths) / len(lengths):.0f} tokens per pair "
          f"(chosen + rejected), longest side {longest}")

    ours = run_ours(pairs, args)
    print(f"ours: {ours['pairs_per_s']:.3f} pairs/s, first loss {ours['losses'][0]:.6f}")
    gc.collect()
    trl = None
    if not args.skip_trl:
        trl = run_trl(pairs, args, autocast=not args.trl_no_autocast)
        print(f"TRL: {trl['pairs_per_s']:.3f} pairs/s, first loss {trl['losses'][0]:.6f}")
        gc.collect()
    load_after = load_average()
    fp32 = None if args.skip_trl or args.skip_fp32_check else fp32_check(pairs, args)

    check = None
    if trl:
        first = abs(ours["losses"][0] - trl["losses"][0])
        check = {
            "first_step_loss": {"ours": ours["losses"][0], "trl": trl["losses"][0], "ln2": math.log(2),
                                "abs_diff": first},
            "first_batch_logps": {"ours": ours["first_batch"], "trl": trl["first_batch"]},
            "first_step_grad_norm": {"ours": ours["grad_norms"][0], "trl": trl["grad_norms"][0]},
            "per_step_loss_abs_diff": [abs(a - b) for a, b in zip(ours["losses"], trl["losses"])],
            "fp32": fp32,
            "tolerance": args.loss_tol,
            "agrees": first <= args.loss_tol and (fp32 is None or fp32["agrees"]),
        }
    trl_mode = "no autocast" if args.trl_no_autocast else "bf16=True autocast (its default)"
    result = {
        "ours_pairs_per_s": round(ours["pairs_per_s"], 3),
        "trl_pairs_per_s": round(trl["pairs_per_s"], 3) if trl else None,
        "ratio_vs_trl": round(ours["pairs_per_s"] / trl["pairs_per_s"], 2) if trl else None,
        "loss_check": check,
        "config": {"batch_size_pairs": args.batch_size, "max_length": args.max_length, "warmup_steps": args.warmup,
                   "timed_steps": args.steps, "lr": args.lr, "schedule": "constant", "loss": "sigmoid",
                   "beta": BETA, "reference": "PEFT base (adapter disabled), computed each step",
                   "lora": LORA, "dtype": f"{args.dtype} base, fp32 LoRA weights; ours no autocast, TRL {trl_mode}",
                   "data": source, "pairs": len(pairs), "mean_tokens_per_pair": round(sum(lengths) / len(lengths), 1),
                   "seed": args.seed},
        "ours": ours,
        "trl": trl,
        **run_context(load_before, load_after, "torch", "transformers", "peft", "trl", "accelerate"),
    }
    return finish(result, args.out, args.quick, print_table)


def print_table(r: dict) -> None:
    ours, trl, c = r["ours"], r["trl"] or {}, r["loss_check"] or {}
    fmt = lambda v, f: "-" if v is None else format(v, f)
    get = lambda d, k, i: (d.get(k) or [None])[i]
    lines = [
        f"{'':30}{'ours':>14}{'TRL DPOTrainer':>16}",
        f"{'pairs/s (timed steps)':30}{ours['pairs_per_s']:>14.3f}{fmt(trl.get('pairs_per_s'), '.3f'):>16}",
        f"{'tokens/s (non-pad, timed)':30}{ours['tokens_per_s']:>14.1f}{fmt(trl.get('tokens_per_s'), '.1f'):>16}",
        (f"{'timed pairs / seconds':30}{ours['timed_pairs']:>8d}{ours['timed_seconds']:>6.1f}"
        f"{fmt(trl.get('timed_pairs'), 'd'):>10}{fmt(trl.get('timed_seconds'), '.1f'):>6}"),
        f"{'loss, step 1':30}{ours['losses'][0]:>14.6f}{fmt(get(trl, 'losses', 0), '.6f'):>16}",
        (f"{'logps/chosen, batch 1':30}{ours['first_batch']['logps/chosen']:>14.4f}"
        f"{fmt((trl.get('first_batch') or {}).get('logps/chosen'), '.4f'):>16}"),
        (f"{'logps/rejected, batch 1':30}{ours['first_batch']['logps/rejected']:>14.4f}"
        f"{fmt((trl.get('first_batch') or {}).get('logps/rejected'), '.4f'):>16}"),
        f"{'grad norm, step 1':30}{ours['grad_norms'][0]:>14.5f}{fmt(get(trl, 'grad_norms', 0), '.5f'):>16}",
        f"{'loss, last step':30}{ours['losses'][-1]:>14.6f}{fmt(get(trl, 'losses', -1), '.6f'):>16}",
    ]
    print("\n".join(lines))
    print(f"ratio ours/TRL: {fmt(r['ratio_vs_trl'], '.2f')}x   (goal >= 2x)")
    if c:
        f = c["fp32"]
        print(f"step-1 loss |diff| {c['first_step_loss']['abs_diff']:.2e} (ln 2 = {math.log(2):.6f} on both by "
              f"construction); bf16 per-step loss max |diff| {max(c['per_step_loss_abs_diff']):.2e} (rounding)")
        if f:
            print(f"fp32 check ({f['config']}): per-step loss max |diff| {f['per_step_loss_max_abs_diff']:.2e}, "
                  f"batch-1 logps max |diff| {f['first_batch_logps_max_abs_diff']:.2e}, LoRA init identical: "
                  f"{f['lora_init_same']}")
        print(f"losses agree within {c['tolerance']}: {c['agrees']}")

if __name__ == "__main__":
    main()

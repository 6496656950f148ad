"""LoRA SFT throughput: posttrain's loop vs TRL's SFTTrainer, same data, same budget, one process.

Both train the default model (SmolLM2-135M-Instruct, bf16 frozen base, LoRA r16/alpha 32/
dropout 0 on all linear layers, fp32 adapter weights) on the same tokenized chat examples
with the same assistant-only loss mask, packed padding-free into rows of at most
`--max-tokens` tokens, one row per optimizer step, AdamW at a constant lr, grad-norm clip 1.
TRL gets the pre-tokenized examples (`input_ids` + `completion_mask`,
`completion_only_loss=True`) because SmolLM2's chat template has no `{% generation %}`
markers, which TRL's `assistant_only_loss` needs; its own tokenization of the same chats
gives the same ids.

Tokens/s counts the input tokens of the packed rows (no padding exists) over the timed
steps only: `--warmup` steps first, then `--steps` timed steps, the clock read at the end
of each optimizer step. MFU = 6 x parameters x tokens/s / the bf16 matmul peak this script
measures (best of several large bf16 matmuls). Loss agreement: both adapted models are
scored on the same held-out examples with the same loss function after training.

    python bench/sft_throughput.py            # full run (a few minutes), writes results JSON
    python bench/sft_throughput.py --quick    # a short smoke run, JSON not written
"""

from __future__ import annotations

import os

# Idle OpenMP threads sleep instead of spinning. On this shared 2-core machine, spinning
# threads that lose their core to another process stall every parallel region: a LoRA step
# ran at 67 tok/s with 2 spinning threads vs 175 with PASSIVE and 163 with 1 thread (load 3-4).
# Must be set before torch loads; it applies to both trainers alike.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import argparse
import gc
import json
import random
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import RESULTS_DIR, best_matmul_peak, finish, load_average, run_context  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
QUICKSTART = REPO / "data" / "quickstart" / "train.jsonl"
LORA = dict(r=16, alpha=32, dropout=0.0, target_modules="all-linear")


# ----------------------------------------------------------------------------- data


def synthetic_chats(n: int, seed: int = 0) -> list[dict]:
    """Deterministic small chat records (arithmetic, word tasks, facts) with learnable answers."""
    rng = random.Random(seed)
    words = ("apple river stone cloud mirror garden lantern pencil violin harbor meadow rocket "
             "candle forest island marble ribbon saddle tunnel whistle").split()
    capitals = {"France": "Paris", "Japan": "Tokyo", "Kenya": "Nairobi", "Peru": "Lima", "Canada": "Ottawa",
                "Egypt": "Cairo", "Norway": "Oslo", "Chile": "Santiago", "India": "New Delhi", "Spain": "Madrid"}
    records = []
    for i in range(n):
        kind = i % 4
        if kind == 0:
            a, b = rng.randint(10, 999), rng.randint(10, 999)
            q, ans = f"What is {a} + {b}?", f"Adding {a} and {b} gives {a + b}. The answer is {a + b}."
        elif kind == 1:
            ws = rng.sample(words, rng.randint(4, 9))
            q = "Sort these words alphabetically: " + ", ".join(ws) + "."
            ans = "Here they are in alphabetical order: " + ", ".join(sorted(ws)) + "."
        elif kind == 2:
            country = rng.choice(sorted(capitals))
            q = f"What is the capital of {country}? Answer in one sentence, then give one fact about it."
            ans = (f"The capital of {country} is {capitals[country]}. {capitals[country]} is the seat of the "
                   f"national government of {country} and one of its largest cities.")
        else:
            ws = rng.sample(words, rng.randint(3, 7))
            q = "Reverse the order of these words: " + " ".join(ws)
            ans = "Reversed: " + " ".join(reversed(ws))
        messages = [{"role": "user", "content": q}, {"role": "assistant", "content": ans}]
        if rng.random() < 0.5:
            messages.insert(0, {"role": "system", "content": "You are a careful assistant. Answer exactly."})
        records.append({"messages": messages})
    return records


def load_examples(tokenizer, n_train: int, n_eval: int, max_length: int) -> tuple[list[dict], list[dict], str]:
    """Encoded train/eval examples from data/quickstart/train.jsonl if present, else synthetic chats."""
    from posttrain.data.templates import encode_record

    source = "synthetic chats (bench/sft_throughput.py, seed 0)"
    records = None
    if QUICKSTART.is_file():
        from posttrain.data.formats import load_records

        loaded = load_records(QUICKSTART)
        if len(loaded.records) >= n_eval + 16:
            records = [r for r in loaded.records]
            kind = loaded.kind
            source = str(QUICKSTART.relative_to(REPO))
    if records is None:
        records, kind = synthetic_chats(n_train + n_eval), "chat"
    examples = [e for e in (encode_record(tokenizer, r, kind, max_length) for r in records) if e is not None]
    return examples[n_eval:], examples[:n_eval], source


# ----------------------------------------------------------------------------- shared pieces


def load_base(dtype: torch.dtype = torch.bfloat16):
    from posttrain.models import load_model

    model, tokenizer = load_model("default", dtype=dtype)
    return model, tokenizer


@torch.no_grad()
def heldout_loss(model, examples: list[dict], max_tokens: int) -> float:
    """Token-mean loss over held-out examples (our loss function, packed rows, no grad)."""
    from posttrain.data.collate import collate_packed, plan_batches
    from posttrain.train.objectives import causal_lm_loss

    was = model.training
    model.eval()
    groups = plan_batches([len(e["input_ids"]) for e in examples], batch_size=None, max_tokens=max_tokens,
                          packing=True, shuffle=False, seed=0, epoch=0)
    total = count = 0.0
    for g in groups:
        loss, m = causal_lm_loss(model, collate_packed([examples[i] for i in g]))
        total += loss.item() * m["loss_tokens"]
        count += m["loss_tokens"]
    model.train(was)
    return total / count


def timed_rate(stamps: list[float], tokens: list[int], warmup: int) -> tuple[float, int, float]:
    """(tokens/s, tokens, seconds) over steps warmup+1..end; stamps[k] = end of step k+1."""
    seconds = stamps[-1] - stamps[warmup - 1] if warmup else stamps[-1] - stamps[0]
    n = sum(tokens[warmup:]) if warmup else sum(tokens[1:])
    return n / seconds, n, seconds


def count_params(model) -> int:
    return sum(p.numel() for p in model.parameters())


# ----------------------------------------------------------------------------- ours


def run_ours(train_ex, eval_ex, args, *, lora_dtype: str = "fp32", base_dtype=torch.bfloat16) -> dict:
    """posttrain: load_model -> apply_adapter(LoRA) -> train(causal_lm_loss) with packing."""
    from posttrain.adapters import AdapterConfig, apply_adapter
    from posttrain.config import TrainConfig
    from posttrain.train.loop import train
    from posttrain.train.objectives import causal_lm_loss

    torch.manual_seed(0)
    model, tokenizer = load_base(base_dtype)
    model = apply_adapter(model, AdapterConfig(method="lora", trainable_dtype=lora_dtype, **LORA))
    n_params = count_params(model)
    cfg = TrainConfig(max_steps=args.warmup + args.steps, packing=True, max_tokens=args.max_tokens, lr=args.lr,
                      schedule="constant", warmup_ratio=0.0, max_grad_norm=1.0, seed=0, progress=False,
                      log_every=1)
    with tempfile.TemporaryDirectory() as run_dir:
        t0 = time.perf_counter()
        model, summary = train(model, causal_lm_loss, train_ex, cfg, run_dir, pad_token_id=tokenizer.pad_token_id)
        wall = time.perf_counter() - t0
        rows = [json.loads(line) for line in (Path(run_dir) / "metrics.jsonl").read_text().splitlines()]
    # the loop logs cumulative tokens and cumulative tokens/s since its start: recover step end times
    stamps = [r["tokens"] / r["tokens_per_s"] for r in rows]
    tokens = [rows[0]["tokens"]] + [b["tokens"] - a["tokens"] for a, b in zip(rows, rows[1:])]
    tok_s, n_tok, secs = timed_rate(stamps, tokens, args.warmup)
    return {
        "tokens_per_s": tok_s, "timed_tokens": n_tok, "timed_seconds": secs, "wall_seconds": wall,
        "total_tokens": rows[-1]["tokens"], "losses": [r["loss"] for r in rows],
        "heldout_loss": heldout_loss(model, eval_ex, args.max_tokens), "params": n_params,
        "settings": f"bf16 base, LoRA weights {lora_dtype}, loop.train + causal_lm_loss (head at loss positions)",
    }


# ----------------------------------------------------------------------------- TRL


def run_trl(train_ex, eval_ex, args, *, bf16_autocast: bool = False) -> dict:
    """TRL SFTTrainer on the same examples: packing (bfd, padding-free), completion-only loss."""
    import peft
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, TrainerCallback
    from trl import SFTConfig, SFTTrainer

    from posttrain.models import default_model_dir, load_tokenizer

    torch.manual_seed(0)
    path = str(default_model_dir())
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.bfloat16)
    tokenizer = load_tokenizer(path)
    rows = [{"input_ids": e["input_ids"], "completion_mask": [int(x != -100) for x in e["labels"]]}
            for e in train_ex]
    dataset = Dataset.from_list(rows)

    stamps: list[float] = []
    tokens: list[int] = []

    class Clock(TrainerCallback):
        def on_step_end(self, a, state, control, **kw):
            stamps.append(time.perf_counter())

    with tempfile.TemporaryDirectory() as out:
        config = SFTConfig(
            output_dir=out, use_cpu=True, bf16=bf16_autocast, max_steps=args.warmup + args.steps,
            per_device_train_batch_size=1, gradient_accumulation_steps=1, max_length=args.max_tokens,
            packing=True, packing_strategy="bfd", padding_free=True, completion_only_loss=True,
            learning_rate=args.lr, lr_scheduler_type="constant", warmup_steps=0, max_grad_norm=1.0,
            weight_decay=0.0, gradient_checkpointing=False, logging_steps=1, save_strategy="no",
            report_to=[], seed=0, dataloader_num_workers=0, disable_tqdm=True,
        )
        pcfg = peft.LoraConfig(r=LORA["r"], lora_alpha=LORA["alpha"], lora_dropout=LORA["dropout"],
                               target_modules=LORA["target_modules"], task_type="CAUSAL_LM")
        trainer = SFTTrainer(model=model, args=config, train_dataset=dataset, processing_class=tokenizer,
                             peft_config=pcfg, callbacks=[Clock()])
        collate = trainer.data_collator

        def counting(features):  # the tokens each optimizer step sees (one packed row per step)
            batch = collate(features)
            tokens.append(int(batch["input_ids"].numel()))
            return batch

        trainer.data_collator = counting
        n_params = count_params(trainer.model)
        t0 = time.perf_counter()
        trainer.train()
        wall = time.perf_counter() - t0
        losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
        tokens = tokens[: len(stamps)]  # the loader may prefetch one batch past the last step
        tok_s, n_tok, secs = timed_rate(stamps, tokens, args.warmup)
        model = trainer.model
    return {
        "tokens_per_s": tok_s, "timed_tokens": n_tok, "timed_seconds": secs, "wall_seconds": wall,
        "total_tokens": sum(tokens), "losses": losses, "heldout_loss": heldout_loss(model, eval_ex, args.max_tokens),
        "params": n_params,
        "settings": (f"SFTTrainer: packing=True (bfd, padding_free), completion_only_loss=True, "
                     f"bf16={bf16_autocast} ({'autocast' if bf16_autocast else 'no autocast'}), bf16 base, "
                     f"PEFT LoRA (fp32 adapter weights), gradient_checkpointing=False, optim adamw_torch_fused"),
    }


# ----------------------------------------------------------------------------- main


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", type=int, default=8, help="timed optimizer steps per trainer")
    p.add_argument("--warmup", type=int, default=2, help="untimed optimizer steps first")
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's, = cores)")
    p.add_argument("--max-tokens", type=int, default=1024, help="tokens per packed row (= per step)")
    p.add_argument("--lr", type=float, default=2e-4)
    p.add_argument("--n-eval", type=int, default=32, help="held-out examples for the loss check")
    p.add_argument("--loss-tol", type=float, default=0.1, help="max |held-out loss difference| (nats)")
    p.add_argument("--trl-bf16", action="store_true", help="run TRL with bf16=True (autocast) instead of off")
    p.add_argument("--skip-trl", action="store_true")
    p.add_argument("--quick", action="store_true", help="2 warm-up + 3 timed steps of 512 tokens; no JSON")
    p.add_argument("--out", type=Path, default=RESULTS_DIR / "sft_throughput.json")
    args = p.parse_args(argv)
    if args.quick:
        args.steps, args.warmup, args.max_tokens, args.n_eval = 3, 2, 512, 8
    if args.warmup < 1 or args.steps < 1:
        p.error("--warmup and --steps must be >= 1")
    return args


def main(argv=None) -> dict:
    args = parse_args(argv)
    from posttrain.models import load_tokenizer

    if args.threads:
        torch.set_num_threads(args.threads)

    load_before = load_average()
    print(f"load average before: {load_before}")
    peak_bf16 = best_matmul_peak(torch.bfloat16)
    peak_fp32 = best_matmul_peak(torch.float32, sizes=(1024, 2048))
    print(f"bf16 matmul peak {peak_bf16['flops'] / 1e12:.3f} TFLOP/s (n={peak_bf16['size']}), "
          f"fp32 {peak_fp32['flops'] / 1e12:.3f}")
    tokenizer = load_tokenizer("default")
    n_train = max(64, (args.warmup + args.steps) * args.max_tokens // 40)
    train_ex, eval_ex, source = load_examples(tokenizer, n_train, args.n_eval, args.max_tokens)
    print(f"data: {source}: {len(train_ex)} train / {len(eval_ex)} held-out examples, "
          f"mean {sum(len(e['input_ids']) for e in train_ex) / len(train_ex):.0f} tokens")

    base, _ = load_base()
    base_loss = heldout_loss(base, eval_ex, args.max_tokens)
    del base
    gc.collect()

    ours = run_ours(train_ex, eval_ex, args)
    print(f"ours: {ours['tokens_per_s']:.1f} tok/s, held-out loss {ours['heldout_loss']:.4f}")
    gc.collect()
    trl = None if args.skip_trl else run_trl(train_ex, eval_ex, args, bf16_autocast=args.trl_bf16)
    load_after = load_average()

    flops_per_token = 6 * ours["params"]
    mfu = flops_per_token * ours["tokens_per_s"] / peak_bf16["flops"]
    result = {
        "ours_tokens_per_s": round(ours["tokens_per_s"], 1),
        "trl_tokens_per_s": round(trl["tokens_per_s"], 1) if trl else None,
        "ratio_vs_trl": round(ours["tokens_per_s"] / trl["tokens_per_s"], 2) if trl else None,
        "mfu_vs_bf16_peak": round(mfu, 4),
        "bf16_peak_tflops": round(peak_bf16["flops"] / 1e12, 4),
        "fp32_peak_tflops": round(peak_fp32["flops"] / 1e12, 4),
        "bf16_peak_detail": peak_bf16,
        "mfu_formula": "6 x parameters (base + LoRA, tied embedding once) x tokens/s / bf16 peak",
        "params": ours["params"],
        "heldout_loss": {"base": round(base_loss, 4), "ours": round(ours["heldout_loss"], 4),
                         "trl": round(trl["heldout_loss"], 4) if trl else None, "tolerance": args.loss_tol},
        "loss_agrees": abs(ours["heldout_loss"] - trl["heldout_loss"]) <= args.loss_tol if trl else None,
        "config": {"max_tokens": args.max_tokens, "warmup_steps": args.warmup, "timed_steps": args.steps,
                   "lr": args.lr, "schedule": "constant", "lora": LORA, "data": source,
                   "train_examples": len(train_ex), "heldout_examples": len(eval_ex)},
        "ours": {k: v for k, v in ours.items()},
        "trl": trl,
        **run_context(load_before, load_after, "torch", "transformers", "peft", "trl", "accelerate"),
    }
    return finish(result, args.out, args.quick, print_table)


def print_table(r: dict) -> None:
    ours, trl = r["ours"], r["trl"] or {}
    fmt = lambda v, f: "-" if v is None else format(v, f)  # noqa: E731
    lines = [
        f"{'':28}{'ours':>14}{'TRL SFTTrainer':>16}",
        f"{'tokens/s (timed steps)':28}{ours['tokens_per_s']:>14.1f}{fmt(trl.get('tokens_per_s'), '.1f'):>16}",
        f"{'timed tokens':28}{ours['timed_tokens']:>14d}{fmt(trl.get('timed_tokens'), 'd'):>16}",
        f"{'train loss, last step':28}{ours['losses'][-1]:>14.4f}{fmt((trl.get('losses') or [None])[-1], '.4f'):>16}",
        f"{'held-out loss (base ' + format(r['heldout_loss']['base'], '.3f') + ')':28}"
        f"{ours['heldout_loss']:>14.4f}{fmt(trl.get('heldout_loss'), '.4f'):>16}",
    ]
    print("\n".join(lines))
    print(f"ratio ours/TRL: {fmt(r['ratio_vs_trl'], '.2f')}x   (goal >= 3x)")
    print(f"MFU: {100 * r['mfu_vs_bf16_peak']:.1f}% of bf16 peak {r['bf16_peak_tflops']:.3f} TFLOP/s   (goal >= 25%)")
    print(f"loss agrees within {r['heldout_loss']['tolerance']}: {r['loss_agrees']}")


if __name__ == "__main__":
    main()

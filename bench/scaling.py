"""How cost grows with model size and sequence length: posttrain's SFT against TRL's SFTTrainer,
and decoding against the memory-bandwidth roofline, all measured in one run.

Models: random-init Llama models of the SmolLM2 family (the 135M and 360M configs, and the
1.7B config cut to 14 layers, ~1.0B parameters), saved once in bf16 with the default tokenizer.
Random weights cost the same FLOPs and bytes as trained ones.

Training points: method (LoRA r16/alpha 32 on all linear layers, or full) x size x length L.
Each step trains one packed row of L tokens made of several documents (lengths L/8..L/2),
so attention runs per document. Both trainers get the same documents, tokenized once:
- LoRA: bf16 frozen base, fp32 adapter weights (ours: adapter.trainable_dtype fp32; TRL:
  PEFT on a bf16 model, bf16=False);
- full: fp32 weights, gradients and AdamW moments, matmuls under bf16 autocast (both load the
  model in fp32: ours model.dtype fp32, train.mixed_precision bf16; TRL bf16=True);
- activation checkpointing on at L >= 8192 for both (it pays there: it is what lets the row fit),
  off below; MALLOC_MMAP_THRESHOLD_=131072 for both (glibc then returns what checkpointing frees);
- TRL: packing=True (bfd, padding_free), max_length=L, batch 1, AdamW (fused), lr constant.
Each trainer runs in its own subprocess: 1-2 untimed steps, then max(1, T // L) timed ones (--timed-tokens T).
Tokens/s counts the row tokens of the timed steps; peak memory is the child's own VmHWM
(peak resident set). Before each of our runs, `posttrain plan` predicts its peak from the
config alone (reported beside the measurement: the planner's CPU validation).
A point whose planned peak exceeds the memory available now is skipped for both trainers.

Decoding: greedy, 64 new tokens from a 32-token prompt, batch 1 and 8 (EOS ignored), with our
generate (backend auto: the native decoder where it runs) and transformers' generate; the roofline
is the read bandwidth measured in this run over the bytes of weights read per step.

    python bench/scaling.py                     # every point (~1 hour on 2 cores)
    python bench/scaling.py --quick             # 135M, L=512, both methods; no JSON
    python bench/scaling.py --sizes 1B --lengths 8192 --merge   # redo some points, keep the rest
"""

from __future__ import annotations

import argparse
import json
import os
import random
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import RESULTS_DIR, load_average, machine_info, run_child, write_json  # noqa: E402
from decoding import read_bandwidth, weight_bytes_per_token  # noqa: E402  (the roofline as bench/decoding.py measures it)

_SMOL = {"model_type": "llama", "vocab_size": 49152, "max_position_embeddings": 8192, "rms_norm_eps": 1e-5,
         "tie_word_embeddings": True, "hidden_act": "silu", "rope_parameters": {"rope_theta": 100000.0,
                                                                                "rope_type": "default"},
         "bos_token_id": 1, "eos_token_id": 2, "pad_token_id": 2}
SIZES = {  # HuggingFaceTB/SmolLM2-{135M,360M,1.7B} config.json shapes; "1B" = the 1.7B shape with 14 of 24 layers
    "135M": dict(_SMOL, hidden_size=576, intermediate_size=1536, num_hidden_layers=30, num_attention_heads=9,
                 num_key_value_heads=3, head_dim=64),
    "360M": dict(_SMOL, hidden_size=960, intermediate_size=2560, num_hidden_layers=32, num_attention_heads=15,
                 num_key_value_heads=5, head_dim=64),
    "1B": dict(_SMOL, hidden_size=2048, intermediate_size=8192, num_hidden_layers=14, num_attention_heads=32,
               num_key_value_heads=32, head_dim=64),
}
LORA = {"r": 16, "alpha": 32, "dropout": 0.0, "target_modules": "all-linear"}
MALLOC = {"MALLOC_MMAP_THRESHOLD_": "131072"}
CKPT_FROM = 8192  # activation checkpointing at and above this length (both trainers)
LR = 1e-5


def make_model(work: Path, size: str) -> Path:
    """Random-init bf16 model of that size with the default tokenizer (built once)."""
    out = work / f"smollm2-{size}-random"
    if (out / "config.json").is_file():
        return out
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from posttrain.models import load_tokenizer

    torch.manual_seed(0)
    with torch.device("cpu"):
        model = LlamaForCausalLM(LlamaConfig(**{k: v for k, v in SIZES[size].items() if k != "model_type"}))
    tmp = out.with_name(out.name + ".tmp")
    model.to(torch.bfloat16).save_pretrained(tmp)
    load_tokenizer("default").save_pretrained(tmp)
    tmp.rename(out)
    return out


def make_docs(work: Path, length: int, rows: int) -> Path:
    """Text documents of L/8..L/2 tokens, enough to fill `rows` packed rows of L tokens."""
    path = work / f"docs-{length}x{rows}.jsonl"
    if path.is_file():
        return path
    rng = random.Random(length)
    words = ("the model of a small language trains on text and data with memory time step loss token "
             "river stone cloud garden lantern pencil harbor meadow rocket candle forest island").split()
    total, docs = 0, []
    while total < length * (rows + 1):
        n = rng.randint(length // 8, length // 2)
        docs.append({"text": " ".join(rng.choice(words) for _ in range(n))})
        total += n
    with open(path, "w") as fh:
        fh.writelines(json.dumps(d) + "\n" for d in docs)
    return path


def ours_recipe(model: Path, method: str, length: int, steps: int, data: Path, out: Path) -> dict:
    adapter = {"method": method, "trainable_dtype": "fp32"}
    if method == "lora":
        adapter.update(LORA)
    return {"stage": "sft", "output_dir": str(out), "model": {"name": str(model), "dtype": "bf16" if method == "lora" else "fp32"},
            "adapter": adapter, "data": {"train": str(data), "kind": "text", "max_length": length},
            "train": {"packing": True, "max_tokens": length, "max_steps": steps, "lr": LR, "schedule": "constant",
                      "warmup_ratio": 0.0, "progress": False, "log_every": 1, "shuffle": False,
                      "mixed_precision": "bf16" if method == "full" else "no", "fused_optimizer": True,
                      "gradient_checkpointing": length >= CKPT_FROM},
            "eval": {"before": False}}


def ours_rate(out: Path, warmup: int) -> tuple[float, int, list[float]]:
    """(tokens/s, timed tokens, step seconds) of the steps after `warmup` from metrics.jsonl."""
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines() if line.strip()]
    ends = [r["tokens"] / r["tokens_per_s"] for r in rows]  # cumulative tokens / cumulative rate = elapsed
    toks = [r["tokens"] for r in rows]
    timed = toks[-1] - toks[warmup - 1]
    return timed / (ends[-1] - ends[warmup - 1]), timed, [round(b - a, 2) for a, b in zip(ends, ends[1:])]


# ----------------------------------------------------------------------------- TRL child


def trl_child(model: str, method: str, length: int, warmup: int, steps: int, data: str, out: str) -> None:
    """One TRL SFTTrainer run; writes {"tokens_per_s", "timed_tokens", "step_s"} to `out`."""
    import peft
    import torch
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, TrainerCallback
    from trl import SFTConfig, SFTTrainer

    from posttrain.data.templates import encode_record
    from posttrain.models import load_tokenizer

    torch.manual_seed(0)
    tokenizer = load_tokenizer(model)
    docs = [json.loads(line) for line in open(data)]
    rows = [{"input_ids": encode_record(tokenizer, d, "text", length)["input_ids"]} for d in docs]
    net = AutoModelForCausalLM.from_pretrained(model, dtype=torch.bfloat16 if method == "lora" else torch.float32)
    stamps: list[float] = []
    tokens: list[int] = []

    class Clock(TrainerCallback):
        def on_step_end(self, a, state, control, **kw):
            stamps.append(time.perf_counter())

    with tempfile.TemporaryDirectory() as tmp:
        config = SFTConfig(
            output_dir=tmp, use_cpu=True, bf16=method == "full", max_steps=warmup + steps,
            per_device_train_batch_size=1, gradient_accumulation_steps=1, max_length=length, packing=True,
            packing_strategy="bfd", padding_free=True, learning_rate=LR, lr_scheduler_type="constant",
            warmup_steps=0, max_grad_norm=1.0, weight_decay=0.0, gradient_checkpointing=length >= CKPT_FROM,
            logging_steps=1, save_strategy="no", report_to=[], seed=0, dataloader_num_workers=0,
            disable_tqdm=True, shuffle_dataset=False)
        pcfg = None
        if method == "lora":
            pcfg = peft.LoraConfig(r=LORA["r"], lora_alpha=LORA["alpha"], lora_dropout=LORA["dropout"],
                                   target_modules=LORA["target_modules"], task_type="CAUSAL_LM")
        trainer = SFTTrainer(model=net, args=config, train_dataset=Dataset.from_list(rows), processing_class=tokenizer,
                             peft_config=pcfg, callbacks=[Clock()])
        collate = trainer.data_collator

        def counting(features):
            batch = collate(features)
            tokens.append(int(batch["input_ids"].numel()))
            return batch

        trainer.data_collator = counting
        trainer.train()
    tokens = tokens[: len(stamps)]  # the loader may prefetch past the last step
    timed = sum(tokens[warmup:])
    Path(out).write_text(json.dumps({
        "tokens_per_s": timed / (stamps[-1] - stamps[warmup - 1]), "timed_tokens": timed,
        "step_s": [round(b - a, 2) for a, b in zip(stamps, stamps[1:])], "row_tokens": tokens}))


# ----------------------------------------------------------------------------- decoding


def decode_point(model_dir: Path, batches=(1, 8), new_tokens: int = 64) -> dict:
    """Greedy decode tokens/s: ours (generate, backend auto) and transformers' generate."""
    import torch

    from posttrain.generate.engine import GenerationConfig, generate
    from posttrain.models import load_model

    model, tok = load_model(str(model_dir), dtype="bf16")
    model.eval()
    rng = random.Random(0)
    out = {}
    for b in batches:
        prompts = [[rng.randint(100, 40000) for _ in range(32)] for _ in range(b)]
        cfg = GenerationConfig(max_new_tokens=new_tokens, ignore_eos=True)
        generate(model, tok, prompts, GenerationConfig(max_new_tokens=4, ignore_eos=True))  # warm-up
        t = time.perf_counter()
        res = generate(model, tok, prompts, cfg)
        ours = sum(len(x) for x in res.token_ids) / (time.perf_counter() - t)
        ids = torch.tensor(prompts)
        with torch.inference_mode():
            model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=4, min_new_tokens=4,
                           do_sample=False, pad_token_id=tok.pad_token_id)
            t = time.perf_counter()
            gen = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=new_tokens,
                                 min_new_tokens=new_tokens, do_sample=False, pad_token_id=tok.pad_token_id)
            hf = (gen.shape[1] - ids.shape[1]) * b / (time.perf_counter() - t)
        out[f"batch{b}"] = {"ours_tokens_per_s": round(ours, 2), "hf_tokens_per_s": round(hf, 2)}
    out["weight_bytes_per_step"] = weight_bytes_per_token(model)
    return out


# ----------------------------------------------------------------------------- main


def step_counts(length: int, args) -> tuple[int, int]:
    """(warm-up, timed) optimizer steps at length L."""
    return args.warmup + (length < CKPT_FROM), max(1, args.timed_tokens // length)


def train_point(work: Path, size: str, method: str, length: int, args, device) -> dict:
    from posttrain.config import build_config
    from posttrain.plan import get_device, plan_stage
    from posttrain.train.sft import SFTConfig

    import yaml

    model = make_model(work, size)
    warmup, steps = step_counts(length, args)
    data = make_docs(work, length, warmup + steps + 2)
    name = f"{size}-{method}-{length}"
    row = {"size": size, "method": method, "length": length, "checkpointing": length >= CKPT_FROM,
           "warmup_steps": warmup, "timed_steps": steps,
           "measured_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
    out = work / f"ours-{name}"
    cfg_path = work / f"ours-{name}.yaml"
    cfg_path.write_text(yaml.safe_dump(ours_recipe(model, method, length, warmup + steps, data, out)))
    plan = plan_stage(build_config(SFTConfig, cfg_path), device, with_suggestions=False, fixed_mmap_threshold=True)
    row["predicted_peak_bytes"] = plan.peak
    avail = get_device("cpu").available
    if plan.peak > avail:
        row["skipped"] = f"planned peak {plan.peak / 2**30:.1f} GiB > {avail / 2**30:.1f} GiB available"
        print(f"{name}: skipped: {row['skipped']}", flush=True)
        return row
    reuse = lambda log: args.reuse and log.with_suffix(".hwm").is_file()  # noqa: E731
    if reuse(work / f"ours-{name}.log"):  # a finished earlier run of this point: read its files
        peak, wall, rc = int((work / f"ours-{name}.hwm").read_text()) * 1024, 0.0, 0
    else:
        peak, wall, rc = run_child(["-m", "posttrain.cli", "sft", "-c", str(cfg_path), "--overwrite", "--no-memory-check"],
                                   work / f"ours-{name}.log", MALLOC)
    if rc == 0:
        rate, timed, step_s = ours_rate(out, warmup)
        row["ours"] = {"tokens_per_s": round(rate, 1), "timed_tokens": timed, "step_s": step_s,
                       "peak_bytes": peak, "wall_s": round(wall, 1)}
        row["planner_error_pct"] = round(100 * (plan.peak - peak) / peak, 1)
    else:
        row["ours"] = {"exit": rc, "peak_bytes": peak, "log": (work / f"ours-{name}.log").read_text()[-1500:]}
    if not args.skip_trl:
        res = work / f"trl-{name}.json"
        if reuse(work / f"trl-{name}.log") and res.is_file():
            peak, wall, rc = int((work / f"trl-{name}.hwm").read_text()) * 1024, 0.0, 0
        else:
            res.unlink(missing_ok=True)
            code = (f"import sys; sys.path[:0] = {[str(ROOT / 'bench'), str(ROOT / 'src')]!r}; from scaling import trl_child; "
                    f"trl_child({str(model)!r}, {method!r}, {length}, {warmup}, {steps}, {str(data)!r}, {str(res)!r})")
            peak, wall, rc = run_child(["-c", code], work / f"trl-{name}.log", MALLOC)
        if rc == 0:
            trl = json.loads(res.read_text())
            row["trl"] = {"tokens_per_s": round(trl["tokens_per_s"], 1), "timed_tokens": trl["timed_tokens"],
                          "step_s": trl["step_s"], "peak_bytes": peak, "wall_s": round(wall, 1)}
        else:
            row["trl"] = {"exit": rc, "peak_bytes": peak, "log": (work / f"trl-{name}.log").read_text()[-1500:]}
    if "tokens_per_s" in row.get("ours", {}) and "tokens_per_s" in row.get("trl", {}):
        row["speed_ratio"] = round(row["ours"]["tokens_per_s"] / row["trl"]["tokens_per_s"], 2)
        row["memory_ratio_trl_over_ours"] = round(row["trl"]["peak_bytes"] / row["ours"]["peak_bytes"], 2)
    row["load_average"] = load_average()
    print(point_line(row), flush=True)
    return row


def point_line(r: dict) -> str:
    o, t = r.get("ours", {}), r.get("trl", {})
    fmt = lambda d, k, s=1.0, f=".1f": format(d[k] / s, f) if k in d else ("exit " + str(d["exit"]) if "exit" in d else "-")  # noqa: E731
    return (f"{r['size']:>5} {r['method']:>5} {r['length']:>5} {'ckpt' if r['checkpointing'] else '':>4} | "
            f"{fmt(o, 'tokens_per_s'):>8} {fmt(t, 'tokens_per_s'):>8} {r.get('speed_ratio', '-'):>5} | "
            f"{fmt(o, 'peak_bytes', 2**30, '.2f'):>6} {fmt(t, 'peak_bytes', 2**30, '.2f'):>6} "
            f"{r.get('memory_ratio_trl_over_ours', '-'):>5} | plan {r['predicted_peak_bytes'] / 2**30:.2f} GiB "
            f"{r.get('planner_error_pct', '-'):>5}%")


HEADER = (f"{'size':>5} {'meth':>5} {'L':>5} {'':>4} | {'ours t/s':>8} {'TRL t/s':>8} {'ratio':>5} | "
          f"{'ours GiB':>6} {'TRL GiB':>6} {'TRL/us':>5} | planner")


def plot(result: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    sizes = [s for s in SIZES if any(p["size"] == s for p in result["points"])]
    fig, axes = plt.subplots(1, 3, figsize=(16, 4.8))
    for method, style in (("lora", "-"), ("full", "--")):
        for length in sorted({p["length"] for p in result["points"]}):
            pts = {p["size"]: p for p in result["points"] if p["method"] == method and p["length"] == length}
            xs = [i for i, s in enumerate(sizes) if "speed_ratio" in pts.get(s, {})]
            if xs:
                axes[0].plot(xs, [pts[sizes[i]]["speed_ratio"] for i in xs], style, marker="o", label=f"{method} L={length}")
                axes[1].plot(xs, [pts[sizes[i]]["memory_ratio_trl_over_ours"] for i in xs], style, marker="o",
                             label=f"{method} L={length}")
    axes[0].axhline(1, color="grey", lw=0.8)
    axes[0].set_title("training tokens/s: ours / TRL SFTTrainer")
    axes[1].axhline(1.5, color="grey", lw=0.8, ls=":")
    axes[1].set_title("peak memory: TRL / ours (goal >= 1.5 at 8192)")
    for ax in axes[:2]:
        ax.set_xticks(range(len(sizes)), sizes)
        ax.legend(fontsize=7)
    dec = result.get("decode", {})
    if dec:
        ds = [s for s in sizes if s in dec]
        for b, marker in (("batch1", "o"), ("batch8", "s")):
            axes[2].plot(range(len(ds)), [dec[s][b]["ours_tokens_per_s"] for s in ds], marker=marker, label=f"ours {b}")
            axes[2].plot(range(len(ds)), [dec[s][b]["hf_tokens_per_s"] for s in ds], marker=marker, ls=":",
                         label=f"transformers {b}")
            axes[2].plot(range(len(ds)), [dec[s][b]["roofline_tokens_per_s"] for s in ds], marker=marker, ls="--",
                         color="grey", label=f"roofline {b}")
        axes[2].set_yscale("log")
        axes[2].set_xticks(range(len(ds)), ds)
        axes[2].set_title("greedy decode tokens/s (bf16)")
        axes[2].legend(fontsize=7)
    fig.suptitle(f"posttrain scaling, {result['machine'].get('cpu', '')}", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def markdown(result: dict) -> str:
    """The BENCHMARKS.md tables of a result."""
    gib = lambda d: f"{d['peak_bytes'] / 2**30:.2f}" if "peak_bytes" in d and "exit" not in d else (  # noqa: E731
        f"exit {d['exit']}" if "exit" in d else "-")
    rate = lambda d: f"{d['tokens_per_s']:.1f}" if "tokens_per_s" in d else gib(d)  # noqa: E731
    lines = ["| size | method | L | ckpt | ours tok/s | TRL tok/s | ratio | ours peak GiB | TRL peak GiB | TRL/ours | "
             "planned GiB | planner error |", "|" + "---|" * 12]
    for p in result["points"]:
        if "skipped" in p:
            lines.append(f"| {p['size']} | {p['method']} | {p['length']} | | skipped: {p['skipped']} |" + " |" * 7)
            continue
        o, t = p.get("ours", {}), p.get("trl", {})
        lines.append(f"| {p['size']} | {p['method']} | {p['length']} | {'yes' if p['checkpointing'] else 'no'} | "
                     f"{rate(o)} | {rate(t)} | {p.get('speed_ratio', '-')} | {gib(o)} | {gib(t)} | "
                     f"{p.get('memory_ratio_trl_over_ours', '-')} | {p['predicted_peak_bytes'] / 2**30:.2f} | "
                     f"{p.get('planner_error_pct', '-')}% |")
    dec = {k: v for k, v in result.get("decode", {}).items() if isinstance(v, dict)}
    if dec:
        lines += ["", f"Decode (greedy, 64 new tokens, bf16; read bandwidth {result['decode'].get('read_bandwidth_gbs')} GB/s):",
                  "", "| size | batch | ours tok/s | transformers tok/s | roofline tok/s | ours / roofline |",
                  "|---|---|---|---|---|---|"]
        for size, d in dec.items():
            for b in ("batch1", "batch8"):
                x = d[b]
                lines.append(f"| {size} | {b[5:]} | {x['ours_tokens_per_s']} | {x['hf_tokens_per_s']} | "
                             f"{x['roofline_tokens_per_s']} | {x['ours_fraction_of_roofline']:.0%} |")
    return "\n".join(lines)


def replan(out: Path, work: Path) -> None:
    """Predictions of the current planner for the measured points (the measurements are untouched)."""
    import subprocess

    from posttrain.config import build_config
    from posttrain.plan import get_device, plan_stage
    from posttrain.train.sft import SFTConfig

    os.environ.update(MALLOC)  # as the runs had it
    result = json.loads(out.read_text())
    device = get_device("cpu")
    for p in result["points"]:
        cfg = build_config(SFTConfig, work / f"ours-{p['size']}-{p['method']}-{p['length']}.yaml")
        p["predicted_peak_bytes"] = plan_stage(cfg, device, with_suggestions=False).peak
        if "peak_bytes" in p.get("ours", {}) and "exit" not in p["ours"]:
            m = p["ours"]["peak_bytes"]
            p["planner_error_pct"] = round(100 * (p["predicted_peak_bytes"] - m) / m, 1)
        print(point_line(p))
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, cwd=ROOT).stdout.strip()
    result["planner_replanned"] = {"commit": commit, "date": machine_info()["date"]}
    write_json(out, result)  # then save() re-derives the summary
    save(str(out), [], {}, merge=True)


def save(out: str, points: list[dict], decode: dict, merge: bool) -> dict:
    """Write `points` and `decode` into `out` (atomically), keeping its other points when merging."""
    old = json.loads(Path(out).read_text()) if merge and Path(out).is_file() else {}
    key = lambda p: (p["size"], p["method"], p["length"])  # noqa: E731
    new = {key(p) for p in points}
    points = [p for p in old.get("points", []) if key(p) not in new] + points
    order = {(s, m, n): i for i, (s, n, m) in enumerate((s, n, m) for s in SIZES for n in (512, 2048, 8192)
                                                         for m in ("lora", "full"))}
    points.sort(key=lambda p: order.get(key(p), len(order)))
    decode = {**old.get("decode", {}), **decode}
    done = [p for p in points if "speed_ratio" in p]
    at_8192 = [p for p in done if p["length"] == 8192]
    planned = [p for p in points if "planner_error_pct" in p]
    summary = {
        "points": len(points), "compared": len(done),
        "speed_ratio_by_size": {s: [p["speed_ratio"] for p in done if p["size"] == s] for s in SIZES},
        "memory_ratio_at_8192": {f"{p['size']} {p['method']}": p["memory_ratio_trl_over_ours"] for p in at_8192},
        "memory_goal_met_at_8192": all(p["memory_ratio_trl_over_ours"] >= 1.5 for p in at_8192) if at_8192 else None,
        "planner_within_15pct": f"{sum(abs(p['planner_error_pct']) <= 15 for p in planned)}/{len(planned)}",
        "planner_max_abs_error_pct": max((abs(p["planner_error_pct"]) for p in planned), default=None),
    }
    runs = old.get("runs", []) + [{"command": "python " + " ".join(sys.argv), "date": machine_info()["date"]}]
    extra = {k: old[k] for k in ("planner_replanned",) if k in old}
    runs = [r for i, r in enumerate(runs) if r not in runs[:i]]
    result = {"machine": machine_info(), "runs": runs, "models": SIZES, "lora": LORA, "checkpointing_from": CKPT_FROM,
              "points": points, "decode": decode, "summary": summary, **extra}
    write_json(out, result)
    return result


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--sizes", default="135M,360M,1B")
    ap.add_argument("--lengths", default="512,2048,8192")
    ap.add_argument("--methods", default="lora,full")
    ap.add_argument("--warmup", type=int, default=1, help="untimed optimizer steps first (2 below L=8192)")
    ap.add_argument("--timed-tokens", type=int, default=16384,
                    help="timed steps per trainer = max(1, this // L): ~the same tokens at every length")
    ap.add_argument("--skip-trl", action="store_true")
    ap.add_argument("--no-decode", action="store_true")
    ap.add_argument("--decode-only", action="store_true", help="only the decode measurements")
    ap.add_argument("--quick", action="store_true", help="135M, L=512, both methods, no decode; no JSON")
    ap.add_argument("--merge", action="store_true", help="replace these points in --out, keep the others")
    ap.add_argument("--reuse", action="store_true",
                    help="take a point's figures from the finished runs in --work instead of running it again")
    ap.add_argument("--work", default=None, help="directory for models, data and run dirs (kept)")
    ap.add_argument("--out", default=str(RESULTS_DIR / "scaling.json"))
    ap.add_argument("--replan", action="store_true",
                    help="recompute every point's planner prediction in --out from the configs kept in --work "
                         "(the planner changed after the runs); run nothing else")
    ap.add_argument("--table", action="store_true", help="print the markdown tables of --out (and redraw its plot); run nothing")
    args = ap.parse_args()
    if args.replan:
        replan(Path(args.out), Path(args.work or "."))
        return
    if args.table:
        result = json.loads(Path(args.out).read_text())
        plot(result, Path(args.out).with_suffix(".png"))
        print(markdown(result))
        return
    if args.quick:
        args.sizes, args.lengths, args.no_decode = "135M", "512", True
    sizes, lengths, methods = args.sizes.split(","), [int(x) for x in args.lengths.split(",")], args.methods.split(",")
    for s in sizes:
        if s not in SIZES:
            ap.error(f"--sizes: unknown size {s!r}; known: {', '.join(SIZES)}")

    import dataclasses

    from posttrain.plan import get_device, measure_cpu_flops

    work = Path(args.work or tempfile.mkdtemp(prefix="scaling_"))
    work.mkdir(parents=True, exist_ok=True)
    print(f"work dir: {work}")
    device = dataclasses.replace(get_device("cpu"), peak_flops=measure_cpu_flops(), flops_measured=True)
    print(HEADER, flush=True)
    points = []
    for size in sizes if not args.decode_only else []:
        for length in lengths:
            for method in methods:
                points.append(train_point(work, size, method, length, args, device))
                if not args.quick:  # each point lands at once: a stopped run keeps what it measured
                    save(args.out, [points[-1]], {}, merge=args.merge or len(points) > 1)
    decode = {}
    if not args.no_decode:
        bw = read_bandwidth()["best_gbs"] * 1e9
        print(f"read bandwidth {bw / 1e9:.1f} GB/s")
        for size in sizes:
            d = decode_point(make_model(work, size))
            for b in (1, 8):
                d[f"batch{b}"]["roofline_tokens_per_s"] = round(b * bw / d["weight_bytes_per_step"], 2)
                d[f"batch{b}"]["ours_fraction_of_roofline"] = round(
                    d[f"batch{b}"]["ours_tokens_per_s"] / d[f"batch{b}"]["roofline_tokens_per_s"], 3)
            decode[size] = d
            print(f"decode {size}: " + ", ".join(f"{b}: ours {d[b]['ours_tokens_per_s']} / transformers "
                                                 f"{d[b]['hf_tokens_per_s']} / roofline {d[b]['roofline_tokens_per_s']} tok/s"
                                                 for b in ("batch1", "batch8")), flush=True)
        decode["read_bandwidth_gbs"] = round(bw / 1e9, 1)
    if args.quick:
        return
    result = save(args.out, [], decode, merge=True)
    plot(result, Path(args.out).with_suffix(".png"))
    print(json.dumps(result["summary"], indent=1))
    print(f"wrote {args.out} and {Path(args.out).with_suffix('.png')}")


if __name__ == "__main__":
    main()

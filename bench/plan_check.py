"""Check `posttrain plan` against measured peak memory: real training steps, one subprocess each.

Each point runs `posttrain sft` for 2 optimizer steps (the second has the AdamW state, so it
holds the steady-state peak) on text rows truncated to exactly max_length tokens, padded mode,
batch B x length L, with no evaluation; the subprocess's own peak RSS comes from os.wait4.
A child that only imports the stack (python, torch, transformers, peft, posttrain) gives the
measured baseline. The planner's prediction is made in this process from the same config,
before the child starts. Reported per point: predicted and measured peak (total), the same
without the runtime (prediction minus its runtime constant vs measured minus the baseline),
the error of each in percent, and step time (indicative: the CPU is shared).

    python bench/plan_check.py            # every point (~10 min on 2 cores)
    python bench/plan_check.py --quick    # three points
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import RESULTS_DIR, child_env, machine_info, run_child, write_json  # noqa: E402

SMOLLM2_360M = {  # HuggingFaceTB/SmolLM2-360M config.json (architecture keys)
    "architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": 960, "intermediate_size": 2560,
    "num_hidden_layers": 32, "num_attention_heads": 15, "num_key_value_heads": 5, "head_dim": 64,
    "vocab_size": 49152, "max_position_embeddings": 8192, "rms_norm_eps": 1e-5, "tie_word_embeddings": True,
    "rope_parameters": {"rope_theta": 100000.0, "rope_type": "default"}, "hidden_act": "silu",
    "bos_token_id": 1, "eos_token_id": 2, "pad_token_id": 2,
}

# (model, method, batch, length, train.gradient_checkpointing)
POINTS = [
    ("135M", "lora", 1, 512, False), ("135M", "lora", 4, 512, False), ("135M", "lora", 1, 2048, False),
    ("135M", "lora", 2, 2048, False), ("135M", "full", 1, 512, False), ("135M", "full", 4, 512, False),
    ("135M", "full", 1, 2048, False), ("135M", "lora", 1, 8192, False),
    ("360M", "lora", 1, 2048, False), ("360M", "full", 2, 512, False),
    ("135M", "full", 1, 2048, True), ("135M", "lora", 2, 2048, True), ("360M", "full", 1, 1024, True),
    ("135M", "lora", 2, 2048, "malloc"),  # checkpointing with MALLOC_MMAP_THRESHOLD_=131072 in the child
]
MALLOC_FIX = {"MALLOC_MMAP_THRESHOLD_": "131072"}
QUICK = [("135M", "lora", 1, 512, False), ("135M", "full", 1, 2048, False), ("135M", "lora", 2, 2048, False)]


def make_360m(root: Path) -> Path:
    """A random-init model with SmolLM2-360M's architecture, saved in bf16, with the default tokenizer."""
    out = root / "smollm2-360m-random"
    if (out / "config.json").is_file():
        return out
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from posttrain.models import load_tokenizer

    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(**{k: v for k, v in SMOLLM2_360M.items() if k != "architectures"}))
    model.to(torch.bfloat16).save_pretrained(out)
    load_tokenizer("default").save_pretrained(out)
    del model
    return out


def make_data(root: Path, rows: int = 8) -> Path:
    """Text rows of ~12k tokens each (truncated by data.max_length to exactly L tokens)."""
    import random

    rng = random.Random(0)
    words = "the model of a small language trains on text and data with memory time step loss token".split()
    path = root / "text.jsonl"
    with open(path, "w") as fh:
        for _ in range(rows):
            fh.write(json.dumps({"text": " ".join(rng.choice(words) for _ in range(12000))}) + "\n")
    return path


def selected(point: tuple, select: str | None) -> bool:
    name, method, _, _, ckpt = point
    words = [w.strip() for w in (select or "").split(",") if w.strip()]
    tags = {name, method, "ckpt" if ckpt else "no-ckpt"} | ({"malloc"} if ckpt == "malloc" else set())
    return all(w in tags for w in words)


def recipe(model: str, method: str, batch: int, length: int, ckpt: bool, data: Path, out: Path) -> dict:
    return {"stage": "sft", "output_dir": str(out), "model": {"name": model, "dtype": "auto"},
            "adapter": {"method": method},
            "data": {"train": str(data), "kind": "text", "max_length": length},
            "train": {"packing": False, "batch_size": batch, "max_steps": 2, "lr": 1e-5, "warmup_ratio": 0.0,
                      "progress": False, "log_every": 1, "shuffle": False,
                      "gradient_checkpointing": ckpt},
            "eval": {"before": False}}


def replan(out: Path, work: Path) -> None:
    """Predictions of the current planner for the measured points (measurements untouched)."""
    from posttrain.config import build_config
    from posttrain.plan import CPU_RUNTIME, get_device, plan_stage
    from posttrain.train.sft import SFTConfig

    work.mkdir(parents=True, exist_ok=True)
    result = json.loads(out.read_text())
    models = {"135M": "default", "360M": str(make_360m(work))}
    for r in result["points"]:
        if "measured_bytes" not in r:
            continue
        cfg_path = work / "replan.yaml"
        cfg_path.write_text(yaml.safe_dump(recipe(models[r["model"]], r["method"], r["batch"], r["length"],
                                                  r.get("checkpointing", False), work / "text.jsonl", work / "out")))
        plan = plan_stage(build_config(SFTConfig, cfg_path), get_device("cpu"), with_suggestions=False,
                          fixed_mmap_threshold=r.get("malloc_mmap_threshold", False))
        r["predicted_bytes"], r["predicted_net_bytes"] = plan.peak, plan.peak - CPU_RUNTIME
        r["error_pct"] = round(100 * (plan.peak - r["measured_bytes"]) / r["measured_bytes"], 1)
        r["net_error_pct"] = round(100 * (r["predicted_net_bytes"] - r["measured_net_bytes"]) / r["measured_net_bytes"], 1)
        r["parts"] = {p.name: p.bytes for p in plan.parts}
        print(f"{r['model']} {r['method']} ckpt={r.get('checkpointing')} {r['batch']}x{r['length']}: {r['error_pct']:+.1f}%")
    done = [r for r in result["points"] if "error_pct" in r]
    result["summary"].update({"within_15pct": sum(abs(r["error_pct"]) <= 15 for r in done),
                              "net_within_15pct": sum(abs(r["net_error_pct"]) <= 15 for r in done),
                              "max_abs_error_pct": max(abs(r["error_pct"]) for r in done),
                              "max_abs_net_error_pct": max(abs(r["net_error_pct"]) for r in done)})
    result["replanned"] = machine_info()["date"]
    write_json(out, result)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="three points only")
    ap.add_argument("--select", help="only the points matching every comma-separated word: a model (135M, 360M), "
                                     "a method (lora, full), ckpt or no-ckpt; e.g. --select full,no-ckpt")
    ap.add_argument("--merge", action="store_true",
                    help="replace those points in the existing --out JSON and keep the others (each row says when)")
    ap.add_argument("--work", default=None, help="directory for the data, the 360M model and run dirs")
    ap.add_argument("--out", default=str(RESULTS_DIR / "plan_check.json"))
    ap.add_argument("--replan", action="store_true",
                    help="recompute the predictions of the points in --out with the current planner (the 360M "
                         "model is built in --work if missing); measure nothing")
    args = ap.parse_args()
    if args.replan:
        replan(Path(args.out), Path(args.work or tempfile.mkdtemp(prefix="plan_check_")))
        return

    from posttrain.config import build_config
    from posttrain.plan import CPU_RUNTIME, get_device, measure_cpu_flops, plan_stage
    from posttrain.train.sft import SFTConfig

    work = Path(args.work or tempfile.mkdtemp(prefix="plan_check_"))
    work.mkdir(parents=True, exist_ok=True)
    data = make_data(work)
    points = QUICK if args.quick else [p for p in POINTS if selected(p, args.select)]
    models = {"135M": "default"}
    if any(p[0] == "360M" for p in points):
        code = f"import sys; sys.path[:0] = {[str(ROOT / 'bench'), str(ROOT / 'src')]!r}; " \
               f"from plan_check import make_360m; from pathlib import Path; make_360m(Path({str(work)!r}))"
        subprocess.run([sys.executable, "-c", code], check=True, env=child_env(), cwd=ROOT)
        models["360M"] = str(work / "smollm2-360m-random")
    import dataclasses

    flops = measure_cpu_flops()
    device = dataclasses.replace(get_device("cpu"), peak_flops=flops, flops_measured=True)
    print(f"matmul peak: bf16 {flops['bf16'] / 1e12:.2f}, fp32 {flops['fp32'] / 1e12:.2f} TFLOP/s")

    base_code = ("import torch, transformers, peft, accelerate, posttrain.cli, posttrain.train.sft, "
                 "posttrain.train.loop, posttrain.plan")
    baseline, _, rc = run_child(["-c", base_code], work / "baseline.log")
    assert rc == 0, (work / "baseline.log").read_text()[-2000:]
    print(f"baseline (imports only): {baseline / 2**20:.0f} MiB; planner's runtime constant {CPU_RUNTIME / 2**20:.0f} MiB")

    rows = []
    header = (f"{'model':>5} {'method':>6} {'ckpt':>4} {'B':>2} {'L':>5} | {'pred MiB':>8} {'meas MiB':>8} {'err':>6} | "
              f"{'pred net':>8} {'meas net':>8} {'err':>6} | {'pred s':>6} {'meas s':>6}")
    print(header)
    for name, method, batch, length, ckpt in points:
        malloc = ckpt == "malloc"
        out = work / f"run-{name}-{method}-{batch}x{length}{'-ckpt' if ckpt else ''}{'-malloc' if malloc else ''}"
        cfg_path = work / f"{out.name}.yaml"
        cfg_path.write_text(yaml.safe_dump(recipe(models[name], method, batch, length, bool(ckpt), data, out)))
        cfg = build_config(SFTConfig, cfg_path)
        plan = plan_stage(cfg, device, with_suggestions=False, fixed_mmap_threshold=malloc)
        peak, seconds, rc = run_child(["-m", "posttrain.cli", "sft", "-c", str(cfg_path), "--overwrite"],
                                      work / f"{out.name}.log", MALLOC_FIX if malloc else None)
        if rc != 0:
            print(f"{name} {method} {batch}x{length}: exit {rc}; see {work / f'{out.name}.log'}")
            rows.append({"model": name, "method": method, "checkpointing": bool(ckpt), "malloc_mmap_threshold": malloc, "batch": batch, "length": length,
                         "exit": rc})
            continue
        metrics = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines() if line.strip()]
        # the second step alone (the first one also warms kernels up): elapsed = tokens / tokens-per-second
        elapsed = [m["tokens"] / m["tokens_per_s"] for m in metrics]
        step_s = elapsed[-1] - elapsed[-2]
        runtime = plan.parts[0].bytes
        row = {"model": name, "method": method, "checkpointing": bool(ckpt), "malloc_mmap_threshold": malloc, "batch": batch, "length": length,
               "predicted_bytes": plan.peak, "measured_bytes": peak,
               "error_pct": round(100 * (plan.peak - peak) / peak, 1),
               "predicted_net_bytes": plan.peak - runtime, "measured_net_bytes": peak - baseline,
               "net_error_pct": round(100 * ((plan.peak - runtime) - (peak - baseline)) / (peak - baseline), 1),
               "load_peak_dominates": plan.load_peak > plan.train_peak - runtime,
               "parts": {p.name: p.bytes for p in plan.parts},
               "predicted_step_s": round(plan.step_seconds, 2) if plan.step_seconds else None,
               "measured_step_s": round(step_s, 2), "wall_s": round(seconds, 1),
               "measured_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "load_average": os.getloadavg()}
        rows.append(row)
        print(f"{name:>5} {method:>6} {'mal' if malloc else 'yes' if ckpt else 'no':>4} {batch:>2} {length:>5} | {plan.peak / 2**20:>8.0f} {peak / 2**20:>8.0f} "
              f"{row['error_pct']:>+5.1f}% | {row['predicted_net_bytes'] / 2**20:>8.0f} "
              f"{row['measured_net_bytes'] / 2**20:>8.0f} {row['net_error_pct']:>+5.1f}% | "
              f"{row['predicted_step_s'] or 0:>6.2f} {step_s:>6.2f}", flush=True)
    if args.merge:  # keep the other points of the earlier run(s)
        key = lambda r: (r["model"], r["method"], r["batch"], r["length"], r.get("checkpointing", False),  # noqa: E731
                         r.get("malloc_mmap_threshold", False))
        new = {key(r) for r in rows}
        old = json.loads(Path(args.out).read_text())
        rows = [r for r in old["points"] if key(r) not in new] + rows
        order = {(p[0], p[1], p[2], p[3], bool(p[4]), p[4] == "malloc"): i for i, p in enumerate(POINTS)}
        rows.sort(key=lambda r: order.get(key(r), len(order)))
    done = [r for r in rows if "error_pct" in r]
    summary = {"points": len(rows), "within_15pct": sum(abs(r["error_pct"]) <= 15 for r in done),
               "net_within_15pct": sum(abs(r["net_error_pct"]) <= 15 for r in done),
               "max_abs_error_pct": max((abs(r["error_pct"]) for r in done), default=None),
               "max_abs_net_error_pct": max((abs(r["net_error_pct"]) for r in done), default=None)}
    print(json.dumps(summary))
    command = ("python bench/plan_check.py" + (" --quick" if args.quick else "")
               + (f" --select {args.select}" if args.select else "") + (" --merge" if args.merge else ""))
    runs = (old.get("runs") or [{"command": old.get("command"), "date": old["machine"]["date"]}] if args.merge else [])
    runs = runs + [{"command": command, "date": machine_info()["date"], "points": len(points)}]
    write_json(args.out, {"machine": machine_info(), "runs": runs, "baseline_bytes": baseline, "runtime_constant_bytes": CPU_RUNTIME,
                          "matmul_peak_flops": flops, "points": rows, "summary": summary,
                          })
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()

"""Pipeline runner overhead: what a re-run of unchanged stages costs.

(1) the demo pipeline (recipes/pipeline_demo.yaml, real default model): validating the stage
configs and fingerprinting them (model content hash + data hashes), i.e. the work a
fully skipped re-run does, less hashing the stages' outputs; (2) a two-stage tiny-model SFT pipeline: first run vs skipped re-run.
Run from the repo root: `python bench/pipeline.py`.
"""

from __future__ import annotations

import json
import os
import sys
import tempfile
import time
from pathlib import Path

import torch
import yaml

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import RESULTS_DIR, finish, run_context  # noqa: E402

from posttrain.pipeline import fingerprint, load_pipeline, model_fingerprint, run_pipeline, stage_config  # noqa: E402


def demo_fingerprint_seconds() -> float:
    started = time.perf_counter()
    pipe = load_pipeline("recipes/pipeline_demo.yaml")
    fp = model_fingerprint(pipe.model.name)
    for i in range(len(pipe.all_stages())):
        cfg, _ = stage_config(pipe, i)
        fp = fingerprint(cfg, fp)
    return time.perf_counter() - started


def tiny_pipeline(root: Path) -> tuple[float, float, list[str]]:
    from posttrain.models import load_tokenizer, save_model, tiny_model

    tok = load_tokenizer("default")
    torch.manual_seed(0)
    save_model(tiny_model(tok), tok, root / "tiny")
    rows = [{"messages": [{"role": "user", "content": f"What is {i} plus 1?"},
                          {"role": "assistant", "content": f"{i + 1}"}]} for i in range(24)]
    (root / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    over = {"data.train": str(root / "train.jsonl"), "model.dtype": "fp32", "adapter.method": "lora",
            "train.max_steps": 4, "train.progress": False}
    (root / "p.yaml").write_text(yaml.safe_dump({
        "name": "bench", "output_dir": str(root / "out"), "model": str(root / "tiny"),
        "stages": [{"name": "a", "verb": "sft", "overrides": over}, {"name": "b", "verb": "sft", "overrides": over}]}))
    t0 = time.perf_counter()
    run_pipeline(load_pipeline(root / "p.yaml"))
    first = time.perf_counter() - t0
    t0 = time.perf_counter()
    state = run_pipeline(load_pipeline(root / "p.yaml"))
    return first, time.perf_counter() - t0, [s["status"] for s in state["stages"].values()]


def main() -> None:
    load_before = os.getloadavg()
    demo_fingerprint_seconds()  # warm the page cache: the figure is the steady-state re-run cost
    demo = [demo_fingerprint_seconds() for _ in range(3)]
    with tempfile.TemporaryDirectory() as tmp:
        first, rerun, statuses = tiny_pipeline(Path(tmp))
    result = {"demo_fingerprint_s": demo, "tiny_first_run_s": first, "tiny_rerun_s": rerun,
              "tiny_rerun_statuses": statuses, **run_context(load_before, os.getloadavg(), "transformers", "peft")}

    def table(r):
        print("| measure | seconds |\n|---|---|")
        print(f"| demo pipeline: validate 5 stages + fingerprints (median of 3, warm cache) | "
              f"{sorted(r['demo_fingerprint_s'])[1]:.2f} |")
        print(f"| tiny 2-stage LoRA SFT pipeline: first run | {r['tiny_first_run_s']:.2f} |")
        print(f"| same, re-run ({', '.join(r['tiny_rerun_statuses'])}) | {r['tiny_rerun_s']:.2f} |")

    finish(result, RESULTS_DIR / "pipeline.json", False, table)


if __name__ == "__main__":
    main()

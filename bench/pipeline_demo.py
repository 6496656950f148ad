"""`make demo` measured: the demo pipeline (recipes/pipeline_demo.yaml) on the default model.

Runs `posttrain run recipes/pipeline_demo.yaml --force --no-serve` as a subprocess (every step
re-run: data, SFT, DPO, int8, eval, deploy), times it, and reads `pipeline.json` for the
per-step seconds, the gate outcomes and the before/after metric table, with this machine's
bf16 matmul peak and read bandwidth measured before and after (a shared machine is told apart
from a slow change). The goal: under 8 minutes on a machine with a 0.63 TFLOP/s bf16 peak and
19 GB/s read bandwidth. Run from the repo root: `python bench/pipeline_demo.py`.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import RESULTS_DIR, best_matmul_peak, finish, run_context  # noqa: E402
from decoding import read_bandwidth  # noqa: E402

from posttrain.eval.report import format_table, metric_table  # noqa: E402
from posttrain.pipeline import load_pipeline  # noqa: E402

RECIPE = "recipes/pipeline_demo.yaml"


def main() -> None:
    pipe = load_pipeline(RECIPE)
    load_before = os.getloadavg()
    # the machine in the same run: a slow or shared machine is told apart from a slow change
    speed = {"bf16_matmul_peak_tflops_before": round(best_matmul_peak()["flops"] / 1e12, 3),
             "read_bandwidth_gbs_before": round(read_bandwidth()["best_gbs"], 1)}
    started = time.perf_counter()
    proc = subprocess.run([sys.executable, "-m", "posttrain.cli", "run", RECIPE, "--force", "--no-serve"])
    wall = time.perf_counter() - started
    state = json.loads((Path(pipe.output_dir) / "pipeline.json").read_text())
    result = {"exit_code": proc.returncode, "wall_s": round(wall, 1),
              "data": {k: {"seconds": v.get("seconds"), "rows": v.get("rows"), "kept": v.get("kept")}
                       for k, v in state.get("data", {}).items()},
              "stages": {k: {"verb": v.get("verb"), "status": v.get("status"), "seconds": v.get("seconds"),
                             "error": v.get("error")} for k, v in state["stages"].items()},
              "metrics": metric_table(state), "gates": {k: v.get("gates") for k, v in state["stages"].items()},
              **run_context(load_before, os.getloadavg(), "transformers", "peft")}
    result.update(speed, bf16_matmul_peak_tflops_after=round(best_matmul_peak()["flops"] / 1e12, 3),
                  read_bandwidth_gbs_after=round(read_bandwidth()["best_gbs"], 1))

    def table(r):
        print(f"demo pipeline: exit {r['exit_code']}, wall {r['wall_s'] / 60:.1f} min (goal: under 8 min on a "
              f"0.63 TFLOP/s, 19 GB/s machine)")
        print(f"this machine: bf16 matmul peak {r['bf16_matmul_peak_tflops_before']} / "
              f"{r['bf16_matmul_peak_tflops_after']} TFLOP/s, read bandwidth {r['read_bandwidth_gbs_before']} / "
              f"{r['read_bandwidth_gbs_after']} GB/s (before / after); load average "
              f"{r['load_average_before'][0]:.2f} -> {r['load_average_after'][0]:.2f}")
        print("| step | status | seconds |\n|---|---|---|")
        for name, d in r["data"].items():
            print(f"| data {name} ({d['rows']} -> {d['kept']} rows) | done | {d['seconds']} |")
        for name, s in r["stages"].items():
            print(f"| {name} ({s['verb']}) | {s['status']} | {s['seconds']} |")
        print(format_table(r["metrics"]))

    finish(result, RESULTS_DIR / "pipeline_demo.json", False, table)
    if proc.returncode:
        sys.exit(proc.returncode)


if __name__ == "__main__":
    main()

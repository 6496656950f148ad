"""`make demo` measured: the demo pipeline (recipes/pipeline_demo.yaml) on the default model.

Runs `posttrain run recipes/pipeline_demo.yaml --force --no-serve` as a subprocess (every step
re-run: data, SFT, DPO, int8, eval, deploy), times it, and reads `pipeline.json` for the
per-step seconds, the gate outcomes and the before/after metric table. The issue's bound:
under 15 minutes on 2 cores. Run from the repo root: `python bench/pipeline_demo.py`.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import RESULTS_DIR, finish, run_context  # noqa: E402

from posttrain.eval.report import format_table, metric_table  # noqa: E402
from posttrain.pipeline import load_pipeline  # noqa: E402

RECIPE = "recipes/pipeline_demo.yaml"


def main() -> None:
    pipe = load_pipeline(RECIPE)
    load_before = os.getloadavg()
    started = time.perf_counter()
    proc = subprocess.run([sys.executable, "-m", "posttrain.cli", "run", RECIPE, "--force", "--no-serve"])
    wall = time.perf_counter() - started
    state = json.loads((Path(pipe.output_dir) / "pipeline.json").read_text())
    result = {"exit_code": proc.returncode, "wall_s": round(wall, 1),
              "data": {k: {"seconds": v.get("seconds"), "rows": v.get("rows"), "kept": v.get("kept")}
                       for k, v in state.get("data", {}).items()},
              "stages": {k: {"verb": v.get("verb"), "status": v.get("status"), "seconds": v.get("seconds"),
                             "error": v.get("error")} for k, v in state["stages"].items()},
              "metrics": metric_table(state),
              **run_context(load_before, os.getloadavg(), "transformers", "peft")}

    def table(r):
        print(f"demo pipeline: exit {r['exit_code']}, wall {r['wall_s'] / 60:.1f} min (bound: 15 min)")
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

"""Pipeline report cost: time to write report.html (+ PNGs), its size, and Chromium's render time.

(1) a real two-stage tiny-model LoRA SFT pipeline (the one bench/pipeline.py runs), reported by
`write_pipeline_report`; (2) a synthetic DPO stage with a 5000-step metrics.jsonl (five curves), the
size a long run's log reaches; (3) headless Chromium screenshot of report (1), when chromium is
installed. Run from the repo root: `python bench/pipeline_report.py`.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import RESULTS_DIR, finish, run_context  # noqa: E402
from pipeline import tiny_pipeline  # noqa: E402

from posttrain.eval.report import write_pipeline_report  # noqa: E402


def timed_report(out: Path, repeats: int = 3) -> tuple[list[float], int, int]:
    """(seconds per write, HTML bytes, PNG count)."""
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        page = write_pipeline_report(out)
        times.append(time.perf_counter() - t0)
    return times, page.stat().st_size, len(list((out / "report").glob("*.png")))


def long_log(root: Path, steps: int = 5000) -> Path:
    out = root / "long"
    (out / "dpo").mkdir(parents=True)
    rows = [{"step": i, "loss": 0.69 / (1 + i / 500), "lr": 1e-6, "rewards/chosen": i / steps,
             "rewards/rejected": -i / steps, "rewards/margin": 2 * i / steps, "rewards/accuracy": 0.5 + i / (2 * steps)}
            for i in range(1, steps + 1)]
    (out / "dpo" / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (out / "pipeline.json").write_text(json.dumps({"name": "long", "stages": {"dpo": {
        "stage": "dpo", "verb": "dpo", "status": "done", "seconds": 1.0,
        "metrics_before": {"acc": 0.4}, "metrics": {"acc": 0.5}}}}))
    return out


def chromium_seconds(page: Path, shot: Path) -> float | None:
    exe = shutil.which("chromium")
    if exe is None:
        return None
    t0 = time.perf_counter()
    subprocess.run([exe, "--headless", "--no-sandbox", "--disable-gpu", f"--user-data-dir={shot.parent / 'profile'}",
                    f"--screenshot={shot}", "--window-size=1200,2000", page.as_uri()],
                   check=True, capture_output=True, timeout=120)
    return time.perf_counter() - t0


def main() -> None:
    load_before = os.getloadavg()
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        _, _, statuses = tiny_pipeline(root)
        tiny = timed_report(root / "out")
        long = timed_report(long_log(root))
        render = chromium_seconds(root / "out" / "report" / "report.html", root / "shot.png")
    result = {"tiny_pipeline_statuses": statuses, "tiny_report_s": tiny[0], "tiny_html_bytes": tiny[1],
              "tiny_pngs": tiny[2], "long_log_report_s": long[0], "long_log_html_bytes": long[1], "long_log_pngs": long[2],
              "chromium_screenshot_s": render,
              **run_context(load_before, os.getloadavg(), "matplotlib", "transformers")}

    def table(r):
        med = lambda xs: sorted(xs)[len(xs) // 2]  # noqa: E731
        print("| report of | write (median of 3) | HTML size | PNGs |\n|---|---|---|---|")
        print(f"| tiny 2-stage LoRA SFT pipeline | {med(r['tiny_report_s']):.2f} s | "
              f"{r['tiny_html_bytes'] / 1e3:.0f} KB | {r['tiny_pngs']} |")
        print(f"| one DPO stage, 5000-step metrics.jsonl | {med(r['long_log_report_s']):.2f} s | "
              f"{r['long_log_html_bytes'] / 1e3:.0f} KB | {r['long_log_pngs']} |")
        shot = r["chromium_screenshot_s"]
        print(f"| headless Chromium screenshot of the first | {'n/a' if shot is None else f'{shot:.2f} s'} | | |")

    finish(result, RESULTS_DIR / "pipeline_report.json", False, table)


if __name__ == "__main__":
    main()

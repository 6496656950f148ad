"""Run directories written by hand (no training), as stages and pipelines leave them."""

import json
import time
from pathlib import Path

import yaml


def stage_run(path: Path, stage="sft", lr=1e-3, steps=5, done=True, model="models/tiny", checkpoints=False,
              started="2026-01-02T03:04:05") -> Path:
    path.mkdir(parents=True, exist_ok=True)
    (path / "config.yaml").write_text(yaml.safe_dump({"stage": stage, "output_dir": str(path), "model": {"name": model},
                                                      "train": {"lr": lr, "max_steps": steps}}))
    (path / "metrics.jsonl").write_text("".join(
        json.dumps({"step": i + 1, "loss": 3.0 - 0.1 * i, "lr": lr, "tokens_per_s": 100.0}) + "\n" for i in range(steps)))
    if checkpoints:
        (path / "checkpoints" / "step-2").mkdir(parents=True)
        (path / "checkpoints" / "step-2" / "state.json").write_text("{}")
    if done:
        (path / "final").mkdir(exist_ok=True)
        (path / "eval_before.json").write_text(json.dumps({"acc": 0.25}))
        (path / "manifest.json").write_text(json.dumps({
            "stage": stage, "started": started, "seconds": 12.5,
            "outputs": {"train": {"steps": steps, "train_loss": 2.6}, "eval_before": {"acc": 0.25},
                        "eval_after": {"acc": 0.5}}}))
    return path


def pipeline_run(path: Path) -> Path:
    stage_run(path / "a")
    stage_run(path / "b", lr=5e-4)
    (path / "b" / "pipeline_stage.json").write_text(json.dumps({
        "status": "done", "gates": [{"metric": "acc", "min": 0.4, "max": None, "label": "acc", "value": 0.5,
                                     "passed": True}]}))
    (path / "pipeline.json").write_text(json.dumps({
        "name": "demo", "plan": [{"stage": "a", "verb": "sft"}, {"stage": "b", "verb": "sft"},
                                 {"stage": "c", "verb": "dpo"}],
        "stages": {"a": {"verb": "sft", "status": "done", "seconds": 3.0, "metrics": {"acc": 0.5},
                         "metrics_before": {"acc": 0.25}},
                   "b": {"verb": "sft", "status": "failed_gate", "seconds": 2.0, "metrics": {"acc": 0.3},
                         "error": "gate failed after stage b: metric acc = 0.3 < min 0.4",
                         "gates": [{"metric": "acc", "min": 0.4, "label": "acc", "value": 0.3, "passed": False}]}}}))
    return path


def job(path: Path, state="running", pid=999999, verb="sft", returncode=None) -> dict:
    record = {"verb": verb, "args": ["--config", "x.yaml"], "command": f"posttrain {verb} --config x.yaml", "pid": pid,
              "started": time.time() - 5, "ended": None if state == "running" else time.time(),
              "returncode": returncode, "state": state}
    (path / "ui").mkdir(parents=True, exist_ok=True)
    (path / "ui" / "job.json").write_text(json.dumps(record))
    return record

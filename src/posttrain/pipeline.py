"""Pipeline runner: one YAML chains stages (sft -> dpo -> quantize -> export ...).

Each stage is built exactly like `posttrain VERB --config RECIPE key=value`, writes its run
dir under `<output_dir>/<stage name>`, and reads the previous stage's run dir as its model.
A fingerprint (resolved config + input fingerprint + data content hashes) makes a re-run
skip unchanged stages and resume a stage that did not finish; gates stop the run when a
metric falls outside its bounds.
"""

from __future__ import annotations

import hashlib
import json
import time
from pathlib import Path
from typing import Any, Literal

from pydantic import Field, ValidationError, model_validator

from posttrain.config import Strict, build_config, format_validation_error, load_yaml
from posttrain.fileio import write_json_atomic

VERBS = ("sft", "pretrain", "rm", "dpo", "online-dpo", "ppo", "grpo", "rloo", "distill", "prune", "quantize",
         "export")


class Gate(Strict):
    """Bounds on one metric; relative_to_previous compares the change from the stage's input."""

    metric: str
    min: float | None = None
    max: float | None = None
    relative_to_previous: bool = False

    @model_validator(mode="after")
    def _check(self) -> "Gate":
        if self.min is None and self.max is None:
            raise ValueError(f"gate on {self.metric!r} needs min or max")
        return self


class StageSpec(Strict):
    name: str = Field(..., pattern=r"^[A-Za-z0-9_.-]+$", description="unique; also the run dir name")
    verb: Literal[VERBS]
    config: str | None = Field(None, description="recipe YAML, as for `posttrain VERB --config`")
    overrides: dict[str, Any] = Field(default_factory=dict, description="dotted key -> value")
    gate: list[Gate] = Field(default_factory=list)


class PipelineConfig(Strict):
    name: str
    output_dir: str
    model: str = Field("default", description="the first stage's input model spec")
    stages: list[StageSpec] = Field(..., min_length=1)

    @model_validator(mode="after")
    def _check(self) -> "PipelineConfig":
        seen = set()
        for stage in self.stages:
            if stage.name in seen:
                raise ValueError(f"stage name {stage.name!r} is used twice; names must be unique")
            seen.add(stage.name)
            if "output_dir" in stage.overrides:
                raise ValueError(f"stage {stage.name!r}: output_dir is set by the pipeline (<output_dir>/<name>)")
        return self


def load_pipeline(path: str | Path) -> PipelineConfig:
    try:
        return PipelineConfig.model_validate(load_yaml(path))
    except ValidationError as exc:
        raise ValueError(format_validation_error(exc, str(path))) from None


def stage_config(pipe: PipelineConfig, index: int):
    """(config, run fn) of stage `index`, built like the CLI builds it."""
    from posttrain.cli import RL_VERBS, _stage

    spec = pipe.stages[index]
    cls, run = _stage(spec.verb)
    overrides = []
    if spec.verb == "pretrain" or spec.verb in RL_VERBS:
        overrides.append(f"stage={spec.verb}")
    if "model.name" not in spec.overrides:
        previous = str(Path(pipe.output_dir) / pipe.stages[index - 1].name) if index else pipe.model
        overrides.append(f"model.name={json.dumps(previous)}")
    overrides.append(f"output_dir={json.dumps(str(Path(pipe.output_dir) / spec.name))}")
    overrides += [f"{k}={json.dumps(v)}" for k, v in spec.overrides.items()]  # JSON is valid YAML
    try:
        return build_config(cls, spec.config, overrides), run
    except ValueError as exc:
        raise ValueError(f"stage {spec.name!r} ({spec.verb}): {exc}") from None


def model_fingerprint(spec: str) -> str:
    """Content hash of a local model (dir or file), else the spec itself (a hub id)."""
    from posttrain.models import resolve_model_path
    from posttrain.stage import content_hash

    try:
        return content_hash(resolve_model_path(spec)) or spec
    except ValueError:
        return spec


def data_hashes(cfg) -> dict[str, str]:
    """Content hashes of every existing file the config names outside `model` and `output_dir`
    (data, eval tasks, calibration, EWC reference, ...); directories are not hashed."""
    from posttrain.stage import content_hash

    found: dict[str, str] = {}

    def walk(node):
        if isinstance(node, dict):
            for value in node.values():
                walk(value)
        elif isinstance(node, list):
            for value in node:
                walk(value)
        elif isinstance(node, str) and Path(node).is_file():
            found[node] = content_hash(node)

    walk({k: v for k, v in cfg.model_dump(mode="json").items() if k not in ("model", "output_dir")})
    return found


def fingerprint(cfg, input_fp: str) -> str:
    blob = json.dumps({"config": cfg.model_dump(mode="json"), "input": input_fp, "data": data_hashes(cfg)},
                      sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()


def merge_input(cfg, stage_dir: Path, reuse: bool) -> None:
    """Point cfg.model.name at a merged copy when it is a run dir holding a PEFT adapter.

    A stage applies its own adapter (or quantizes, prunes) on a plain model, so an
    adapter input is folded into `<stage dir>/input_merged` first; export merges itself.
    """
    from posttrain.adapters import merge_adapter
    from posttrain.models import load_model, resolve_model_path, save_model

    src = Path(cfg.model.name)
    if cfg.stage == "export" or not src.is_dir() or not (Path(resolve_model_path(src)) / "adapter_config.json").is_file():
        return
    out = stage_dir / "input_merged"
    if not (reuse and (out / "config.json").is_file()):
        model, tok = load_model(str(src), dtype="auto")
        save_model(merge_adapter(model), tok, out)
        print(f"merged the adapter of {src} into {out}")
    cfg.model.name = str(out)


def lookup_metric(metrics: dict, outputs: dict, name: str) -> float | None:
    """A metric from eval_after, else a dotted path into the manifest outputs."""
    if name in metrics:
        return metrics[name]
    node: Any = outputs
    for part in name.split("."):
        if not isinstance(node, dict) or part not in node:
            return None
        node = node[part]
    return node if isinstance(node, (int, float)) else None


def check_gates(spec: StageSpec, record: dict, previous: dict | None) -> None:
    """Raise ValueError naming the first gate the stage's metrics fail."""
    for gate in spec.gate:
        value = lookup_metric(record["metrics"], record.get("outputs", {}), gate.metric)
        if value is None:
            raise ValueError(f"gate after stage {spec.name}: metric {gate.metric!r} not found; "
                             f"available: {sorted(record['metrics'])}")
        label = gate.metric
        if gate.relative_to_previous:
            base = (previous or {}).get(gate.metric, record.get("metrics_before", {}).get(gate.metric))
            if base is None:
                raise ValueError(f"gate after stage {spec.name}: no previous value of {gate.metric!r} to compare to")
            value, label = value - base, f"{gate.metric} - previous ({base:.4g})"
        if gate.min is not None and value < gate.min:
            raise ValueError(f"gate failed after stage {spec.name}: metric {label} = {value:.4g} < min {gate.min}")
        if gate.max is not None and value > gate.max:
            raise ValueError(f"gate failed after stage {spec.name}: metric {label} = {value:.4g} > max {gate.max}")


def run_pipeline(pipe: PipelineConfig, force: bool = False) -> dict:
    """Run (or skip, or resume) each stage in order; returns the pipeline state."""
    out = Path(pipe.output_dir)
    state = {"name": pipe.name, "stages": {}}
    built = [stage_config(pipe, i) for i in range(len(pipe.stages))]  # every config valid before any runs
    input_fp, previous_metrics = model_fingerprint(pipe.model), None
    for spec, (cfg, run) in zip(pipe.stages, built):
        if "model.name" in spec.overrides:
            input_fp = model_fingerprint(cfg.model.name)
        fp = fingerprint(cfg, input_fp)
        record_path = out / spec.name / "pipeline_stage.json"
        old = json.loads(record_path.read_text()) if record_path.exists() else None
        same = old is not None and old.get("fingerprint") == fp and not force
        if same and old["status"] in ("done", "failed_gate"):
            record = {**{k: v for k, v in old.items() if k != "error"}, "status": "skipped"}  # gates re-checked
            print(f"[{spec.name}] skipped (unchanged)")
        else:
            # started with the same inputs and left checkpoints: continue from them (else start over)
            resume = same and (out / spec.name / "checkpoints").is_dir()
            print(f"[{spec.name}] {spec.verb}: {'resuming' if resume else 'running'}")
            record = {"stage": spec.name, "verb": spec.verb, "fingerprint": fp, "status": "running"}
            write_json_atomic(record_path, record)
            started = time.time()
            try:
                merge_input(cfg, out / spec.name, reuse=resume)
                manifest = run(cfg, resume=resume, overwrite=not resume)
            except Exception as exc:
                record.update(status="error", error=f"{type(exc).__name__}: {exc}",
                              seconds=round(time.time() - started, 1))
                write_json_atomic(record_path, record)
                state["stages"][spec.name] = record
                write_json_atomic(out / "pipeline.json", state)
                raise
            outputs = (manifest or {}).get("outputs", {})
            record.update(status="done", seconds=round(time.time() - started, 1),
                          metrics=outputs.get("eval_after") or {}, metrics_before=outputs.get("eval_before") or {},
                          outputs=json.loads(json.dumps(outputs, default=str)))
        try:
            check_gates(spec, record, previous_metrics)
        except ValueError as exc:
            record.update(status="failed_gate", error=str(exc))
            raise
        finally:
            write_json_atomic(record_path, {**record, "status": "failed_gate" if record["status"] == "failed_gate"
                                            else "done"})
            state["stages"][spec.name] = record
            write_json_atomic(out / "pipeline.json", state)
        input_fp, previous_metrics = fp, record["metrics"]
    return state

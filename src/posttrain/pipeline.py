"""Pipeline runner: one YAML is the whole loop, data -> model -> stages -> gates -> deploy.

- `data:` entries load files (any format `load_records` reads) or `feedback:DB` sources (the
  feedback a `posttrain serve` database holds: choices as preference pairs, or ratings as KTO
  examples with `kind: unpaired`), add synthetic rows (`posttrain synth` recipes) and run the
  filters; each writes `<output_dir>/data/NAME.jsonl`, which stage overrides name as `${data.NAME}`.
- `model:` is the first stage's input, and its `dtype`/`adapter` (LoRA, freezing, ...)
  initialise every stage that trains; `eval:` is one evaluation every stage runs, so the
  metric table compares like with like (only the first stage also evaluates its input).
- Each stage is built exactly like `posttrain VERB --config RECIPE key=value`, writes its
  run dir under `<output_dir>/<stage name>`, and reads the previous stage's model. An
  `eval` stage evaluates that model without changing it.
- `deploy:` exports a stage's model (adapters merged, HF dir and GGUF files) as the last
  stage, `<output_dir>/deploy`, and `posttrain run` can then serve it. Or, with `swap_into`,
  the source stage's LoRA adapter is posted to a running `posttrain serve` (its
  `/admin/adapters`) once every gate has passed: the loop from served feedback back into the
  server, without a restart.

A fingerprint (resolved config + input fingerprint + data content hashes) makes a re-run
skip unchanged steps and resume a stage that did not finish; gates stop the run when a
metric falls outside its bounds.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import time
from pathlib import Path
from typing import Any, Literal

from pydantic import Field, ValidationError, ValidationInfo, field_validator, model_validator

from posttrain.config import Strict, build_config, format_validation_error, load_yaml
from posttrain.eval.suite import EvalConfig
from posttrain.fileio import write_json_atomic
from posttrain.stages import PIPELINE_ROLES, STAGES, verbs

VERBS = verbs(*PIPELINE_ROLES)
DATA_REF = re.compile(r"\$\{data\.([A-Za-z0-9_.-]+)\}")
FEEDBACK = "feedback:"  # a data source read from a feedback database (SQLite path or postgresql:// URL)


class Gate(Strict):
    """Bounds on one metric; relative_to_previous compares the change from the stage's input."""

    metric: str = Field(..., description="an eval task's name (arithmetic_em), general_ppl, or a dotted path "
                                         "into the stage's manifest outputs (train.train_loss)")
    min: float | None = Field(None, description="the metric (or its change) must be at least this")
    max: float | None = Field(None, description="the metric (or its change) must be at most this")
    relative_to_previous: bool = Field(False, description="bound the change from the stage's input model")

    @field_validator("metric")
    @classmethod
    def _named(cls, v: str) -> str:
        if not v.strip():
            raise ValueError("give the metric's name: an eval task (arithmetic_em), general_ppl, or a dotted "
                             "path into the stage's outputs (train.train_loss)")
        return v

    @field_validator("max")
    @classmethod
    def _not_below_min(cls, v: float | None, info: ValidationInfo) -> float | None:
        low = info.data.get("min")
        if v is not None and low is not None and v < low:
            raise ValueError(f"max {v:g} is below min {low:g}: no value passes this gate")
        return v

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
    eval: bool = Field(True, description="run the pipeline's eval section in this stage")
    gate: list[Gate] = Field(default_factory=list)


class DataPrep(Strict):
    """One prepared dataset: source rows, then synthetic rows, then the filters."""

    source: str | list[str] = Field(default_factory=list, description="files or `datasets` dirs, concatenated; "
                                    "feedback:DB reads a `posttrain serve` feedback database (SQLite file or "
                                    "postgresql:// URL): choices as preference pairs, or ratings with kind: unpaired")
    kind: Literal["chat", "completion", "text", "preference", "prompt", "unpaired"] | None = None
    synth: str | None = Field(None, description="a `posttrain synth` recipe; its rows are appended")
    synth_overrides: dict[str, Any] = Field(default_factory=dict, description="dotted key -> value")
    filters: str | dict[str, Any] | None = Field(None, description="filter rules: a YAML path or the rules inline")

    @model_validator(mode="after")
    def _check(self) -> "DataPrep":
        if isinstance(self.source, str):
            self.source = [self.source]
        if not self.source and not self.synth:
            raise ValueError("a data entry needs source (files) or synth (a synth recipe), or both")
        if self.synth_overrides and not self.synth:
            raise ValueError("synth_overrides needs synth: a `posttrain synth` recipe to override")
        if "output" in self.synth_overrides:
            raise ValueError("synth_overrides.output is set by the pipeline")
        for src in self.source:
            if src.startswith(FEEDBACK) and not src[len(FEEDBACK):].strip():
                raise ValueError(f"source {src!r}: give the database, e.g. feedback:runs/x/serve/feedback.db")
        if any(src.startswith(FEEDBACK) for src in self.source) and self.kind not in (None, "preference", "unpaired"):
            raise ValueError(f"kind {self.kind!r}: a feedback source gives preference pairs (choices) or "
                             "unpaired examples (ratings, kind: unpaired)")
        return self


class ModelInit(Strict):
    """The input model, and how every training stage initialises it (unless its overrides say otherwise)."""

    name: str = "default"
    dtype: str | None = Field(None, description="model.dtype of every stage")
    adapter: dict[str, Any] | None = Field(None, description="adapter section of every stage that trains one: "
                                                             "{method: lora, r: 16} or {method: freeze, ...}")


class ServeSpec(Strict):
    host: str = "127.0.0.1"
    port: int = Field(8000, ge=1, le=65535)
    feedback_db: str | None = Field(None, description="replies and feedback: a SQLite file, a postgresql:// URL "
                                                      "or 'off' (default: <output_dir>/deploy/serve/feedback.db)")
    args: list[str] = Field(default_factory=list, description="more `posttrain serve` flags")


SWAP_KEY_ENV = "POSTTRAIN_ADMIN_KEY"


class DeploySpec(Strict):
    source: str | None = Field(None, description="the stage whose model is deployed (default: the last one "
                                                 "that makes a model)")
    config: str | None = Field(None, description="an export recipe (recipes/export.yaml)")
    formats: list[str] | None = Field(None, description="hf = adapters merged into a transformers dir (default: "
                                                        "[hf, gguf-q8_0]; with swap_into: [] = no export)")
    overrides: dict[str, Any] = Field(default_factory=dict)
    serve: ServeSpec | None = Field(None, description="serve the exported model after the run (`--no-serve` skips)")
    gate: list[Gate] = Field(default_factory=list)
    swap_into: str | None = Field(None, description="http://host:port of a running `posttrain serve`: post the "
                                                    "source stage's LoRA adapter to its /admin/adapters (after every "
                                                    "gate passed) instead of serving a new model")
    swap_name: str | None = Field(None, description="the adapter's name on that server (default: the pipeline's "
                                                    "name); requests pick it with model: NAME")
    swap_key_env: str = Field(SWAP_KEY_ENV, description="environment variable holding that server's admin key")
    swap_reset_baseline: bool = Field(False, description="the server's drift baselines of swap_name start over")

    @model_validator(mode="after")
    def _check(self) -> "DeploySpec":
        if self.swap_into is not None:
            if not re.match(r"^https?://[^/\s]+/?$", self.swap_into):
                raise ValueError(f"swap_into: {self.swap_into!r} is not a server address like http://127.0.0.1:8000")
            if self.serve is not None:
                raise ValueError("swap_into posts the adapter to a running server; serve starts a new one: "
                                 "choose one")
            if not self.swap_key_env.strip():
                raise ValueError("swap_key_env: give the environment variable that holds the admin key")
        else:
            for key in ("swap_name", "swap_reset_baseline"):
                if getattr(self, key):
                    raise ValueError(f"{key} needs swap_into (the server to swap the adapter into)")
            if self.formats == []:
                raise ValueError("formats: empty; a deploy without swap_into exports at least one format")
        if self.formats == [] and self.gate:
            raise ValueError("gate: with formats: [] there is no export stage to gate; gate the source stage")
        return self

    def export_formats(self) -> list[str]:
        if self.formats is not None:
            return self.formats
        return [] if self.swap_into else ["hf", "gguf-q8_0"]


class PipelineConfig(Strict):
    name: str
    output_dir: str
    data: dict[str, DataPrep] = Field(default_factory=dict)
    model: ModelInit = Field(default_factory=ModelInit, description="a model spec, or {name, dtype, adapter}")
    eval: dict[str, Any] | None = Field(None, description="the eval section every stage runs (tasks, forgetting)")
    stages: list[StageSpec] = Field(..., min_length=1)
    deploy: DeploySpec | None = None

    @model_validator(mode="before")
    @classmethod
    def _model_spec(cls, data: Any) -> Any:
        if isinstance(data, dict) and isinstance(data.get("model"), str):
            data = {**data, "model": {"name": data["model"]}}
        return data

    @model_validator(mode="after")
    def _check(self) -> "PipelineConfig":
        if self.eval is not None:
            EvalConfig.model_validate(self.eval)
        names = [s.name for s in self.stages]
        if self.deploy is not None:
            if "deploy" in names:
                raise ValueError("stage name 'deploy' is taken by the deploy section")
            makers = _model_makers(self.stages)
            if self.deploy.source is not None and self.deploy.source not in makers:
                raise ValueError(f"deploy.source {self.deploy.source!r} is not a stage that makes a model; "
                                 f"choose one of {makers}")
            if self.deploy.source is None and not makers:
                raise ValueError("deploy: no stage makes a model to deploy")
            if self.deploy.swap_into is not None:
                self._check_swap(makers)
        seen = set()
        for stage in self.all_stages():
            if stage.name in seen:
                raise ValueError(f"stage name {stage.name!r} is used twice; names must be unique")
            seen.add(stage.name)
            if "output_dir" in stage.overrides:
                raise ValueError(f"stage {stage.name!r}: output_dir is set by the pipeline (<output_dir>/<name>)")
            for ref in DATA_REF.findall(json.dumps(stage.overrides)):
                if ref not in self.data:
                    raise ValueError(f"stage {stage.name!r}: ${{data.{ref}}} names no entry of data: "
                                     f"{sorted(self.data) or 'none defined'}")
        return self

    def _check_swap(self, makers: list[str]) -> None:
        """A swapped adapter must be a LoRA adapter over the served base: the source stage trains one
        and reads the pipeline's input model itself (after an adapter stage, a stage trains over a
        merged copy, and its adapter means nothing without that stage's weights)."""
        source = self.deploy.source or makers[-1]
        index = next(i for i, s in enumerate(self.stages) if s.name == source)
        if STAGES.get(self.stages[index].verb).role != "model" or self.stages[index].verb == "rm":
            raise ValueError(f"deploy.swap_into: stage {source!r} ({self.stages[index].verb}) does not train an "
                             "adapter; swap a training stage's LoRA adapter")
        reads = input_model(self, index)
        if reads != self.model.name:
            raise ValueError(f"deploy.swap_into: stage {source!r} trains over {reads}, not over the pipeline's "
                             f"model {self.model.name!r} that the server serves, so its adapter does not apply "
                             "there; swap a stage that reads model.name, or deploy a merged model (deploy.serve)")

    def all_stages(self) -> list[StageSpec]:
        """The stages, then the deploy section as one more: an export of the chosen stage's model
        (none when deploy only swaps an adapter into a running server)."""
        if self.deploy is None or not self.deploy.export_formats():
            return list(self.stages)
        source = self.deploy.source or _model_makers(self.stages)[-1]
        overrides = {"model.name": str(Path(self.output_dir) / source), "formats": self.deploy.export_formats(),
                     **self.deploy.overrides}
        return [*self.stages, StageSpec(name="deploy", verb="export", config=self.deploy.config,
                                        overrides=overrides, gate=self.deploy.gate)]


def _model_makers(stages: list[StageSpec]) -> list[str]:
    """Names of the stages whose output is a new model (deploy sources)."""
    return [s.name for s in stages if STAGES.get(s.verb).role in ("model", "compress")]


def load_pipeline(path: str | Path) -> PipelineConfig:
    try:
        return PipelineConfig.model_validate(load_yaml(path))
    except ValidationError as exc:
        raise ValueError(format_validation_error(exc, str(path))) from None


def data_path(pipe: PipelineConfig, name: str) -> Path:
    return Path(pipe.output_dir) / "data" / f"{name}.jsonl"


def input_model(pipe: PipelineConfig, index: int) -> str:
    """The model stage `index` reads: the last earlier stage that made one (eval stages pass theirs on)."""
    stages = pipe.all_stages()
    for prev in reversed(stages[:index]):
        if STAGES.get(prev.verb).role != "eval":
            return str(Path(pipe.output_dir) / prev.name)
    return pipe.model.name


def stage_config(pipe: PipelineConfig, index: int):
    """(config, run fn) of stage `index`, built like the CLI builds it, plus the pipeline's
    model initialisation and eval section where the stage's config has those fields."""
    spec = pipe.all_stages()[index]
    cls, run = STAGES.get(spec.verb).load()
    overrides = [f"{k}={json.dumps(v)}" for k, v in stage_settings(pipe, index).items()]  # JSON is valid YAML
    try:
        return build_config(cls, spec.config, overrides), run
    except ValueError as exc:
        raise ValueError(f"stage {spec.name!r} ({spec.verb}): {exc}") from None


def stage_settings(pipe: PipelineConfig, index: int) -> dict[str, Any]:
    """The dotted keys the pipeline sets over stage `index`'s recipe: the verb's presets, the input
    model, the pipeline's model initialisation and eval section, output_dir, then the stage's
    overrides (with ${data.NAME} resolved)."""
    stages = pipe.all_stages()
    spec = stages[index]
    entry = STAGES.get(spec.verb)
    fields = entry.load()[0].model_fields
    sets: dict[str, Any] = dict(entry.presets)
    sets["model.name"] = input_model(pipe, index)
    if pipe.model.dtype is not None and entry.role != "export":
        sets["model.dtype"] = pipe.model.dtype
    if pipe.model.adapter is not None and "adapter" in fields:
        sets.update({f"adapter.{k}": v for k, v in pipe.model.adapter.items()})
    if pipe.eval is not None and spec.eval and "eval" in fields:
        first = next(i for i, s in enumerate(stages) if s.eval and "eval" in STAGES.get(s.verb).load()[0].model_fields)
        sets["eval"] = {**pipe.eval, "before": index == first and entry.role != "eval"}
    sets["output_dir"] = str(Path(pipe.output_dir) / spec.name)
    refs = {name: json.dumps(str(data_path(pipe, name)))[1:-1] for name in pipe.data}  # escaped inside JSON
    sets.update(json.loads(DATA_REF.sub(lambda m: refs[m.group(1)], json.dumps(spec.overrides))))
    return sets


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
    adapter input is folded into `<stage dir>/input_merged` first; export merges itself and
    an eval stage loads the adapter as it is.
    """
    from posttrain.adapters import merge_adapter
    from posttrain.models import load_model, resolve_model_path, save_model

    src = Path(cfg.model.name)
    if cfg.stage in ("export", "eval") or not src.is_dir() or not (Path(resolve_model_path(src)) / "adapter_config.json").is_file():
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
    """Raise ValueError naming the first gate the stage's metrics fail; record["gates"] lists the outcomes."""
    record["gates"] = []
    for gate in spec.gate:
        value = lookup_metric(record["metrics"], record.get("outputs", {}), gate.metric)
        outcome = {**gate.model_dump(), "label": gate.metric, "value": value, "passed": False}
        record["gates"].append(outcome)
        if value is None:
            raise ValueError(f"gate after stage {spec.name}: metric {gate.metric!r} not found; "
                             f"available: {sorted(record['metrics'])}")
        label = gate.metric
        if gate.relative_to_previous:
            base = (previous or {}).get(gate.metric, record.get("metrics_before", {}).get(gate.metric))
            if base is None:
                raise ValueError(f"gate after stage {spec.name}: no previous value of {gate.metric!r} to compare to")
            value, label = value - base, f"{gate.metric} - previous ({base:.4g})"
            outcome.update(label=label, value=value)
        if gate.min is not None and value < gate.min:
            raise ValueError(f"gate failed after stage {spec.name}: metric {label} = {value:.4g} < min {gate.min}")
        if gate.max is not None and value > gate.max:
            raise ValueError(f"gate failed after stage {spec.name}: metric {label} = {value:.4g} > max {gate.max}")
        outcome["passed"] = True


def feedback_source(name: str, src: str, kind: str) -> list[dict]:
    """The records of a `feedback:DB` source (`posttrain feedback export` without the filters,
    which prepare_data runs on the whole entry)."""
    from posttrain.data.feedback import feedback_records

    try:
        records, report = feedback_records(src[len(FEEDBACK):], kind)
    except (ValueError, FileNotFoundError) as exc:
        raise ValueError(f"data {name!r}: source {src}: {exc}") from None
    if not records:
        what = "choices between two replies" if kind == "preference" else "ratings"
        raise ValueError(f"data {name!r}: source {src} holds no usable {what} ({report['feedback_rows']} "
                         f"feedback rows, skipped: {report['skipped'] or 'none'})")
    return records


def prepare_data(pipe: PipelineConfig, name: str, force: bool = False) -> dict:
    """Write `<output_dir>/data/NAME.jsonl` (skipped when its inputs are unchanged); returns its record."""
    from posttrain.data.feedback import records_digest
    from posttrain.data.filters import filter_file, load_rules
    from posttrain.data.formats import load_records
    from posttrain.generate.synth import SynthConfig, run_synth
    from posttrain.fileio import write_text_atomic
    from posttrain.stage import content_hash
    from posttrain.train.reward_model import filter_scorer

    spec, path = pipe.data[name], data_path(pipe, name)
    synth_cfg = None
    if spec.synth:
        sets = {**spec.synth_overrides, "output": str(path.with_suffix(".synth.jsonl"))}
        try:
            synth_cfg = build_config(SynthConfig, spec.synth, [f"{k}={json.dumps(v)}" for k, v in sets.items()])
        except ValueError as exc:
            raise ValueError(f"data {name!r} (synth): {exc}") from None
    rules = spec.filters if isinstance(spec.filters, dict) else load_rules(spec.filters).model_dump(mode="json") \
        if spec.filters else None
    feedback = {}  # feedback source -> its records, read now: the database's content is the fingerprint
    for src in spec.source:
        if src.startswith(FEEDBACK):
            feedback[src] = feedback_source(name, src, spec.kind or "preference")
        elif not Path(src).exists():
            raise ValueError(f"data {name!r}: source {src} does not exist")
    if feedback and rules is None:  # raw user traffic: never unfiltered (dedup, PII redaction)
        rules = load_rules(None).model_dump(mode="json")
    blob = {"spec": spec.model_dump(mode="json"), "rules": rules,
            "sources": {src: records_digest(feedback[src]) if src in feedback else content_hash(src)
                        for src in spec.source},
            "synth": synth_cfg and {"config": synth_cfg.model_dump(mode="json"), "data": data_hashes(synth_cfg),
                                    "teacher": model_fingerprint(synth_cfg.teacher.name)}}
    fp = hashlib.sha256(json.dumps(blob, sort_keys=True, default=str).encode()).hexdigest()
    record_path = path.with_suffix(".json")
    old = json.loads(record_path.read_text()) if record_path.exists() else None
    if old and old.get("fingerprint") == fp and path.is_file() and not force:
        print(f"[data {name}] skipped (unchanged)")
        return {**old, "status": "skipped"}
    print(f"[data {name}] preparing")
    started = time.time()
    rows, kind, counts = [], None, {}  # counts: rows per source file, then "synth"
    for src in spec.source:
        if src in feedback:
            loaded_kind, records = spec.kind or "preference", feedback[src]
        else:
            loaded = load_records(src, kind=spec.kind)
            loaded_kind, records = loaded.kind, loaded.records
        if kind is not None and loaded_kind != kind:
            raise ValueError(f"data {name!r}: {src} holds {loaded_kind} rows, the sources before it "
                             f"{kind} rows; one entry holds one kind")
        kind = loaded_kind
        counts[src] = len(records)
        rows += records
    if synth_cfg is not None:
        if kind not in (None, "chat"):
            raise ValueError(f"data {name!r}: synth writes chat rows, the sources hold {kind} rows; "
                             "one entry holds one kind")
        result = run_synth(synth_cfg, make_scorer=filter_scorer)
        counts["synth"] = len(result.rows)
        rows += result.rows
    text = "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows)
    if rules is None:
        write_text_atomic(path, text)
        kept, dropped = len(rows), 0
    else:
        raw = path.with_suffix(".raw.jsonl")
        write_text_atomic(raw, text)
        result = filter_file(raw, path, rules, report_path=path.with_suffix(".filter.json"),
                             scorer=filter_scorer(rules))
        kept, dropped = len(result.kept), len(result.dropped)
    record = {"name": name, "status": "done", "fingerprint": fp, "path": str(path), "kind": kind or "chat",
              "rows": len(rows), "kept": kept, "dropped": dropped, "counts": counts, "seconds": round(time.time() - started, 1)}
    write_json_atomic(record_path, record)
    print(f"[data {name}] {len(rows)} rows -> {kept} kept ({dropped} dropped by the filters): {path}")
    return record


# ================================================================================ swap into a server


def swap_key(pipe: PipelineConfig) -> str:
    env = pipe.deploy.swap_key_env
    key = os.environ.get(env, "").strip()
    if not key:
        raise ValueError(f"deploy.swap_into: the environment variable {env} (deploy.swap_key_env) is not set; it "
                         f"holds the admin key of the server at {pipe.deploy.swap_into} (posttrain serve --admin-key)")
    return key


def admin_call(url: str, method: str, key: str, body: dict | None = None, timeout: float = 600) -> dict:
    """One request to a server's /admin/adapters; a refusal or an unreachable server raises ValueError."""
    import urllib.error
    import urllib.request

    target = url.rstrip("/") + "/admin/adapters"
    data = json.dumps(body).encode() if body is not None else None
    request = urllib.request.Request(target, data=data, method=method, headers={
        "Authorization": f"Bearer {key}", "Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=timeout) as answer:
            return json.loads(answer.read() or b"{}")
    except urllib.error.HTTPError as exc:
        text = exc.read().decode(errors="replace")
        try:
            message = json.loads(text)["error"]["message"]
        except (ValueError, KeyError, TypeError):
            message = text[:500] or exc.reason
        raise ValueError(f"deploy.swap_into: {method} {target} answered {exc.code}: {message}") from None
    except (urllib.error.URLError, OSError) as exc:
        raise ValueError(f"deploy.swap_into: cannot reach {target}: {getattr(exc, 'reason', exc)}") from None


def source_stage(pipe: PipelineConfig) -> str:
    return pipe.deploy.source or _model_makers(pipe.stages)[-1]


def check_swap_target(pipe: PipelineConfig, built: list) -> None:
    """Before anything trains: the source stage trains a LoRA adapter, the admin key is set, and
    the server answers it and serves the pipeline's base model (where both paths are known)."""
    from posttrain.models import resolve_model_path

    source = source_stage(pipe)
    cfg = built[[s.name for s in pipe.all_stages()].index(source)][0]
    method = getattr(getattr(cfg, "adapter", None), "method", None)
    if method not in ("lora", "dora"):
        raise ValueError(f"deploy.swap_into: stage {source!r} trains adapter.method {method!r}; a hot swap takes "
                         "a LoRA adapter (model.adapter: {method: lora} or the stage's adapter.method)")
    listing = admin_call(pipe.deploy.swap_into, "GET", swap_key(pipe), timeout=30)
    served = (listing.get("base") or {}).get("path")
    try:
        ours = resolve_model_path(pipe.model.name)
    except ValueError:
        ours = None
    if served and ours and Path(served).exists() and Path(ours).exists() and \
            os.path.realpath(served) != os.path.realpath(ours):
        raise ValueError(f"deploy.swap_into: the server at {pipe.deploy.swap_into} serves {served}, this pipeline "
                         f"trains adapters over {ours} (model.name {pipe.model.name!r}); they would not apply")


def swap_adapter(pipe: PipelineConfig) -> dict:
    """Post the source stage's adapter to the server (skipped when the server already serves these
    exact files under that name); returns the record for pipeline.json."""
    from posttrain.models import resolve_model_path
    from posttrain.stage import content_hash

    source = source_stage(pipe)
    name = pipe.deploy.swap_name or pipe.name
    path = Path(resolve_model_path(Path(pipe.output_dir) / source)).resolve()
    if not (path / "adapter_config.json").is_file():
        raise ValueError(f"deploy.swap_into: {path} holds no PEFT adapter (adapter_config.json); stage {source!r} "
                         "did not save a LoRA adapter")
    key, started = swap_key(pipe), time.time()
    fingerprint = content_hash(path)
    listing = admin_call(pipe.deploy.swap_into, "GET", key, timeout=30)
    current = next((a for a in listing.get("data", []) if a.get("name") == name), None)
    record = {"url": pipe.deploy.swap_into, "name": name, "source": source, "path": str(path),
              "fingerprint": fingerprint}
    if current is not None and current.get("fingerprint") == fingerprint:
        print(f"[swap] skipped: {pipe.deploy.swap_into} already serves these weights as {name!r} "
              f"(version {current.get('version')})")
        return {**record, "status": "skipped", "version": current.get("version")}
    print(f"[swap] posting {path} to {pipe.deploy.swap_into} as {name!r}")
    answer = admin_call(pipe.deploy.swap_into, "POST", key, {"name": name, "path": str(path),
                                                             "reset_baseline": pipe.deploy.swap_reset_baseline})
    print(f"[swap] {name!r} version {answer.get('version')} serving"
          + (f" (replaced version {answer['replaced']['version']})" if answer.get("replaced") else ""))
    return {**record, "status": "swapped", "version": answer.get("version"),
            "replaced": (answer.get("replaced") or {}).get("version"), "seconds": round(time.time() - started, 1)}


def stage_fingerprint(cfg, fps: dict[str, str]) -> str:
    """A stage's fingerprint: its config, its input model's weights and, when the input is an earlier
    stage of this run (`fps`: run dir -> fingerprint), that stage's inputs too (a LoRA dir does not
    hold its base), and the content of its data files."""
    return fingerprint(cfg, f"{fps.get(cfg.model.name, '')}:{model_fingerprint(cfg.model.name)}")


def stage_action(out: Path, name: str, old: dict | None, fp: str, force: bool = False) -> str:
    """skip (unchanged since it finished), resume (same inputs, left checkpoints) or run."""
    same = old is not None and old.get("fingerprint") == fp and not force
    if same and old.get("status") in ("done", "failed_gate"):
        return "skip"
    return "resume" if same and (out / name / "checkpoints").is_dir() else "run"


def plan_pipeline(pipe: PipelineConfig, force: bool = False) -> dict:
    """What `posttrain run` would do now, shown before it runs (the web studio's launch page): the
    data entries, then each stage (deploy last) with its verb, the model it reads, its run dir,
    gates, and whether it would run, resume or be skipped as unchanged. Every stage config is built
    as the run builds it, so a bad one raises ValueError naming the stage. A skip assumes the data
    entries come out as they are on disk now."""
    out = Path(pipe.output_dir)
    stages = pipe.all_stages()
    built = [stage_config(pipe, i) for i in range(len(stages))]
    data = []
    for name, spec in pipe.data.items():
        record_path = data_path(pipe, name).with_suffix(".json")
        last = json.loads(record_path.read_text()) if record_path.is_file() else {}
        data.append({"name": name, "path": str(data_path(pipe, name)), "source": spec.source, "synth": spec.synth,
                     "filters": spec.filters is not None, "last_status": last.get("status"), "rows": last.get("kept")})
    fps: dict[str, str] = {}
    rows = []
    for i, (spec, (cfg, _)) in enumerate(zip(stages, built)):
        fp = stage_fingerprint(cfg, fps)
        record_path = out / spec.name / "pipeline_stage.json"
        old = json.loads(record_path.read_text()) if record_path.is_file() else None
        rows.append({"name": spec.name, "verb": spec.verb, "config": spec.config, "overrides": spec.overrides,
                     "input_model": input_model(pipe, i), "run_dir": str(out / spec.name),
                     "gates": [g.model_dump() for g in spec.gate], "eval": spec.eval and "eval" in type(cfg).model_fields,
                     "action": stage_action(out, spec.name, old, fp, force),
                     "last_status": (old or {}).get("status")})
        fps[str(out / spec.name)] = fp
    swap = None
    if pipe.deploy is not None and pipe.deploy.swap_into:
        swap = {"into": pipe.deploy.swap_into, "name": pipe.deploy.swap_name or pipe.name,
                "source": source_stage(pipe)}
    return {"name": pipe.name, "output_dir": str(out), "data": data, "stages": rows, "swap": swap,
            "serve": pipe.deploy.serve.model_dump() if pipe.deploy is not None and pipe.deploy.serve else None}


def run_pipeline(pipe: PipelineConfig, force: bool = False) -> dict:
    """Prepare the data, then run (or skip, or resume) each stage in order; returns the pipeline state."""
    out = Path(pipe.output_dir)
    stages = pipe.all_stages()
    built = [stage_config(pipe, i) for i in range(len(stages))]  # every config valid before any runs
    if pipe.deploy is not None and pipe.deploy.swap_into:  # and the server ready before anything trains
        check_swap_target(pipe, built)
    state: dict[str, Any] = {"name": pipe.name, "data": {}, "stages": {},
                             "plan": [{"stage": s.name, "verb": s.verb} for s in stages]}  # for the report
    for name in pipe.data:
        state["data"][name] = prepare_data(pipe, name, force)
        write_json_atomic(out / "pipeline.json", state)
    fps: dict[str, str] = {}  # stage run dir -> fingerprint
    previous_metrics = None
    for spec, (cfg, run) in zip(stages, built):
        fp = stage_fingerprint(cfg, fps)
        record_path = out / spec.name / "pipeline_stage.json"
        old = json.loads(record_path.read_text()) if record_path.exists() else None
        action = stage_action(out, spec.name, old, fp, force)
        if action == "skip":
            record = {**{k: v for k, v in old.items() if k != "error"}, "status": "skipped"}  # gates re-checked
            print(f"[{spec.name}] skipped (unchanged)")
        else:
            resume = action == "resume"
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
        fps[str(out / spec.name)] = fp
        if STAGES.get(spec.verb).role != "export":  # an export's checks are not model metrics
            previous_metrics = {**(previous_metrics or {}), **record["metrics"]}  # the latest value of each
    if pipe.deploy is not None and pipe.deploy.swap_into:  # every gate passed (a failed one raised above)
        try:
            state["swap"] = swap_adapter(pipe)
        except ValueError as exc:
            state["swap"] = {"url": pipe.deploy.swap_into, "status": "error", "error": str(exc)}
            raise
        finally:
            write_json_atomic(out / "pipeline.json", state)
    return state

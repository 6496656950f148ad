"""The Pipeline tab's editor: a pipeline mapping as form-shaped JSON and back, the choices the
form offers (stage verbs, field help, gate metric names seen in runs), and where each problem
belongs in the form.

The YAML stays the source the server validates: the page sends either YAML text or the form,
and a form becomes a mapping here (`from_form`), then YAML, then goes through the same checks.
The form's shape mirrors the YAML's (`stages.1.gate.0.metric` is the same key in both), so a
problem from pydantic, from the paths check or from building a stage's config names the field
the page shows it beside. The form shows stages field by field (overrides as key/value rows,
gates as metric/min/max rows) and the other sections (data, eval, deploy, model.adapter) as
YAML text; a mapping with keys the form has no field for stays in the YAML editor (`to_form`
lists them) rather than losing them.

posttrain.pipeline is imported where it is used: it imports torch, which the studio's start
does without.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import yaml
from pydantic import ValidationError

from posttrain.config import apply_overrides, load_yaml, validation_problems
from posttrain.stages import PIPELINE_ROLES, STAGES, stage_of_recipe, verbs
from posttrain.ui import runs
from posttrain.ui.forms import to_text

Problems = list[tuple[str, str]]

# what the form shows of each model; tests/ui/test_pipelines.py checks these cover every field
TOP_TEXT = ("name", "output_dir")
YAML_SECTIONS = ("data", "eval", "deploy")  # whole sections as YAML text
MODEL_FIELDS = ("name", "dtype", "adapter")  # adapter as YAML text
STAGE_FIELDS = ("name", "verb", "config", "overrides", "eval", "gate")
GATE_FIELDS = ("metric", "min", "max", "relative_to_previous")


class FormError(ValueError):
    """A form whose shape is not the editor's (a client bug or a hand-made request)."""


def schema(root: Path) -> dict:
    """What the editor offers: the pipeline verbs (help, role), each field's help text, and the
    metric names the runs under the root recorded, by verb (suggestions for gates)."""
    from posttrain.pipeline import Gate, ModelInit, PipelineConfig, StageSpec

    help_texts = {}
    for prefix, cls in (("", PipelineConfig), ("model.", ModelInit), ("stage.", StageSpec), ("gate.", Gate)):
        for name, field in cls.model_fields.items():
            help_texts[prefix + name] = field.description or ""
    return {"verbs": [{"verb": v, "help": STAGES.get(v).help, "role": STAGES.get(v).role}
                      for v in verbs(*PIPELINE_ROLES)],
            "help": help_texts, "metrics": run_metrics(root)}


def run_metrics(root: Path) -> dict[str, list[str]]:
    """{verb: metric names a gate can name}: eval scores (eval_after) and the numeric outputs
    (dotted) of the finished runs under the root. Only suggestions: a run whose files do not
    read is left out of them."""
    found: dict[str, set[str]] = {}
    for path in runs.find_runs(root):
        try:
            manifest = json.loads((path / "manifest.json").read_text())
            config = load_yaml(path / "config.yaml")
            verb = stage_of_recipe(config).verb
        except (OSError, ValueError):  # not finished, not a stage run, or unreadable: no suggestions from it
            continue
        outputs = manifest.get("outputs") if isinstance(manifest, dict) else None
        if not isinstance(outputs, dict):
            continue
        names = found.setdefault(verb, set())
        names.update(k for k, v in (outputs.get("eval_after") or {}).items() if isinstance(v, (int, float)))
        names.update(_numeric_paths({k: v for k, v in outputs.items() if k not in ("eval_before", "eval_after")}))
    return {verb: sorted(names) for verb, names in sorted(found.items())}


def _numeric_paths(node: Any, prefix: str = "") -> list[str]:
    if isinstance(node, dict):
        return [p for k, v in node.items() for p in _numeric_paths(v, f"{prefix}{k}.")]
    return [prefix[:-1]] if isinstance(node, (int, float)) and not isinstance(node, bool) and prefix else []


def eval_metrics(data: dict) -> list[str]:
    """The metric names the pipeline's own eval section produces (task names, general_ppl)."""
    section = data.get("eval") if isinstance(data, dict) else None
    if not isinstance(section, dict):
        return []
    names = [t["name"] for t in section.get("tasks") or [] if isinstance(t, dict) and isinstance(t.get("name"), str)]
    return names + (["general_ppl"] if section.get("forgetting") else [])


# ------------------------------------------------------------------------------ YAML <-> form


def value_text(value: Any) -> str:
    """An override's value as its form text: YAML that reads back as the same value (a string
    that YAML would read as something else, like 'true' or '1e-3', is quoted)."""
    if isinstance(value, str):
        try:
            same = yaml.safe_load(value) == value
        except yaml.YAMLError:
            same = False
        return value if same and value.strip() == value else json.dumps(value)
    if value is None:
        return "null"
    text = to_text(value)
    if isinstance(value, float) and yaml.safe_load(text) != value:  # 1e-05: YAML 1.1 reads it as a string
        text = yaml.safe_dump(value).splitlines()[0]  # 1.0e-05
    return text


def _bound_text(value: Any) -> str:
    return "" if value is None else value_text(value)


def _section_text(value: Any) -> str:
    if value is None:
        return ""
    return yaml.safe_dump(value, sort_keys=False, default_flow_style=False, width=100, allow_unicode=True).strip()


def to_form(data: dict) -> tuple[dict, list[str]]:
    """(form, unshown): a pipeline mapping as the editor shows it, and the keys it would lose
    (unknown keys, values of a shape the form has no field for). Not validated: the form shows
    what is there, problems included."""
    from posttrain.pipeline import PipelineConfig

    unshown = [k for k in data if k not in PipelineConfig.model_fields]
    form: dict[str, Any] = {}
    for key in TOP_TEXT:
        value = data.get(key)
        if value is not None and not isinstance(value, str):
            unshown.append(key)
        form[key] = value if isinstance(value, str) else ""
    model = data.get("model")
    form["model"] = {"name": "", "dtype": "", "adapter": ""}
    if isinstance(model, str):
        form["model"]["name"] = model
    elif isinstance(model, dict):
        unshown += [f"model.{k}" for k in model if k not in MODEL_FIELDS]
        for key in ("name", "dtype"):
            if model.get(key) is not None and not isinstance(model.get(key), str):
                unshown.append(f"model.{key}")
            form["model"][key] = model.get(key) if isinstance(model.get(key), str) else ""
        form["model"]["adapter"] = _section_text(model.get("adapter"))
    elif model is not None:
        unshown.append("model")
    for key in YAML_SECTIONS:
        form[key] = _section_text(data.get(key))
    stages = data.get("stages")
    form["stages"] = []
    if not isinstance(stages, list):
        if stages is not None:
            unshown.append("stages")
        return form, unshown
    for i, stage in enumerate(stages):
        if not isinstance(stage, dict):
            unshown.append(f"stages.{i}")
            continue
        where = f"stages.{i}"
        unshown += [f"{where}.{k}" for k in stage if k not in STAGE_FIELDS]
        row: dict[str, Any] = {}
        for key in ("name", "verb", "config"):
            value = stage.get(key)
            if value is not None and not isinstance(value, str):
                unshown.append(f"{where}.{key}")
            row[key] = value if isinstance(value, str) else ""
        row["eval"] = stage.get("eval", True)
        if not isinstance(row["eval"], bool):
            unshown.append(f"{where}.eval")
            row["eval"] = True
        overrides = stage.get("overrides") or {}
        if not isinstance(overrides, dict):
            unshown.append(f"{where}.overrides")
            overrides = {}
        row["overrides"] = [[str(k), value_text(v)] for k, v in overrides.items()]
        gates = stage.get("gate") or []
        if not isinstance(gates, list):
            unshown.append(f"{where}.gate")
            gates = []
        row["gate"] = []
        for j, gate in enumerate(gates):
            if not isinstance(gate, dict):
                unshown.append(f"{where}.gate.{j}")
                continue
            unshown += [f"{where}.gate.{j}.{k}" for k in gate if k not in GATE_FIELDS]
            metric = gate.get("metric")
            if metric is not None and not isinstance(metric, str):
                unshown.append(f"{where}.gate.{j}.metric")
            rel = gate.get("relative_to_previous", False)
            if not isinstance(rel, bool):
                unshown.append(f"{where}.gate.{j}.relative_to_previous")
            row["gate"].append({"metric": metric if isinstance(metric, str) else "",
                                "min": _bound_text(gate.get("min")), "max": _bound_text(gate.get("max")),
                                "relative_to_previous": rel is True})
        form["stages"].append(row)
    return form, unshown


def _text(node: Any, key: str, where: str) -> str:
    value = node.get(key, "")
    if not isinstance(value, str):
        raise FormError(f"{where}: expected form text, got {type(value).__name__}")
    return value


def _yaml_value(text: str, where: str, problems: Problems) -> Any:
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError as exc:
        problems.append((where, f"not valid YAML: {str(exc).splitlines()[0]}"))
        return None


def from_form(form: Any) -> tuple[dict, Problems]:
    """(the pipeline mapping, problems in the form's own text: YAML that does not parse, an
    override without a key or set twice). Raises FormError for a form of another shape."""
    if not isinstance(form, dict):
        raise FormError("form: expected an object")
    problems: Problems = []
    data: dict[str, Any] = {}
    for key in TOP_TEXT:
        data[key] = _text(form, key, key)
    model = form.get("model") or {}
    if not isinstance(model, dict):
        raise FormError("model: expected an object")
    name, dtype, adapter = (_text(model, k, f"model.{k}") for k in MODEL_FIELDS)
    if dtype.strip() or adapter.strip():
        data["model"] = {**({"name": name} if name.strip() else {}), **({"dtype": dtype} if dtype.strip() else {})}
        if adapter.strip():
            data["model"]["adapter"] = _yaml_value(adapter, "model.adapter", problems)
    elif name.strip():
        data["model"] = name
    sections = {key: _text(form, key, key) for key in YAML_SECTIONS}
    for key in ("data", "eval"):
        if sections[key].strip():
            data[key] = _yaml_value(sections[key], key, problems)
    stages = form.get("stages")
    if not isinstance(stages, list):
        raise FormError("stages: expected a list")
    data["stages"] = []
    for i, stage in enumerate(stages):
        where = f"stages.{i}"
        if not isinstance(stage, dict):
            raise FormError(f"{where}: expected an object")
        row: dict[str, Any] = {"name": _text(stage, "name", f"{where}.name"),
                               "verb": _text(stage, "verb", f"{where}.verb")}
        config = _text(stage, "config", f"{where}.config")
        if config.strip():
            row["config"] = config.strip()
        if stage.get("eval", True) is not True:
            if stage.get("eval") is not False:
                raise FormError(f"{where}.eval: expected true or false")
            row["eval"] = False
        overrides: dict[str, Any] = {}
        rows = stage.get("overrides") or []
        if not isinstance(rows, list):
            raise FormError(f"{where}.overrides: expected a list of [key, value] rows")
        for pair in rows:
            if not (isinstance(pair, list) and len(pair) == 2 and all(isinstance(p, str) for p in pair)):
                raise FormError(f"{where}.overrides: expected [key, value] text rows")
            key, text = pair[0].strip(), pair[1]
            if not key:
                if text.strip():
                    problems.append((f"{where}.overrides", f"the value {text.strip()!r} has no key"))
                continue  # a blank row
            if key in overrides:
                problems.append((f"{where}.overrides.{key}", f"{key} is set twice"))
                continue
            overrides[key] = _yaml_value(text, f"{where}.overrides.{key}", problems) if text.strip() else None
        if overrides:
            row["overrides"] = overrides
        gates = stage.get("gate") or []
        if not isinstance(gates, list):
            raise FormError(f"{where}.gate: expected a list")
        out_gates = []
        for j, gate in enumerate(gates):
            gwhere = f"{where}.gate.{j}"
            if not isinstance(gate, dict):
                raise FormError(f"{gwhere}: expected an object")
            item: dict[str, Any] = {"metric": _text(gate, "metric", f"{gwhere}.metric").strip()}
            for bound in ("min", "max"):
                text = _text(gate, bound, f"{gwhere}.{bound}")
                if text.strip():
                    item[bound] = _yaml_value(text, f"{gwhere}.{bound}", problems)
            if gate.get("relative_to_previous", False) is True:
                item["relative_to_previous"] = True
            out_gates.append(item)
        if out_gates:
            row["gate"] = out_gates
        data["stages"].append(row)
    if sections["deploy"].strip():
        data["deploy"] = _yaml_value(sections["deploy"], "deploy", problems)
    return data, problems


def dump(data: dict) -> str:
    """The pipeline mapping as the YAML file the run reads."""
    return yaml.safe_dump(data, sort_keys=False, default_flow_style=None, width=100, allow_unicode=True)


# ------------------------------------------------------------------------------ where problems go

_STAGE_NAMED = re.compile(r"^stage (?:name )?'([^']+)'")


def place(problems: Problems, data: dict) -> Problems:
    """Pipeline-wide problems (pydantic's '(top level)') that name a stage, moved onto that stage:
    its name when it is used twice, its overrides when they are at fault; the rest stay."""
    names = [s.get("name") for s in data.get("stages") or [] if isinstance(s, dict)]
    out = []
    for key, message in problems:
        match = _STAGE_NAMED.match(message) if key == "(top level)" else None
        if match and match.group(1) in names:
            index = len(names) - 1 - names[::-1].index(match.group(1))  # the later one, for a name used twice
            part = ".name" if "used twice" in message else ".overrides" if (
                "output_dir" in message or "${data." in message) else ""
            key = f"stages.{index}{part}"
        elif key == "(top level)" and message.startswith("deploy"):
            key = "deploy"
        out.append((key, message))
    return out


def stage_problems(pipe) -> Problems:
    """Each stage's config built as the run builds it (recipe, then what the pipeline sets, then
    the stage's overrides), its problems keyed where the form can fix them: an override's row,
    model.dtype / model.adapter / eval for what the pipeline sets, else the stage's config
    (its recipe); the deploy stage's under deploy."""
    from posttrain.pipeline import stage_settings

    problems: Problems = []
    stages = pipe.all_stages()
    for index, spec in enumerate(stages):
        cls = STAGES.get(spec.verb).load()[0]
        where = f"stages.{index}" if index < len(pipe.stages) else "deploy"
        settings = stage_settings(pipe, index)
        try:
            data = load_yaml(spec.config) if spec.config else {}
            apply_overrides(data, [f"{k}={json.dumps(v)}" for k, v in settings.items()])
            cls.model_validate(data)
        except (ValueError, FileNotFoundError) as exc:
            if isinstance(exc, ValidationError):
                problems += [_stage_problem(pipe, index, where, spec, key, message)
                             for key, message in validation_problems(exc)]
            else:
                problems.append((f"{where}.config" if where != "deploy" else where, str(exc)))
    return problems


def _stage_problem(pipe, index: int, where: str, spec, key: str, message: str) -> tuple[str, str]:
    from posttrain.pipeline import input_model

    said = f"{key}: {message}" if key != "(top level)" else message
    if where == "deploy":
        return where, f"the deploy stage (export): {said}"
    for name in spec.overrides:
        if key == name or key.startswith(name + "."):
            return f"{where}.overrides.{name}", message if key == name else said
    if key.startswith("adapter") and pipe.model.adapter is not None:
        return "model.adapter", f"stage {spec.name!r}: {said}"
    if key == "model.dtype" and pipe.model.dtype is not None:
        return "model.dtype", f"stage {spec.name!r}: {message}"
    if key == "model.name" and input_model(pipe, index) == pipe.model.name:
        return "model.name", f"stage {spec.name!r}: {message}"
    if key.startswith("eval") and pipe.eval is not None and spec.eval:
        return "eval", f"stage {spec.name!r}: {said}"
    return (f"{where}.config" if spec.config else where), said + (
        "" if spec.config or key == "(top level)" else " (give the stage a recipe, or set it in its overrides)")

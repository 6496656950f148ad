"""A stage's pydantic config as form fields, and a filled form back into a validated config.

The form is the resolved recipe (recipe YAML + the verb's presets, as `--print-config` shows
it), one field per leaf key: a checkbox for a bool, a list for a Literal, a text box for
numbers and strings, YAML text for anything else (lists, mappings, optional sections). A
submitted form is parsed field by field (numbers and lists as YAML scalars, like `key=value`
overrides on the command line; strings as typed) and validated by the same pydantic model,
its errors worded by the same `config.validation_problems` the CLI prints, each under its
dotted key so the page can show it beside the field.
"""

from __future__ import annotations

import json
import types
import typing
from pathlib import Path
from typing import Any, Literal, Union

import yaml
from pydantic import BaseModel, ValidationError
from pydantic_core import PydanticUndefined

from posttrain.config import apply_overrides, build_config, load_yaml, validation_problems

Problems = list[tuple[str, str]]


def _unwrap(annotation) -> tuple[Any, bool]:
    """(the annotation without None, whether None is allowed)."""
    if typing.get_origin(annotation) in (Union, types.UnionType):
        args = [a for a in typing.get_args(annotation) if a is not type(None)]
        nullable = len(args) < len(typing.get_args(annotation))
        return (args[0] if len(args) == 1 else Union[tuple(args)]), nullable
    return annotation, False


def _is_section(annotation) -> bool:
    return isinstance(annotation, type) and issubclass(annotation, BaseModel)


def describe_fields(cls: type[BaseModel], prefix: str = "") -> list[dict]:
    """Every leaf key of the config, in the model's order: key, widget kind, choices, whether it
    may be empty (nullable) or must be given (required), its help text and default as form text."""
    out = []
    for name, f in cls.model_fields.items():
        key = prefix + name
        if _is_section(f.annotation):
            out += describe_fields(f.annotation, key + ".")
            continue
        inner, nullable = _unwrap(f.annotation)
        if typing.get_origin(inner) is Literal:
            kind, choices = "choice", [str(c) for c in typing.get_args(inner)]
        else:
            choices = None
            kind = {bool: "bool", int: "number", float: "number", str: "text"}.get(inner, "yaml")
        default = None if f.is_required() else f.get_default(call_default_factory=True)
        out.append({"key": key, "section": key.split(".")[0] if "." in key else "", "kind": kind,
                    "choices": choices, "nullable": nullable, "required": f.is_required(),
                    "help": f.description or "", "default": to_text(default)})
    return out


def to_text(value: Any) -> str:
    """A config value as the form shows it: strings as they are, None as empty, the rest as YAML."""
    if isinstance(value, BaseModel):
        value = value.model_dump(mode="json")
    if value is None:
        return ""
    if isinstance(value, str):
        return value
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return json.dumps(value)
    if isinstance(value, tuple):
        value = list(value)
    return yaml.safe_dump(value, default_flow_style=True, width=1 << 20, sort_keys=False).strip()


def flatten(data: Any, prefix: str = "") -> dict[str, Any]:
    """{dotted key: leaf value} of nested mappings (lists are leaves)."""
    if not isinstance(data, dict):
        return {prefix[:-1]: data} if prefix else {}
    out = {}
    for k, v in data.items():
        if isinstance(v, dict) and v:
            out.update(flatten(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def recipe_values(stage, cls: type[BaseModel], recipe: str | Path | None) -> tuple[dict[str, str], Problems]:
    """The form's starting values: the recipe resolved as `posttrain VERB [--config RECIPE]
    --print-config` resolves it (without a recipe, the verb's placeholders fill the required data
    keys); when that does not validate, the recipe's own values over the defaults, with the problems."""
    data = load_yaml(recipe) if recipe else {}
    overrides = [f"{k}={v}" for k, v in stage.presets.items()]
    if not recipe:
        overrides += list(stage.placeholders)
    fields = describe_fields(cls)
    try:
        cfg = build_config(cls, recipe, overrides)
    except ValueError:
        raw = apply_overrides(dict(data), overrides)
        try:
            cls.model_validate(raw)
            problems: Problems = []
        except ValidationError as exc:
            problems = validation_problems(exc)
        return {f["key"]: to_text(lookup(raw, f["key"])[1]) if lookup(raw, f["key"])[0] else f["default"]
                for f in fields}, problems
    dumped = cfg.model_dump(mode="json")
    return {f["key"]: to_text(lookup(dumped, f["key"])[1]) for f in fields}, []


def lookup(data: Any, key: str) -> tuple[bool, Any]:
    """(found, value) of a dotted key in nested mappings."""
    node = data
    for part in key.split("."):
        if not isinstance(node, dict) or part not in node:
            return False, None
        node = node[part]
    return True, node


def _parse(field: dict, text: str) -> tuple[bool, Any]:
    """(present, value) of one submitted field; raises ValueError for text that is not YAML."""
    if text.strip() == "" and field["kind"] != "text":
        if field["nullable"]:
            return True, None
        return (False, None) if field["required"] else (True, "")  # "" lets pydantic name the type
    if field["kind"] == "text":
        return True, (None if text == "" and field["nullable"] else text)
    if field["kind"] == "choice" and text in field["choices"]:
        return True, text  # `no` stays the string "no", not YAML's false
    try:
        return True, yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise ValueError(f"not valid YAML: {str(exc).splitlines()[0]}") from None


def config_from_form(stage, cls: type[BaseModel], values: dict[str, Any]) -> tuple[BaseModel | None, Problems]:
    """(the validated config, []) or (None, [(dotted key, message), ...]); unknown keys are
    refused like unknown overrides. The verb's presets win over the form (they name the stage)."""
    fields = {f["key"]: f for f in describe_fields(cls)}
    problems: Problems = [(k, "unknown key") for k in values if k not in fields]
    data: dict[str, Any] = {}
    for key, field in fields.items():
        if key not in values:
            continue
        text = values[key]
        if isinstance(text, bool):  # a checkbox may send a JSON boolean
            text = "true" if text else "false"
        if not isinstance(text, str):
            problems.append((key, f"expected form text, got {type(text).__name__}"))
            continue
        try:
            present, value = _parse(field, text)
        except ValueError as exc:
            problems.append((key, str(exc)))
            continue
        if present:
            node = data
            for part in key.split(".")[:-1]:
                node = node.setdefault(part, {})
            node[key.split(".")[-1]] = value
    for key, value in stage.presets.items():
        apply_overrides(data, [f"{key}={json.dumps(value)}"])
    if problems:
        return None, problems
    try:
        return cls.model_validate(data), []
    except ValidationError as exc:
        return None, validation_problems(exc)

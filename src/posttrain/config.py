"""Stage configs: pydantic models, YAML recipes, `a.b=c` overrides.

Unknown keys and bad values are refused at validation time, before any model loads,
with the dotted key and the allowed values in the message.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import AfterValidator, BaseModel, ConfigDict, Field, ValidationError, ValidationInfo, field_validator, model_validator

from posttrain.fileio import read_text_utf8


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


def _bounded(test, bound: str):
    def check(v, info: ValidationInfo):
        if not test(v):
            raise ValueError(f"{info.field_name} {bound}, got {v}")
        return v

    return AfterValidator(check)


# Field types whose errors name the field and the bound in plain words ("k must be >= 1, got 0")
AtLeastOne = Annotated[int, _bounded(lambda v: v >= 1, "must be >= 1")]
Positive = Annotated[float, _bounded(lambda v: v > 0, "must be > 0")]
NonNegative = Annotated[float, _bounded(lambda v: v >= 0, "must be >= 0")]
Probability = Annotated[float, _bounded(lambda v: 0 <= v <= 1, "is a probability in [0, 1]")]


class TrainConfig(Strict):
    """The loop's knobs; shared by every gradient-based stage."""

    epochs: float = Field(1.0, gt=0)
    max_steps: int | None = Field(None, gt=0, description="stop after this many optimizer steps")
    batch_size: int = Field(8, gt=0, description="examples per micro-batch (padded mode)")
    packing: bool = True
    max_tokens: int = Field(2048, gt=0, description="tokens per packed micro-batch")
    grad_accum: int = Field(1, gt=0)
    lr: float = Field(2e-4, gt=0)
    weight_decay: float = Field(0.0, ge=0)
    betas: tuple[float, float] = (0.9, 0.999)
    schedule: Literal["cosine", "linear", "constant"] = "cosine"
    warmup_ratio: float = Field(0.03, ge=0, lt=1)
    min_lr_ratio: float = Field(0.0, ge=0, le=1)
    max_grad_norm: float | None = Field(1.0, gt=0)
    seed: int = 0
    shuffle: bool = True
    eval_every: int | None = Field(None, gt=0, description="steps between evaluations")
    early_stopping_patience: int | None = Field(None, gt=0, description="evals without improvement")
    restore_best: bool = True
    save_every: int | None = Field(None, gt=0, description="steps between checkpoints")
    keep_checkpoints: int = Field(2, gt=0)
    log_every: int = Field(1, gt=0)
    mixed_precision: Literal["no", "bf16", "fp16"] = "no"
    gradient_checkpointing: bool = Field(False, description="recompute each decoder layer in backward: activations "
                                         "shrink to each layer's input plus one layer, for ~1/3 more compute")
    fused_optimizer: bool = Field(False, description="torch's fused AdamW kernel (CPU: 3-10x faster optimizer "
                                  "steps than the per-tensor default; matters for full fine-tuning)")
    ewc_weight: float = Field(0.0, ge=0)
    progress: bool = True

    @field_validator("mixed_precision", mode="before")
    @classmethod
    def _yaml_no(cls, v):
        return "no" if v is False else v  # YAML reads a bare `no` as false

    @model_validator(mode="after")
    def _check(self) -> "TrainConfig":
        if self.early_stopping_patience and not self.eval_every:
            raise ValueError("train.early_stopping_patience needs train.eval_every (evaluations to compare)")
        return self


class ModelConfig(Strict):
    """The input model of a stage: every stage config has one."""

    name: str = Field("default", description="a named model ('default' = SmolLM2-135M-Instruct, 'gemma3-270m'), HF dir, run dir, .gguf file or hub id")
    dtype: Literal["auto", "bf16", "fp32", "fp16"] = "auto"
    trust_remote_code: bool = False


class StageConfig(Strict):
    """What every stage's config has, first in its YAML: the stage's name, its run directory and
    its input model. `stage.start_stage` and the pipeline read these three."""

    stage: str
    output_dir: str
    model: ModelConfig = ModelConfig()


class DataConfig(Strict):
    """A training file of chat, completion or text records, and where its held-out part comes from."""

    train: str = Field(..., description="JSONL/JSON/Parquet/CSV file or datasets directory")
    eval: str | None = None
    eval_fraction: float = Field(0.0, ge=0, lt=1, description="held out from train when no eval file")
    kind: Literal["chat", "completion", "text"] | None = None
    max_length: int = Field(1024, gt=8)
    skip_invalid: bool = False


class PairDataConfig(Strict):
    """A file of preference pairs (prompt, chosen, rejected) and its held-out part."""

    train: str = Field(..., description="preference records: prompt, chosen, rejected (+ margin, aspect); "
                                        "for an unpaired loss (kto) also prompt, completion, label")
    eval: str | None = None
    eval_fraction: float = Field(0.0, ge=0, lt=1, description="held out from train when no eval file")
    max_length: int = Field(512, gt=8)
    skip_invalid: bool = False


def valid_regex(pattern: str) -> str:
    """A pydantic validator body: the pattern compiles, else a message quoting it."""
    import re

    try:
        re.compile(pattern)
    except re.error as exc:
        raise ValueError(f"{pattern!r} is not a valid regex: {exc}") from exc
    return pattern


def parse_override(item: str) -> tuple[list[str], Any]:
    """'train.lr=1e-4' -> (['train', 'lr'], 1e-4); values parse as YAML scalars/lists."""
    if "=" not in item:
        raise ValueError(f"override {item!r} must look like key.sub=value")
    key, raw = item.split("=", 1)
    if not key or any(not part for part in key.split(".")):
        raise ValueError(f"override {item!r} has an empty key part")
    return key.split("."), yaml.safe_load(raw) if raw != "" else ""


def apply_overrides(data: dict, overrides: list[str]) -> dict:
    for item in overrides:
        path, value = parse_override(item)
        node = data
        for part in path[:-1]:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise ValueError(f"override {item!r}: '{part}' is not a section")
        node[path[-1]] = value
    return data


def load_yaml(path: str | Path) -> dict:
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"config file not found: {path}")
    try:
        data = yaml.safe_load(read_text_utf8(path)) or {}
    except yaml.YAMLError as exc:
        raise ValueError(f"{path}: not valid YAML: {exc}") from exc
    if not isinstance(data, dict):
        raise ValueError(f"{path}: the top level must be a mapping of sections")
    return data


def validation_problems(exc: ValidationError) -> list[tuple[str, str]]:
    """(dotted key, message) per problem, worded for people: unknown keys, the allowed values of a
    choice, our own validators' messages without pydantic's prefix. The CLI prints them
    (`format_validation_error`); the web studio shows each beside its field."""
    problems = []
    for err in exc.errors():
        key = ".".join(str(p) for p in err["loc"]) or "(top level)"
        msg = err["msg"]
        if err["type"] == "extra_forbidden":
            msg = "unknown key"
        elif err["type"] == "literal_error":
            msg = f"must be one of {err['ctx']['expected']}; got {err['input']!r}"
        elif err["type"] == "value_error":  # our own validators' messages, without pydantic's prefix
            msg = msg.removeprefix("Value error, ")
        problems.append((key, msg))
    return problems


def format_validation_error(exc: ValidationError, source: str = "config") -> str:
    """One line per problem: dotted key, message, and the allowed values where known."""
    return "\n".join([f"invalid {source}:", *(f"  {key}: {msg}" for key, msg in validation_problems(exc))])


def build_config(cls: type[BaseModel], path: str | Path | None = None, overrides: list[str] | None = None):
    """Recipe YAML (optional) + overrides -> validated config, or ValueError naming the keys."""
    data = load_yaml(path) if path else {}
    apply_overrides(data, overrides or [])
    try:
        return cls.model_validate(data)
    except ValidationError as exc:
        raise ValueError(format_validation_error(exc, str(path) if path else "config")) from None


def dump_config(cfg: BaseModel) -> str:
    return yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False)

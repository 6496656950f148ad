"""Reward functions: everything that scores a completion for RL.

One interface for every scorer of (prompt, completion):
``fn(prompts, completions, records=None) -> RewardOutput(scores [N], parts {name: [N]})``.
Reward models (trained in train/reward_model.py, scored here through `RewardModelScorer`),
rule scorers (length, format, blocklist), verifiers and a weighted `Mixture` of experts whose
weights may adapt during training (running variance, or tags carried by the records).
`build_reward` makes any of them from a YAML-style dict, through the `REWARDS` registry
(one builder per ``type``).
"""

from __future__ import annotations

import re
from typing import Annotated, Any, Callable, Literal, Protocol, Sequence

import torch
from pydantic import Field, TypeAdapter, ValidationError, field_validator, model_validator
from torch import Tensor

from posttrain.config import Strict, valid_regex
from posttrain.data.answers import answers_match, extract_answer
from posttrain.registry import Registry
from posttrain.train.reward_model import (
    RewardModelScorer,
    RewardOutput,
    check_scorer_inputs,
    load_reward_model,
)


# ================================================================================ reward functions


class RewardFunction(Protocol):
    """Anything that scores completions: ``fn(prompts, completions, records=None) -> RewardOutput``.

    `prompts` are strings or message lists; `records` are the data rows the prompts came
    from (verifiers read ``answer``, tag weighting reads ``tags``). The classes here also
    carry a ``name`` (their key in ``parts``); a plain function works as a mixture expert too.
    """

    def __call__(self, prompts: Sequence[Any], completions: Sequence[str],
                 records: Sequence[dict] | None = None) -> RewardOutput: ...


def _single(name: str, values: Sequence[float]) -> RewardOutput:
    scores = torch.tensor(list(values), dtype=torch.float32)
    return RewardOutput(scores, {name: scores})


class LengthScorer:
    """0 inside [min_length, max_length], ``-penalty * distance`` outside (tokens or characters).

    Tokens are counted without special tokens, so the tokenizer must be the one the
    completions came from.
    """

    def __init__(self, min_length: int = 0, max_length: int | None = None, unit: Literal["tokens", "chars"] = "tokens",
                 tokenizer=None, penalty: float = 0.01, name: str = "length"):
        if unit not in ("tokens", "chars"):
            raise ValueError(f"unit must be 'tokens' or 'chars', got {unit!r}")
        if unit == "tokens" and tokenizer is None:
            raise ValueError("a length scorer in tokens needs the tokenizer (or use unit 'chars')")
        if min_length < 0 or (max_length is not None and max_length < min_length):
            raise ValueError(f"length range [{min_length}, {max_length}] is empty or negative")
        self.min_length, self.max_length, self.unit = min_length, max_length, unit
        self.tokenizer, self.penalty, self.name = tokenizer, penalty, name

    def length(self, completion: str) -> int:
        if self.unit == "chars":
            return len(completion)
        return len(self.tokenizer(completion, add_special_tokens=False)["input_ids"])

    def __call__(self, prompts, completions, records=None) -> RewardOutput:
        check_scorer_inputs(prompts, completions, records)
        values = []
        for c in completions:
            n = self.length(c)
            over = n - self.max_length if self.max_length is not None else 0
            values.append(-self.penalty * max(0, self.min_length - n, over))
        return _single(self.name, values)


def _compile(pattern: str, flags: int = 0, what: str = "pattern") -> re.Pattern:
    try:
        return re.compile(pattern, flags)
    except re.error as exc:
        raise ValueError(f"{what} {pattern!r} is not a valid regex: {exc}") from exc


class FormatScorer:
    """1.0 when the completion matches `pattern` (anywhere, or whole with `fullmatch`), else 0.0."""

    def __init__(self, pattern: str, fullmatch: bool = False, name: str = "format"):
        self.pattern = _compile(pattern, re.DOTALL)
        self.fullmatch, self.name = fullmatch, name

    def __call__(self, prompts, completions, records=None) -> RewardOutput:
        check_scorer_inputs(prompts, completions, records)
        find = self.pattern.fullmatch if self.fullmatch else self.pattern.search
        return _single(self.name, [1.0 if find(c) else 0.0 for c in completions])


class BlocklistScorer:
    """``-penalty`` for each blocklisted pattern found in the completion (0.0 when clean)."""

    def __init__(self, patterns: Sequence[str], penalty: float = 1.0, ignore_case: bool = True,
                 name: str = "blocklist"):
        if not patterns:
            raise ValueError("a blocklist needs at least one pattern")
        flags = re.IGNORECASE if ignore_case else 0
        self.patterns = [_compile(p, flags, "blocklist pattern") for p in patterns]
        self.penalty, self.name = penalty, name

    def __call__(self, prompts, completions, records=None) -> RewardOutput:
        check_scorer_inputs(prompts, completions, records)
        return _single(self.name, [-self.penalty * sum(1 for p in self.patterns if p.search(c)) for c in completions])


class AnswerVerifier:
    """1.0 when the completion's extracted answer equals ``records[i]["answer"]``, else 0.0.

    `extract`: "last_number", "first_line" or a regex (see eval.metrics.extract_answer);
    numbers compare by value.
    """

    def __init__(self, extract: str = "last_number", name: str = "verifier"):
        if extract not in ("last_number", "first_line"):
            _compile(extract, what="extract")
        self.extract, self.name = extract, name

    def __call__(self, prompts, completions, records=None) -> RewardOutput:
        n = check_scorer_inputs(prompts, completions, records)
        if records is None:
            raise ValueError(f"{self.name}: the answer verifier needs records with an 'answer' field")
        values = []
        for i in range(n):
            answer = records[i].get("answer")
            if answer is None:
                raise ValueError(f"{self.name}: record {i} has no 'answer' to verify against")
            values.append(float(answers_match(extract_answer(completions[i], self.extract), str(answer))))
        return _single(self.name, values)


DYNAMIC = ("inverse_variance", "tags")


class Mixture:
    """Weighted sum of expert scores; weights may adapt during training.

    ``scores[i] = sum_e w_e[i] * expert_e.scores[i]``. Parts: every expert's raw scores
    (name), its sub-parts when it has several (``name/part``), and the weight used for
    each sample (``weight/name``), so the breakdown sums back to the score.

    Dynamic weighting (`dynamic`, one mode or a list):
      * ``inverse_variance``: each expert's weight is scaled by ``1 / std``, where the
        variance is an EMA (decay `ema`) of its within-batch score variance, floored at
        `min_std`; rescaled so the weights sum to the static total. An expert whose scores
        vary a lot (noisy) counts less; one that stops varying is capped by `min_std`.
      * ``tags``: records carry ``tags`` (a list of names or one name); ``tag_weights``
        maps tag -> {expert: multiplier}, applied per sample (e.g. ``safety: {safety: 3}``).
    `weights_history` holds the mean weight per expert of every call, for logging.
    """

    def __init__(self, experts: dict[str, RewardFunction], weights: dict[str, float] | None = None,
                 dynamic: str | Sequence[str] | None = None, tag_weights: dict[str, dict[str, float]] | None = None,
                 ema: float = 0.9, min_std: float = 1e-2, name: str = "mixture"):
        if not experts:
            raise ValueError("a mixture needs at least one expert")
        weights = {e: 1.0 for e in experts} if weights is None else dict(weights)
        unknown = sorted(set(weights) - set(experts))
        if unknown:
            raise ValueError(f"weights name unknown experts {unknown}; experts: {list(experts)}")
        modes = [dynamic] if isinstance(dynamic, str) else list(dynamic or [])
        bad = [m for m in modes if m not in DYNAMIC]
        if bad:
            raise ValueError(f"dynamic must be one of {DYNAMIC} (or a list of them); got {bad}")
        tag_weights = tag_weights or {}
        for tag, mult in tag_weights.items():
            unknown = sorted(set(mult) - set(experts))
            if unknown:
                raise ValueError(f"tag_weights.{tag} names unknown experts {unknown}; experts: {list(experts)}")
        if "tags" in modes and not tag_weights:
            raise ValueError("dynamic 'tags' needs tag_weights (tag -> {expert: multiplier})")
        self.static = {e: float(weights.get(e, 0.0)) for e in experts}
        if "inverse_variance" in modes and (any(w < 0 for w in self.static.values())
                                            or sum(self.static.values()) <= 0):
            raise ValueError("dynamic 'inverse_variance' needs non-negative weights with a positive sum")
        if not 0 <= ema < 1:
            raise ValueError(f"ema must be in [0, 1), got {ema}")
        if min_std <= 0:
            raise ValueError(f"min_std must be > 0, got {min_std}")
        self.experts, self.modes, self.tag_weights = dict(experts), modes, tag_weights
        self.ema, self.min_std, self.name = ema, min_std, name
        self.variance: dict[str, float] = {}  # EMA of each expert's within-batch score variance
        self.weights_history: list[dict[str, float]] = []

    def current_weights(self) -> dict[str, float]:
        """Per-expert weights before tag multipliers (static, or inverse-variance scaled)."""
        if "inverse_variance" not in self.modes or not self.variance:
            return dict(self.static)
        raw = {e: w / max(self.variance.get(e, 0.0) ** 0.5, self.min_std) for e, w in self.static.items()}
        scale = sum(self.static.values()) / sum(raw.values())
        return {e: w * scale for e, w in raw.items()}

    def _update_variance(self, outputs: dict[str, RewardOutput]) -> None:
        for e, out in outputs.items():
            if out.scores.numel() < 2:
                continue
            var = float(out.scores.float().var(unbiased=False))
            old = self.variance.get(e)
            self.variance[e] = var if old is None else self.ema * old + (1 - self.ema) * var

    def _tag_multipliers(self, records: Sequence[dict] | None, n: int) -> dict[str, Tensor]:
        mult = {e: torch.ones(n) for e in self.experts}
        if "tags" not in self.modes or records is None:
            return mult
        for i, record in enumerate(records):
            tags = record.get("tags") or []
            if isinstance(tags, str):
                tags = [tags]
            if not isinstance(tags, (list, tuple)) or not all(isinstance(t, str) for t in tags):
                raise ValueError(f"record {i}: 'tags' must be a name or a list of names, got {tags!r}")
            for tag in tags:
                for e, m in self.tag_weights.get(tag, {}).items():
                    mult[e][i] *= m
        return mult

    def __call__(self, prompts, completions, records=None) -> RewardOutput:
        n = check_scorer_inputs(prompts, completions, records)
        outputs = {}
        for e, fn in self.experts.items():
            out = fn(prompts, completions, records)
            if tuple(out.scores.shape) != (n,):
                raise ValueError(f"expert {e!r} returned scores of shape {tuple(out.scores.shape)}, expected ({n},)")
            outputs[e] = out
        if "inverse_variance" in self.modes:
            self._update_variance(outputs)
        base = self.current_weights()
        mult = self._tag_multipliers(records, n)
        scores = torch.zeros(n)
        parts: dict[str, Tensor] = {}
        for e, out in outputs.items():
            w = base[e] * mult[e]
            scores = scores + w * out.scores.float().cpu()
            parts[e] = out.scores.float().cpu()
            if len(out.parts) > 1:
                parts.update({f"{e}/{k}": v.float().cpu() for k, v in out.parts.items()})
            parts[f"weight/{e}"] = w
        self.weights_history.append({e: float(parts[f"weight/{e}"].mean()) for e in outputs})
        return RewardOutput(scores, parts)

    def state_dict(self) -> dict:
        """What a resumed run needs to continue the same dynamic weights."""
        return {"variance": dict(self.variance), "weights_history": list(self.weights_history)}

    def load_state_dict(self, state: dict) -> None:
        self.variance = dict(state["variance"])
        self.weights_history = list(state["weights_history"])


# ================================================================================ configuration


class RewardModelRewardConfig(Strict):
    type: Literal["reward_model"]
    path: str = Field(description="a save_reward_model directory or a reward-model run directory")
    aspect: str | None = None
    weights: dict[str, float] | None = Field(None, description="aspect -> weight; a weighted sum of heads")
    dtype: Literal["auto", "fp32", "bf16", "fp16"] = "auto"
    batch_size: int = Field(8, gt=0)
    max_length: int | None = Field(None, gt=0)

    @model_validator(mode="after")
    def _one_choice(self) -> "RewardModelRewardConfig":
        if self.aspect is not None and self.weights is not None:
            raise ValueError("aspect, weights: give one of them, not both")
        return self


class LengthRewardConfig(Strict):
    type: Literal["length"]
    min_length: int = Field(0, ge=0)
    max_length: int | None = Field(None, ge=0)
    unit: Literal["tokens", "chars"] = "tokens"
    penalty: float = Field(0.01, ge=0, description="score lost per unit outside the range")

    @model_validator(mode="after")
    def _range(self) -> "LengthRewardConfig":
        if self.max_length is not None and self.max_length < self.min_length:
            raise ValueError(f"max_length: {self.max_length} is below min_length {self.min_length}")
        return self


class FormatRewardConfig(Strict):
    type: Literal["format"]
    pattern: str
    fullmatch: bool = False

    _pattern = field_validator("pattern")(valid_regex)


class BlocklistRewardConfig(Strict):
    type: Literal["blocklist"]
    patterns: list[str] = Field(min_length=1)
    penalty: float = Field(1.0, ge=0)
    ignore_case: bool = True

    @field_validator("patterns")
    @classmethod
    def _patterns(cls, v: list[str]) -> list[str]:
        for p in v:
            valid_regex(p)
        return v


class VerifierRewardConfig(Strict):
    type: Literal["verifier"]
    extract: str = "last_number"

    @field_validator("extract")
    @classmethod
    def _extract(cls, v: str) -> str:
        return v if v in ("last_number", "first_line") else valid_regex(v)


class MixtureRewardConfig(Strict):
    type: Literal["mixture"]
    experts: dict[str, "RewardConfig"] = Field(min_length=1)
    weights: dict[str, float] | None = Field(None, description="expert -> weight (default 1 each)")
    dynamic: list[Literal["inverse_variance", "tags"]] = Field([], description="one mode or a list of them")
    tag_weights: dict[str, dict[str, float]] = {}
    ema: float = Field(0.9, ge=0, lt=1)
    min_std: float = Field(1e-2, gt=0)

    @field_validator("dynamic", mode="before")
    @classmethod
    def _one_or_list(cls, v: Any) -> Any:
        return [] if v is None else [v] if isinstance(v, str) else v

    @model_validator(mode="after")
    def _names(self) -> "MixtureRewardConfig":
        unknown = sorted(set(self.weights or {}) - set(self.experts))
        if unknown:
            raise ValueError(f"weights: unknown experts {unknown}; experts are {list(self.experts)}")
        for tag, mult in self.tag_weights.items():
            unknown = sorted(set(mult) - set(self.experts))
            if unknown:
                raise ValueError(f"tag_weights.{tag}: unknown experts {unknown}; experts are {list(self.experts)}")
        if "tags" in self.dynamic and not self.tag_weights:
            raise ValueError("dynamic: 'tags' needs tag_weights (tag -> {expert: multiplier})")
        if "inverse_variance" in self.dynamic and any(w < 0 for w in (self.weights or {}).values()):
            raise ValueError("weights: dynamic 'inverse_variance' needs non-negative weights")
        return self


RewardConfig = Annotated[
    RewardModelRewardConfig | LengthRewardConfig | FormatRewardConfig | BlocklistRewardConfig
    | VerifierRewardConfig | MixtureRewardConfig,
    Field(discriminator="type"),
]
MixtureRewardConfig.model_rebuild()
REWARD_TYPES = ("reward_model", "length", "format", "blocklist", "verifier", "mixture")
_ADAPTER = TypeAdapter(RewardConfig)


def _error_key(loc: tuple) -> str:
    """Dotted key with pydantic's union tags dropped: ('mixture', 'experts', 'x', 'length', 'penalty')
    -> 'experts.x.penalty'. Tags sit first and right after an expert's name."""
    keep = [p for i, p in enumerate(loc)
            if not (p in REWARD_TYPES and (i == 0 or (i >= 2 and loc[i - 2] == "experts")))]
    return ".".join(str(p) for p in keep)


def _format_errors(exc: ValidationError, source: str) -> str:
    lines = [f"invalid {source}:"]
    for err in exc.errors():
        key, msg = _error_key(err["loc"]), err["msg"]
        if err["type"] == "extra_forbidden":
            msg = "unknown key"
        elif err["type"] == "literal_error":
            msg = f"must be one of {err['ctx']['expected']}; got {err['input']!r}"
        elif err["type"] in ("union_tag_not_found", "union_tag_invalid"):
            key = f"{key}.type" if key else "type"
            got = err["input"].get("type") if isinstance(err["input"], dict) else None
            msg = f"must be one of {', '.join(REWARD_TYPES)}" + (f"; got {got!r}" if got is not None else " (missing)")
        elif msg.startswith("Value error, "):
            msg = msg[len("Value error, "):]
            if not err["loc"] or err["loc"][-1] in REWARD_TYPES:  # a model-level check: msg starts with its keys
                lines.append(f"  {key + '.' if key else ''}{msg}")
                continue
        lines.append(f"  {key or '(top level)'}: {msg}")
    return "\n".join(lines)


def parse_reward_config(data: dict | Any, source: str = "reward config") -> Any:
    """A dict (e.g. a YAML section) -> validated RewardConfig, or ValueError naming each bad key."""
    try:
        return _ADAPTER.validate_python(data)
    except ValidationError as exc:
        raise ValueError(_format_errors(exc, source)) from None


REWARDS: Registry[Callable[..., RewardFunction]] = Registry("reward type")


def build_reward(cfg: dict | Any, tokenizer=None, name: str | None = None) -> RewardFunction:
    """A RewardFunction from its config. `tokenizer` counts tokens for length scorers;
    reward models bring their own. Mixture experts are named by their keys."""
    if isinstance(cfg, dict):
        cfg = parse_reward_config(cfg)
    return REWARDS.get(cfg.type)(cfg, tokenizer, name or cfg.type)


# one builder per reward type: (validated config, tokenizer, name) -> RewardFunction


@REWARDS.register("reward_model")
def _reward_model(cfg: RewardModelRewardConfig, tokenizer, name: str) -> RewardFunction:
    rm, rm_tokenizer = load_reward_model(cfg.path, dtype=cfg.dtype)
    return RewardModelScorer(rm, rm_tokenizer, aspect=cfg.aspect, weights=cfg.weights,
                             batch_size=cfg.batch_size, max_length=cfg.max_length, name=name)


@REWARDS.register("length")
def _length(cfg: LengthRewardConfig, tokenizer, name: str) -> RewardFunction:
    if cfg.unit == "tokens" and tokenizer is None:
        raise ValueError(f"{name}: unit 'tokens' needs a tokenizer (pass build_reward(..., tokenizer=...)) "
                         "or use unit: chars")
    return LengthScorer(cfg.min_length, cfg.max_length, cfg.unit, tokenizer, cfg.penalty, name=name)


@REWARDS.register("format")
def _format(cfg: FormatRewardConfig, tokenizer, name: str) -> RewardFunction:
    return FormatScorer(cfg.pattern, cfg.fullmatch, name=name)


@REWARDS.register("blocklist")
def _blocklist(cfg: BlocklistRewardConfig, tokenizer, name: str) -> RewardFunction:
    return BlocklistScorer(cfg.patterns, cfg.penalty, cfg.ignore_case, name=name)


@REWARDS.register("verifier")
def _verifier(cfg: VerifierRewardConfig, tokenizer, name: str) -> RewardFunction:
    return AnswerVerifier(cfg.extract, name=name)


@REWARDS.register("mixture")
def _mixture(cfg: MixtureRewardConfig, tokenizer, name: str) -> RewardFunction:
    experts = {e: build_reward(sub, tokenizer, name=e) for e, sub in cfg.experts.items()}
    return Mixture(experts, cfg.weights, cfg.dynamic, cfg.tag_weights, cfg.ema, cfg.min_std, name=name)

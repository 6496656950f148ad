"""What the server accepts and answers: its settings, the OpenAI request models, their checks
against the settings, and the error and response bodies.

No HTTP and no model here, so every rule can be tested alone: a bad field becomes an `APIError`
naming it (`param`), which app.py answers as OpenAI's `{"error": {...}}`.
"""

from __future__ import annotations

import json
import time
from dataclasses import replace
from typing import Annotated, Any, Literal

from pydantic import (BaseModel, ConfigDict, Field, StringConstraints, ValidationError, ValidationInfo, field_validator,
                      model_validator)

from posttrain.config import AtLeastOne, NonNegative, Positive, Strict
from posttrain.generate.engine import GenerationConfig, GenerationOutput
from posttrain.generate.guard import GuardRules


class ServeConfig(Strict):
    """Server settings; every limit protects the one model from a bad or greedy client."""

    model_name: str = "default"  # the name clients put in `model` for the base model
    api_keys: list[str] = []  # empty: no auth
    max_tokens_cap: AtLeastOne = 512  # a request asking for more gets 400
    default_max_tokens: AtLeastOne = 128  # lowered to max_tokens_cap when above it
    queue_size: AtLeastOne = 32  # requests admitted (waiting + running); more get 429
    timeout_s: Positive = 120.0  # per request: waiting for the model + generating
    max_body_bytes: AtLeastOne = 1 << 20  # bigger bodies get 413
    decoding: str = "sam"
    backend: str = "auto"
    guard: GuardRules | None = None
    adapters: list[str] = []  # adapter names loaded on a PeftModel
    # compatible requests decoded together; 1 = one at a time. 16: on 16 clients of the mixed load
    # (bench/serve_load.py) 8-token requests' p50 fell 3.1x from 8 rows, tokens/s rose 1.38x
    max_batch: AtLeastOne = 16
    # continuous: requests join and leave the running batch at token boundaries (scheduler.py; needs the
    # native decoder, else static); static: a batch is formed, decoded to its end, then the next (batcher.py)
    batching: Literal["continuous", "static"] = "continuous"
    batch_wait_ms: NonNegative = 5.0  # static: how long the worker waits for a batch to fill before it starts
    prefill_chunk: AtLeastOne = 256  # continuous: prompt tokens prefilled per step beside the decoding rows
    draft_max_rows: NonNegative = 2  # continuous: SAM/lookup drafts for greedy rows while at most this many decode
    max_n: AtLeastOne = 4  # most samples (`n`) per request; each takes a queue slot (lowered to queue_size)
    # where replies and feedback are stored: a SQLite file or a postgresql:// URL; None: nothing is
    # stored and /v1/feedback answers 404 (`posttrain serve` sets a file by default)
    feedback_db: str | None = None
    # PII (emails, phone and card numbers) in prompts, replies and feedback text is replaced by
    # [EMAIL]/[PHONE]/[CARD] before storage: the database keeps raw traffic for months, and the
    # training export redacts anyway, so an unredacted copy would only be a liability
    feedback_redact_pii: bool = True
    feedback_window: AtLeastOne = 100  # /metrics' up-rate is over the last this-many ratings
    # keys for /admin/* (loading, swapping and deleting adapters), kept apart from api_keys: a client
    # key lets one ask for text, an admin key makes the server read a directory on its disk into the
    # model; empty: /admin/* answers 403
    admin_keys: list[str] = []
    monitor_window: AtLeastOne = 100  # replies per adapter in /metrics' sliding-window series
    # drift alert: relative change of a window series from its baseline that raises
    # posttrain_drift_alert; a number for every series, {series: number} for some, None: off
    drift_threshold: float | dict[str, float] | None = 0.5
    drift_baseline: dict[str, dict[str, float]] = {}  # served name -> {series: value}; else the first full window

    @field_validator("decoding", "backend")
    @classmethod
    def _engine_name(cls, v: str, info: ValidationInfo) -> str:
        GenerationConfig(**{info.field_name: v})  # the engine's own list of names
        return v

    @field_validator("drift_threshold")
    @classmethod
    def _thresholds(cls, v):
        from posttrain.serve.monitor import drift_thresholds

        drift_thresholds(v)
        return v

    @field_validator("drift_baseline")
    @classmethod
    def _baselines(cls, v):
        from posttrain.serve.monitor import check_baselines

        return check_baselines(v)

    @model_validator(mode="after")
    def _consistent(self) -> "ServeConfig":
        if self.model_name in self.adapters:
            raise ValueError(f"adapters: adapter name {self.model_name!r} is the base model's name; rename it")
        if self.default_max_tokens > self.max_tokens_cap:
            self.default_max_tokens = self.max_tokens_cap  # re-validates: then equal, so no loop
        if self.max_n > self.queue_size:  # n samples take n slots: more could never be admitted
            self.max_n = self.queue_size
        shared = sorted(set(self.admin_keys) & set(self.api_keys))
        if shared:
            raise ValueError("admin_keys: an admin key is also an API key; give /admin/* its own key (a client "
                             "key must not be able to load adapters)")
        if any(not k.strip() for k in self.admin_keys):
            raise ValueError("admin_keys: an empty key")
        if self.feedback_db is not None and not self.feedback_db.strip():
            raise ValueError("feedback_db: empty; give a SQLite file path or a postgresql:// URL (None: off)")
        return self

    def served_names(self) -> list[str]:
        """What clients may put in `model`: the base model's name, then the adapters'."""
        return [self.model_name, *self.adapters]


# ---------------------------------------------------------------------------------
# requests (OpenAI field names; unknown fields are ignored, as OpenAI's server does)


class Message(BaseModel):
    model_config = ConfigDict(extra="ignore")
    role: Literal["system", "user", "assistant"]
    content: str


class _Common(BaseModel):
    model_config = ConfigDict(extra="ignore")
    model: str
    max_tokens: int | None = Field(None, ge=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    temperature: float = Field(1.0, ge=0, le=2)
    top_p: float = Field(1.0, gt=0, le=1)
    stop: str | list[str] | None = None
    stream: bool = False
    seed: int | None = None
    n: int = Field(1, ge=1)  # at most ServeConfig.max_n; each sample has its own reply id
    user: str | None = None


class ChatRequest(_Common):
    messages: list[Message] = Field(min_length=1)


class CompletionRequest(_Common):
    prompt: str


class APIError(Exception):
    """An error answered as OpenAI's `{"error": {message, type, param, code}}`."""

    def __init__(self, status: int, message: str, type_: str = "invalid_request_error",
                 param: str | None = None, code: str | None = None):
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type_, param, code

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


def _validated(cls: type[BaseModel], data: Any) -> Any:
    """cls.model_validate(data), or APIError 400 naming the first bad field."""
    if not isinstance(data, dict):
        raise APIError(400, f"request body must be a JSON object, got {type(data).__name__}")
    try:
        return cls.model_validate(data)
    except ValidationError as exc:
        first = exc.errors()[0]
        param = ".".join(str(p) for p in first["loc"]) or None
        raise APIError(400, f"{param}: {first['msg']}" if param else first["msg"], param=param,
                       code="invalid_value") from None


def parse_request(cls: type[_Common], data: Any, config: ServeConfig,
                  names: list[str] | None = None) -> tuple[_Common, GenerationConfig]:
    """A decoded JSON body -> (request, its GenerationConfig), or APIError naming the bad field.
    `names`: the model names served now (default: the config's; hot-swapped adapters change them)."""
    req = _validated(cls, data)
    if req.n > config.max_n:
        raise APIError(400, f"n: {req.n} samples is over this server's limit of {config.max_n}", param="n",
                       code="invalid_value")
    names = config.served_names() if names is None else names
    if req.model not in names:
        raise APIError(404, f"the model '{req.model}' does not exist; served: {', '.join(names)}",
                       param="model", code="model_not_found")
    max_tokens = req.max_completion_tokens or req.max_tokens or config.default_max_tokens
    if max_tokens > config.max_tokens_cap:
        raise APIError(400, f"max_tokens {max_tokens} is over this server's cap of {config.max_tokens_cap}",
                       param="max_tokens", code="invalid_value")
    stop = [req.stop] if isinstance(req.stop, str) else list(req.stop or [])
    if any(not s for s in stop):
        raise APIError(400, "stop strings must be non-empty", param="stop", code="invalid_value")
    gen = GenerationConfig(max_new_tokens=max_tokens, do_sample=req.temperature > 0,
                           temperature=req.temperature or 1.0, top_p=req.top_p, seed=req.seed, stop=stop,
                           decoding=config.decoding, backend=config.backend)  # the guard runs per row (batcher)
    return req, gen


def reply_ids(rid: str, n: int) -> list[str]:
    """The id of each choice of response `rid`: the response id itself when n == 1 (so a client
    that keeps OpenAI's `id` can give feedback), else `rid-0`, `rid-1`, ..."""
    return [rid] if n == 1 else [f"{rid}-{i}" for i in range(n)]


def choice_configs(gen: GenerationConfig, n: int) -> list[GenerationConfig]:
    """One config per sample; a seeded request's sample i draws with seed + i, so the n samples
    differ and each is reproducible (the same seed would give n copies)."""
    if n == 1 or gen.seed is None:
        return [gen] * n
    return [replace(gen, seed=gen.seed + i) for i in range(n)]


# ---------------------------------------------------------------------------------
# feedback on replies (our extension; strict: an unknown field is a typo, refused by name)

ReplyId = Annotated[str, StringConstraints(min_length=1, max_length=200)]


class RatingFeedback(BaseModel):
    model_config = ConfigDict(extra="forbid")
    reply_id: ReplyId
    rating: Literal["up", "down"]
    text: str | None = None


class ChoiceFeedback(BaseModel):
    model_config = ConfigDict(extra="forbid")
    reply_ids: list[ReplyId] = Field(min_length=2, max_length=2)
    chosen: ReplyId
    text: str | None = None

    @property
    def rejected(self) -> str:
        return next(i for i in self.reply_ids if i != self.chosen)


FEEDBACK_SHAPES = ("a rating {\"reply_id\": ID, \"rating\": \"up\" | \"down\", \"text\": optional} or a choice "
                   "{\"reply_ids\": [A, B], \"chosen\": A, \"text\": optional}")


def parse_feedback(data: Any) -> RatingFeedback | ChoiceFeedback:
    """A decoded `POST /v1/feedback` body -> a rating or a choice, or APIError naming the bad field."""
    if not isinstance(data, dict):
        raise APIError(400, f"request body must be a JSON object, got {type(data).__name__}")
    choice, rating = {"reply_ids", "chosen"} & set(data), {"reply_id", "rating"} & set(data)
    if choice and rating:
        field = sorted(rating)[0]
        raise APIError(400, f"{field}: a feedback body is {FEEDBACK_SHAPES}, not both", param=field,
                       code="invalid_value")
    if not choice and not rating:
        raise APIError(400, f"reply_id: missing; a feedback body is {FEEDBACK_SHAPES}", param="reply_id",
                       code="invalid_value")
    fb = _validated(ChoiceFeedback if choice else RatingFeedback, data)
    if isinstance(fb, ChoiceFeedback):
        if fb.reply_ids[0] == fb.reply_ids[1]:
            raise APIError(400, "reply_ids: a choice is between two different replies", param="reply_ids",
                           code="invalid_value")
        if fb.chosen not in fb.reply_ids:
            raise APIError(400, f"chosen: {fb.chosen!r} is not one of reply_ids {fb.reply_ids}", param="chosen",
                           code="invalid_value")
    return fb


# ---------------------------------------------------------------------------------
# adapter administration (our extension; strict)


class AdapterLoad(BaseModel):
    """`POST /admin/adapters`: load the adapter at `path` under `name` (replacing one of that name)."""

    model_config = ConfigDict(extra="forbid")
    name: str
    path: str
    check_base: bool = True  # refuse an adapter whose adapter_config.json names another base model
    reset_baseline: bool = False  # the drift baselines of `name` start over from its next full window


def parse_adapter_load(data: Any) -> AdapterLoad:
    return _validated(AdapterLoad, data)


def parse_json(body: bytes) -> Any:
    try:
        return json.loads(body)
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise APIError(400, f"request body is not valid JSON: {exc}", code="invalid_json") from None


# ---------------------------------------------------------------------------------
# responses


def finish_reason(out: GenerationOutput, gen: GenerationConfig) -> str:
    return "length" if len(out.token_ids[0]) >= gen.max_new_tokens and not out.stats.get("guard_blocked") \
        else "stop"


def completion_body(rid: str, chat: bool, model: str, choices: list[tuple[str, str, str]], prompt_tokens: int,
                    completion_tokens: int) -> dict:
    """A whole `chat.completion` or `text_completion` answer; choices: (text, finish_reason, reply_id)
    per sample. Each choice carries its `reply_id` (for `POST /v1/feedback`)."""
    out = []
    for index, (text, finish, reply_id) in enumerate(choices):
        choice = {"index": index, "finish_reason": finish, "logprobs": None, "reply_id": reply_id}
        choice.update({"message": {"role": "assistant", "content": text}} if chat else {"text": text})
        out.append(choice)
    return {"id": rid, "object": "chat.completion" if chat else "text_completion", "created": int(time.time()),
            "model": model, "choices": out,
            "usage": {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
                      "total_tokens": prompt_tokens + completion_tokens}}


def chunk_event(rid: str, chat: bool, model: str, delta: dict | str, finish: str | None, index: int = 0,
                reply_id: str | None = None) -> str:
    """One SSE event of a stream (chat: a `delta` dict; completions: a text piece) for choice `index`."""
    choice = {"index": index, "finish_reason": finish, "logprobs": None, "reply_id": reply_id or rid}
    choice.update({"delta": delta} if chat else {"text": delta})
    body = {"id": rid, "object": "chat.completion.chunk" if chat else "text_completion",
            "created": int(time.time()), "model": model, "choices": [choice]}
    return f"data: {json.dumps(body, ensure_ascii=False)}\n\n"

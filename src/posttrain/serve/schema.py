"""What the server accepts and answers: its settings, the OpenAI request models, their checks
against the settings, and the error and response bodies.

No HTTP and no model here, so every rule can be tested alone: a bad field becomes an `APIError`
naming it (`param`), which app.py answers as OpenAI's `{"error": {...}}`.
"""

from __future__ import annotations

import json
import time
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, ValidationInfo, field_validator, model_validator

from posttrain.config import AtLeastOne, NonNegative, Positive, Strict
from posttrain.generate.engine import GenerationConfig, GenerationOutput
from posttrain.generate.guard import GuardRules


class ServeConfig(Strict):
    """Server settings; every limit protects the one model from a bad or greedy client."""

    model_name: str = "default"  # the name clients put in `model` for the base model
    api_keys: list[str] = []  # empty: no auth
    max_tokens_cap: AtLeastOne = 512  # a request asking for more gets 400
    default_max_tokens: AtLeastOne = 128  # lowered to max_tokens_cap when above it
    queue_size: AtLeastOne = 8  # requests admitted (waiting + running); more get 429
    timeout_s: Positive = 120.0  # per request: waiting for the model + generating
    max_body_bytes: AtLeastOne = 1 << 20  # bigger bodies get 413
    decoding: str = "sam"
    backend: str = "auto"
    guard: GuardRules | None = None
    adapters: list[str] = []  # adapter names loaded on a PeftModel
    max_batch: AtLeastOne = 8  # compatible requests decoded together; 1 = one at a time
    batch_wait_ms: NonNegative = 5.0  # how long the worker waits for a batch to fill before it starts

    @field_validator("decoding", "backend")
    @classmethod
    def _engine_name(cls, v: str, info: ValidationInfo) -> str:
        GenerationConfig(**{info.field_name: v})  # the engine's own list of names
        return v

    @model_validator(mode="after")
    def _consistent(self) -> "ServeConfig":
        if self.model_name in self.adapters:
            raise ValueError(f"adapters: adapter name {self.model_name!r} is the base model's name; rename it")
        if self.default_max_tokens > self.max_tokens_cap:
            self.default_max_tokens = self.max_tokens_cap  # re-validates: then equal, so no loop
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
    n: int = Field(1, ge=1, le=1)
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


def parse_request(cls: type[_Common], data: Any, config: ServeConfig) -> tuple[_Common, GenerationConfig]:
    """A decoded JSON body -> (request, its GenerationConfig), or APIError naming the bad field."""
    if not isinstance(data, dict):
        raise APIError(400, f"request body must be a JSON object, got {type(data).__name__}")
    try:
        req = cls.model_validate(data)
    except ValidationError as exc:
        first = exc.errors()[0]
        param = ".".join(str(p) for p in first["loc"]) or None
        raise APIError(400, f"{param}: {first['msg']}" if param else first["msg"], param=param,
                       code="invalid_value") from None
    names = config.served_names()
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


def completion_body(rid: str, chat: bool, model: str, text: str, finish: str, prompt_tokens: int,
                    completion_tokens: int) -> dict:
    """A whole `chat.completion` or `text_completion` answer."""
    choice = {"index": 0, "finish_reason": finish, "logprobs": None}
    choice.update({"message": {"role": "assistant", "content": text}} if chat else {"text": text})
    return {"id": rid, "object": "chat.completion" if chat else "text_completion", "created": int(time.time()),
            "model": model, "choices": [choice],
            "usage": {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
                      "total_tokens": prompt_tokens + completion_tokens}}


def chunk_event(rid: str, chat: bool, model: str, delta: dict | str, finish: str | None) -> str:
    """One SSE event of a stream (chat: a `delta` dict; completions: a text piece)."""
    choice = {"index": 0, "finish_reason": finish, "logprobs": None}
    choice.update({"delta": delta} if chat else {"text": delta})
    body = {"id": rid, "object": "chat.completion.chunk" if chat else "text_completion",
            "created": int(time.time()), "model": model, "choices": [choice]}
    return f"data: {json.dumps(body, ensure_ascii=False)}\n\n"

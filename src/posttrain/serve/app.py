"""OpenAI-compatible HTTP server over the generation engine.

One model (optionally several PEFT LoRA adapters over it, picked by the request's
`model` name) serves `/v1/chat/completions`, `/v1/completions` (both with SSE
streaming), `/v1/models`, `/health` and `/metrics` (Prometheus text).

Generation runs in a worker thread, one request at a time under a lock (this slice
does not batch concurrent requests together). Admission is bounded: at most
`queue_size` requests wait or run; one more gets 429 at once instead of piling up.
Every request has a deadline: waiting for the lock and every generated token check
it, so a timed-out request stops decoding and frees the model (504).

Greedy and sampled requests decode with SAM speculative decoding by default
(`decoding="sam"`, lossless). The output guard (if configured) rewrites or blocks
replies; a stream cannot retract text, so a guarded stream is generated in full,
checked, and then sent as one chunk.
"""

from __future__ import annotations

import asyncio
import json
import threading
import time
import uuid
from dataclasses import dataclass, field
from typing import Any, Callable, Literal

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, PlainTextResponse, StreamingResponse
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from pydantic import BaseModel, ConfigDict, Field, ValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException

from posttrain.generate.engine import GenerationConfig, GenerationOutput, generate


@dataclass
class ServeConfig:
    """Server settings; every limit protects the one model from a bad or greedy client."""

    model_name: str = "default"  # the name clients put in `model` for the base model
    api_keys: list[str] = field(default_factory=list)  # empty: no auth
    max_tokens_cap: int = 512  # a request asking for more gets 400
    default_max_tokens: int = 128
    queue_size: int = 8  # requests admitted (waiting + running); more get 429
    timeout_s: float = 120.0  # per request: waiting for the model + generating
    max_body_bytes: int = 1 << 20  # bigger bodies get 413
    decoding: str = "sam"
    backend: str = "auto"
    guard: Any = None  # GuardRules
    adapters: list[str] = field(default_factory=list)  # adapter names loaded on a PeftModel

    def __post_init__(self) -> None:
        if self.max_tokens_cap < 1 or self.default_max_tokens < 1:
            raise ValueError("max_tokens_cap and default_max_tokens must be >= 1")
        if self.default_max_tokens > self.max_tokens_cap:
            self.default_max_tokens = self.max_tokens_cap
        if self.queue_size < 1:
            raise ValueError(f"queue_size must be >= 1, got {self.queue_size}")
        if self.timeout_s <= 0:
            raise ValueError(f"timeout_s must be > 0, got {self.timeout_s}")
        GenerationConfig(decoding=self.decoding, backend=self.backend)  # validates both names
        if self.model_name in self.adapters:
            raise ValueError(f"adapter name {self.model_name!r} is the base model's name; rename it")


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


class _Timeout(Exception):
    pass


# ---------------------------------------------------------------------------------
# metrics


def _metrics(registry: CollectorRegistry) -> dict:
    return {
        "requests": Counter("posttrain_requests", "HTTP requests by endpoint and status", ["endpoint", "status"],
                            registry=registry),
        "errors": Counter("posttrain_errors", "error answers by OpenAI error type", ["type"], registry=registry),
        "latency": Histogram("posttrain_request_latency_seconds", "request latency (streams: until the last chunk)",
                             ["endpoint"], registry=registry,
                             buckets=(0.05, 0.1, 0.25, 0.5, 1, 2, 5, 10, 30, 60, 120)),
        "tokens": Counter("posttrain_generated_tokens", "tokens generated", registry=registry),
        "prompt_tokens": Counter("posttrain_prompt_tokens", "prompt tokens processed", registry=registry),
        "tokens_per_s": Gauge("posttrain_tokens_per_second", "decode speed of the last finished request",
                              registry=registry),
        "drafted": Counter("posttrain_draft_tokens", "speculative draft tokens proposed", registry=registry),
        "accepted": Counter("posttrain_draft_tokens_accepted", "speculative draft tokens accepted",
                            registry=registry),
        "in_flight": Gauge("posttrain_requests_in_flight", "admitted requests (waiting + running)",
                           registry=registry),
        "guard_blocked": Counter("posttrain_guard_blocked", "replies blocked by the output guard",
                                 registry=registry),
    }


# ---------------------------------------------------------------------------------
# adapters


def load_adapters(model, adapters: dict[str, str]):
    """Load PEFT adapters (name -> adapter dir or run dir) onto one base model.

    Returns the PeftModel; requests pick an adapter by name (`set_adapter`) or the bare
    base (adapters disabled) under the server's generation lock.
    """
    from pathlib import Path

    from peft import PeftModel

    from posttrain.models import resolve_model_path

    peft_model = model
    for name, spec in adapters.items():
        path = resolve_model_path(spec)
        if not (Path(path) / "adapter_config.json").is_file():
            raise ValueError(f"adapter {name}={spec}: {path} is not a PEFT adapter directory (no adapter_config.json)")
        if isinstance(peft_model, PeftModel):
            peft_model.load_adapter(path, adapter_name=name)
        else:
            peft_model = PeftModel.from_pretrained(peft_model, path, adapter_name=name)
    peft_model.eval()
    return peft_model


# ---------------------------------------------------------------------------------
# the app


def create_app(model, tokenizer, config: ServeConfig | None = None,
               generate_fn: Callable[..., GenerationOutput] = generate):
    """The FastAPI app. `generate_fn` has `engine.generate`'s signature (tests slow it down)."""
    config = config or ServeConfig()
    registry = CollectorRegistry()
    m = _metrics(registry)
    model_lock = threading.Lock()
    admit_lock = threading.Lock()
    admitted = [0]
    created = int(time.time())
    names = [config.model_name, *config.adapters]
    app = FastAPI(title="posttrain", docs_url=None, redoc_url=None)

    def error_response(exc: APIError, endpoint: str) -> JSONResponse:
        m["errors"].labels(exc.type).inc()
        m["requests"].labels(endpoint, str(exc.status)).inc()
        return JSONResponse(exc.body(), status_code=exc.status)

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, exc: StarletteHTTPException):
        kind = "not_found_error" if exc.status_code == 404 else "invalid_request_error"
        return error_response(APIError(exc.status_code, f"{request.method} {request.url.path}: {exc.detail}", kind),
                              "other")

    def check_key(request: Request) -> None:
        if not config.api_keys:
            return
        header = request.headers.get("authorization", "")
        scheme, _, key = header.partition(" ")
        if scheme.lower() != "bearer" or not key:
            raise APIError(401, "missing API key: send the header 'Authorization: Bearer KEY'",
                           "authentication_error", code="invalid_api_key")
        if key.strip() not in config.api_keys:
            raise APIError(401, "incorrect API key", "authentication_error", code="invalid_api_key")

    async def read_json(request: Request) -> Any:
        length = request.headers.get("content-length")
        if length is not None and length.isdigit() and int(length) > config.max_body_bytes:
            raise APIError(413, f"request body of {length} bytes is over the {config.max_body_bytes}-byte limit",
                           code="request_too_large")
        body = bytearray()
        async for chunk in request.stream():
            body += chunk
            if len(body) > config.max_body_bytes:
                raise APIError(413, f"request body is over the {config.max_body_bytes}-byte limit",
                               code="request_too_large")
        try:
            return json.loads(body)
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise APIError(400, f"request body is not valid JSON: {exc}", code="invalid_json") from None

    def parse(cls, data: Any):
        if not isinstance(data, dict):
            raise APIError(400, f"request body must be a JSON object, got {type(data).__name__}")
        try:
            req = cls.model_validate(data)
        except ValidationError as exc:
            first = exc.errors()[0]
            param = ".".join(str(p) for p in first["loc"]) or None
            raise APIError(400, f"{param}: {first['msg']}" if param else first["msg"], param=param,
                           code="invalid_value") from None
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
                               decoding=config.decoding, backend=config.backend, guard=config.guard)
        return req, gen

    def admit() -> None:
        with admit_lock:
            if admitted[0] >= config.queue_size:
                raise APIError(429, f"server busy: {admitted[0]} requests are queued or running; retry later",
                               "rate_limit_error", code="queue_full")
            admitted[0] += 1
            m["in_flight"].set(admitted[0])

    def release() -> None:
        with admit_lock:
            admitted[0] -= 1
            m["in_flight"].set(admitted[0])

    def run_generation(prompt: Any, gen: GenerationConfig, model_name: str, deadline: float,
                       on_piece: Callable[[str], None] | None,
                       cancel: threading.Event | None = None) -> GenerationOutput:
        """Runs in a worker thread: wait for the model, pick the adapter, decode until done, the
        deadline, or `cancel` (a streaming client that went away)."""
        if not model_lock.acquire(timeout=max(deadline - time.monotonic(), 0)):
            raise _Timeout()
        try:
            def stream(row: int, token: int, piece: str) -> None:
                if time.monotonic() > deadline or (cancel is not None and cancel.is_set()):
                    raise _Timeout()
                if piece and on_piece is not None:
                    on_piece(piece)

            start = time.perf_counter()
            if config.adapters and model_name != config.model_name:
                model.set_adapter(model_name)
                out = generate_fn(model, tokenizer, [prompt], gen, stream=stream)
            elif config.adapters:
                with model.disable_adapter():
                    out = generate_fn(model, tokenizer, [prompt], gen, stream=stream)
            else:
                out = generate_fn(model, tokenizer, [prompt], gen, stream=stream)
            seconds = time.perf_counter() - start
        finally:
            model_lock.release()
        n = len(out.token_ids[0])
        m["tokens"].inc(n)
        if seconds > 0 and n:
            m["tokens_per_s"].set(n / seconds)
        m["drafted"].inc(out.stats.get("drafted", 0))
        m["accepted"].inc(out.stats.get("accepted", 0))
        m["guard_blocked"].inc(out.stats.get("guard_blocked", 0))
        return out

    def finish_reason(out: GenerationOutput, gen: GenerationConfig) -> str:
        return "length" if len(out.token_ids[0]) >= gen.max_new_tokens and not out.stats.get("guard_blocked") \
            else "stop"

    def prompt_tokens(prompt: Any) -> int:
        from posttrain.generate.engine import encode_prompts

        n = len(encode_prompts(tokenizer, [prompt])[0])
        m["prompt_tokens"].inc(n)
        return n

    async def handle(request: Request, endpoint: str, chat: bool):
        started = time.perf_counter()
        try:
            check_key(request)
            req, gen = parse(ChatRequest if chat else CompletionRequest, await read_json(request))
            prompt = [msg.model_dump() for msg in req.messages] if chat else req.prompt
            try:
                n_prompt = prompt_tokens(prompt)
            except (ValueError, TypeError) as exc:
                raise APIError(400, str(exc), param="messages" if chat else "prompt") from None
            admit()
        except APIError as exc:
            return error_response(exc, endpoint)
        deadline = time.monotonic() + config.timeout_s
        rid = ("chatcmpl-" if chat else "cmpl-") + uuid.uuid4().hex[:24]
        obj = "chat.completion" if chat else "text_completion"
        if req.stream:  # start decoding here, so the slot is freed even if the stream is never read
            loop = asyncio.get_running_loop()
            queue: asyncio.Queue = asyncio.Queue()
            on_piece = None if config.guard is not None else (lambda p: loop.call_soon_threadsafe(queue.put_nowait, p))
            cancel = threading.Event()
            task = loop.run_in_executor(None, run_generation, prompt, gen, req.model, deadline, on_piece, cancel)
            task.add_done_callback(lambda _: queue.put_nowait(None))
            task.add_done_callback(lambda _: release())
            return StreamingResponse(stream_answer(task, queue, cancel, gen, req.model, rid, chat, endpoint, started),
                                     media_type="text/event-stream", headers={"Cache-Control": "no-cache"})
        try:
            out = await asyncio.to_thread(run_generation, prompt, gen, req.model, deadline, None)
        except _Timeout:
            return error_response(APIError(504, f"request timed out after {config.timeout_s} s", "timeout_error",
                                           code="timeout"), endpoint)
        except Exception as exc:  # a generation failure answers 500 and the server keeps serving
            return error_response(APIError(500, f"generation failed: {type(exc).__name__}: {exc}", "server_error"),
                                  endpoint)
        finally:
            release()
        text, n = out.texts[0], len(out.token_ids[0])
        choice = {"index": 0, "finish_reason": finish_reason(out, gen), "logprobs": None}
        choice.update({"message": {"role": "assistant", "content": text}} if chat else {"text": text})
        m["requests"].labels(endpoint, "200").inc()
        m["latency"].labels(endpoint).observe(time.perf_counter() - started)
        return {"id": rid, "object": obj, "created": int(time.time()), "model": req.model, "choices": [choice],
                "usage": {"prompt_tokens": n_prompt, "completion_tokens": n, "total_tokens": n_prompt + n}}

    async def stream_answer(task, queue, cancel, gen, model_name, rid, chat, endpoint, started):
        """SSE chunks as tokens decode; with a guard, the whole checked reply as one chunk."""
        obj = "chat.completion.chunk" if chat else "text_completion"

        def chunk(delta: dict | str, finish: str | None) -> str:
            choice = {"index": 0, "finish_reason": finish, "logprobs": None}
            choice.update({"delta": delta} if chat else {"text": delta})
            body = {"id": rid, "object": obj, "created": int(time.time()), "model": model_name, "choices": [choice]}
            return f"data: {json.dumps(body, ensure_ascii=False)}\n\n"

        status = "200"
        try:
            if chat:
                yield chunk({"role": "assistant", "content": ""}, None)
            while (piece := await queue.get()) is not None:
                yield chunk({"content": piece} if chat else piece, None)
            try:
                out = task.result()
            except Exception as exc:  # headers are sent: the error goes in the stream, as OpenAI does
                timeout = isinstance(exc, _Timeout)
                err = APIError(504, f"request timed out after {config.timeout_s} s", "timeout_error", code="timeout") \
                    if timeout else APIError(500, f"generation failed: {type(exc).__name__}: {exc}", "server_error")
                status = str(err.status)
                m["errors"].labels(err.type).inc()
                yield f"data: {json.dumps(err.body())}\n\n"
                return
            if config.guard is not None and out.texts[0]:
                yield chunk({"content": out.texts[0]} if chat else out.texts[0], None)
            yield chunk({} if chat else "", finish_reason(out, gen))
            yield "data: [DONE]\n\n"
        except Exception:
            status = "500"
            m["errors"].labels("server_error").inc()
            raise
        finally:
            if not task.done():  # the client went away: stop decoding at the next token
                cancel.set()
            m["requests"].labels(endpoint, status).inc()
            m["latency"].labels(endpoint).observe(time.perf_counter() - started)

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request):
        return await handle(request, "/v1/chat/completions", chat=True)

    @app.post("/v1/completions")
    async def completions(request: Request):
        return await handle(request, "/v1/completions", chat=False)

    @app.get("/v1/models")
    async def list_models(request: Request):
        try:
            check_key(request)
        except APIError as exc:
            return error_response(exc, "/v1/models")
        m["requests"].labels("/v1/models", "200").inc()
        return {"object": "list", "data": [{"id": n, "object": "model", "created": created, "owned_by": "posttrain"}
                                           for n in names]}

    @app.get("/health")
    async def health():
        return {"status": "ok", "models": names, "in_flight": admitted[0]}

    @app.get("/metrics")
    async def metrics():
        return PlainTextResponse(generate_latest(registry).decode(), media_type=CONTENT_TYPE_LATEST)

    return app

"""OpenAI-compatible HTTP server over the generation engine.

One model (optionally several PEFT LoRA adapters over it, picked by the request's
`model` name) serves `/v1/chat/completions`, `/v1/completions` (both with SSE
streaming), `/v1/models`, `/health` and `/metrics` (Prometheus text).

Concurrent requests are batched. One worker thread owns the model; handlers put
their request on a queue and await a future. The worker takes the oldest waiting
request, then every other waiting request *compatible* with it (same model/adapter
name, same sampling settings; a seeded sampled request runs alone so its seed
stays reproducible), up to `max_batch`, waiting at most `batch_wait_ms` for more to
arrive, and decodes them as one batch (`generate(..., row_max_new_tokens=...,
row_stop=...)`: each row keeps its own max_tokens and stop strings). Why: on this CPU a
decode step of 8 rows costs little more than a step of 1 (weights are read once per
step), so tokens/s grows with the batch. A batch of one decodes with
`config.decoding` (SAM by default, lossless for greedy); a batch of several uses
plain batched decoding, because our speculative decoding verifies one row at a time.
Batches are static: a request arriving mid-batch waits for the next batch
(continuous batching would need inserting rows into a running KV cache); a request
is answered as soon as its own row ends (`row_done`), not when the whole batch ends.

Admission is bounded: at most `queue_size` requests wait or run; one more gets 429
at once instead of piling up. Every request has a deadline: a waiting request past it
leaves the queue, and a running one leaves its batch at the next token (the engine
drops that row; the other rows go on), answering 504. A streaming client that goes
away leaves the same way.

The output guard (if configured) rewrites or blocks replies; a stream cannot retract
text, so a guarded stream is generated in full, checked, and then sent as one chunk.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import json
import threading
import time
import uuid
from dataclasses import dataclass, field, replace
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
    max_batch: int = 8  # compatible requests decoded together; 1 = one at a time
    batch_wait_ms: float = 5.0  # how long the worker waits for a batch to fill before it starts

    def __post_init__(self) -> None:
        if self.max_batch < 1:
            raise ValueError(f"max_batch must be >= 1, got {self.max_batch}")
        if self.batch_wait_ms < 0:
            raise ValueError(f"batch_wait_ms must be >= 0, got {self.batch_wait_ms}")
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
        "tokens_per_s": Gauge("posttrain_tokens_per_second", "decode speed of the last finished batch (all rows)",
                              registry=registry),
        "batch_size": Histogram("posttrain_batch_size", "rows (requests) per generation batch", registry=registry,
                                buckets=(1, 2, 3, 4, 6, 8, 12, 16, 32, 64)),
        "drafted": Counter("posttrain_draft_tokens", "speculative draft tokens proposed", registry=registry),
        "accepted": Counter("posttrain_draft_tokens_accepted", "speculative draft tokens accepted",
                            registry=registry),
        "in_flight": Gauge("posttrain_requests_in_flight", "admitted requests (waiting + running)",
                           registry=registry),
        "guard_blocked": Counter("posttrain_guard_blocked", "replies blocked by the output guard",
                                 registry=registry),
    }


# ---------------------------------------------------------------------------------
# the batcher


@dataclass(eq=False)
class _Job:
    """One admitted request on its way through the batcher; `future` gets its GenerationOutput."""

    prompt: Any
    gen: GenerationConfig
    model_name: str
    deadline: float  # time.monotonic()
    on_piece: Callable[[str], None] | None  # streamed text pieces
    key: tuple | None  # requests with equal keys may share a batch; None: runs alone
    cancel: threading.Event = field(default_factory=threading.Event)
    future: concurrent.futures.Future = field(default_factory=concurrent.futures.Future)

    def expired(self) -> bool:
        return self.cancel.is_set() or time.monotonic() > self.deadline


def _settle(future: concurrent.futures.Future, result: Any = None, exc: BaseException | None = None) -> None:
    """Set a job's outcome unless it is settled already (its waiter was cancelled: the client left)."""
    with contextlib.suppress(concurrent.futures.InvalidStateError):
        if exc is not None:
            future.set_exception(exc)
        else:
            future.set_result(result)


def batch_key(gen: GenerationConfig, model_name: str) -> tuple | None:
    """What must be equal for two requests to decode in one batch (the server sets the rest).

    Greedy ignores temperature and top_p, so greedy requests batch regardless of them. A seeded
    sampled request gets None: one seeded generator draws for a whole batch, so its tokens
    would depend on its batch-mates.
    """
    if gen.do_sample and gen.seed is not None:
        return None
    sampling = (gen.temperature, gen.top_p) if gen.do_sample else ()
    return (model_name, gen.do_sample, *sampling)  # max_tokens and stop strings are per row


class Batcher:
    """A queue of jobs and the one worker thread that owns the model and runs them in batches.

    `run_batch(jobs)` decodes a list of compatible, unexpired jobs and settles every job's future.
    """

    def __init__(self, run_batch: Callable[[list[_Job]], None], max_batch: int, wait_s: float):
        self.run_batch, self.max_batch, self.wait_s = run_batch, max_batch, wait_s
        self.pending: list[_Job] = []
        self.cond = threading.Condition()
        self.thread: threading.Thread | None = None
        self.stopping = False

    def submit(self, job: _Job) -> concurrent.futures.Future:
        with self.cond:
            if self.thread is None or not self.thread.is_alive():  # started on first use
                self.stopping = False
                self.thread = threading.Thread(target=self._loop, name="posttrain-batcher", daemon=True)
                self.thread.start()
            self.pending.append(job)
            self.cond.notify()
        return job.future

    def abandon(self, job: _Job) -> None:
        """Deadline passed or client gone: a waiting job leaves the queue (504) now; a running one
        leaves its batch at its next token."""
        job.cancel.set()
        with self.cond:
            if job in self.pending:
                self.pending.remove(job)
                _settle(job.future, exc=_Timeout())

    def stop(self) -> None:
        with self.cond:
            self.stopping = True
            self.cond.notify_all()

    def _take(self) -> list[_Job] | None:
        """The oldest waiting job plus the compatible ones behind it (None: stopping, queue empty)."""
        with self.cond:
            batch: list[_Job] = []
            until = None
            while True:
                for job in list(self.pending):
                    if job.expired():
                        self.pending.remove(job)
                        _settle(job.future, exc=_Timeout())
                    elif not batch or (len(batch) < self.max_batch and batch[0].key is not None
                                       and job.key == batch[0].key):
                        self.pending.remove(job)
                        batch.append(job)
                full = batch and (len(batch) >= self.max_batch or batch[0].key is None)
                if batch and until is None:
                    until = time.monotonic() + self.wait_s
                if full or (batch and time.monotonic() >= until):
                    return batch
                if not batch and self.stopping:
                    return None
                self.cond.wait(None if not batch else until - time.monotonic())

    def _loop(self) -> None:
        while (jobs := self._take()) is not None:
            try:
                self.run_batch(jobs)
            except Exception as exc:  # run_batch settles futures itself; this is the last resort
                for job in jobs:
                    _settle(job.future, exc=exc)


# ---------------------------------------------------------------------------------
# adapters


def load_adapters(model, adapters: dict[str, str]):
    """Load PEFT adapters (name -> adapter dir or run dir) onto one base model.

    Returns the PeftModel; requests pick an adapter by name (`set_adapter`) or the bare
    base (adapters disabled) under the server's generation lock.
    """
    from pathlib import Path

    from peft import PeftModel

    from posttrain.models import resolve_model_path, torchao_hidden

    peft_model = model
    for name, spec in adapters.items():
        path = resolve_model_path(spec)
        if not (Path(path) / "adapter_config.json").is_file():
            raise ValueError(f"adapter {name}={spec}: {path} is not a PEFT adapter directory (no adapter_config.json)")
        with torchao_hidden():  # PEFT asks torchao about every layer it wraps
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
    """The FastAPI app. `generate_fn` has `engine.generate`'s signature (tests slow it down);
    it gets `row_max_new_tokens` and `row_done` only for batches of more than one request."""
    config = config or ServeConfig()
    registry = CollectorRegistry()
    m = _metrics(registry)
    admit_lock = threading.Lock()
    admitted = [0]
    created = int(time.time())
    names = [config.model_name, *config.adapters]

    @contextlib.asynccontextmanager
    async def lifespan(_app):
        yield
        batcher.stop()

    app = FastAPI(title="posttrain", docs_url=None, redoc_url=None, lifespan=lifespan)

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
                               decoding=config.decoding, backend=config.backend)  # the guard runs per row below
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

    def run_batch(jobs: list[_Job]) -> None:
        """In the worker thread: decode compatible jobs as one batch and settle each job's future."""
        n = len(jobs)
        limits = [job.gen.max_new_tokens for job in jobs]
        gen = replace(jobs[0].gen, max_new_tokens=max(limits))
        if n > 1:
            gen.decoding = "plain"  # SAM verifies one row at a time: see the module docstring
        dropped, sent = [False] * n, [False] * n

        def stream(row: int, token: int, piece: str) -> bool:
            job = jobs[row]
            if job.expired():
                if n == 1:
                    raise _Timeout()  # nothing else in the batch: stop generating at once
                dropped[row] = True
                return True  # the engine drops this row; the others go on
            if piece and job.on_piece is not None:
                sent[row] = True
                job.on_piece(piece)
            return False

        def answer(row: int, out: GenerationOutput, i: int = 0) -> None:
            """Settle one job with its row of `out` (guard applied): called as soon as the row ends."""
            text, blocked = out.texts[i], False
            if config.guard is not None:
                from posttrain.generate.guard import guard_text

                checked = guard_text(text, config.guard)
                text, blocked = checked.text, checked.blocked
                m["guard_blocked"].inc(int(blocked))
            _settle(jobs[row].future, GenerationOutput([text], [out.token_ids[i]], [out.logprobs[i]],
                                                       {"guard_blocked": int(blocked)}))

        name = jobs[0].model_name
        rows = {"row_max_new_tokens": limits, "row_stop": [job.gen.stop for job in jobs], "row_done": answer} \
            if n > 1 else {}
        m["batch_size"].observe(n)
        start = time.perf_counter()
        try:
            if config.adapters and name != config.model_name:
                model.set_adapter(name)
                context = contextlib.nullcontext()
            else:
                context = model.disable_adapter() if config.adapters else contextlib.nullcontext()
            with context:
                out = generate_fn(model, tokenizer, [job.prompt for job in jobs], gen, stream=stream, **rows)
        except Exception as exc:  # the server keeps serving: 504 or 500 for the request(s) it concerns
            for row, job in enumerate(jobs):
                if n > 1 and not job.future.done() and not sent[row] and not isinstance(exc, _Timeout):
                    run_batch([job])  # one bad request must not fail its batch-mates: each again, alone
                else:
                    _settle(job.future, exc=exc)
            return
        seconds = time.perf_counter() - start
        total = sum(len(ids) for ids in out.token_ids)
        m["tokens"].inc(total)
        if seconds > 0 and total:
            m["tokens_per_s"].set(total / seconds)
        m["drafted"].inc(out.stats.get("drafted", 0))
        m["accepted"].inc(out.stats.get("accepted", 0))
        for i, job in enumerate(jobs):
            if dropped[i]:
                _settle(job.future, exc=_Timeout())
            elif not job.future.done():  # a batch of one (or a generate_fn without row_done)
                answer(i, out, i)

    batcher = Batcher(run_batch, config.max_batch, config.batch_wait_ms / 1000)

    def submit(prompt: Any, gen: GenerationConfig, model_name: str, deadline: float,
               on_piece: Callable[[str], None] | None) -> tuple[_Job, asyncio.Future]:
        """Queue a request; its slot is released when the worker is done with it; at the deadline
        it leaves the queue or its batch."""
        loop = asyncio.get_running_loop()
        job = _Job(prompt, gen, model_name, deadline, on_piece, batch_key(gen, model_name))
        job.future.add_done_callback(lambda _: release())
        timer = loop.call_later(max(deadline - time.monotonic(), 0), batcher.abandon, job)
        waiter = asyncio.wrap_future(batcher.submit(job))
        waiter.add_done_callback(lambda _: timer.cancel())
        return job, waiter

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
        if req.stream:  # queue it here, so the slot is freed even if the stream is never read
            loop = asyncio.get_running_loop()
            queue: asyncio.Queue = asyncio.Queue()
            on_piece = None if config.guard is not None else (lambda p: loop.call_soon_threadsafe(queue.put_nowait, p))
            job, task = submit(prompt, gen, req.model, deadline, on_piece)
            task.add_done_callback(lambda _: queue.put_nowait(None))
            return StreamingResponse(stream_answer(task, queue, lambda: batcher.abandon(job), gen, req.model, rid,
                                                   chat, endpoint, started),
                                     media_type="text/event-stream", headers={"Cache-Control": "no-cache"})
        job, waiter = submit(prompt, gen, req.model, deadline, None)
        try:
            out = await waiter
        except asyncio.CancelledError:  # the client went away
            batcher.abandon(job)
            raise
        except _Timeout:
            return error_response(APIError(504, f"request timed out after {config.timeout_s} s", "timeout_error",
                                           code="timeout"), endpoint)
        except Exception as exc:  # a generation failure answers 500 and the server keeps serving
            return error_response(APIError(500, f"generation failed: {type(exc).__name__}: {exc}", "server_error"),
                                  endpoint)
        text, n = out.texts[0], len(out.token_ids[0])
        choice = {"index": 0, "finish_reason": finish_reason(out, gen), "logprobs": None}
        choice.update({"message": {"role": "assistant", "content": text}} if chat else {"text": text})
        m["requests"].labels(endpoint, "200").inc()
        m["latency"].labels(endpoint).observe(time.perf_counter() - started)
        return {"id": rid, "object": obj, "created": int(time.time()), "model": req.model, "choices": [choice],
                "usage": {"prompt_tokens": n_prompt, "completion_tokens": n, "total_tokens": n_prompt + n}}

    async def stream_answer(task, queue, abandon, gen, model_name, rid, chat, endpoint, started):
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
            if not task.done():  # the client went away: leave the queue, or the batch at the next token
                abandon()
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

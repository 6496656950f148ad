"""OpenAI-compatible HTTP server over the generation engine: routes, auth, admission, errors.

One model (optionally several PEFT LoRA adapters over it, picked by the request's
`model` name) serves `/v1/chat/completions`, `/v1/completions` (both with SSE
streaming), `/v1/models`, `/health` and `/metrics` (Prometheus text).

Requests are checked by schema.py and decoded by batcher.py's worker thread, which batches
compatible concurrent requests (see its docstring); this module turns HTTP into jobs and
outcomes into answers.

Admission is bounded: at most `queue_size` requests wait or run; one more gets 429
at once instead of piling up. Every request has a deadline: a waiting request past it
leaves the queue, and a running one leaves its batch at the next token, answering 504.
A streaming client that goes away leaves the same way.

The output guard (if configured) rewrites or blocks replies; a stream cannot retract
text, so a guarded stream is generated in full, checked, and then sent as one chunk.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import json
import threading
import time
import uuid
from typing import Any, Callable

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, PlainTextResponse, StreamingResponse
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from starlette.exceptions import HTTPException as StarletteHTTPException

from posttrain.generate.engine import GenerationConfig, GenerationOutput, generate
from posttrain.serve.batcher import Batcher, Job, JobTimeout, batch_key, batch_metrics, run_batch
from posttrain.serve.schema import (
    APIError,
    ChatRequest,
    CompletionRequest,
    ServeConfig,
    chunk_event,
    completion_body,
    finish_reason,
    parse_json,
    parse_request,
)

__all__ = ["APIError", "ServeConfig", "batch_key", "create_app", "load_adapters"]


def http_metrics(registry: CollectorRegistry) -> dict:
    """The HTTP side's Prometheus metrics, beside the worker's `batch_metrics`."""
    return {
        "requests": Counter("posttrain_requests", "HTTP requests by endpoint and status", ["endpoint", "status"],
                            registry=registry),
        "errors": Counter("posttrain_errors", "error answers by OpenAI error type", ["type"], registry=registry),
        "latency": Histogram("posttrain_request_latency_seconds", "request latency (streams: until the last chunk)",
                             ["endpoint"], registry=registry,
                             buckets=(0.05, 0.1, 0.25, 0.5, 1, 2, 5, 10, 30, 60, 120)),
        "prompt_tokens": Counter("posttrain_prompt_tokens", "prompt tokens processed", registry=registry),
        "in_flight": Gauge("posttrain_requests_in_flight", "admitted requests (waiting + running)",
                           registry=registry),
    }


def load_adapters(model, adapters: dict[str, str]):
    """Load PEFT adapters (name -> adapter dir or run dir) onto one base model.

    Returns the PeftModel; requests pick an adapter by name (`set_adapter`) or the bare
    base (adapters disabled) under the server's generation lock.
    """
    from pathlib import Path

    from peft import PeftModel

    from posttrain.hf_imports import torchao_hidden
    from posttrain.models import resolve_model_path

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


def failure_error(exc: BaseException, timeout_s: float) -> APIError:
    """A job's failure as the answer: its deadline (504) or the generation (500)."""
    if isinstance(exc, JobTimeout):
        return APIError(504, f"request timed out after {timeout_s} s", "timeout_error", code="timeout")
    return APIError(500, f"generation failed: {type(exc).__name__}: {exc}", "server_error")


class _Server:
    """One app's state (settings, metrics, admission count, batcher) and its handlers' steps."""

    def __init__(self, model, tokenizer, config: ServeConfig, generate_fn: Callable[..., GenerationOutput]):
        self.model, self.tokenizer, self.config, self.generate_fn = model, tokenizer, config, generate_fn
        self.registry = CollectorRegistry()
        self.m = {**http_metrics(self.registry), **batch_metrics(self.registry)}
        self.admit_lock = threading.Lock()
        self.admitted = 0
        self.created = int(time.time())
        self.names = config.served_names()
        worker = functools.partial(run_batch, decode=self.decode, guard=config.guard, metrics=self.m)
        self.batcher = Batcher(worker, config.max_batch, config.batch_wait_ms / 1000)

    def decode(self, name: str, prompts: list, gen: GenerationConfig, **kwargs) -> GenerationOutput:
        """In the worker thread: generate with adapter `name` (or the bare base) selected."""
        config, model = self.config, self.model
        if config.adapters and name != config.model_name:
            model.set_adapter(name)
            context = contextlib.nullcontext()
        else:
            context = model.disable_adapter() if config.adapters else contextlib.nullcontext()
        with context:
            return self.generate_fn(model, self.tokenizer, prompts, gen, **kwargs)

    def error_response(self, exc: APIError, endpoint: str) -> JSONResponse:
        self.m["errors"].labels(exc.type).inc()
        self.m["requests"].labels(endpoint, str(exc.status)).inc()
        return JSONResponse(exc.body(), status_code=exc.status)

    def check_key(self, request: Request) -> None:
        if not self.config.api_keys:
            return
        header = request.headers.get("authorization", "")
        scheme, _, key = header.partition(" ")
        if scheme.lower() != "bearer" or not key:
            raise APIError(401, "missing API key: send the header 'Authorization: Bearer KEY'",
                           "authentication_error", code="invalid_api_key")
        if key.strip() not in self.config.api_keys:
            raise APIError(401, "incorrect API key", "authentication_error", code="invalid_api_key")

    async def read_json(self, request: Request) -> Any:
        limit = self.config.max_body_bytes
        length = request.headers.get("content-length")
        if length is not None and length.isdigit() and int(length) > limit:
            raise APIError(413, f"request body of {length} bytes is over the {limit}-byte limit",
                           code="request_too_large")
        body = bytearray()
        async for chunk in request.stream():
            body += chunk
            if len(body) > limit:
                raise APIError(413, f"request body is over the {limit}-byte limit", code="request_too_large")
        return parse_json(body)

    def admit(self) -> None:
        with self.admit_lock:
            if self.admitted >= self.config.queue_size:
                raise APIError(429, f"server busy: {self.admitted} requests are queued or running; retry later",
                               "rate_limit_error", code="queue_full")
            self.admitted += 1
            self.m["in_flight"].set(self.admitted)

    def release(self) -> None:
        with self.admit_lock:
            self.admitted -= 1
            self.m["in_flight"].set(self.admitted)

    def submit(self, prompt: Any, gen: GenerationConfig, model_name: str, deadline: float,
               on_piece: Callable[[str], None] | None) -> tuple[Job, asyncio.Future]:
        """Queue a request; its slot is released when the worker is done with it; at the deadline
        it leaves the queue or its batch."""
        loop = asyncio.get_running_loop()
        job = Job(prompt, gen, model_name, deadline, on_piece, batch_key(gen, model_name))
        job.future.add_done_callback(lambda _: self.release())
        timer = loop.call_later(max(deadline - time.monotonic(), 0), self.batcher.abandon, job)
        waiter = asyncio.wrap_future(self.batcher.submit(job))
        waiter.add_done_callback(lambda _: timer.cancel())
        return job, waiter

    def prompt_tokens(self, prompt: Any) -> int:
        from posttrain.generate.engine import encode_prompts

        n = len(encode_prompts(self.tokenizer, [prompt])[0])
        self.m["prompt_tokens"].inc(n)
        return n

    async def handle(self, request: Request, endpoint: str, chat: bool):
        started = time.perf_counter()
        try:
            self.check_key(request)
            req, gen = parse_request(ChatRequest if chat else CompletionRequest, await self.read_json(request),
                                     self.config)
            prompt = [msg.model_dump() for msg in req.messages] if chat else req.prompt
            try:
                n_prompt = self.prompt_tokens(prompt)
            except (ValueError, TypeError) as exc:
                raise APIError(400, str(exc), param="messages" if chat else "prompt") from None
            self.admit()
        except APIError as exc:
            return self.error_response(exc, endpoint)
        deadline = time.monotonic() + self.config.timeout_s
        rid = ("chatcmpl-" if chat else "cmpl-") + uuid.uuid4().hex[:24]
        if req.stream:  # queue it here, so the slot is freed even if the stream is never read
            loop = asyncio.get_running_loop()
            queue: asyncio.Queue = asyncio.Queue()
            on_piece = None if self.config.guard is not None else \
                (lambda p: loop.call_soon_threadsafe(queue.put_nowait, p))
            job, task = self.submit(prompt, gen, req.model, deadline, on_piece)
            task.add_done_callback(lambda _: queue.put_nowait(None))
            return StreamingResponse(self.stream_answer(task, queue, lambda: self.batcher.abandon(job), gen, req.model,
                                                        rid, chat, endpoint, started),
                                     media_type="text/event-stream", headers={"Cache-Control": "no-cache"})
        job, waiter = self.submit(prompt, gen, req.model, deadline, None)
        try:
            out = await waiter
        except asyncio.CancelledError:  # the client went away
            self.batcher.abandon(job)
            raise
        except Exception as exc:  # a timeout answers 504, a generation failure 500; the server keeps serving
            return self.error_response(failure_error(exc, self.config.timeout_s), endpoint)
        self.m["requests"].labels(endpoint, "200").inc()
        self.m["latency"].labels(endpoint).observe(time.perf_counter() - started)
        return completion_body(rid, chat, req.model, out.texts[0], finish_reason(out, gen), n_prompt,
                               len(out.token_ids[0]))

    async def stream_answer(self, task, queue, abandon, gen, model_name, rid, chat, endpoint, started):
        """SSE chunks as tokens decode; with a guard, the whole checked reply as one chunk."""
        status = "200"
        try:
            if chat:
                yield chunk_event(rid, chat, model_name, {"role": "assistant", "content": ""}, None)
            while (piece := await queue.get()) is not None:
                yield chunk_event(rid, chat, model_name, {"content": piece} if chat else piece, None)
            try:
                out = task.result()
            except Exception as exc:  # headers are sent: the error goes in the stream, as OpenAI does
                err = failure_error(exc, self.config.timeout_s)
                status = str(err.status)
                self.m["errors"].labels(err.type).inc()
                yield f"data: {json.dumps(err.body())}\n\n"
                return
            if self.config.guard is not None and out.texts[0]:
                yield chunk_event(rid, chat, model_name, {"content": out.texts[0]} if chat else out.texts[0], None)
            yield chunk_event(rid, chat, model_name, {} if chat else "", finish_reason(out, gen))
            yield "data: [DONE]\n\n"
        except Exception:
            status = "500"
            self.m["errors"].labels("server_error").inc()
            raise
        finally:
            if not task.done():  # the client went away: leave the queue, or the batch at the next token
                abandon()
            self.m["requests"].labels(endpoint, status).inc()
            self.m["latency"].labels(endpoint).observe(time.perf_counter() - started)


def create_app(model, tokenizer, config: ServeConfig | None = None,
               generate_fn: Callable[..., GenerationOutput] = generate) -> FastAPI:
    """The FastAPI app. `generate_fn` has `engine.generate`'s signature (tests slow it down);
    it gets `row_max_new_tokens` and `row_done` only for batches of more than one request."""
    server = _Server(model, tokenizer, config or ServeConfig(), generate_fn)

    @contextlib.asynccontextmanager
    async def lifespan(_app):
        yield
        server.batcher.stop()

    app = FastAPI(title="posttrain", docs_url=None, redoc_url=None, lifespan=lifespan)

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, exc: StarletteHTTPException):
        kind = "not_found_error" if exc.status_code == 404 else "invalid_request_error"
        return server.error_response(APIError(exc.status_code, f"{request.method} {request.url.path}: {exc.detail}",
                                              kind), "other")

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request):
        return await server.handle(request, "/v1/chat/completions", chat=True)

    @app.post("/v1/completions")
    async def completions(request: Request):
        return await server.handle(request, "/v1/completions", chat=False)

    @app.get("/v1/models")
    async def list_models(request: Request):
        try:
            server.check_key(request)
        except APIError as exc:
            return server.error_response(exc, "/v1/models")
        server.m["requests"].labels("/v1/models", "200").inc()
        return {"object": "list", "data": [{"id": n, "object": "model", "created": server.created,
                                            "owned_by": "posttrain"} for n in server.names]}

    @app.get("/health")
    async def health():
        return {"status": "ok", "models": server.names, "in_flight": server.admitted}

    @app.get("/metrics")
    async def metrics():
        return PlainTextResponse(generate_latest(server.registry).decode(), media_type=CONTENT_TYPE_LATEST)

    return app

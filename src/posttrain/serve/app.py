"""OpenAI-compatible HTTP server over the generation engine: routes, auth, admission, errors.

One model (optionally several PEFT LoRA adapters over it, picked by the request's
`model` name) serves `/v1/chat/completions`, `/v1/completions` (both with SSE
streaming, `n` samples per prompt), `/v1/feedback`, `/v1/models`, `/health` and `/metrics`
(Prometheus text).

Feedback: with `feedback_db` set, every answered request and its replies (each choice has a
`reply_id`) are committed to the database (data/feedback.py) before the answer goes out, a
stream's before its closing chunks and `[DONE]`; `/v1/feedback` then takes a rating of a
reply or a choice between two replies to the same prompt, also committed before it answers.

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
import collections
import contextlib
import functools
import json
import logging
import threading
import time
import uuid
from typing import Any, Callable

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, PlainTextResponse, StreamingResponse
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from starlette.exceptions import HTTPException as StarletteHTTPException

from posttrain.data.feedback import DifferentPrompts, UnknownReplies, now_iso, open_store, redact_value
from posttrain.generate.engine import GenerationConfig, GenerationOutput, generate
from posttrain.serve.batcher import Batcher, Job, JobTimeout, batch_key, batch_metrics, run_batch
from posttrain.serve.schema import (
    APIError,
    ChatRequest,
    CompletionRequest,
    RatingFeedback,
    ServeConfig,
    choice_configs,
    chunk_event,
    completion_body,
    finish_reason,
    parse_feedback,
    parse_json,
    parse_request,
    reply_ids,
)

__all__ = ["APIError", "ServeConfig", "batch_key", "create_app", "load_adapters"]
log = logging.getLogger("posttrain.serve")


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
        "in_flight": Gauge("posttrain_requests_in_flight", "admitted samples (waiting + running; n per request)",
                           registry=registry),
        "feedback": Counter("posttrain_feedback", "feedback received: ratings by up/down, choices",
                            ["kind", "rating"], registry=registry),
        "up_rate": Gauge("posttrain_feedback_up_rate", "share of 'up' among the last feedback_window ratings "
                         "(NaN before the first)", registry=registry),
        "window": Gauge("posttrain_feedback_window_ratings", "ratings in the up-rate window", registry=registry),
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


def storage_error(exc: BaseException) -> APIError:
    """The feedback database refused a write: the reply is not acknowledged (500), and the
    operator is told (a full disk or a dropped database link is theirs to fix)."""
    log.error("feedback database write failed: %s: %s", type(exc).__name__, exc)
    return APIError(500, f"storing failed: {type(exc).__name__}: {exc}", "server_error", code="storage_error")


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
        self.store = open_store(config.feedback_db) if config.feedback_db else None
        self.ratings: collections.deque[bool] = collections.deque(maxlen=config.feedback_window)
        if self.store is not None:  # a restart keeps the window: the latest ratings from the database
            self.ratings.extend(self.store.recent_ratings(config.feedback_window))
        self.m["up_rate"].set(sum(self.ratings) / len(self.ratings) if self.ratings else float("nan"))
        self.m["window"].set(len(self.ratings))

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

    def admit(self, n: int = 1) -> None:
        """Take n slots (one per sample) or answer 429."""
        with self.admit_lock:
            if self.admitted + n > self.config.queue_size:
                raise APIError(429, f"server busy: {self.admitted} samples are queued or running; retry later",
                               "rate_limit_error", code="queue_full")
            self.admitted += n
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
        started, created = time.perf_counter(), now_iso()
        try:
            self.check_key(request)
            req, gen = parse_request(ChatRequest if chat else CompletionRequest, await self.read_json(request),
                                     self.config)
            prompt = [msg.model_dump() for msg in req.messages] if chat else req.prompt
            try:
                n_prompt = self.prompt_tokens(prompt)
            except (ValueError, TypeError) as exc:
                raise APIError(400, str(exc), param="messages" if chat else "prompt") from None
            self.admit(req.n)
        except APIError as exc:
            return self.error_response(exc, endpoint)
        deadline = time.monotonic() + self.config.timeout_s
        rid = ("chatcmpl-" if chat else "cmpl-") + uuid.uuid4().hex[:24]
        ids, gens = reply_ids(rid, req.n), choice_configs(gen, req.n)
        store = functools.partial(self.store_replies, rid, created, chat, req, gen, prompt, ids, gens)
        if req.stream:  # queue it here, so the slots are freed even if the stream is never read
            loop = asyncio.get_running_loop()
            queue: asyncio.Queue = asyncio.Queue()
            jobs, tasks = [], []
            for i, g in enumerate(gens):
                on_piece = None if self.config.guard is not None else \
                    (lambda p, i=i: loop.call_soon_threadsafe(queue.put_nowait, (i, p)))
                job, task = self.submit(prompt, g, req.model, deadline, on_piece)
                task.add_done_callback(lambda _, i=i: queue.put_nowait((i, None)))
                jobs.append(job)
                tasks.append(task)
            return StreamingResponse(self.stream_answer(tasks, queue, lambda: self.abandon(jobs), gens, req.model, ids,
                                                        rid, chat, endpoint, started, store),
                                     media_type="text/event-stream", headers={"Cache-Control": "no-cache"})
        jobs, waiters = zip(*(self.submit(prompt, g, req.model, deadline, None) for g in gens))
        for waiter in waiters:  # a sample abandoned after another failed: its outcome is read here
            waiter.add_done_callback(lambda f: f.cancelled() or f.exception())
        try:
            done, _ = await asyncio.wait(waiters, return_when=asyncio.FIRST_EXCEPTION)
        except asyncio.CancelledError:  # the client went away
            self.abandon(jobs)
            raise
        failed = next((w.exception() for w in done if w.exception() is not None), None)
        if failed is not None:  # a timeout answers 504, a generation failure 500; the server keeps serving
            self.abandon(jobs)
            return self.error_response(failure_error(failed, self.config.timeout_s), endpoint)
        outs = [w.result() for w in waiters]
        try:
            await store(outs)
        except Exception as exc:  # not stored: not acknowledged either
            return self.error_response(storage_error(exc), endpoint)
        self.m["requests"].labels(endpoint, "200").inc()
        self.m["latency"].labels(endpoint).observe(time.perf_counter() - started)
        return completion_body(rid, chat, req.model,
                               [(out.texts[0], finish_reason(out, g), i) for out, g, i in zip(outs, gens, ids)],
                               n_prompt, sum(len(out.token_ids[0]) for out in outs))

    def abandon(self, jobs) -> None:
        for job in jobs:
            self.batcher.abandon(job)

    async def store_replies(self, rid: str, created: str, chat: bool, req, gen: GenerationConfig, prompt: Any,
                            ids: list[str], gens: list[GenerationConfig], outs: list[GenerationOutput]) -> None:
        """Commit the request and its replies (PII redacted if configured) before the answer goes out."""
        if self.store is None:
            return
        redact = self.config.feedback_redact_pii
        replies = [{"id": i, "text": redact_value(out.texts[0])[0] if redact else out.texts[0],
                    "finish_reason": finish_reason(out, g), "completion_tokens": len(out.token_ids[0])}
                   for i, out, g in zip(ids, outs, gens)]
        params = {"temperature": req.temperature, "top_p": req.top_p, "max_tokens": gen.max_new_tokens,
                  "stop": gen.stop, "seed": req.seed, "n": req.n, "stream": req.stream, "decoding": gen.decoding}
        conversation = {"id": rid, "created_at": created, "endpoint": "chat" if chat else "completion",
                        "model": req.model, "prompt": redact_value(prompt)[0] if redact else prompt,
                        "params": params, "redacted": redact}
        await asyncio.to_thread(self.store.add_conversation, conversation, replies)

    async def stream_answer(self, tasks, queue, abandon, gens, model_name, ids, rid, chat, endpoint, started, store):
        """SSE chunks as tokens decode (choice `index` per sample); with a guard, each whole checked
        reply as one chunk. The replies are stored before the closing chunks and `[DONE]`."""
        status = "200"
        try:
            if chat:
                for i, reply_id in enumerate(ids):
                    yield chunk_event(rid, chat, model_name, {"role": "assistant", "content": ""}, None, i, reply_id)
            running = len(tasks)
            while running:
                i, piece = await queue.get()
                if piece is None:
                    running -= 1
                    continue
                yield chunk_event(rid, chat, model_name, {"content": piece} if chat else piece, None, i, ids[i])
            try:
                outs = [task.result() for task in tasks]
            except Exception as exc:  # headers are sent: the error goes in the stream, as OpenAI does
                err = failure_error(exc, self.config.timeout_s)
                status = str(err.status)
                self.m["errors"].labels(err.type).inc()
                yield f"data: {json.dumps(err.body())}\n\n"
                return
            if self.config.guard is not None:
                for i, out in enumerate(outs):
                    if out.texts[0]:
                        yield chunk_event(rid, chat, model_name, {"content": out.texts[0]} if chat else out.texts[0],
                                          None, i, ids[i])
            try:
                await store(outs)
            except Exception as exc:  # not stored: no [DONE], so the client does not take it as acknowledged
                err = storage_error(exc)
                status = str(err.status)
                self.m["errors"].labels(err.type).inc()
                yield f"data: {json.dumps(err.body())}\n\n"
                return
            for i, (out, gen) in enumerate(zip(outs, gens)):
                yield chunk_event(rid, chat, model_name, {} if chat else "", finish_reason(out, gen), i, ids[i])
            yield "data: [DONE]\n\n"
        except Exception:
            status = "500"
            self.m["errors"].labels("server_error").inc()
            raise
        finally:
            if not all(task.done() for task in tasks):  # the client went away: leave the queue or the batch
                abandon()
            self.m["requests"].labels(endpoint, status).inc()
            self.m["latency"].labels(endpoint).observe(time.perf_counter() - started)

    async def feedback(self, request: Request):
        """`POST /v1/feedback`: a rating of one reply or a choice between two, committed before the answer."""
        endpoint = "/v1/feedback"
        try:
            self.check_key(request)
            if self.store is None:
                raise APIError(404, "this server stores no feedback: start it with --feedback-db PATH "
                                    "(ServeConfig.feedback_db)", "not_found_error", code="feedback_disabled")
            fb = parse_feedback(await self.read_json(request))
            text = redact_value(fb.text)[0] if fb.text and self.config.feedback_redact_pii else fb.text
            rating = isinstance(fb, RatingFeedback)
            try:
                if rating:
                    fid = await asyncio.to_thread(self.store.add_rating, fb.reply_id, fb.rating, text)
                else:
                    fid = await asyncio.to_thread(self.store.add_choice, fb.chosen, fb.rejected, text)
            except UnknownReplies as exc:
                param = "reply_id" if rating else "reply_ids"
                raise APIError(404, f"{param}: {exc} (unknown, or a stream that has not finished)",
                               "not_found_error", param=param, code="reply_not_found") from None
            except DifferentPrompts as exc:
                raise APIError(400, f"reply_ids: {exc}", param="reply_ids", code="different_prompts") from None
            except Exception as exc:
                raise storage_error(exc) from None
        except APIError as exc:
            return self.error_response(exc, endpoint)
        self.m["requests"].labels(endpoint, "200").inc()
        if rating:
            self.m["feedback"].labels("rating", fb.rating).inc()
            self.note_rating(fb.rating == "up")
        else:
            self.m["feedback"].labels("choice", "").inc()
        return {"id": fid, "object": "feedback", "created": int(time.time()), "kind": "rating" if rating else "choice"}

    def note_rating(self, up: bool) -> None:
        """Slide the up-rate window (the last `feedback_window` ratings) by one rating."""
        with self.admit_lock:
            self.ratings.append(up)
            self.m["up_rate"].set(sum(self.ratings) / len(self.ratings))
            self.m["window"].set(len(self.ratings))


def create_app(model, tokenizer, config: ServeConfig | None = None,
               generate_fn: Callable[..., GenerationOutput] = generate) -> FastAPI:
    """The FastAPI app. `generate_fn` has `engine.generate`'s signature (tests slow it down);
    it gets `row_max_new_tokens` and `row_done` only for batches of more than one request."""
    server = _Server(model, tokenizer, config or ServeConfig(), generate_fn)

    @contextlib.asynccontextmanager
    async def lifespan(_app):
        yield
        server.batcher.stop()
        if server.store is not None:
            server.store.close()

    app = FastAPI(title="posttrain", docs_url=None, redoc_url=None, lifespan=lifespan)
    app.state.feedback_store = server.store  # None when feedback_db is not set

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

    @app.post("/v1/feedback")
    async def feedback(request: Request):
        return await server.feedback(request)

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

"""OpenAI-compatible HTTP server over the generation engine: routes, auth, admission, errors.

One model (optionally several PEFT LoRA adapters over it, picked by the request's
`model` name) serves `/v1/chat/completions`, `/v1/completions` (both with SSE
streaming, `n` samples per prompt), `/v1/feedback`, `/v1/models`, `/health` and `/metrics`
(Prometheus text).

Feedback: with `feedback_db` set, every answered request and its replies (each choice has a
`reply_id`) are committed to the database (data/feedback.py) before the answer goes out, a
stream's before its closing chunks and `[DONE]`; `/v1/feedback` then takes a rating of a
reply or a choice between two replies to the same prompt, also committed before it answers.

Requests are checked by schema.py and decoded by one worker thread: by default scheduler.py's
continuous batcher (requests join and leave the running batch at token boundaries), with
`batching: static` batcher.py's static batches (see their docstrings); this module turns HTTP
into jobs and outcomes into answers.

Admission is bounded: at most `queue_size` requests wait or run; one more gets 429
at once instead of piling up. Every request has a deadline: a waiting request past it
leaves the queue, and a running one leaves its batch at the next token, answering 504.
A streaming client that goes away leaves the same way.

The output guard (if configured) rewrites or blocks replies; a stream cannot retract
text, so a guarded stream is generated in full, checked, and then sent as one chunk.

Adapters (adapters.py): `/admin/adapters` (admin keys only) loads, swaps and deletes LoRA
adapters while serving; a request is pinned at admission to the adapter version its `model`
names then, and finishes on it even if the name is swapped meanwhile. Loads and deletions run
in the batcher's worker thread between batches. Every reply also feeds monitor.py's per-adapter
windows and drift alerts.
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
from posttrain.serve.adapters import (AdapterEntry, AdapterProblem, AdapterTable, attach_adapter, base_identity,
                                      check_fits, check_name, detach_adapter, read_adapter)
from posttrain.serve.batcher import Batcher, Job, JobTimeout, batch_key, batch_metrics, run_batch
from posttrain.serve.monitor import Monitor, drift_thresholds, monitor_metrics
from posttrain.serve.scheduler import ContinuousBatcher, selector
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
    parse_adapter_load,
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
        "adapter_version": Gauge("posttrain_adapter_version", "version of the adapter a name serves (1 = first "
                                 "load, +1 per swap; 0 after a delete)", ["adapter"], registry=registry),
        "adapter_loads": Counter("posttrain_adapter_loads", "adapter loads through /admin/adapters by outcome",
                                 ["outcome"], registry=registry),
    }


def load_adapters(model, adapters: dict[str, str]):
    """Load PEFT LoRA adapters (name -> adapter dir or run dir) onto one base model, each under its
    own name (checked like a hot swap: adapters.py). Returns the PeftModel; pass it to `create_app`
    with `ServeConfig(adapters=[names])`."""
    for name, spec in adapters.items():
        try:
            info = read_adapter(spec)
            check_fits(model, info)
        except AdapterProblem as exc:
            raise ValueError(f"adapter {name}={spec}: {exc}") from None
        model = attach_adapter(model, name, info["path"])
    return model


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

    def __init__(self, model, tokenizer, config: ServeConfig, generate_fn: Callable[..., GenerationOutput],
                 adapter_paths: dict[str, str] | None = None):
        self.model, self.tokenizer, self.config, self.generate_fn = model, tokenizer, config, generate_fn
        self.registry = CollectorRegistry()
        self.m = {**http_metrics(self.registry), **batch_metrics(self.registry), **monitor_metrics(self.registry)}
        self.admit_lock = threading.Lock()
        self.admin_lock = asyncio.Lock()  # one load or delete at a time
        self.admitted = 0
        self.created = int(time.time())
        self.adapters = AdapterTable()
        loaded = set(getattr(model, "peft_config", None) or {})
        for name in config.adapters:  # loaded onto the model before (load_adapters): PEFT name = served name
            if name not in loaded:
                raise ValueError(f"adapters: {name!r} is not loaded on the model (PEFT adapters: "
                                 f"{sorted(loaded) or 'none'}); load it with load_adapters first")
            self.adapters.install(AdapterEntry(name, name, 1, loaded_at=now_iso()))
            self.m["adapter_version"].labels(name).set(1)
        for name, spec in (adapter_paths or {}).items():  # as a hot load would (the worker is not running yet)
            try:
                if name in self.adapters.names():
                    raise AdapterProblem(f"name: {name!r} is given twice", "invalid_name")
                self.install(check_name(name, config.model_name), read_adapter(spec), True, spec)
            except AdapterProblem as exc:
                raise ValueError(f"adapter {name}={spec}: {exc}") from None
            self.m["adapter_version"].labels(name).set(1)
        self.monitor = Monitor(self.m, config.monitor_window, drift_thresholds(config.drift_threshold),
                               config.drift_baseline)
        worker = functools.partial(run_batch, decode=self.decode, guard=config.guard, metrics=self.m)
        # a LoRA run served as itself: its own adapter is the model behind the base name (not the bare base)
        own = getattr(model, "active_adapter", None) if getattr(model, "peft_config", None) else None
        self.select = selector(lambda: self.model, own if isinstance(own, str) and own not in config.adapters else None)
        if config.batching == "continuous" and generate_fn is generate:
            self.batcher = ContinuousBatcher(worker, config.max_batch, config.batch_wait_ms / 1000,
                                             select=self.select, tokenizer=tokenizer, guard=config.guard,
                                             metrics=self.m, prefill_chunk=config.prefill_chunk,
                                             draft_max_rows=config.draft_max_rows)
        else:  # a replacement generate_fn (tests) decodes whole batches: only the static batcher calls it
            self.batcher = Batcher(worker, config.max_batch, config.batch_wait_ms / 1000)
        self.store = open_store(config.feedback_db) if config.feedback_db else None
        self.ratings: collections.deque[bool] = collections.deque(maxlen=config.feedback_window)
        if self.store is not None:  # a restart keeps the window: the latest ratings from the database
            self.ratings.extend(self.store.recent_ratings(config.feedback_window))
        self.m["up_rate"].set(sum(self.ratings) / len(self.ratings) if self.ratings else float("nan"))
        self.m["window"].set(len(self.ratings))
        if self.ratings:  # a restored full window is the up-rate's baseline
            self.monitor.record_up_rate(sum(self.ratings) / len(self.ratings),
                                        len(self.ratings) == config.feedback_window)

    def served_names(self) -> list[str]:
        """What clients may put in `model` now: the base model's name, then the adapters'."""
        return [self.config.model_name, *self.adapters.names()]

    def decode(self, peft_name: str, prompts: list, gen: GenerationConfig, **kwargs) -> GenerationOutput:
        """In the worker thread: generate with PEFT adapter `peft_name` selected ("": the bare base).
        A batch holds one adapter's requests (the batch key), and only this thread selects."""
        with self.select(peft_name) as model:
            return self.generate_fn(model, self.tokenizer, prompts, gen, **kwargs)

    def error_response(self, exc: APIError, endpoint: str) -> JSONResponse:
        self.m["errors"].labels(exc.type).inc()
        self.m["requests"].labels(endpoint, str(exc.status)).inc()
        return JSONResponse(exc.body(), status_code=exc.status)

    def check_key(self, request: Request, keys: list[str] | None = None, what: str = "API key") -> None:
        keys = self.config.api_keys if keys is None else keys
        if not keys:
            return
        header = request.headers.get("authorization", "")
        scheme, _, key = header.partition(" ")
        if scheme.lower() != "bearer" or not key:
            raise APIError(401, f"missing {what}: send the header 'Authorization: Bearer KEY'",
                           "authentication_error", code="invalid_api_key")
        if key.strip() not in keys:
            raise APIError(401, f"incorrect {what}", "authentication_error", code="invalid_api_key")

    def check_admin(self, request: Request) -> None:
        """/admin/* needs an admin key (never a client API key); without admin keys it is off."""
        if not self.config.admin_keys:
            raise APIError(403, "adapter administration is off: start the server with --admin-key KEY (or the "
                                "POSTTRAIN_ADMIN_KEY environment variable; ServeConfig.admin_keys)",
                           "permission_error", code="admin_disabled")
        self.check_key(request, self.config.admin_keys, "admin key")

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

    def release(self, n: int = 1) -> None:
        with self.admit_lock:
            self.admitted -= n
            self.m["in_flight"].set(self.admitted)

    def pin(self, name: str, n: int) -> AdapterEntry | None:
        """Pin n admitted samples to the adapter version `name` resolves to now (None: the base);
        a name deleted since the request was checked answers 404 and frees the slots."""
        if name == self.config.model_name:
            return None
        try:
            return self.adapters.acquire(name, n)
        except KeyError:
            self.release(n)
            raise APIError(404, f"the model '{name}' does not exist; served: {', '.join(self.served_names())}",
                           param="model", code="model_not_found") from None

    def unpin(self, entry: AdapterEntry | None) -> None:
        if entry is not None and self.adapters.release(entry):  # retired and unused: delete it from the model
            self.batcher.call(self.collect)

    def collect(self) -> None:
        """In the worker thread: delete retired adapter versions no request holds any more."""
        for entry in self.adapters.unused_retired():
            if entry.peft_name in (getattr(self.model, "peft_config", None) or {}):
                self.model = detach_adapter(self.model, entry.peft_name)
                log.info("adapter %s version %d unloaded", entry.name, entry.version)

    def submit(self, prompt: Any, gen: GenerationConfig, entry: AdapterEntry | None, deadline: float,
               on_piece: Callable[[str], None] | None) -> tuple[Job, asyncio.Future]:
        """Queue a request; its slot (and adapter pin) is released when the worker is done with it; at
        the deadline it leaves the queue or its batch."""
        loop = asyncio.get_running_loop()
        peft_name = entry.peft_name if entry is not None else ""
        job = Job(prompt, gen, peft_name, deadline, on_piece, batch_key(gen, peft_name))
        job.future.add_done_callback(lambda _: (self.release(), self.unpin(entry)))
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
        req = None
        try:
            self.check_key(request)
            req, gen = parse_request(ChatRequest if chat else CompletionRequest, await self.read_json(request),
                                     self.config, self.served_names())
            prompt = [msg.model_dump() for msg in req.messages] if chat else req.prompt
            try:
                n_prompt = self.prompt_tokens(prompt)
            except (ValueError, TypeError) as exc:
                raise APIError(400, str(exc), param="messages" if chat else "prompt") from None
            self.admit(req.n)
            entry = self.pin(req.model, req.n)
        except APIError as exc:
            if req is not None:  # a served name: counted per adapter (an unknown one would be any string)
                self.m["adapter_requests"].labels(req.model, str(exc.status)).inc()
            return self.error_response(exc, endpoint)
        deadline = time.monotonic() + self.config.timeout_s
        rid = ("chatcmpl-" if chat else "cmpl-") + uuid.uuid4().hex[:24]
        ids, gens = reply_ids(rid, req.n), choice_configs(gen, req.n)
        store = functools.partial(self.store_replies, rid, created, chat, req, gen, prompt, ids, gens, entry)
        observe = functools.partial(self.observe, req.model, started)
        if req.stream:  # queue it here, so the slots are freed even if the stream is never read
            loop = asyncio.get_running_loop()
            queue: asyncio.Queue = asyncio.Queue()
            jobs, tasks = [], []
            for i, g in enumerate(gens):
                on_piece = None if self.config.guard is not None else \
                    (lambda p, i=i: loop.call_soon_threadsafe(queue.put_nowait, (i, p)))
                job, task = self.submit(prompt, g, entry, deadline, on_piece)
                task.add_done_callback(lambda _, i=i: queue.put_nowait((i, None)))
                jobs.append(job)
                tasks.append(task)
            return StreamingResponse(self.stream_answer(tasks, queue, lambda: self.abandon(jobs), gens, req.model, ids,
                                                        rid, chat, endpoint, started, store, observe),
                                     media_type="text/event-stream", headers={"Cache-Control": "no-cache"})
        jobs, waiters = zip(*(self.submit(prompt, g, entry, deadline, None) for g in gens))
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
            err = failure_error(failed, self.config.timeout_s)
            observe(str(err.status), [])
            return self.error_response(err, endpoint)
        outs = [w.result() for w in waiters]
        try:
            await store(outs)
        except Exception as exc:  # not stored: not acknowledged either
            observe("500", [])
            return self.error_response(storage_error(exc), endpoint)
        self.m["requests"].labels(endpoint, "200").inc()
        self.m["latency"].labels(endpoint).observe(time.perf_counter() - started)
        observe("200", outs)
        return completion_body(rid, chat, req.model,
                               [(out.texts[0], finish_reason(out, g), i) for out, g, i in zip(outs, gens, ids)],
                               n_prompt, sum(len(out.token_ids[0]) for out in outs))

    def abandon(self, jobs) -> None:
        for job in jobs:
            self.batcher.abandon(job)

    def observe(self, adapter: str, started: float, status: str, outs: list[GenerationOutput]) -> None:
        """Per-adapter request count and latency; each answered reply into the adapter's window."""
        self.m["adapter_requests"].labels(adapter, status).inc()
        self.m["adapter_latency"].labels(adapter).observe(time.perf_counter() - started)
        for out in outs:
            self.monitor.record(adapter, out.texts[0], len(out.token_ids[0]), out.stats.get("decode_s"))

    async def store_replies(self, rid: str, created: str, chat: bool, req, gen: GenerationConfig, prompt: Any,
                            ids: list[str], gens: list[GenerationConfig], entry: AdapterEntry | None,
                            outs: list[GenerationOutput]) -> None:
        """Commit the request and its replies (PII redacted if configured) before the answer goes out.
        `model` is the name the client asked for (an adapter's or the base's); for an adapter, params
        also record which load of it answered (version, fingerprint), as a name can be swapped."""
        if self.store is None:
            return
        redact = self.config.feedback_redact_pii
        replies = [{"id": i, "text": redact_value(out.texts[0])[0] if redact else out.texts[0],
                    "finish_reason": finish_reason(out, g), "completion_tokens": len(out.token_ids[0])}
                   for i, out, g in zip(ids, outs, gens)]
        params = {"temperature": req.temperature, "top_p": req.top_p, "max_tokens": gen.max_new_tokens,
                  "stop": gen.stop, "seed": req.seed, "n": req.n, "stream": req.stream, "decoding": gen.decoding}
        if entry is not None:
            params["adapter"] = {"name": entry.name, "version": entry.version, "fingerprint": entry.fingerprint}
        conversation = {"id": rid, "created_at": created, "endpoint": "chat" if chat else "completion",
                        "model": req.model, "prompt": redact_value(prompt)[0] if redact else prompt,
                        "params": params, "redacted": redact}
        await asyncio.to_thread(self.store.add_conversation, conversation, replies)

    async def stream_answer(self, tasks, queue, abandon, gens, model_name, ids, rid, chat, endpoint, started, store,
                            observe):
        """SSE chunks as tokens decode (choice `index` per sample); with a guard, each whole checked
        reply as one chunk. The replies are stored before the closing chunks and `[DONE]`."""
        status, outs = "200", []
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
            observe(status, outs if status == "200" else [])

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
            rate, full = sum(self.ratings) / len(self.ratings), len(self.ratings) == self.config.feedback_window
            self.m["up_rate"].set(rate)
            self.m["window"].set(len(self.ratings))
        self.monitor.record_up_rate(rate, full)

    # -- /admin/adapters

    async def load_adapter(self, request: Request):
        """`POST /admin/adapters` {name, path, check_base?, reset_baseline?}: load the LoRA adapter at path
        as `name` (a new version if the name is served: requests admitted before keep the old one)."""
        endpoint = "/admin/adapters"
        try:
            self.check_admin(request)
            body = parse_adapter_load(await self.read_json(request))
            try:
                name = check_name(body.name, self.config.model_name)
                async with self.admin_lock:
                    info = await asyncio.to_thread(read_adapter, body.path)  # files only: the worker decodes on
                    started = time.perf_counter()
                    old, entry = await asyncio.wrap_future(self.batcher.call(
                        functools.partial(self.install, name, info, body.check_base, body.path)))
            except AdapterProblem as exc:
                self.m["adapter_loads"].labels("refused").inc()
                raise APIError(exc.status, str(exc), param=exc.param, code=exc.code) from None
            except Exception as exc:  # not the adapter's fault as far as we can tell: the operator is told
                self.m["adapter_loads"].labels("failed").inc()
                log.exception("loading adapter %r failed", body.name)
                raise APIError(500, f"loading the adapter failed: {type(exc).__name__}: {exc}", "server_error",
                               code="adapter_load_failed") from None
        except APIError as exc:
            return self.error_response(exc, endpoint)
        seconds = time.perf_counter() - started
        if body.reset_baseline:
            self.monitor.reset_baseline(name)
        self.m["adapter_loads"].labels("loaded").inc()
        self.m["adapter_version"].labels(name).set(entry.version)
        replaced = "" if old is None else f" (replaces version {old.version}" + (
            f", unloaded when its {old.refs} pinned samples finish)" if old.refs else ")")
        log.info("adapter %s version %d loaded from %s in %.2f s%s", name, entry.version, info["path"], seconds,
                 replaced)
        self.m["requests"].labels(endpoint, "200" if old else "201").inc()
        answer = {"object": "adapter", **entry.describe(), "replaced": old.describe() if old else None,
                  "load_seconds": round(seconds, 3)}
        return JSONResponse(answer, status_code=200 if old else 201)

    def install(self, name: str, info: dict, check_base: bool, source: str) -> tuple[AdapterEntry | None, AdapterEntry]:
        """In the worker thread, between batches: check the adapter against the model, load it under a
        fresh PEFT name, make `name` resolve to it, and drop replaced versions nobody holds."""
        check_fits(self.model, info, check_base)
        taken = set(getattr(self.model, "peft_config", None) or {}) | {self.config.model_name}
        entry = self.adapters.next_entry(name, taken)
        entry.source, entry.path, entry.fingerprint, entry.base = source, info["path"], info["fingerprint"], info["base"]
        try:
            self.model = attach_adapter(self.model, entry.peft_name, info["path"])
        except Exception as exc:  # the checks passed but PEFT refused: still the adapter's fault; the model is as before
            log.error("loading adapter %s from %s failed: %s: %s", name, info["path"], type(exc).__name__, exc)
            raise AdapterProblem(f"path: {info['path']}: PEFT could not load it: {type(exc).__name__}: {exc}",
                                 "adapter_load_failed") from None
        entry.loaded_at = now_iso()
        old = self.adapters.install(entry)
        self.collect()
        return old, entry

    async def delete_adapter(self, request: Request, name: str):
        """`DELETE /admin/adapters/{name}`: stop serving `name`; requests already admitted on it finish,
        then it is unloaded."""
        endpoint = "/admin/adapters"
        try:
            self.check_admin(request)
            async with self.admin_lock:
                try:
                    entry = self.adapters.remove(name)
                except KeyError:
                    raise APIError(404, f"no adapter named {name!r}; served adapters: "
                                        f"{', '.join(self.adapters.names()) or 'none'}", "not_found_error",
                                   param="name", code="adapter_not_found") from None
                await asyncio.wrap_future(self.batcher.call(self.collect))
        except APIError as exc:
            return self.error_response(exc, endpoint)
        self.m["adapter_version"].labels(name).set(0)
        log.info("adapter %s version %d deleted%s", name, entry.version,
                 f" (unloaded when its {entry.refs} pinned samples finish)" if entry.refs else "")
        self.m["requests"].labels(endpoint, "200").inc()
        return {"object": "adapter", "name": name, "version": entry.version, "deleted": True,
                "in_flight": entry.refs}

    def list_adapters(self, request: Request):
        endpoint = "/admin/adapters"
        try:
            self.check_admin(request)
        except APIError as exc:
            return self.error_response(exc, endpoint)
        self.m["requests"].labels(endpoint, "200").inc()
        with self.adapters.lock:
            current = [e.describe() for e in self.adapters.current.values()]
            retired = [e.describe() for e in self.adapters.retired]
        return {"object": "list", "base": {"name": self.config.model_name, "path": base_identity(self.model)},
                "data": current, "retired": retired}


def create_app(model, tokenizer, config: ServeConfig | None = None,
               generate_fn: Callable[..., GenerationOutput] = generate,
               adapter_paths: dict[str, str] | None = None) -> FastAPI:
    """The FastAPI app. `generate_fn` has `engine.generate`'s signature (tests slow it down);
    it gets `row_max_new_tokens` and `row_done` only for batches of more than one request. A
    replacement `generate_fn` means static batching: the continuous batcher drives the engine's
    rows step by step, which a function decoding whole batches cannot stand in for.
    `adapter_paths`: name -> LoRA adapter dir or run dir, loaded now as `/admin/adapters` would
    (`config.adapters` instead names adapters already loaded on `model` by `load_adapters`)."""
    server = _Server(model, tokenizer, config or ServeConfig(), generate_fn, adapter_paths)

    @contextlib.asynccontextmanager
    async def lifespan(_app):
        yield
        server.batcher.stop()
        if server.store is not None:
            server.store.close()

    app = FastAPI(title="posttrain", docs_url=None, redoc_url=None, lifespan=lifespan)
    app.state.feedback_store = server.store  # None when feedback_db is not set
    app.state.server = server  # tests and embedding code: the model, adapter table, monitor

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
                                            "owned_by": "posttrain"} for n in server.served_names()]}

    @app.get("/health")
    async def health():
        return {"status": "ok", "models": server.served_names(), "in_flight": server.admitted}

    @app.post("/admin/adapters")
    async def load_adapter(request: Request):
        return await server.load_adapter(request)

    @app.get("/admin/adapters")
    async def list_adapters(request: Request):
        return server.list_adapters(request)

    @app.delete("/admin/adapters/{name}")
    async def delete_adapter(request: Request, name: str):
        return await server.delete_adapter(request, name)

    @app.get("/metrics")
    async def metrics():
        return PlainTextResponse(generate_latest(server.registry).decode(), media_type=CONTENT_TYPE_LATEST)

    return app

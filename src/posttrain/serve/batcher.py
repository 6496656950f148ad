"""The server's worker side: one thread owns the model and decodes queued requests in batches.

Handlers put a `Job` on the queue and await its future. The worker takes the oldest waiting
job, then every other waiting job *compatible* with it (`batch_key`: same model/adapter name,
same sampling settings; a seeded sampled request runs alone so its seed stays reproducible),
up to `max_batch`, waiting at most `wait_s` for more to arrive, and decodes them as one batch
(`run_batch`: each row keeps its own max_tokens and stop strings). Why: on this CPU a decode
step of 8 rows costs little more than a step of 1 (weights are read once per step), so
tokens/s grows with the batch. A batch of one decodes with its config's decoding (SAM by
default, lossless for greedy); a batch of several uses plain batched decoding, because our
speculative decoding verifies one row at a time. Batches are static: a job arriving mid-batch
waits for the next batch (scheduler.py's continuous batcher, the server's default, lets it join
the running one); a job is settled as soon as its own row ends (`row_done`), not when the whole
batch ends. `batching: static` selects this batcher; the continuous one also falls back to it
where the native decoder cannot run the model.

Every job has a deadline: a waiting job past it leaves the queue, and a running one leaves its
batch at the next token (the engine drops that row; the other rows go on), with `JobTimeout`.
If a batch fails, each job that has not streamed anything runs again alone, so one bad
request does not fail its batch-mates. Nothing here knows about HTTP.

`Batcher.call(fn)` runs fn in the worker thread between batches (before the next batch is
taken): how the server loads and deletes adapters, since the model's adapter state is global
and only this thread may touch it.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import threading
import time
from dataclasses import dataclass, field, replace
from typing import Any, Callable

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from posttrain.generate.engine import GenerationConfig, GenerationOutput
from posttrain.generate.guard import GuardRules

# decode(model_name, prompts, gen, stream=..., **rows) -> GenerationOutput; rows (batches of more
# than one only): row_max_new_tokens, row_stop, row_done, as engine.generate takes them
Decode = Callable[..., GenerationOutput]


class JobTimeout(Exception):
    """The job's deadline passed or its client went away (answered 504)."""


@dataclass(eq=False)
class Job:
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


def settle(future: concurrent.futures.Future, result: Any = None, exc: BaseException | None = None) -> None:
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


def batch_metrics(registry: CollectorRegistry) -> dict:
    """The worker's Prometheus metrics (app.py adds the HTTP ones to the same registry)."""
    return {
        "tokens": Counter("posttrain_generated_tokens", "tokens generated", registry=registry),
        "tokens_per_s": Gauge("posttrain_tokens_per_second", "decode speed of the last finished batch (all rows)",
                              registry=registry),
        "batch_size": Histogram("posttrain_batch_size", "rows (requests) per generation batch", registry=registry,
                                buckets=(1, 2, 3, 4, 6, 8, 12, 16, 32, 64)),
        "drafted": Counter("posttrain_draft_tokens", "speculative draft tokens proposed", registry=registry),
        "accepted": Counter("posttrain_draft_tokens_accepted", "speculative draft tokens accepted",
                            registry=registry),
        "guard_blocked": Counter("posttrain_guard_blocked", "replies blocked by the output guard",
                                 registry=registry),
    }


def reply(job: Job, out: GenerationOutput, i: int, guard: GuardRules | None, m: dict, decode_s: float) -> None:
    """Settle `job` with row i of `out`, the output guard applied (both batchers answer this way)."""
    text, blocked = out.texts[i], False
    if guard is not None:
        from posttrain.generate.guard import guard_text

        checked = guard_text(text, guard)
        text, blocked = checked.text, checked.blocked
        m["guard_blocked"].inc(int(blocked))
    settle(job.future, GenerationOutput([text], [out.token_ids[i]], [out.logprobs[i]],
                                        {"guard_blocked": int(blocked), "decode_s": decode_s}))


def run_batch(jobs: list[Job], decode: Decode, guard: GuardRules | None = None, metrics: dict | None = None) -> None:
    """In the worker thread: decode compatible, unexpired jobs as one batch and settle each job's future.

    Each row gets its own budget and stop strings and is settled (guard applied) when it ends;
    a row past its deadline is dropped at its next token. `metrics`: `batch_metrics`' dict
    (None: counted nowhere).
    """
    m = metrics if metrics is not None else batch_metrics(CollectorRegistry())
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
                raise JobTimeout()  # nothing else in the batch: stop generating at once
            dropped[row] = True
            return True  # the engine drops this row; the others go on
        if piece and job.on_piece is not None:
            sent[row] = True
            job.on_piece(piece)
        return False

    def answer(row: int, out: GenerationOutput, i: int = 0) -> None:
        """Settle one job with its row of `out` (guard applied): called as soon as the row ends."""
        reply(jobs[row], out, i, guard, m, time.perf_counter() - start)

    rows = {"row_max_new_tokens": limits, "row_stop": [job.gen.stop for job in jobs], "row_done": answer} \
        if n > 1 else {}
    m["batch_size"].observe(n)
    start = time.perf_counter()
    try:
        out = decode(jobs[0].model_name, [job.prompt for job in jobs], gen, stream=stream, **rows)
    except Exception as exc:  # the server keeps serving: 504 or 500 for the request(s) it concerns
        for row, job in enumerate(jobs):
            if n > 1 and not job.future.done() and not sent[row] and not isinstance(exc, JobTimeout):
                run_batch([job], decode, guard, m)  # one bad request must not fail its batch-mates: each alone
            else:
                settle(job.future, exc=exc)
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
            settle(job.future, exc=JobTimeout())
        elif not job.future.done():  # a batch of one (or a decode without row_done)
            answer(i, out, i)


class Batcher:
    """A queue of jobs and the one worker thread that owns the model and runs them in batches.

    `run_batch(jobs)` decodes a list of compatible, unexpired jobs and settles every job's future
    (app.py passes `run_batch` above with its decode, guard and metrics bound).
    """

    def __init__(self, run_batch: Callable[[list[Job]], None], max_batch: int, wait_s: float):
        self.run_batch, self.max_batch, self.wait_s = run_batch, max_batch, wait_s
        self.pending: list[Job] = []
        self.calls: list[tuple[Callable[[], Any], concurrent.futures.Future]] = []
        self.cond = threading.Condition()
        self.thread: threading.Thread | None = None
        self.stopping = False

    def _start(self) -> None:
        """Start the worker on first use (under self.cond)."""
        if self.thread is None or not self.thread.is_alive():
            self.stopping = False
            self.thread = threading.Thread(target=self._loop, name="posttrain-batcher", daemon=True)
            self.thread.start()

    def submit(self, job: Job) -> concurrent.futures.Future:
        with self.cond:
            self._start()
            self.pending.append(job)
            self.cond.notify()
        return job.future

    def call(self, fn: Callable[[], Any]) -> concurrent.futures.Future:
        """Run fn() in the worker thread before the next batch (after the running one); its future gets
        fn's result or exception."""
        future: concurrent.futures.Future = concurrent.futures.Future()
        with self.cond:
            self._start()
            self.calls.append((fn, future))
            self.cond.notify()
        return future

    def _run_calls(self) -> None:
        with self.cond:
            calls, self.calls = self.calls, []
        for fn, future in calls:
            try:
                result = fn()
            except BaseException as exc:  # the caller gets it; the worker goes on
                future.set_exception(exc)
            else:
                future.set_result(result)

    def abandon(self, job: Job) -> None:
        """Deadline passed or client gone: a waiting job leaves the queue (504) now; a running one
        leaves its batch at its next token."""
        job.cancel.set()
        with self.cond:
            if job in self.pending:
                self.pending.remove(job)
                settle(job.future, exc=JobTimeout())

    def stop(self) -> None:
        with self.cond:
            self.stopping = True
            self.cond.notify_all()

    def _take(self) -> list[Job] | None:
        """The oldest waiting job plus the compatible ones behind it (None: stopping, queue empty;
        [] when calls wait and no batch is being formed)."""
        with self.cond:
            batch: list[Job] = []
            until = None
            while True:
                if self.calls and not batch:
                    return []
                for job in list(self.pending):
                    if job.expired():
                        self.pending.remove(job)
                        settle(job.future, exc=JobTimeout())
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
            self._run_calls()
            if not jobs:
                continue
            try:
                self.run_batch(jobs)
            except Exception as exc:  # run_batch settles futures itself; this is the last resort
                for job in jobs:
                    settle(job.future, exc=exc)

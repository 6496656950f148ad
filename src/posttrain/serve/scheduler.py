"""Continuous batching for the server: requests join and leave the running batch at token boundaries.

`ContinuousBatcher` has the static `Batcher`'s interface (submit, call, abandon, stop) and queue, but
its worker thread drives a `generate.continuous.RunningBatch`: at every token boundary waiting jobs
join (their prompts are prefilled in the next step, beside the rows already decoding) and finished
rows leave, each job settled (guard applied) in the step its row ends. A short request arriving
while a long one decodes starts at the next token instead of after the long one, and a slot freed
by a finished row is refilled at once instead of idling until the longest row of a static batch ends.
There is no batch-forming wait (`batch_wait_ms`): a job joins the next step.

Adapters: the running batch serves one model state (the base or one adapter version: the job's
`model_name`, its PEFT name), selected when the batch starts. Jobs are admitted oldest first while
they are for that adapter; the first waiting job for another one stops admission, the batch
drains, and the next batch starts with that job's adapter. So no row decodes on another row's
adapter, and no adapter's requests wait behind a stream of later requests for another. Functions
queued with `call` (adapter loads and deletions) also stop admission and run once the batch has
drained, since they change the model the batch decodes.

Deadlines and cancellation as in the static batcher: a waiting job past its deadline leaves the
queue, a running one leaves the batch before the next step (or at its next token) with
`JobTimeout`. If a step fails, the batch is discarded; each of its jobs that has streamed nothing
runs again alone on the static path (`run_batch`), the others get the error, and serving goes on.

Where the native decoder cannot run the model (`continuous.unsupported_reason`: no AVX-512, an
adapter that does not fold, backend=torch, a GPU model) the worker runs static batches instead,
and says so once in the log.
"""

from __future__ import annotations

import contextlib
import logging
import time
from typing import Any, Callable, ContextManager

from posttrain.generate.continuous import DRAFT_MAX_ROWS, PREFILL_CHUNK, RunningBatch, unsupported_reason
from posttrain.generate.engine import encode_prompts
from posttrain.generate.guard import GuardRules
from posttrain.serve.batcher import Batcher, Job, JobTimeout, reply, settle

log = logging.getLogger("posttrain.serve")

# select(peft_name) -> a context in which the model decodes with that adapter ("": the bare base); it yields the model
Select = Callable[[str], ContextManager[Any]]


class ContinuousBatcher(Batcher):
    """The queue of jobs and the worker thread that decodes them in a continuously refilled batch.

    `run_batch(jobs)`: the static path (used where the native decoder cannot run, and to retry the
    jobs of a failed step one by one); `select`: see `Select`; `metrics`: `batch_metrics`' dict.
    """

    def __init__(self, run_batch: Callable[[list[Job]], None], max_batch: int, wait_s: float, *,
                 select: Select, tokenizer, guard: GuardRules | None, metrics: dict,
                 prefill_chunk: int = PREFILL_CHUNK, draft_max_rows: int = DRAFT_MAX_ROWS):
        super().__init__(run_batch, max_batch, wait_s)
        self.select, self.tokenizer, self.guard, self.m = select, tokenizer, guard, metrics
        self.prefill_chunk, self.draft_max_rows = prefill_chunk, draft_max_rows
        self.fallbacks: set[str] = set()  # reasons already logged
        self.speed = [0, 0.0, time.perf_counter()]  # tokens and step seconds since the gauge was last set

    def _expire(self) -> None:
        """Settle waiting jobs past their deadline (under self.cond)."""
        for job in list(self.pending):
            if job.expired():
                self.pending.remove(job)
                settle(job.future, exc=JobTimeout())

    def _loop(self) -> None:
        while True:
            with self.cond:
                self._expire()
                while not self.pending and not self.calls and not self.stopping:
                    self.cond.wait()
                    self._expire()
                if not self.pending and not self.calls:
                    return  # stopping, nothing left
                head = self.pending[0] if self.pending and not self.calls else None
            if head is None:
                self._run_calls()
                continue
            try:
                self._serve(head)
            except Exception:  # _serve settles its jobs; this keeps the worker alive whatever happened
                log.exception("the continuous batcher failed; serving goes on")

    def _serve(self, head: Job) -> None:
        """Run one batch for head's adapter until it drains (or one static batch, where native cannot run)."""
        group = head.model_name
        retry: list[Job] = []
        try:
            with self.select(group) as model:
                reason = unsupported_reason(model, head.gen)
                if reason is None:
                    self._run_native(group, model, retry)  # settles every job it admitted, or puts it in retry
        except Exception as exc:  # selecting the adapter or packing the model failed: the static path says how
            reason = f"{type(exc).__name__}: {exc}"
        for job in retry:  # the jobs of a failed step that had streamed nothing: each alone
            self._run_static([job])
        if reason is not None:
            if reason not in self.fallbacks:
                self.fallbacks.add(reason)
                log.warning("continuous batching cannot run here (%s): static batches instead", reason)
            jobs = self._take()  # the static batcher's choice: head and the compatible jobs behind it
            if jobs:
                self._run_static(jobs)

    def _run_static(self, jobs: list[Job]) -> None:
        try:
            self.run_batch(jobs)
        except Exception as exc:  # run_batch settles futures itself; this is the last resort
            for job in jobs:
                settle(job.future, exc=exc)

    def _run_native(self, group: str, model, retry: list[Job]) -> None:
        """Decode group's jobs in a RunningBatch until none runs or waits (or a step fails); after a
        failure, the jobs to run again alone are appended to `retry`."""
        batch = RunningBatch(model, self.tokenizer, self.max_batch, self.prefill_chunk, self.draft_max_rows)
        live: dict[Job, Any] = {}  # job -> its row
        sent: set[Job] = set()  # jobs that streamed a piece: they cannot be retried
        try:
            while True:
                admit = []
                with self.cond:
                    self._expire()
                    if not self.calls:  # calls wait for the batch to drain
                        while (len(batch) + len(admit) < self.max_batch and self.pending
                               and self.pending[0].model_name == group):
                            admit.append(self.pending.pop(0))
                for job in admit:
                    self._admit(batch, job, live, sent)
                for job, row in list(live.items()):
                    if job.expired():  # deadline passed or client gone: it leaves before the next step
                        batch.drop(row)
                        del live[job]
                        settle(job.future, exc=JobTimeout())
                if not len(batch):
                    if not admit:
                        return  # drained: nothing runs, nothing for this adapter waits
                    continue
                started = time.perf_counter()
                stats = batch.step()
                self._count(stats, time.perf_counter() - started)
        except Exception as exc:
            log.error("a continuous-batching step failed (%s: %s); its %d rows are retried alone or failed",
                      type(exc).__name__, exc, len(live))
            for job in live:
                if job.future.done():
                    continue
                if job in sent:
                    settle(job.future, exc=exc)
                else:
                    retry.append(job)

    def _admit(self, batch: RunningBatch, job: Job, live: dict, sent: set) -> None:
        """Add job as a row of the batch (a bad prompt fails this job only)."""
        admitted = time.perf_counter()

        def stream(token: int, piece: str) -> bool:
            if job.expired():
                live.pop(job, None)
                settle(job.future, exc=JobTimeout())
                return True  # the batch drops this row; the others go on
            if piece and job.on_piece is not None:
                sent.add(job)
                job.on_piece(piece)
            return False

        def done(row) -> None:
            live.pop(job, None)
            reply(job, row.output(), 0, self.guard, self.m, time.perf_counter() - admitted)

        try:
            prompt = encode_prompts(self.tokenizer, [job.prompt], job.gen.chat, job.gen.system)[0]
            row = batch.add(prompt, job.gen, stream, done)
        except Exception as exc:
            settle(job.future, exc=exc)
            return
        if not row.finished:
            live[job] = row

    def _count(self, stats, seconds: float) -> None:
        m = self.m
        if stats.rows:
            m["batch_size"].observe(stats.rows)
        m["tokens"].inc(stats.tokens)
        m["drafted"].inc(stats.drafted)
        m["accepted"].inc(stats.accepted)
        self.speed[0] += stats.tokens
        self.speed[1] += seconds
        if time.perf_counter() - self.speed[2] >= 1.0 and self.speed[1] > 0:
            m["tokens_per_s"].set(self.speed[0] / self.speed[1])
            self.speed = [0, 0.0, time.perf_counter()]


def selector(get_model: Callable[[], Any], own: str | None = None) -> Select:
    """The server's adapter selection as a context (the model as it is when the context is entered).
    `own`: the adapter the served model came with (a LoRA run's), which the base name serves; other
    adapters are served by their names only."""

    @contextlib.contextmanager
    def select(peft_name: str):
        model = get_model()
        if peft_name:
            if peft_name not in (getattr(model, "peft_config", None) or {}):  # a pinned adapter is never deleted
                raise RuntimeError(f"adapter {peft_name} is not loaded")
            model.set_adapter(peft_name)
            yield model
        elif own is not None and own in (getattr(model, "peft_config", None) or {}):
            model.set_adapter(own)
            yield model
        elif getattr(model, "peft_config", None):
            with model.disable_adapter():
                yield model
        else:
            yield model

    return select

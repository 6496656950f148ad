"""The batcher alone (serve/batcher.py): no HTTP and no model, a fake decode that follows the
engine's row protocol (per-row budgets, `stream` returning True drops a row, `row_done`).

Each test first submits a *blocker* job (seeded sampling: it always runs alone) whose decode waits
until every other job is queued, so the batches that follow are formed from a full, known queue.
"""

from __future__ import annotations

import functools
import threading
import time

import pytest
from prometheus_client import CollectorRegistry, generate_latest

from posttrain.generate.engine import GenerationConfig, GenerationOutput
from posttrain.serve.batcher import Batcher, Job, JobTimeout, batch_key, batch_metrics, run_batch


class FakeDecode:
    """decode(model_name, prompts, gen, stream, **rows): one token per row per step, text '<prompt>:k'.

    The blocker's call waits for `go`; a prompt containing BOOM fails the whole call at its start;
    `at_step` (step, fn) runs fn before that decode step of a batch of several (to cancel a job mid-batch)."""

    def __init__(self):
        self.calls: list[dict] = []
        self.started, self.go = threading.Event(), threading.Event()
        self.at_step: tuple[int, callable] | None = None

    def __call__(self, name, prompts, gen, stream=None, row_max_new_tokens=None, row_stop=None, row_done=None):
        self.calls.append({"model": name, "prompts": list(prompts), "limits": row_max_new_tokens,
                           "decoding": gen.decoding})
        if prompts == ["blocker"]:
            self.started.set()
            assert self.go.wait(20), "the test never released the blocker"
        if any("BOOM" in p for p in prompts):
            raise RuntimeError("cannot decode BOOM")
        limits = row_max_new_tokens or [gen.max_new_tokens]
        ids: list[list[int]] = [[] for _ in prompts]
        alive = set(range(len(prompts)))
        cancelled = []
        for step in range(max(limits)):
            if self.at_step and self.at_step[0] == step and len(prompts) > 1:
                self.at_step[1]()
            for row in sorted(alive):
                ids[row].append(step)
                if stream(row, step, "t"):
                    alive.discard(row)
                    cancelled.append(row)
                elif len(ids[row]) == limits[row]:
                    alive.discard(row)
                    if row_done is not None:
                        row_done(row, GenerationOutput([self.text(prompts[row], ids[row])], [ids[row]],
                                                       [[0.0] * len(ids[row])]))
        return GenerationOutput([self.text(p, i) for p, i in zip(prompts, ids)], ids, [[0.0] * len(i) for i in ids],
                                {"cancelled": cancelled})

    @staticmethod
    def text(prompt: str, ids: list[int]) -> str:
        return f"<{prompt}>:{len(ids)}"

    def batches(self) -> list[list[str]]:
        return [c["prompts"] for c in self.calls[1:]]


def make_job(prompt: str, n: int = 3, temperature: float = 0.0, seed: int | None = None, model: str = "m",
             timeout: float = 20.0) -> Job:
    gen = GenerationConfig(max_new_tokens=n, do_sample=temperature > 0, temperature=temperature or 1.0, seed=seed,
                           decoding="sam")
    return Job(prompt, gen, model, time.monotonic() + timeout, None, batch_key(gen, model))


def run_all(decode: FakeDecode, jobs: list[Job], max_batch: int = 8, metrics: dict | None = None) -> list:
    """Blocker first, then `jobs` queued behind it; release; each job's result or exception."""
    batcher = Batcher(functools.partial(run_batch, decode=decode, metrics=metrics), max_batch, wait_s=0.0)
    try:
        blocker = batcher.submit(make_job("blocker", temperature=0.7, seed=1))
        assert decode.started.wait(20)
        futures = [batcher.submit(job) for job in jobs]
        decode.go.set()
        assert blocker.result(20).texts == ["<blocker>:3"]
        outcomes = []
        for f in futures:
            exc = f.exception(20)
            outcomes.append(exc if exc is not None else f.result())
        return outcomes
    finally:
        batcher.stop()


def test_compatible_jobs_share_a_batch_with_their_own_budgets():
    decode = FakeDecode()
    budgets = [2, 5, 3, 4]
    registry = CollectorRegistry()
    outcomes = run_all(decode, [make_job(f"g{i}", n) for i, n in enumerate(budgets)], metrics=batch_metrics(registry))
    assert decode.batches() == [["g0", "g1", "g2", "g3"]]  # oldest first, one batch
    assert decode.calls[1]["limits"] == budgets and decode.calls[1]["decoding"] == "plain"  # SAM is batch-1 only
    assert [o.texts[0] for o in outcomes] == [f"<g{i}>:{n}" for i, n in enumerate(budgets)]
    assert [len(o.token_ids[0]) for o in outcomes] == budgets
    text = generate_latest(registry).decode()
    assert "posttrain_batch_size_count 2.0" in text and "posttrain_batch_size_sum 5.0" in text
    assert "posttrain_generated_tokens_total 17.0" in text  # 3 (blocker) + 2 + 5 + 3 + 4


def test_max_batch_splits_the_queue_oldest_first():
    decode = FakeDecode()
    run_all(decode, [make_job(f"g{i}") for i in range(5)], max_batch=2)
    assert decode.batches() == [["g0", "g1"], ["g2", "g3"], ["g4"]]
    assert decode.calls[-1]["limits"] is None and decode.calls[-1]["decoding"] == "sam"  # a batch of one


def test_incompatible_jobs_are_kept_apart():
    decode = FakeDecode()
    jobs = [
        make_job("greedy0"), make_job("hot0", temperature=0.8), make_job("adapter0", model="a"),
        make_job("greedy1"), make_job("seeded0", temperature=0.8, seed=3), make_job("warm0", temperature=0.5),
        make_job("hot1", temperature=0.8), make_job("seeded1", temperature=0.8, seed=3), make_job("adapter1", model="a"),
    ]
    outcomes = run_all(decode, jobs)
    assert decode.batches() == [["greedy0", "greedy1"], ["hot0", "hot1"], ["adapter0", "adapter1"], ["seeded0"],
                                ["warm0"], ["seeded1"]]
    assert [c["model"] for c in decode.calls[1:]] == ["m", "m", "a", "m", "m", "m"]
    assert all(isinstance(o, GenerationOutput) for o in outcomes)


def test_a_failing_row_is_isolated_and_its_batch_mates_answered():
    decode = FakeDecode()
    outcomes = run_all(decode, [make_job("fine0"), make_job("BOOM"), make_job("fine2", n=2)])
    assert decode.batches() == [["fine0", "BOOM", "fine2"], ["fine0"], ["BOOM"], ["fine2"]]  # then each alone
    assert isinstance(outcomes[1], RuntimeError) and "BOOM" in str(outcomes[1])
    assert outcomes[0].texts == ["<fine0>:3"] and outcomes[2].texts == ["<fine2>:2"]


def test_a_cancelled_row_leaves_its_batch_at_the_next_token():
    decode = FakeDecode()
    jobs = [make_job("a", n=6), make_job("late", n=6), make_job("b", n=2)]
    decode.at_step = (1, jobs[1].cancel.set)  # the client of "late" goes away after one token
    outcomes = run_all(decode, jobs)
    assert decode.batches() == [["a", "late", "b"]]
    assert isinstance(outcomes[1], JobTimeout)
    assert outcomes[0].texts == ["<a>:6"] and outcomes[2].texts == ["<b>:2"]


def test_expired_and_abandoned_waiting_jobs_never_decode():
    decode = FakeDecode()
    batcher = Batcher(functools.partial(run_batch, decode=decode), max_batch=8, wait_s=0.0)
    try:
        blocker = batcher.submit(make_job("blocker", temperature=0.7, seed=1))
        assert decode.started.wait(20)
        expired, abandoned, kept = make_job("expired", timeout=-1), make_job("abandoned"), make_job("kept")
        futures = [batcher.submit(job) for job in (expired, abandoned, kept)]
        batcher.abandon(abandoned)
        with pytest.raises(JobTimeout):
            futures[1].result(0)  # left the queue at once, before the worker looked at it
        decode.go.set()
        blocker.result(20)
        with pytest.raises(JobTimeout):
            futures[0].result(20)
        assert futures[2].result(20).texts == ["<kept>:3"]
    finally:
        batcher.stop()
    assert decode.batches() == [["kept"]]


def test_guard_rewrites_each_row():
    from posttrain.generate.guard import GuardRules

    guard = GuardRules(regex=[{"name": "all", "pattern": "(?s).+", "action": "redact", "replacement": "[OK]"}])
    decode = FakeDecode()
    jobs = [make_job("x"), make_job("y")]
    futures = [job.future for job in jobs]
    run_batch(jobs, decode, guard=guard)
    assert [f.result(0).texts for f in futures] == [["[OK]"], ["[OK]"]]
    assert [f.result(0).stats["guard_blocked"] for f in futures] == [0, 0]

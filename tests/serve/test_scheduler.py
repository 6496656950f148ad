"""The continuous batcher: jobs join a running batch at token boundaries, a short job overtakes a
long one, answers equal serial greedy (over HTTP too, with streams and adapters), deadlines,
cancellation and failures behave as in the static batcher, adapter calls wait for the batch to
drain, and models the native decoder cannot run fall back to static batches."""

from __future__ import annotations

import functools
import logging
import threading
import time

import httpx
import pytest
from prometheus_client import CollectorRegistry

from posttrain.generate.continuous import RunningBatch
from posttrain.generate.engine import GenerationConfig, generate
from posttrain.models import tiny_model
from posttrain.serve import ServeConfig, create_app
from posttrain.serve.batcher import Batcher, Job, JobTimeout, batch_key, batch_metrics, run_batch
from posttrain.serve.scheduler import ContinuousBatcher, selector
from tests.generate.test_continuous import native_tiny
from tests.serve.test_app import running

NATIVE = {"hidden": 64, "heads": 2, "kv_heads": 1}  # a tiny Llama the native decoder runs


def make_batcher(model, tokenizer, max_batch: int = 4, **kwargs) -> tuple[ContinuousBatcher, dict]:
    metrics = batch_metrics(CollectorRegistry())
    select = selector(lambda: model)

    def decode(peft_name, prompts, gen, **rows):
        with select(peft_name) as m:
            return generate(m, tokenizer, prompts, gen, **rows)

    static = functools.partial(run_batch, decode=decode, guard=None, metrics=metrics)
    return ContinuousBatcher(static, max_batch, 0.0, select=select, tokenizer=tokenizer, guard=None,
                             metrics=metrics, **kwargs), metrics


def job(prompt, n: int, on_piece=None, timeout: float = 60.0, model_name: str = "", **gen) -> Job:
    config = GenerationConfig(max_new_tokens=n, ignore_eos=True, **gen)
    return Job(prompt, config, model_name, time.monotonic() + timeout, on_piece, batch_key(config, model_name))


def alone(model, tokenizer, j: Job) -> list[int]:
    return generate(model, tokenizer, [j.prompt], j.gen).token_ids[0]


class Pieces:
    """on_piece callbacks that log (name, piece, time) and sleep `delay` per piece (slowing every step)."""

    def __init__(self, delay: float = 0.0):
        self.log: list[tuple[str, str, float]] = []
        self.delay = delay
        self.first: dict[str, threading.Event] = {}

    def __call__(self, name: str):
        self.first[name] = threading.Event()

        def on_piece(piece: str) -> None:
            self.log.append((name, piece, time.monotonic()))
            self.first[name].set()
            time.sleep(self.delay)

        return on_piece

    def text(self, name: str) -> str:
        return "".join(p for n, p, _ in self.log if n == name)


def test_a_short_job_joins_a_running_long_one_and_finishes_first(tokenizer):
    model = native_tiny(tokenizer)
    batcher, metrics = make_batcher(model, tokenizer)
    pieces = Pieces(delay=0.003)
    long, short = job("A long story:", 300, pieces("long")), job("Short:", 4, pieces("short"))
    try:
        f_long = batcher.submit(long)
        assert pieces.first["long"].wait(20)
        f_short = batcher.submit(short)
        out_short = f_short.result(30)
        assert not f_long.done()  # answered while the long job still decodes
        out_long = f_long.result(60)
    finally:
        batcher.stop()
    assert out_short.token_ids[0] == alone(model, tokenizer, short)
    assert out_long.token_ids[0] == alone(model, tokenizer, long)
    assert pieces.text("long") == out_long.texts[0] and pieces.text("short") == out_short.texts[0]
    # the short job's pieces came between the long job's: both rows decoded in the same steps
    names = [n for n, _, _ in pieces.log]
    assert names.index("short") > names.index("long") and names[-1] == "long"
    assert metrics["batch_size"].collect()[0].samples  # steps were counted


def test_streams_interleave_per_row_and_equal_serial_greedy_with_mixed_lengths(tokenizer):
    model = native_tiny(tokenizer)
    batcher, _ = make_batcher(model, tokenizer, max_batch=3)
    pieces = Pieces()
    budgets = [2, 30, 5, 40, 3, 25, 8, 12]
    jobs = [job(f"Request {i} is about", n, pieces(str(i))) for i, n in enumerate(budgets)]
    try:
        futures = []
        for j in jobs:  # more jobs than rows: the later ones join as rows finish
            futures.append(batcher.submit(j))
            time.sleep(0.002)
        outs = [f.result(60) for f in futures]
    finally:
        batcher.stop()
    for i, (j, out) in enumerate(zip(jobs, outs)):
        assert out.token_ids[0] == alone(model, tokenizer, j), i
        assert pieces.text(str(i)) == out.texts[0], i
    names = [n for n, _, _ in pieces.log]
    assert any(a != b for a, b in zip(names, names[1:]))  # pieces of different rows interleave


def test_deadline_cancellation_and_bad_prompts_concern_their_job_only(tokenizer):
    model = native_tiny(tokenizer)
    batcher, _ = make_batcher(model, tokenizer)
    pieces = Pieces(delay=0.003)
    slow = job("Slow", 400, pieces("slow"), timeout=0.3)  # its deadline passes while it decodes
    gone = job("Gone", 400, pieces("gone"))  # its client goes away
    expired = job("Expired", 5, timeout=-1)  # past its deadline before it starts
    bad = job([10 ** 9], 5)  # a token id outside the vocabulary
    kept = job("Kept", 20, pieces("kept"))
    try:
        futures = {j: batcher.submit(j) for j in (slow, gone, expired, bad, kept)}
        assert pieces.first["gone"].wait(20)
        batcher.abandon(gone)
        with pytest.raises(JobTimeout):
            futures[slow].result(30)
        with pytest.raises(JobTimeout):
            futures[gone].result(30)
        with pytest.raises(JobTimeout):
            futures[expired].result(30)
        with pytest.raises(ValueError, match="vocabulary"):
            futures[bad].result(30)
        assert futures[kept].result(30).token_ids[0] == alone(model, tokenizer, kept)
    finally:
        batcher.stop()
    assert "Expired" not in "".join(n for n, _, _ in pieces.log)
    assert len([1 for n, _, _ in pieces.log if n == "gone"]) < 400  # left at a token boundary


def test_a_failed_step_retries_unstreamed_jobs_alone_and_fails_streamed_ones(tokenizer, monkeypatch):
    model = native_tiny(tokenizer)
    batcher, _ = make_batcher(model, tokenizer)
    real = RunningBatch.step
    calls = {"n": 0}
    pieces = Pieces()

    def flaky(self):
        calls["n"] += 1
        if calls["n"] == 4:
            raise RuntimeError("BOOM")
        return real(self)

    monkeypatch.setattr(RunningBatch, "step", flaky)
    quiet, streamed = job("Quiet", 10), job("Streamed", 10, pieces("streamed"))
    try:
        futures = [batcher.submit(quiet), batcher.submit(streamed)]
        out = futures[0].result(30)
        with pytest.raises(RuntimeError, match="BOOM"):
            futures[1].result(30)
        after = batcher.submit(job("After", 3)).result(30)  # serving goes on
    finally:
        batcher.stop()
    assert out.token_ids[0] == alone(model, tokenizer, quiet)  # run again alone
    assert len(after.token_ids[0]) == 3


def test_adapter_calls_wait_for_the_batch_to_drain_and_groups_never_share_it(tokenizer):
    model = native_tiny(tokenizer)
    batcher, _ = make_batcher(model, tokenizer)
    entered = []
    select = batcher.select

    def recording(name):
        entered.append(name)
        return select(name)

    batcher.select = recording
    pieces = Pieces(delay=0.002)
    first, other, later = job("First", 60, pieces("first")), job("Other", 5, pieces("other"), model_name="x"), \
        job("Later", 5, pieces("later"))
    state = {}
    try:
        f_first = batcher.submit(first)
        assert pieces.first["first"].wait(20)
        f_other = batcher.submit(other)  # another adapter: waits for the running batch to drain
        f_later = batcher.submit(later)  # same adapter as the batch, but behind `other`: no overtaking
        f_call = batcher.call(lambda: state.setdefault("first_done", f_first.done()))
        f_first.result(30)
        f_call.result(30)
        with pytest.raises(RuntimeError, match="adapter x is not loaded"):  # no such PEFT adapter here
            f_other.result(30)
        f_later.result(30)
    finally:
        batcher.stop()
    assert state["first_done"]  # the call ran once the batch had drained
    assert entered[:2] == ["", "x"] and "other" not in [n for n, _, _ in pieces.log]
    # `later` (the batch's adapter, queued behind `other`) did not join the running batch
    assert min(t for n, _, t in pieces.log if n == "later") > max(t for n, _, t in pieces.log if n == "first")


def test_http_mixed_lengths_streams_and_adapters_equal_serial_greedy(tokenizer, tmp_path):
    from peft import PeftModel

    from tests.serve.test_hotswap import make_adapter

    paths = {name: make_adapter(tokenizer, tmp_path / name, seed, **NATIVE) for name, seed in (("a", 1), ("b", 2))}
    base = native_tiny(tokenizer)

    def serial(model_name: str, prompt: str, n: int) -> str:
        model = tiny_model(tokenizer, **NATIVE)
        if model_name != "tiny":
            model = PeftModel.from_pretrained(model, paths[model_name])
        return generate(model, tokenizer, [prompt], GenerationConfig(max_new_tokens=n)).texts[0]

    requests = [(m, f"Request {i} for {m}:", n, i % 3 == 1)
                for i, (m, n) in enumerate([("tiny", 3), ("tiny", 30), ("a", 6), ("tiny", 12), ("b", 20),
                                            ("a", 2), ("tiny", 40), ("b", 4), ("tiny", 5)])]
    want = {r: serial(r[0], r[1], r[2]) for r in requests}
    assert len({want[r] for r in requests if r[0] == "a"} & {want[r] for r in requests if r[0] == "tiny"}) == 0
    config = ServeConfig(model_name="tiny", queue_size=16, max_batch=4, max_tokens_cap=64)
    app = create_app(base, tokenizer, config, adapter_paths=paths)
    assert isinstance(app.state.server.batcher, ContinuousBatcher)
    results = {}

    def post(r):
        model_name, prompt, n, stream = r
        body = {"model": model_name, "prompt": prompt, "max_tokens": n, "temperature": 0, "stream": stream}
        if not stream:
            resp = httpx.post(url + "/v1/completions", json=body, timeout=60)
            results[r] = resp.json()["choices"][0]["text"] if resp.status_code == 200 else resp.text
            return
        text = ""
        with httpx.stream("POST", url + "/v1/completions", json=body, timeout=60) as resp:
            for line in resp.iter_lines():
                if line.startswith("data: {"):
                    import json

                    text += json.loads(line[6:])["choices"][0]["text"]
        results[r] = text

    with running(app) as url:
        threads = [threading.Thread(target=post, args=(r,)) for r in requests]
        for t in threads:
            t.start()
            time.sleep(0.005)
        for t in threads:
            t.join(60)
        metrics = httpx.get(url + "/metrics").text
    for r in requests:
        assert results[r] == want[r], r
    assert not app.state.server.batcher.fallbacks  # every batch ran continuously
    steps = next(float(line.split()[-1]) for line in metrics.splitlines()
                 if line.startswith("posttrain_batch_size_count"))
    assert steps > len(requests)  # the histogram counts steps, not whole batches


def test_config_switch_and_static_fallback(tokenizer, caplog):
    static = create_app(native_tiny(tokenizer), tokenizer, ServeConfig(model_name="tiny", batching="static"))
    assert type(static.state.server.batcher) is Batcher
    with pytest.raises(ValueError, match="batching"):
        ServeConfig(batching="dynamic")
    # a model the native decoder cannot run (head size 16): static batches, said once in the log
    model = tiny_model(tokenizer)
    batcher, _ = make_batcher(model, tokenizer)
    try:
        with caplog.at_level(logging.WARNING, logger="posttrain.serve"):
            jobs = [job(f"Fallback {i}", 4 + i) for i in range(3)]
            outs = [f.result(30) for f in [batcher.submit(j) for j in jobs]]
    finally:
        batcher.stop()
    assert [o.token_ids[0] for o in outs] == [alone(model, tokenizer, j) for j in jobs]
    assert len(batcher.fallbacks) == 1 and "head size" in next(iter(batcher.fallbacks))
    assert sum("static batches instead" in r.message for r in caplog.records) == 1

"""Concurrent requests batched in the server: a real uvicorn on 127.0.0.1, a tiny model, and a
generate_fn wrapper that records every batch.

Each test first sends one *blocker* request (seeded sampling: it always runs alone) whose generation
waits until every other request is queued, so the batches that follow are formed from a full,
known queue instead of from arrival timing.
"""

from __future__ import annotations

import json
import threading
import time

import httpx
import pytest

from posttrain.generate.engine import GenerationConfig, generate
from posttrain.serve import ServeConfig, create_app
from posttrain.serve.app import batch_key
from tests.serve.test_app import running

BLOCKER = {"model": "tiny", "prompt": "blocker", "max_tokens": 2, "temperature": 0.7, "seed": 1}


class Recorder:
    """generate_fn that logs each call (prompts, config, row budgets, stats); the first call (the
    blocker) waits for `go`; `delay` seconds of sleep per streamed token slow decoding down."""

    def __init__(self, delay: float = 0.0):
        self.calls: list[dict] = []
        self.started, self.go = threading.Event(), threading.Event()
        self.delay = delay

    def __call__(self, model, tok, prompts, config, stream=None, **rows):
        call = {"prompts": list(prompts), "config": config, "limits": rows.get("row_max_new_tokens")}
        self.calls.append(call)
        if len(self.calls) == 1:
            self.started.set()
            assert self.go.wait(20), "the test never released the blocker"

        def slow(row, token, piece):
            time.sleep(self.delay)
            return stream(row, token, piece)

        out = generate(model, tok, prompts, config, stream=slow if self.delay else stream, **rows)
        call["stats"] = out.stats
        return out

    def batches(self) -> list[list]:
        return [c["prompts"] for c in self.calls[1:]]


def post(base: str, body: dict, results: dict, key) -> None:
    """One request (SSE when body['stream']); results[key] = (status, text, usage, finish_reason, end time)."""
    url = base + "/v1/completions"
    if not body.get("stream"):
        r = httpx.post(url, json=body, timeout=60)
        data = r.json()
        if r.status_code != 200:
            results[key] = (r.status_code, data["error"]["type"], None, None, time.monotonic())
            return
        choice = data["choices"][0]
        results[key] = (200, choice["text"], data["usage"], choice["finish_reason"], time.monotonic())
        return
    text, finish, error = "", None, None
    with httpx.stream("POST", url, json=body, timeout=60) as r:
        for line in r.iter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            chunk = json.loads(line[6:])
            if "error" in chunk:
                error = chunk["error"]["type"]
                continue
            text += chunk["choices"][0]["text"]
            finish = chunk["choices"][0]["finish_reason"] or finish
    results[key] = (r.status_code, error or text, None, finish, time.monotonic())


def send_all(base: str, rec: Recorder, bodies: dict, gap: float = 0.0) -> dict:
    """Blocker first, then every body concurrently; release the blocker once all are admitted."""
    results: dict = {}
    threads = [threading.Thread(target=post, args=(base, BLOCKER, results, "blocker"))]
    threads[0].start()
    assert rec.started.wait(20)
    for key, body in bodies.items():
        threads.append(threading.Thread(target=post, args=(base, body, results, key)))
        threads[-1].start()
        time.sleep(gap)
    deadline = time.monotonic() + 20
    while httpx.get(base + "/health").json()["in_flight"] < 1 + len(bodies):
        assert time.monotonic() < deadline, "requests were not admitted"
        time.sleep(0.01)
    rec.go.set()
    for t in threads:
        t.join(60)
    assert results["blocker"][0] == 200
    return results


def alone(model, tokenizer, prompt: str, n: int):
    return generate(model, tokenizer, [prompt], GenerationConfig(max_new_tokens=n))


def test_concurrent_greedy_requests_batch_and_match_unbatched(tiny, tokenizer):
    budgets = [2, 7, 4, 9, 5, 3]
    bodies = {i: {"model": "tiny", "prompt": f"Request number {i} says", "max_tokens": n, "temperature": 0,
                  "stream": i % 3 == 1} for i, n in enumerate(budgets)}
    rec = Recorder()
    config = ServeConfig(model_name="tiny", queue_size=16, max_batch=4, batch_wait_ms=0)
    with running(create_app(tiny, tokenizer, config, generate_fn=rec)) as base:
        results = send_all(base, rec, bodies)
        metrics = httpx.get(base + "/metrics").text
    # 6 requests in 2 generate calls: a full batch of 4 (oldest first), then the 2 left
    assert [len(b) for b in rec.batches()] == [4, 2]
    assert all(c["config"].decoding == "plain" for c in rec.calls[1:])  # SAM is batch-1: plain when batched
    assert sorted(rec.calls[1]["limits"] + rec.calls[2]["limits"]) == sorted(budgets)
    for i, n in enumerate(budgets):
        expected = alone(tiny, tokenizer, bodies[i]["prompt"], n)
        status, text, usage, finish, _ = results[i]
        assert status == 200 and text == expected.texts[0], i  # streamed ones too
        assert len(expected.token_ids[0]) == n and finish == "length"  # random tiny model: no EOS this early
        if usage is not None:
            assert usage["completion_tokens"] == n
    assert "posttrain_batch_size_bucket" in metrics
    assert "posttrain_batch_size_count 3.0" in metrics and "posttrain_batch_size_sum 7.0" in metrics


def test_incompatible_requests_are_not_batched_together(tiny, tokenizer, tmp_path):
    from peft import LoraConfig, get_peft_model

    from posttrain.models import tiny_model
    from posttrain.serve import load_adapters

    peft = get_peft_model(tiny_model(tokenizer), LoraConfig(r=4, target_modules=["q_proj", "v_proj"]))
    peft.save_pretrained(tmp_path / "a")
    model = load_adapters(tiny, {"a": str(tmp_path / "a")})
    groups = {
        # top_p does nothing to greedy; stop strings and max_tokens are per row
        "greedy": [{"temperature": 0}, {"temperature": 0, "top_p": 0.5}, {"temperature": 0, "stop": ["\n"]}],
        "adapter": [{"temperature": 0, "model": "a"}, {"temperature": 0, "model": "a"}],
        "hot": [{"temperature": 0.8}, {"temperature": 0.8}],
        "warm": [{"temperature": 0.5}],
        "seeded": [{"temperature": 0.8, "seed": 3}, {"temperature": 0.8, "seed": 3}],
    }
    bodies, group_of = {}, {}
    for group, variants in groups.items():
        for j, extra in enumerate(variants):
            prompt = group if group == "seeded" else f"{group} {j}"  # both seeded ones ask the same
            bodies[f"{group} {j}"] = {"model": "tiny", "prompt": prompt, "max_tokens": 3, **extra}
            group_of[prompt] = group
    rec = Recorder()
    config = ServeConfig(model_name="tiny", adapters=["a"], queue_size=16, max_batch=8, batch_wait_ms=0)
    with running(create_app(model, tokenizer, config, generate_fn=rec)) as base:
        results = send_all(base, rec, bodies)
    assert all(r[0] == 200 for r in results.values()), results
    batches = [sorted(group_of[p] for p in b) for b in rec.batches()]
    assert sorted(batches) == sorted([["greedy"] * 3, ["adapter", "adapter"], ["hot", "hot"], ["warm"],
                                      ["seeded"], ["seeded"]])
    assert results["seeded 0"][1] == results["seeded 1"][1]  # each seeded request alone: same seed, same text


def test_batch_key():
    greedy = GenerationConfig(max_new_tokens=5)
    assert batch_key(greedy, "m") == batch_key(GenerationConfig(max_new_tokens=50, top_p=0.3), "m")
    assert batch_key(greedy, "m") != batch_key(greedy, "adapter")
    assert batch_key(greedy, "m") == batch_key(GenerationConfig(stop=["x"]), "m")  # stop strings are per row
    hot = GenerationConfig(do_sample=True, temperature=0.8)
    assert batch_key(hot, "m") != batch_key(GenerationConfig(do_sample=True, temperature=0.9), "m")
    assert batch_key(hot, "m") != batch_key(greedy, "m")
    assert batch_key(GenerationConfig(do_sample=True, seed=1), "m") is None
    with pytest.raises(ValueError, match="max_batch"):
        ServeConfig(max_batch=0)


def test_request_past_its_deadline_leaves_the_batch_others_succeed(tiny, tokenizer):
    bodies = {
        "late": {"model": "tiny", "prompt": "a long story", "max_tokens": 60, "temperature": 0},
        "short": {"model": "tiny", "prompt": "short one", "max_tokens": 4, "temperature": 0},
        "streamed": {"model": "tiny", "prompt": "short two", "max_tokens": 4, "temperature": 0, "stream": True},
    }
    rec = Recorder(delay=0.1)  # 60 tokens would take > 6 s; the deadline is 4 s after admission
    config = ServeConfig(model_name="tiny", queue_size=8, timeout_s=4.0, batch_wait_ms=0)
    with running(create_app(tiny, tokenizer, config, generate_fn=rec)) as base:
        start = time.monotonic()
        results = send_all(base, rec, bodies, gap=0.5)  # "late" is admitted first: its deadline comes first
        took = time.monotonic() - start
        assert httpx.get(base + "/health").json()["in_flight"] == 0
    assert [len(b) for b in rec.batches()] == [3]
    assert results["late"][:2] == (504, "timeout_error")
    assert rec.calls[1]["stats"]["cancelled"] == [0]  # the engine dropped that row only
    assert took < 7  # it left at its deadline, not after 60 tokens
    for key in ("short", "streamed"):
        status, text, _, finish, end = results[key]
        assert status == 200 and text == alone(tiny, tokenizer, bodies[key]["prompt"], 4).texts[0]
        assert finish == "length"
        assert end < results["late"][4] - 0.5  # answered when its own row ended, not with the batch


def test_a_failing_request_does_not_fail_its_batch_mates(tiny, tokenizer):
    class Failing(Recorder):
        def __call__(self, model, tok, prompts, config, stream=None, **rows):
            if any("BOOM" in p for p in prompts):  # fails at the start, as a too-long prompt would
                self.calls.append({"prompts": list(prompts)})
                raise RuntimeError("cannot decode BOOM")
            return super().__call__(model, tok, prompts, config, stream, **rows)

    bodies = {i: {"model": "tiny", "prompt": f"BOOM {i}" if i == 1 else f"fine {i}", "max_tokens": 3,
                  "temperature": 0, "stream": i == 2} for i in range(3)}
    rec = Failing()
    config = ServeConfig(model_name="tiny", queue_size=8, batch_wait_ms=0)
    with running(create_app(tiny, tokenizer, config, generate_fn=rec)) as base:
        results = send_all(base, rec, bodies)
        assert httpx.get(base + "/health").json()["in_flight"] == 0
    assert [len(b) for b in rec.batches()] == [3, 1, 1, 1]  # the batch failed, then each request alone
    assert results[1][:2] == (500, "server_error")
    for i in (0, 2):
        assert results[i][0] == 200 and results[i][1] == alone(tiny, tokenizer, bodies[i]["prompt"], 3).texts[0]


def test_cli_serve_rejects_a_bad_max_batch(capsys):
    from posttrain.cli import main

    assert main(["serve", "default", "--max-batch", "0"]) == 2
    assert "max_batch must be >= 1" in capsys.readouterr().err

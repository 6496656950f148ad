"""The server end to end: a real uvicorn on 127.0.0.1, driven by the official openai client and httpx."""

from __future__ import annotations

import contextlib
import socket
import threading
import time

import httpx
import pytest
import torch

from posttrain.generate.engine import GenerationOutput, generate
from posttrain.generate.guard import GuardRules
from posttrain.serve import ServeConfig, create_app

KEY = "sk-test"


@contextlib.contextmanager
def running(app):
    """Serve `app` on a free 127.0.0.1 port in a background thread; yield its base URL."""
    import uvicorn

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 10
    while not server.started:
        assert time.monotonic() < deadline and thread.is_alive(), "server did not start"
        time.sleep(0.02)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(10)


@pytest.fixture
def url(tiny, tokenizer):
    config = ServeConfig(model_name="tiny", api_keys=[KEY], max_tokens_cap=16, default_max_tokens=8,
                         max_body_bytes=4096)
    with running(create_app(tiny, tokenizer, config)) as base:
        yield base


def test_openai_client_chat_completion_stream_models(url, tiny, tokenizer):
    from openai import OpenAI

    client = OpenAI(base_url=url + "/v1", api_key=KEY, max_retries=0)
    assert [m.id for m in client.models.list().data] == ["tiny"]

    messages = [{"role": "user", "content": "Say hi"}]
    chat = client.chat.completions.create(model="tiny", messages=messages, max_tokens=8, temperature=0)
    # greedy through the server (SAM decoding) == plain greedy decoding of the same chat prompt
    expected = generate(tiny, tokenizer, [messages], _greedy(8))
    assert chat.choices[0].message.content == expected.texts[0]
    assert chat.usage.completion_tokens == len(expected.token_ids[0])
    assert chat.choices[0].finish_reason in ("stop", "length")

    pieces = [c.choices[0].delta.content or "" for c in
              client.chat.completions.create(model="tiny", messages=messages, max_tokens=8, temperature=0,
                                             stream=True)]
    assert "".join(pieces) == expected.texts[0]
    assert len([p for p in pieces if p]) > 1  # really streamed, token by token

    comp = client.completions.create(model="tiny", prompt="The sky is", max_tokens=6, temperature=0)
    assert comp.choices[0].text == generate(tiny, tokenizer, ["The sky is"], _greedy(6)).texts[0]
    streamed = "".join(c.choices[0].text for c in
                       client.completions.create(model="tiny", prompt="The sky is", max_tokens=6, temperature=0,
                                                 stream=True))
    assert streamed == comp.choices[0].text

    sampled = client.chat.completions.create(model="tiny", messages=messages, max_tokens=8, temperature=0.8,
                                             seed=3)
    again = client.chat.completions.create(model="tiny", messages=messages, max_tokens=8, temperature=0.8, seed=3)
    assert sampled.choices[0].message.content == again.choices[0].message.content  # seeded sampling repeats

    metrics = httpx.get(url + "/metrics").text
    assert 'posttrain_requests_total{endpoint="/v1/chat/completions",status="200"} 4.0' in metrics
    assert "posttrain_request_latency_seconds_bucket" in metrics
    assert "posttrain_draft_tokens_accepted_total" in metrics
    tokens = [line for line in metrics.splitlines() if line.startswith("posttrain_generated_tokens_total")]
    assert float(tokens[0].split()[-1]) > 0


def _greedy(n):
    from posttrain.generate.engine import GenerationConfig

    return GenerationConfig(max_new_tokens=n)


GOOD = {"model": "tiny", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 4}
AUTH = {"Authorization": f"Bearer {KEY}"}


@pytest.mark.parametrize("case, status, kwargs", [
    ("bad json", 400, {"content": b'{"model": "tiny", "messages": [', "headers": AUTH}),
    ("not an object", 400, {"json": [1, 2], "headers": AUTH}),
    ("missing messages", 400, {"json": {"model": "tiny"}, "headers": AUTH}),
    ("wrong type", 400, {"json": {**GOOD, "max_tokens": "many"}, "headers": AUTH}),
    ("bad role", 400, {"json": {**GOOD, "messages": [{"role": "wizard", "content": "x"}]}, "headers": AUTH}),
    ("temperature range", 400, {"json": {**GOOD, "temperature": 9}, "headers": AUTH}),
    ("n over max_n", 400, {"json": {**GOOD, "n": 99}, "headers": AUTH}),
    ("over max_tokens cap", 400, {"json": {**GOOD, "max_tokens": 10_000}, "headers": AUTH}),
    ("huge body", 413, {"json": {**GOOD, "messages": [{"role": "user", "content": "x" * 10_000}]}, "headers": AUTH}),
    ("unknown model", 404, {"json": {**GOOD, "model": "gpt-9"}, "headers": AUTH}),
    ("missing key", 401, {"json": GOOD}),
    ("wrong key", 401, {"json": GOOD, "headers": {"Authorization": "Bearer nope"}}),
])
def test_malformed_requests_get_4xx_and_server_keeps_serving(url, case, status, kwargs):
    with httpx.Client(base_url=url, timeout=30) as http:
        bad = http.post("/v1/chat/completions", **kwargs)
        assert bad.status_code == status, (case, bad.text)
        error = bad.json()["error"]
        assert set(error) == {"message", "type", "param", "code"} and error["message"]
        good = http.post("/v1/chat/completions", json=GOOD, headers=AUTH)
        assert good.status_code == 200, good.text
        assert good.json()["choices"][0]["message"]["role"] == "assistant"
        assert http.get("/v1/nowhere").json()["error"]["type"] == "not_found_error"
        metrics = http.get("/metrics").text
        assert f'status="{status}"' in metrics


def test_full_queue_answers_429_and_timeout_answers_504(tiny, tokenizer):
    gate = threading.Event()

    def slow_generate(model, tok, prompts, config, stream=None):
        """Holds the model until the test opens the gate, emitting a token every 10 ms."""
        for _ in range(1000):
            if gate.is_set():
                break
            stream(0, 1, "")
            time.sleep(0.01)
        return GenerationOutput(["done"], [[1]], [[0.0]])

    config = ServeConfig(model_name="tiny", queue_size=1, timeout_s=3)
    with running(create_app(tiny, tokenizer, config, generate_fn=slow_generate)) as base:
        result = {}
        first = threading.Thread(target=lambda: result.update(r=httpx.post(base + "/v1/completions", timeout=30,
                                                                           json={"model": "tiny", "prompt": "a"})))
        first.start()
        while httpx.get(base + "/health").json()["in_flight"] < 1:
            time.sleep(0.01)
        busy = httpx.post(base + "/v1/completions", json={"model": "tiny", "prompt": "b"}, timeout=30)
        assert busy.status_code == 429 and busy.json()["error"]["code"] == "queue_full"
        gate.set()
        first.join(30)
        assert result["r"].status_code == 200 and result["r"].json()["choices"][0]["text"] == "done"
        assert httpx.post(base + "/v1/completions", json={"model": "tiny", "prompt": "c"}, timeout=30).status_code == 200

    config = ServeConfig(model_name="tiny", timeout_s=0.3)
    gate.clear()
    with running(create_app(tiny, tokenizer, config, generate_fn=slow_generate)) as base:
        late = httpx.post(base + "/v1/completions", json={"model": "tiny", "prompt": "a"}, timeout=30)
        assert late.status_code == 504 and late.json()["error"]["type"] == "timeout_error"
        assert httpx.get(base + "/health").json()["in_flight"] == 0
        gate.set()
        ok = httpx.post(base + "/v1/completions", json={"model": "tiny", "prompt": "a"}, timeout=30)
        assert ok.status_code == 200


def test_guarded_stream_sends_the_checked_reply(tiny, tokenizer):
    from openai import OpenAI

    guard = GuardRules(regex=[{"name": "all", "pattern": "(?s).+", "action": "redact", "replacement": "[CHECKED]"}])
    config = ServeConfig(model_name="tiny", guard=guard, max_tokens_cap=8)
    with running(create_app(tiny, tokenizer, config)) as base:
        client = OpenAI(base_url=base + "/v1", api_key="unused", max_retries=0)
        messages = [{"role": "user", "content": "hello"}]
        whole = client.chat.completions.create(model="tiny", messages=messages, max_tokens=8, temperature=0)
        assert whole.choices[0].message.content == "[CHECKED]"
        pieces = [c.choices[0].delta.content for c in client.chat.completions.create(
            model="tiny", messages=messages, max_tokens=8, temperature=0, stream=True) if c.choices[0].delta.content]
        assert pieces == ["[CHECKED]"]  # never the unguarded tokens


def test_lora_adapters_selected_by_model_name(tiny, tokenizer, tmp_path):
    """Two LoRA adapters over one base: each model name gives that adapter's greedy output."""
    from peft import LoraConfig, PeftModel, get_peft_model

    from posttrain.models import tiny_model
    from posttrain.serve import load_adapters

    for name, seed in (("a", 1), ("b", 2)):
        base = tiny_model(tokenizer)
        torch.manual_seed(seed)
        peft = get_peft_model(base, LoraConfig(r=4, target_modules=["q_proj", "v_proj"], init_lora_weights=False))
        for p in peft.parameters():  # make the adapters matter at this tiny scale
            if p.requires_grad:
                p.data.mul_(20)
        peft.save_pretrained(tmp_path / name)
    prompt = "The sky is"
    expected = {}
    for name in ("a", "b"):
        expected[name] = generate(PeftModel.from_pretrained(tiny_model(tokenizer), tmp_path / name), tokenizer,
                                  [prompt], _greedy(8)).texts[0]
    expected["tiny"] = generate(tiny_model(tokenizer), tokenizer, [prompt], _greedy(8)).texts[0]
    assert len(set(expected.values())) == 3  # the adapters change the output

    model = load_adapters(tiny_model(tokenizer), {"a": str(tmp_path / "a"), "b": str(tmp_path / "b")})
    config = ServeConfig(model_name="tiny", adapters=["a", "b"])
    with running(create_app(model, tokenizer, config)) as base:
        got = {}
        for name in ("b", "tiny", "a", "tiny"):
            r = httpx.post(base + "/v1/completions", timeout=30,
                           json={"model": name, "prompt": prompt, "max_tokens": 8, "temperature": 0})
            got[name] = r.json()["choices"][0]["text"]
        assert got == expected
        assert [m["id"] for m in httpx.get(base + "/v1/models").json()["data"]] == ["tiny", "a", "b"]


def test_a_lora_run_is_served_as_itself_not_as_its_bare_base(tokenizer, tmp_path):
    """`posttrain serve RUN` of a LoRA run loads a PeftModel; the base name serves it with its adapter
    (the studio's chat with a run), while an adapter hot-loaded later is still served by its name only."""
    from peft import LoraConfig, PeftModel, get_peft_model

    from posttrain.models import tiny_model

    torch.manual_seed(3)
    peft = get_peft_model(tiny_model(tokenizer), LoraConfig(r=4, target_modules=["q_proj", "v_proj"],
                                                            init_lora_weights=False))
    for p in peft.parameters():
        if p.requires_grad:
            p.data.mul_(20)
    peft.save_pretrained(tmp_path / "run")
    prompt = "The sky is"
    tuned = generate(PeftModel.from_pretrained(tiny_model(tokenizer), tmp_path / "run"), tokenizer, [prompt],
                     _greedy(8)).texts[0]
    assert tuned != generate(tiny_model(tokenizer), tokenizer, [prompt], _greedy(8)).texts[0]
    model = PeftModel.from_pretrained(tiny_model(tokenizer), tmp_path / "run")  # as load_model gives a LoRA run
    with running(create_app(model, tokenizer, ServeConfig(model_name="run"))) as base:
        r = httpx.post(base + "/v1/completions", timeout=30,
                       json={"model": "run", "prompt": prompt, "max_tokens": 8, "temperature": 0})
        assert r.json()["choices"][0]["text"] == tuned


def test_generation_failure_is_a_500_then_serving_continues(tiny, tokenizer):
    calls = []

    def flaky_generate(model, tok, prompts, config, stream=None):
        calls.append(1)
        if len(calls) <= 2:
            raise RuntimeError("boom")
        return generate(model, tok, prompts, config, stream)

    with running(create_app(tiny, tokenizer, ServeConfig(model_name="tiny"), generate_fn=flaky_generate)) as base:
        body = {"model": "tiny", "prompt": "a", "max_tokens": 3}
        failed = httpx.post(base + "/v1/completions", json=body, timeout=30)
        assert failed.status_code == 500 and "boom" in failed.json()["error"]["message"]
        with httpx.stream("POST", base + "/v1/completions", json={**body, "stream": True}, timeout=30) as r:
            events = [line for line in r.iter_lines() if line.startswith("data: ")]
        assert '"server_error"' in events[-1] and "data: [DONE]" not in events
        assert httpx.post(base + "/v1/completions", json=body, timeout=30).status_code == 200
        assert httpx.get(base + "/health").json()["in_flight"] == 0


def test_cli_serve_rejects_a_bad_adapter_flag(capsys):
    from posttrain.cli import main

    assert main(["serve", "default", "--adapter", "no-equals-sign"]) == 2
    assert "NAME=RUN_DIR" in capsys.readouterr().err


def test_abandoned_stream_stops_decoding(tiny, tokenizer):
    steps = []

    def endless_generate(model, tok, prompts, config, stream=None):
        """Would run 20 s: a piece every 10 ms until the stream callback raises."""
        for _ in range(2000):
            steps.append(1)
            stream(0, 1, "x")
            time.sleep(0.01)
        return GenerationOutput(["x" * 2000], [[1] * 2000], [[0.0] * 2000])

    with running(create_app(tiny, tokenizer, ServeConfig(model_name="tiny"), generate_fn=endless_generate)) as base:
        with httpx.stream("POST", base + "/v1/completions", timeout=30,
                          json={"model": "tiny", "prompt": "a", "stream": True}) as r:
            next(line for line in r.iter_lines() if line.startswith("data: "))
        deadline = time.monotonic() + 5
        while httpx.get(base + "/health").json()["in_flight"]:
            assert time.monotonic() < deadline, "the worker kept decoding after the client left"
            time.sleep(0.05)
        assert len(steps) < 1000

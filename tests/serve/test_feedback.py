"""Reply ids, n samples, POST /v1/feedback and what lands in the feedback database, through
FastAPI's TestClient over a tiny random model; and a real server process killed with SIGKILL."""

from __future__ import annotations

import json
import math
import os
import signal
import socket
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest
from fastapi.testclient import TestClient

from posttrain.data.feedback import open_store
from posttrain.generate.engine import GenerationOutput
from posttrain.serve import ServeConfig, create_app
from tests.data.test_feedback import postgres_url  # noqa: F401 (a fixture: a throwaway PostgreSQL server)

KEY = "sk-test"
AUTH = {"Authorization": f"Bearer {KEY}"}
MESSAGES = [{"role": "user", "content": "Say hi"}]


def config(db, **kwargs) -> ServeConfig:
    return ServeConfig(model_name="tiny", api_keys=[KEY], max_tokens_cap=16, default_max_tokens=6,
                       feedback_db=str(db) if db else None, **kwargs)


@pytest.fixture
def served(tiny, tokenizer, tmp_path):
    """(client, db path) of an app storing into tmp_path/fb.db."""
    db = tmp_path / "fb.db"
    with TestClient(create_app(tiny, tokenizer, config(db))) as client:
        yield client, db


def stream(client, path: str, body: dict) -> tuple[list[dict], list[str]]:
    """(decoded chunks, raw data lines) of an SSE answer."""
    with client.stream("POST", path, json={**body, "stream": True}, headers=AUTH) as r:
        assert r.status_code == 200, r.read()
        lines = [line[6:] for line in r.iter_lines() if line.startswith("data: ")]
    return [json.loads(x) for x in lines if x != "[DONE]"], lines


def joined(chunks: list[dict], chat: bool) -> dict[int, str]:
    """index -> the text a stream sent for that choice."""
    out: dict[int, str] = {}
    for chunk in chunks:
        for c in chunk["choices"]:
            out[c["index"]] = out.get(c["index"], "") + ((c["delta"].get("content") or "") if chat else c["text"])
    return out


def test_every_reply_gets_a_unique_id_and_is_stored(served):
    client, db = served
    ids, texts = [], {}
    for chat in (True, False):
        path = "/v1/chat/completions" if chat else "/v1/completions"
        body = {"model": "tiny", "max_tokens": 5, "temperature": 0,
                **({"messages": MESSAGES} if chat else {"prompt": "The sky is"})}
        for n in (1, 2):
            r = client.post(path, json={**body, "n": n}, headers=AUTH)
            assert r.status_code == 200, r.text
            answer = r.json()
            choices = answer["choices"]
            assert [c["index"] for c in choices] == list(range(n))
            assert [c["reply_id"] for c in choices] == ([answer["id"]] if n == 1 else
                                                        [f"{answer['id']}-{i}" for i in range(n)])
            for c in choices:
                ids.append(c["reply_id"])
                texts[c["reply_id"]] = c["message"]["content"] if chat else c["text"]
            chunks, lines = stream(client, path, {**body, "n": n})
            assert lines[-1] == "[DONE]" and len({c["id"] for c in chunks}) == 1
            reply_of = {c["index"]: c["reply_id"] for chunk in chunks for c in chunk["choices"]}
            assert sorted(reply_of) == list(range(n))
            for i, text in joined(chunks, chat).items():
                ids.append(reply_of[i])
                texts[reply_of[i]] = text
    assert len(ids) == 12 and len(set(ids)) == 12  # unique, stream or not, chat or completion

    store = open_store(db)
    assert store.journal_mode() == "wal"
    for reply_id, text in texts.items():
        conv_id = reply_id if reply_id.count("-") == 1 else reply_id.rsplit("-", 1)[0]
        conv = store.conversation(conv_id)
        assert conv is not None, reply_id
        assert {r["id"]: r["text"] for r in conv["replies"]}[reply_id] == text  # what the client got
        assert conv["model"] == "tiny" and conv["created_at"] <= conv["finished_at"]
        assert conv["params"]["temperature"] == 0 and conv["params"]["max_tokens"] == 5
        assert conv["prompt"] == (MESSAGES if conv["endpoint"] == "chat" else "The sky is")
    store.close()


def test_n_samples_differ_and_match_their_seeds(served):
    client, _ = served
    body = {"model": "tiny", "messages": MESSAGES, "max_tokens": 6, "temperature": 1.0, "seed": 11}
    both = client.post("/v1/chat/completions", json={**body, "n": 2}, headers=AUTH).json()
    texts = [c["message"]["content"] for c in both["choices"]]
    assert texts[0] != texts[1]  # so a user has a real choice
    for i in range(2):  # sample i draws with seed + i: the same as a single request with that seed
        alone = client.post("/v1/chat/completions", json={**body, "seed": 11 + i}, headers=AUTH).json()
        assert alone["choices"][0]["message"]["content"] == texts[i]
    assert both["usage"]["completion_tokens"] == sum(
        client.post("/v1/chat/completions", json={**body, "seed": 11 + i}, headers=AUTH).json()["usage"]
        ["completion_tokens"] for i in range(2))
    chunks, _ = stream(client, "/v1/chat/completions", {**body, "n": 2})
    assert joined(chunks, chat=True) == {0: texts[0], 1: texts[1]}
    over = client.post("/v1/chat/completions", json={**body, "n": 5}, headers=AUTH)
    assert over.status_code == 400 and over.json()["error"]["param"] == "n"


def test_the_openai_client_reads_reply_ids(served):
    from openai import OpenAI

    client, _ = served
    openai = OpenAI(base_url="http://testserver/v1", api_key=KEY, max_retries=0, http_client=client)
    chat = openai.chat.completions.create(model="tiny", messages=MESSAGES, max_tokens=4, n=2, temperature=0.9)
    assert [c.reply_id for c in chat.choices] == [f"{chat.id}-0", f"{chat.id}-1"]
    r = client.post("/v1/feedback", json={"reply_ids": [c.reply_id for c in chat.choices],
                                          "chosen": chat.choices[1].reply_id}, headers=AUTH)
    assert r.status_code == 200 and r.json()["kind"] == "choice" and r.json()["id"].startswith("fb-")


def test_feedback_accepted_and_refused_with_clear_errors(served):
    client, db = served
    first = client.post("/v1/chat/completions", json={"model": "tiny", "messages": MESSAGES, "n": 2,
                                                      "temperature": 0.9}, headers=AUTH).json()
    a, b = (c["reply_id"] for c in first["choices"])
    other = client.post("/v1/completions", json={"model": "tiny", "prompt": "x"}, headers=AUTH).json()["id"]

    ok = [client.post("/v1/feedback", json=body, headers=AUTH) for body in (
        {"reply_id": a, "rating": "up"},
        {"reply_id": other, "rating": "down", "text": "off topic"},
        {"reply_ids": [a, b], "chosen": b, "text": "shorter"})]
    assert [r.status_code for r in ok] == [200, 200, 200], [r.text for r in ok]
    assert [r.json()["kind"] for r in ok] == ["rating", "rating", "choice"]
    assert len({r.json()["id"] for r in ok}) == 3

    refused = [
        ({"reply_id": a, "rating": "great"}, 400, "rating"),
        ({"reply_id": a}, 400, "rating"),
        ({"reply_id": a, "rating": "up", "stars": 5}, 400, "stars"),
        ({"rating": "up"}, 400, "reply_id"),
        ({"reply_ids": [a, b], "chosen": "c"}, 400, "chosen"),
        ({"reply_ids": [a, a], "chosen": a}, 400, "reply_ids"),
        ({"reply_ids": [a], "chosen": a}, 400, "reply_ids"),
        ({"reply_ids": [a, other], "chosen": a}, 400, "reply_ids"),  # different prompts
        ({"reply_id": "chatcmpl-nope", "rating": "up"}, 404, "reply_id"),
        ({"reply_ids": [a, "chatcmpl-nope"], "chosen": a}, 404, "reply_ids"),
        ([1, 2], 400, None),
    ]
    for body, status, param in refused:
        r = client.post("/v1/feedback", json=body, headers=AUTH)
        error = r.json()["error"]
        assert (r.status_code, error["param"]) == (status, param), (body, r.text)
        assert set(error) == {"message", "type", "param", "code"} and (param is None or param in error["message"])
    assert "chatcmpl-nope" in client.post("/v1/feedback", json={"reply_id": "chatcmpl-nope", "rating": "up"},
                                          headers=AUTH).json()["error"]["message"]
    bad_json = client.post("/v1/feedback", content=b'{"reply_id": ', headers=AUTH)
    assert bad_json.status_code == 400 and bad_json.json()["error"]["code"] == "invalid_json"
    assert client.post("/v1/feedback", json={"reply_id": a, "rating": "up"}).status_code == 401

    store = open_store(db)
    rows = store.feedback()
    store.close()
    assert [(r["kind"], r["reply_id"], r["rating"], r["text"]) for r in rows] == [
        ("rating", a, "up", None), ("rating", other, "down", "off topic"), ("choice", b, None, "shorter")]
    assert rows[2]["other_reply_id"] == a  # the refused ones left nothing


def test_feedback_off_still_gives_ids(tiny, tokenizer):
    with TestClient(create_app(tiny, tokenizer, config(None))) as client:
        answer = client.post("/v1/completions", json={"model": "tiny", "prompt": "x", "max_tokens": 2},
                             headers=AUTH).json()
        assert answer["choices"][0]["reply_id"] == answer["id"]
        r = client.post("/v1/feedback", json={"reply_id": answer["id"], "rating": "up"}, headers=AUTH)
        assert r.status_code == 404 and r.json()["error"]["code"] == "feedback_disabled"


def leaky_generate(model, tok, prompts, gen, stream=None, **rows):
    """A model that repeats a phone number (what the client sees; the database must not)."""
    text = "Call 555-123-4567."
    if stream is not None:
        stream(0, 1, text)
    return GenerationOutput([text] * len(prompts), [[1, 2]] * len(prompts), [[0.0, 0.0]] * len(prompts))


@pytest.mark.parametrize("redact", [True, False])
def test_pii_is_redacted_before_storage(tiny, tokenizer, tmp_path, redact):
    db = tmp_path / "fb.db"
    app = create_app(tiny, tokenizer, config(db, feedback_redact_pii=redact), generate_fn=leaky_generate)
    with TestClient(app) as client:
        messages = [{"role": "user", "content": "I am ann@example.com, card 4111 1111 1111 1111"}]
        answer = client.post("/v1/chat/completions", json={"model": "tiny", "messages": messages}, headers=AUTH).json()
        assert answer["choices"][0]["message"]["content"] == "Call 555-123-4567."  # the answer is not touched
        chunks, _ = stream(client, "/v1/completions", {"model": "tiny", "prompt": "mail ann@example.com"})
        assert joined(chunks, chat=False)[0] == "Call 555-123-4567."
        r = client.post("/v1/feedback", json={"reply_id": answer["id"], "rating": "down",
                                              "text": "it leaked, reach me at +1 555 987 6543"}, headers=AUTH)
        assert r.status_code == 200
    store = open_store(db)
    conv, streamed = store.conversation(answer["id"]), store.conversation(chunks[0]["id"])
    fb = store.feedback()[0]
    store.close()
    if redact:
        assert conv["prompt"][0]["content"] == "I am [EMAIL], card [CARD]" and conv["redacted"]
        assert conv["replies"][0]["text"] == "Call [PHONE]." and streamed["prompt"] == "mail [EMAIL]"
        assert fb["text"] == "it leaked, reach me at [PHONE]"
    else:
        assert conv["prompt"] == messages and conv["replies"][0]["text"] == "Call 555-123-4567."
        assert fb["text"].endswith("+1 555 987 6543") and not conv["redacted"]


def test_a_reply_that_cannot_be_stored_is_not_acknowledged(served):
    client, _ = served

    def broken(*args, **kwargs):
        raise sqlite3.OperationalError("disk I/O error")

    store = client.app.state.feedback_store
    store.add_conversation = broken
    r = client.post("/v1/completions", json={"model": "tiny", "prompt": "x", "max_tokens": 2}, headers=AUTH)
    assert r.status_code == 500 and r.json()["error"]["code"] == "storage_error"
    assert "disk I/O error" in r.json()["error"]["message"]
    _, lines = stream(client, "/v1/completions", {"model": "tiny", "prompt": "x", "max_tokens": 2})
    assert "[DONE]" not in lines and json.loads(lines[-1])["error"]["code"] == "storage_error"
    assert client.get("/health").json()["in_flight"] == 0


def metric(text: str, name: str) -> float:
    line = next(x for x in text.splitlines() if x.startswith(name + " ") or x.startswith(name + "{"))
    return float(line.split()[-1])


def test_metrics_up_rate_over_a_sliding_window(tiny, tokenizer, tmp_path):
    db = tmp_path / "fb.db"
    with TestClient(create_app(tiny, tokenizer, config(db, feedback_window=3))) as client:
        assert math.isnan(metric(client.get("/metrics").text, "posttrain_feedback_up_rate"))
        rid = client.post("/v1/completions", json={"model": "tiny", "prompt": "x", "max_tokens": 2},
                          headers=AUTH).json()["id"]
        rates = []
        for rating in ("down", "up", "up", "up", "down"):
            assert client.post("/v1/feedback", json={"reply_id": rid, "rating": rating}, headers=AUTH).status_code == 200
            rates.append(metric(client.get("/metrics").text, "posttrain_feedback_up_rate"))
        assert rates == pytest.approx([0, 1 / 2, 2 / 3, 1, 2 / 3])  # the last 3 ratings
        text = client.get("/metrics").text
        assert 'posttrain_feedback_total{kind="rating",rating="up"} 3.0' in text
        assert metric(text, "posttrain_feedback_window_ratings") == 3
    with TestClient(create_app(tiny, tokenizer, config(db, feedback_window=3))) as client:  # a restart
        assert metric(client.get("/metrics").text, "posttrain_feedback_up_rate") == pytest.approx(2 / 3)


def test_postgres_feedback_database(tiny, tokenizer, postgres_url):
    with TestClient(create_app(tiny, tokenizer, config(postgres_url))) as client:
        answer = client.post("/v1/chat/completions", json={"model": "tiny", "messages": MESSAGES, "n": 2,
                                                           "temperature": 0.9}, headers=AUTH).json()
        a, b = (c["reply_id"] for c in answer["choices"])
        assert client.post("/v1/feedback", json={"reply_ids": [a, b], "chosen": a}, headers=AUTH).status_code == 200
        assert client.post("/v1/feedback", json={"reply_id": "x", "rating": "up"}, headers=AUTH).status_code == 404
    store = open_store(postgres_url)
    assert [r["id"] for r in store.conversation(answer["id"])["replies"]] == [a, b]
    assert [(r["kind"], r["reply_id"], r["other_reply_id"]) for r in store.feedback()] == [("choice", a, b)]
    store.close()


# ------------------------------------------------------------------------------ kill -9


def test_acknowledged_replies_and_feedback_survive_kill_9(tiny_dir, tmp_path):
    """`posttrain serve` in a subprocess; everything it answered is in the database after SIGKILL."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    db = tmp_path / "serve" / "fb.db"
    src = Path(__file__).resolve().parents[2] / "src"
    env = {**os.environ, "PYTHONPATH": f"{src}{os.pathsep}{os.environ.get('PYTHONPATH', '')}", "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen([sys.executable, "-m", "posttrain.cli", "serve", str(tiny_dir), "--name", "tiny",
                             "--port", str(port), "--feedback-db", str(db), "--max-tokens-cap", "8",
                             "--dtype", "fp32"], env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 120
        while True:
            assert proc.poll() is None, proc.stdout.read().decode()
            assert time.monotonic() < deadline, "server did not start"
            try:
                if httpx.get(base + "/health", timeout=2).status_code == 200:
                    break
            except httpx.TransportError:
                time.sleep(0.2)
        acked_replies, acked_feedback = {}, []
        with httpx.Client(base_url=base, timeout=60) as http:
            for i in range(3):
                r = http.post("/v1/chat/completions", json={"model": "tiny", "n": 2, "temperature": 0.9,
                                                            "messages": [{"role": "user", "content": f"hi {i}"}]})
                assert r.status_code == 200, r.text
                acked_replies.update({c["reply_id"]: c["message"]["content"] for c in r.json()["choices"]})
                ids = [c["reply_id"] for c in r.json()["choices"]]
                f = http.post("/v1/feedback", json={"reply_ids": ids, "chosen": ids[i % 2]})
                assert f.status_code == 200, f.text
                acked_feedback.append(f.json()["id"])
            with http.stream("POST", "/v1/completions", json={"model": "tiny", "prompt": "The", "stream": True,
                                                              "max_tokens": 4}) as r:
                lines = [x[6:] for x in r.iter_lines() if x.startswith("data: ")]
            assert lines[-1] == "[DONE]"
            chunks = [json.loads(x) for x in lines[:-1]]
            acked_replies[chunks[0]["id"]] = "".join(c["choices"][0]["text"] for c in chunks)
            f = http.post("/v1/feedback", json={"reply_id": chunks[0]["id"], "rating": "up", "text": "nice"})
            assert f.status_code == 200
            acked_feedback.append(f.json()["id"])
        proc.send_signal(signal.SIGKILL)  # no shutdown, no checkpoint: what was committed is all there is
        proc.wait(30)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(30)
        proc.stdout.close()
    assert proc.returncode == -signal.SIGKILL
    wal = Path(f"{db}-wal")
    assert wal.is_file() and wal.stat().st_size > 0  # the rows sit in the WAL, not yet checkpointed
    conn = sqlite3.connect(db)
    stored = dict(conn.execute("SELECT id, text FROM replies").fetchall())
    assert stored == acked_replies
    assert sorted(r[0] for r in conn.execute("SELECT id FROM feedback")) == sorted(acked_feedback)
    assert conn.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
    assert conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    conn.close()

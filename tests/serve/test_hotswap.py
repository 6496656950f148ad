"""Hot-swapping LoRA adapters while serving: /admin/adapters (admin keys), requests pinned to the
adapter version they were admitted on, adapters batched apart, bad adapters refused with 4xx, the
adapter recorded with stored replies; a tiny random model and LoRA adapters made here."""

from __future__ import annotations

import json
import shutil
import threading
import time
from pathlib import Path

import httpx
import pytest
import torch
from fastapi.testclient import TestClient

from posttrain.data.feedback import open_store
from posttrain.generate.engine import GenerationConfig, generate
from posttrain.models import tiny_model
from posttrain.serve import ServeConfig, create_app
from tests.serve.test_app import running
from tests.serve.test_batching import Recorder, send_all

KEY, ADMIN = "sk-client", "sk-admin"
ADMIN_AUTH = {"Authorization": f"Bearer {ADMIN}"}
PROMPT = "The sky is"


def make_adapter(tokenizer, path, seed: int, **tiny) -> str:
    """A LoRA adapter over tiny_model(**tiny) with weights large enough to change greedy outputs."""
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(seed)
    peft = get_peft_model(tiny_model(tokenizer, **tiny),
                          LoraConfig(r=4, target_modules=["q_proj", "v_proj"], init_lora_weights=False))
    for p in peft.parameters():
        if p.requires_grad:
            p.data.mul_(20)
    peft.save_pretrained(path)
    return str(path)


def alone(tokenizer, adapter: str | None, prompt: str = PROMPT, n: int = 8) -> str:
    """Greedy text of the tiny model (with the adapter at `adapter`), one prompt, no server."""
    from peft import PeftModel

    model = tiny_model(tokenizer)
    if adapter is not None:
        model = PeftModel.from_pretrained(model, adapter)
    return generate(model, tokenizer, [prompt], GenerationConfig(max_new_tokens=n)).texts[0]


@pytest.fixture(scope="module")
def adapters(tokenizer, tmp_path_factory):
    """name -> adapter dir (a, a2: a retrained, b), and each one's greedy text alone (plus the base's)."""
    root = tmp_path_factory.mktemp("adapters")
    paths = {name: make_adapter(tokenizer, root / name, seed) for name, seed in (("a", 1), ("a2", 3), ("b", 2))}
    expected = {name: alone(tokenizer, path) for name, path in paths.items()}
    expected["tiny"] = alone(tokenizer, None)
    assert len(set(expected.values())) == 4  # every adapter changes the output
    return paths, expected


def config(**kwargs) -> ServeConfig:
    return ServeConfig(model_name="tiny", api_keys=[KEY], admin_keys=[ADMIN], max_tokens_cap=64, **kwargs)


def complete(client, model: str, prompt: str = PROMPT, n: int = 8) -> str:
    r = client.post("/v1/completions", json={"model": model, "prompt": prompt, "max_tokens": n, "temperature": 0},
                    headers={"Authorization": f"Bearer {KEY}"})
    assert r.status_code == 200, r.text
    return r.json()["choices"][0]["text"]


def test_admin_routes_need_an_admin_key(tiny, tokenizer, adapters):
    paths, _ = adapters
    body = {"name": "a", "path": paths["a"]}
    off = ServeConfig(model_name="tiny", api_keys=[KEY])
    with TestClient(create_app(tiny, tokenizer, off)) as client:
        r = client.post("/admin/adapters", json=body, headers={"Authorization": f"Bearer {KEY}"})
        assert r.status_code == 403 and r.json()["error"]["code"] == "admin_disabled"
        assert "--admin-key" in r.json()["error"]["message"]
        assert client.get("/admin/adapters").status_code == 403
    with TestClient(create_app(tiny_model(tokenizer), tokenizer, config())) as client:
        assert client.post("/admin/adapters", json=body).status_code == 401
        client_key = client.post("/admin/adapters", json=body, headers={"Authorization": f"Bearer {KEY}"})
        assert client_key.status_code == 401 and client_key.json()["error"]["message"] == "incorrect admin key"
        assert client.delete("/admin/adapters/a", headers={"Authorization": f"Bearer {KEY}"}).status_code == 401
        assert client.post("/admin/adapters", json=body, headers=ADMIN_AUTH).status_code == 201
        # the admin key is not a client key
        r = client.post("/v1/completions", json={"model": "a", "prompt": "x"}, headers=ADMIN_AUTH)
        assert r.status_code == 401
    with pytest.raises(ValueError, match="admin key is also an API key"):
        ServeConfig(api_keys=["k"], admin_keys=["k"])


def test_load_list_swap_delete_while_serving(tokenizer, adapters):
    paths, expected = adapters
    with TestClient(create_app(tiny_model(tokenizer), tokenizer, config())) as client:
        assert complete(client, "tiny") == expected["tiny"]
        r = client.post("/admin/adapters", json={"name": "a", "path": paths["a"]}, headers=ADMIN_AUTH)
        assert r.status_code == 201, r.text
        assert r.json()["version"] == 1 and r.json()["replaced"] is None and r.json()["fingerprint"]
        assert complete(client, "a") == expected["a"]
        assert complete(client, "tiny") == expected["tiny"]  # the base runs with adapters disabled
        assert client.post("/admin/adapters", json={"name": "b", "path": paths["b"]},
                           headers=ADMIN_AUTH).status_code == 201
        models = client.get("/v1/models", headers={"Authorization": f"Bearer {KEY}"}).json()["data"]
        assert [m["id"] for m in models] == ["tiny", "a", "b"]
        r = client.post("/admin/adapters", json={"name": "a", "path": paths["a2"]}, headers=ADMIN_AUTH)
        assert r.status_code == 200 and r.json()["version"] == 2 and r.json()["replaced"]["version"] == 1
        assert complete(client, "a") == expected["a2"]
        assert complete(client, "b") == expected["b"]
        listing = client.get("/admin/adapters", headers=ADMIN_AUTH).json()
        assert [(a["name"], a["version"], a["source"]) for a in listing["data"]] == [("a", 2, paths["a2"]),
                                                                                     ("b", 1, paths["b"])]
        assert listing["retired"] == []  # version 1 of a was unloaded at once: nothing held it
        assert listing["base"]["name"] == "tiny"

        r = client.delete("/admin/adapters/a", headers=ADMIN_AUTH)
        assert r.status_code == 200 and r.json()["deleted"] is True and r.json()["in_flight"] == 0
        gone = client.post("/v1/completions", json={"model": "a", "prompt": "x"},
                           headers={"Authorization": f"Bearer {KEY}"})
        assert gone.status_code == 404 and gone.json()["error"]["code"] == "model_not_found"
        missing = client.delete("/admin/adapters/a", headers=ADMIN_AUTH)
        assert missing.status_code == 404 and missing.json()["error"]["code"] == "adapter_not_found"
        assert client.delete("/admin/adapters/b", headers=ADMIN_AUTH).status_code == 200
        assert complete(client, "tiny") == expected["tiny"]  # the last adapter gone: the plain model again
        r = client.post("/admin/adapters", json={"name": "a", "path": paths["a"]}, headers=ADMIN_AUTH)
        assert r.json()["version"] == 3  # a name's versions keep counting after a delete
        assert complete(client, "a") == expected["a"]
        text = client.get("/metrics").text
        assert 'posttrain_adapter_version{adapter="a"} 3.0' in text
        assert 'posttrain_adapter_version{adapter="b"} 0.0' in text
        assert 'posttrain_adapter_requests_total{adapter="a",status="200"} 3.0' in text
        assert 'posttrain_adapter_request_latency_seconds_count{adapter="tiny"} 3.0' in text


def test_startup_adapters_load_like_hot_ones(tokenizer, adapters):
    paths, expected = adapters
    app = create_app(tiny_model(tokenizer), tokenizer, config(), adapter_paths={"a": paths["a"], "b": paths["b"]})
    with TestClient(app) as client:
        assert complete(client, "b") == expected["b"] and complete(client, "a") == expected["a"]
        listing = client.get("/admin/adapters", headers=ADMIN_AUTH).json()["data"]
        assert [(a["name"], a["version"], a["path"]) for a in listing] == [("a", 1, paths["a"]), ("b", 1, paths["b"])]
    with pytest.raises(ValueError, match=r"adapter x=.*does not exist"):
        create_app(tiny_model(tokenizer), tokenizer, config(), adapter_paths={"x": "/nonexistent/adapter"})


def test_bad_adapters_get_a_clear_4xx_and_serving_goes_on(tokenizer, adapters, tmp_path, tiny_dir):
    paths, expected = adapters
    wide = make_adapter(tokenizer, tmp_path / "wide", 4, hidden=128, heads=4, kv_heads=2)
    deep = make_adapter(tokenizer, tmp_path / "deep", 5, layers=4)
    pickled = tmp_path / "pickled"
    pickled.mkdir()
    (pickled / "adapter_config.json").write_text((tmp_path / "wide" / "adapter_config.json").read_text())
    (pickled / "adapter_model.bin").write_bytes(b"\x80\x04not really")
    ia3 = tmp_path / "ia3"
    ia3.mkdir()
    (ia3 / "adapter_config.json").write_text(json.dumps({"peft_type": "IA3"}))
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "adapter_config.json").write_text("{not json")
    cases = [  # body, status, code, words in the message
        ({"name": "bad name!", "path": paths["a"]}, 400, "invalid_name", "not a valid adapter name"),
        ({"name": "tiny", "path": paths["a"]}, 400, "invalid_name", "base model's name"),
        ({"name": "x", "path": str(tmp_path / "nope")}, 400, "adapter_not_found", "does not exist"),
        ({"name": "x", "path": str(tmp_path / "wide" / "adapter_config.json")}, 400, "invalid_adapter", "is a file"),
        ({"name": "x", "path": str(tiny_dir)}, 400, "invalid_adapter", "no adapter_config.json"),
        ({"name": "x", "path": str(pickled)}, 400, "invalid_adapter", "pickled adapter_model.bin is not loaded"),
        ({"name": "x", "path": str(ia3)}, 400, "invalid_adapter", "only LoRA"),
        ({"name": "x", "path": str(broken)}, 400, "invalid_adapter", "not valid JSON"),
        ({"name": "x", "path": wide}, 409, "incompatible_base", "has 64 inputs"),
        ({"name": "x", "path": deep}, 409, "incompatible_base", "layers.2.self_attn"),
        ({"name": "x", "path": paths["a"], "colour": 1}, 400, "invalid_value", "colour"),
        ({"name": "x"}, 400, "invalid_value", "path"),
    ]
    with TestClient(create_app(tiny_model(tokenizer), tokenizer, config())) as client:
        assert client.post("/admin/adapters", json={"name": "a", "path": paths["a"]},
                           headers=ADMIN_AUTH).status_code == 201
        for body, status, code, words in cases:
            r = client.post("/admin/adapters", json=body, headers=ADMIN_AUTH)
            assert r.status_code == status, (body, r.text)
            assert r.json()["error"]["code"] == code, (body, r.text)
            assert words in r.json()["error"]["message"], (body, r.text)
            assert complete(client, "a") == expected["a"]  # still serving, the loaded adapter untouched
        assert [a["name"] for a in client.get("/admin/adapters", headers=ADMIN_AUTH).json()["data"]] == ["a"]
        assert 'posttrain_adapter_loads_total{outcome="refused"} 10.0' in client.get("/metrics").text


def test_an_adapter_of_another_base_model_is_refused(tokenizer, adapters, tiny_dir, tmp_path):
    """adapter_config.json names its base; a server that knows its own base refuses another one."""
    from posttrain.models import load_model

    paths, _ = adapters
    model, _ = load_model(str(tiny_dir), dtype="fp32")  # its config records tiny_dir as its path
    cfg = json.loads((Path(paths["a"]) / "adapter_config.json").read_text())
    for name, base in (("other", tmp_path), ("same", tiny_dir)):
        shutil.copytree(paths["a"], tmp_path / name)
        (tmp_path / name / "adapter_config.json").write_text(json.dumps({**cfg, "base_model_name_or_path": str(base)}))
    other, same = tmp_path / "other", tmp_path / "same"
    with TestClient(create_app(model, tokenizer, config())) as client:
        r = client.post("/admin/adapters", json={"name": "x", "path": str(other)}, headers=ADMIN_AUTH)
        assert r.status_code == 409 and r.json()["error"]["code"] == "incompatible_base"
        assert f"trained on base model {tmp_path}" in r.json()["error"]["message"]
        assert client.post("/admin/adapters", json={"name": "x", "path": str(same)},
                           headers=ADMIN_AUTH).status_code == 201
        assert client.post("/admin/adapters", json={"name": "y", "path": str(other), "check_base": False},
                           headers=ADMIN_AUTH).status_code == 201


def test_requests_in_flight_finish_on_the_adapter_they_started_with(tokenizer, adapters):
    """A long stream on `a` is decoding and a second request on `a` waits in the queue when `a` is
    swapped: both produce exactly the old adapter's tokens; a request after the swap gets the new one."""
    paths, expected = adapters
    n = 24
    old, new = alone(tokenizer, paths["a"], n=n), alone(tokenizer, paths["a2"], n=n)
    assert old != new

    def slow(model, tok, prompts, cfg, stream=None, **rows):  # ~1.2 s of decoding per request
        def step(row, token, piece):
            time.sleep(0.05)
            return stream(row, token, piece)

        return generate(model, tok, prompts, cfg, stream=step, **rows)

    app = create_app(tiny_model(tokenizer), tokenizer, config(max_batch=1), generate_fn=slow)
    with running(app) as base:
        assert httpx.post(base + "/admin/adapters", json={"name": "a", "path": paths["a"]}, headers=ADMIN_AUTH,
                          timeout=30).status_code == 201
        body = {"model": "a", "prompt": PROMPT, "max_tokens": n, "temperature": 0}
        auth = {"Authorization": f"Bearer {KEY}"}
        out: dict = {}

        def queued():
            out["queued"] = httpx.post(base + "/v1/completions", json=body, headers=auth, timeout=60).json()

        def swap():
            out["swap_sent"] = time.monotonic()
            out["swap"] = httpx.post(base + "/admin/adapters", json={"name": "a", "path": paths["a2"]},
                                     headers=ADMIN_AUTH, timeout=60)
            out["swap_done"] = time.monotonic()

        threads = [threading.Thread(target=queued), threading.Thread(target=swap)]
        pieces = []
        with httpx.stream("POST", base + "/v1/completions", json={**body, "stream": True}, headers=auth,
                          timeout=60) as r:
            for line in r.iter_lines():
                if not line.startswith("data: ") or line == "data: [DONE]":
                    continue
                pieces.append(json.loads(line[6:])["choices"][0]["text"])
                if len(pieces) == 2:  # the stream is decoding: queue a request on `a`, then swap `a`
                    threads[0].start()
                    deadline = time.monotonic() + 10
                    while httpx.get(base + "/health").json()["in_flight"] < 2:
                        assert time.monotonic() < deadline
                        time.sleep(0.01)
                    threads[1].start()
        stream_done = time.monotonic()
        for t in threads:
            t.join(60)
        assert out["swap_sent"] < stream_done  # the swap was asked for while the stream ran
        assert out["swap"].status_code == 200 and out["swap"].json()["version"] == 2
        assert "".join(pieces) == old  # the stream: every token from version 1
        assert out["queued"]["choices"][0]["text"] == old  # admitted before the swap: version 1 too
        after = httpx.post(base + "/v1/completions", json=body, headers=auth, timeout=60).json()
        assert after["choices"][0]["text"] == new
        # version 1 was unloaded once its last request finished
        deadline = time.monotonic() + 10
        while httpx.get(base + "/admin/adapters", headers=ADMIN_AUTH).json()["retired"]:
            assert time.monotonic() < deadline, "the replaced adapter was never unloaded"
            time.sleep(0.02)
        assert len(app.state.server.model.peft_config) == 1  # only version 2 is left in the model


def selected(model) -> str | None:
    """The PEFT adapter a forward would apply now (None: adapters off or none loaded)."""
    layer = next((m for m in model.modules() if hasattr(m, "lora_A")), None)
    if layer is None or layer.disable_adapters:
        return None
    assert len(layer.active_adapters) == 1
    return layer.active_adapters[0]


def test_two_adapters_served_concurrently_each_match_serving_alone(tokenizer, adapters):
    """Requests on a, b and the base arrive together: each batch runs one adapter (selected for
    it, no other), batches of several rows do form, and every greedy answer equals that adapter's
    output with the adapter alone."""
    paths, _ = adapters
    prompts = {"a": ["The sky is", "Once upon a time", "Hello there"],
               "b": ["In 1990", "My favourite food", "The answer is"],
               "tiny": ["Paris is", "Water boils at", "Dear diary"]}
    owner = {p: m for m, ps in prompts.items() for p in ps}
    want = {p: alone(tokenizer, paths[m] if m != "tiny" else None, p, 6) for p, m in owner.items()}
    rec = Recorder()
    ran_with = []

    def recording(model, tok, batch, cfg, stream=None, **rows):
        ran_with.append(selected(model))
        return rec(model, tok, batch, cfg, stream, **rows)

    app = create_app(tiny_model(tokenizer), tokenizer, ServeConfig(model_name="tiny", admin_keys=[ADMIN],
                                                                   queue_size=16, max_batch=8, batch_wait_ms=0),
                     generate_fn=recording, adapter_paths={"a": paths["a"], "b": paths["b"]})
    with running(app) as base:
        bodies = {p: {"model": m, "prompt": p, "max_tokens": 6, "temperature": 0} for p, m in owner.items()}
        results = send_all(base, rec, bodies)
    for p in owner:
        assert results[p][0] == 200 and results[p][1] == want[p], p
    names = {e.peft_name: e.name for e in app.state.server.adapters.loaded()}
    batches = rec.batches()
    assert sorted(len(b) for b in batches) == [3, 3, 3]  # one batch per adapter, with all its requests
    for active, batch in zip(ran_with[1:], batches):
        models = {owner[p] for p in batch}
        assert len(models) == 1  # never two adapters in one batch
        assert names.get(active, "tiny") == models.pop()  # and the one selected is theirs


def test_stored_replies_record_the_adapter_and_its_version(tokenizer, adapters, tmp_path):
    paths, _ = adapters
    db = tmp_path / "fb.db"
    with TestClient(create_app(tiny_model(tokenizer), tokenizer, config(feedback_db=str(db)))) as client:
        ids = []
        for path in (paths["a"], paths["a2"]):
            client.post("/admin/adapters", json={"name": "a", "path": path}, headers=ADMIN_AUTH)
            ids.append(client.post("/v1/completions", json={"model": "a", "prompt": "x", "max_tokens": 2},
                                   headers={"Authorization": f"Bearer {KEY}"}).json()["id"])
        ids.append(client.post("/v1/completions", json={"model": "tiny", "prompt": "x", "max_tokens": 2},
                               headers={"Authorization": f"Bearer {KEY}"}).json()["id"])
        fingerprints = {a["version"]: a["fingerprint"]
                        for a in client.get("/admin/adapters", headers=ADMIN_AUTH).json()["data"]}
    store = open_store(db)
    rows = [store.conversation(i) for i in ids]
    store.close()
    assert [r["model"] for r in rows] == ["a", "a", "tiny"]
    assert [r["params"].get("adapter", {}).get("version") for r in rows] == [1, 2, None]
    assert rows[1]["params"]["adapter"]["fingerprint"] == fingerprints[2]
    assert rows[0]["params"]["adapter"]["fingerprint"] != fingerprints[2]


@pytest.mark.parametrize("argv, message", [
    (["--api-key", "k", "--admin-key", "k"], "admin key is also an API key"),
    (["--adapter", "a=x", "--adapter", "a=y"], "a NAME is given twice"),
    (["--drift-threshold", "-1"], "drift_threshold"),
])
def test_cli_serve_refuses_bad_admin_and_monitor_flags(argv, message, capsys):
    from posttrain.cli import main

    assert main(["serve", "default", *argv]) == 2
    assert message in capsys.readouterr().err

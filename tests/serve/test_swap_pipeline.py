"""The closed loop: a running server stores replies and feedback; a pipeline trains a LoRA DPO
stage on that fresh feedback and, when its gates pass, swaps the adapter into the same server
(deploy.swap_into); a failed gate swaps nothing. A real uvicorn on 127.0.0.1 over a tiny model."""

from __future__ import annotations

import httpx
import pytest
import yaml

from posttrain.generate.engine import GenerationConfig, generate
from posttrain.models import load_model
from posttrain.pipeline import load_pipeline, run_pipeline
from posttrain.serve import ServeConfig, create_app
from posttrain.stage import content_hash
from tests.serve.test_app import running

ADMIN = "sk-admin"
AUTH = {"Authorization": f"Bearer {ADMIN}"}
TRAIN = {"train.max_steps": 1, "train.batch_size": 2, "train.progress": False, "train.lr": 0.05,
         "data.max_length": 64, "adapter.method": "lora", "adapter.r": 2}


def pipeline(tmp_path, base: str, db, name: str, gate_min: float, **deploy) -> str:
    spec = {"name": "loop", "output_dir": str(tmp_path / name), "model": str(deploy.pop("model")),
            "data": {"pairs": {"source": f"feedback:{db}", "filters": {"near_dedup": {"enabled": False}}}},
            "stages": [{"name": "dpo", "verb": "dpo", "overrides": {**TRAIN, "data.train": "${data.pairs}"},
                        "gate": [{"metric": "train.steps", "min": gate_min}]}],
            "deploy": {"swap_into": base, "swap_name": name, **deploy}}
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump(spec))
    return str(path)


@pytest.fixture
def served(tiny_dir, tokenizer, tmp_path):
    """(base URL, feedback db) of a server over tiny_dir with admin key ADMIN and some rated replies."""
    model, _ = load_model(str(tiny_dir), dtype="fp32")
    db = tmp_path / "serve" / "feedback.db"
    config = ServeConfig(model_name="tiny", admin_keys=[ADMIN], feedback_db=str(db), max_tokens_cap=16,
                         default_max_tokens=8)
    with running(create_app(model, tokenizer, config)) as base:
        for i in range(4):  # n=2 sampled replies per prompt, one chosen over the other
            answer = httpx.post(base + "/v1/chat/completions", timeout=60, json={
                "model": "tiny", "n": 2, "temperature": 1.0, "seed": i,
                "messages": [{"role": "user", "content": f"Tell me about {i}"}]}).json()
            a, b = (c["reply_id"] for c in answer["choices"])
            assert httpx.post(base + "/v1/feedback", json={"reply_ids": [a, b], "chosen": a}).status_code == 200
        yield base, db


def test_fresh_feedback_trains_an_adapter_that_is_swapped_into_the_server(served, tiny_dir, tokenizer, tmp_path,
                                                                          monkeypatch, capsys):
    base, db = served
    monkeypatch.setenv("POSTTRAIN_ADMIN_KEY", ADMIN)
    path = pipeline(tmp_path, base, db, "fresh", 1, model=tiny_dir)
    state = run_pipeline(load_pipeline(path))
    assert state["data"]["pairs"]["kept"] == 4 and state["stages"]["dpo"]["status"] == "done"
    assert "deploy" not in state["stages"]  # swap only: no export stage
    adapter_dir = tmp_path / "fresh" / "dpo" / "final"
    assert state["swap"]["status"] == "swapped" and state["swap"]["version"] == 1
    listing = httpx.get(base + "/admin/adapters", headers=AUTH).json()["data"]
    assert [(a["name"], a["path"], a["fingerprint"]) for a in listing] == [
        ("fresh", str(adapter_dir), content_hash(adapter_dir))]
    # the server now answers `model: fresh` exactly as the trained adapter does alone
    alone, _ = load_model(str(tmp_path / "fresh" / "dpo"), dtype="fp32")
    want = generate(alone, tokenizer, ["The sky is"], GenerationConfig(max_new_tokens=8)).texts[0]
    plain, _ = load_model(str(tiny_dir), dtype="fp32")
    assert want != generate(plain, tokenizer, ["The sky is"], GenerationConfig(max_new_tokens=8)).texts[0]
    got = httpx.post(base + "/v1/completions", timeout=60, json={"model": "fresh", "prompt": "The sky is",
                                                                 "max_tokens": 8, "temperature": 0}).json()
    assert got["choices"][0]["text"] == want
    # unchanged feedback and weights: everything skipped, the swap too
    state = run_pipeline(load_pipeline(path))
    assert state["stages"]["dpo"]["status"] == "skipped" and state["swap"]["status"] == "skipped"
    assert httpx.get(base + "/admin/adapters", headers=AUTH).json()["data"][0]["version"] == 1
    assert "already serves these weights" in capsys.readouterr().out


def test_a_failed_gate_swaps_nothing(served, tiny_dir, tmp_path, monkeypatch):
    base, db = served
    monkeypatch.setenv("POSTTRAIN_ADMIN_KEY", ADMIN)
    with pytest.raises(ValueError, match="gate failed after stage dpo"):
        run_pipeline(load_pipeline(pipeline(tmp_path, base, db, "gated", 100, model=tiny_dir)))
    assert (tmp_path / "gated" / "dpo" / "final" / "adapter_config.json").is_file()  # trained, not deployed
    assert httpx.get(base + "/admin/adapters", headers=AUTH).json()["data"] == []


def test_the_server_is_checked_before_anything_trains(served, tiny_dir, tmp_path, monkeypatch):
    base, db = served
    monkeypatch.delenv("POSTTRAIN_ADMIN_KEY", raising=False)
    with pytest.raises(ValueError, match="POSTTRAIN_ADMIN_KEY .* is not set"):
        run_pipeline(load_pipeline(pipeline(tmp_path, base, db, "nokey", 1, model=tiny_dir)))
    monkeypatch.setenv("MY_KEY", "wrong")
    with pytest.raises(ValueError, match="answered 401: incorrect admin key"):
        run_pipeline(load_pipeline(pipeline(tmp_path, base, db, "badkey", 1, model=tiny_dir, swap_key_env="MY_KEY")))
    monkeypatch.setenv("MY_KEY", ADMIN)
    with pytest.raises(ValueError, match="cannot reach"):
        run_pipeline(load_pipeline(pipeline(tmp_path, "http://127.0.0.1:9", db, "down", 1, model=tiny_dir,
                                            swap_key_env="MY_KEY")))
    other = tmp_path / "other_base"
    other.mkdir()
    (other / "config.json").write_text((tiny_dir / "config.json").read_text())
    with pytest.raises(ValueError, match="serves .* this pipeline trains adapters over"):
        run_pipeline(load_pipeline(pipeline(tmp_path, base, db, "otherbase", 1, model=other, swap_key_env="MY_KEY")))
    assert not any((tmp_path / n / "dpo").exists() for n in ("nokey", "badkey", "down", "otherbase"))

"""Per-adapter window series and drift alerts (monitor.py), alone and through the app with synthetic
traffic; the Grafana dashboard in recipes/ queries only metrics /metrics exposes."""

from __future__ import annotations

import json
import logging
import re
from pathlib import Path

import pytest
from fastapi.testclient import TestClient
from prometheus_client import CollectorRegistry, generate_latest

from posttrain.generate.engine import GenerationOutput
from posttrain.models import tiny_model
from posttrain.serve import ServeConfig, create_app
from posttrain.serve.monitor import Monitor, drift_thresholds, monitor_metrics
from tests.serve.test_hotswap import ADMIN, ADMIN_AUTH, make_adapter

ROOT = Path(__file__).resolve().parents[2]
REFUSAL = "I'm sorry, but I can't help with that."
ANSWER = "Paris is the capital of France."


def value(text: str, sample: str) -> float | None:
    """The value of one exposition line `sample value` (None when absent)."""
    for line in text.splitlines():
        if line.startswith(sample + " "):
            return float(line.split()[-1])
    return None


def monitor(window: int = 4, threshold=0.5, baselines=None) -> tuple[Monitor, CollectorRegistry]:
    registry = CollectorRegistry()
    return Monitor(monitor_metrics(registry), window, drift_thresholds(threshold), baselines), registry


def alert(registry, adapter: str, series: str) -> float | None:
    text = generate_latest(registry).decode()
    return value(text, f'posttrain_drift_alert{{adapter="{adapter}",series="{series}"}}')


def test_refusal_drift_alerts_once_per_episode(caplog):
    mon, reg = monitor(window=4)
    caplog.set_level(logging.INFO, "posttrain.serve")
    for _ in range(3):
        mon.record("a", ANSWER, 7, 0.1)
    assert alert(reg, "a", "refusal_rate") is None  # no full window yet: no baseline, no check
    mon.record("a", ANSWER, 7, 0.1)
    assert alert(reg, "a", "refusal_rate") == 0  # baseline: 0 refusals, 7 tokens, 70 tokens/s
    mon.record("a", REFUSAL, 7, 0.1)  # 1/4 refusals: change 0.25 / floor 0.1 = 2.5 > 0.5
    assert alert(reg, "a", "refusal_rate") == 1
    for _ in range(5):
        mon.record("a", REFUSAL, 7, 0.1)
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1 and "adapter a, refusal_rate = 0.25" in warnings[0].getMessage()
    text = generate_latest(reg).decode()
    assert value(text, 'posttrain_window_refusal_rate{adapter="a"}') == 1.0
    assert value(text, 'posttrain_drift_baseline{adapter="a",series="refusal_rate"}') == 0.0
    assert value(text, 'posttrain_drift_change{adapter="a",series="refusal_rate"}') == pytest.approx(10.0)
    assert value(text, 'posttrain_refusals_total{adapter="a"}') == 6
    assert alert(reg, "a", "reply_tokens") == 0  # the other series did not move
    for _ in range(4):
        mon.record("a", ANSWER, 7, 0.1)
    assert alert(reg, "a", "refusal_rate") == 0  # a clean window: the episode is over
    assert any("drift alert over" in r.getMessage() for r in caplog.records)
    mon.record("a", REFUSAL, 7, 0.1)
    assert alert(reg, "a", "refusal_rate") == 1  # a new episode, a new warning
    assert len([r for r in caplog.records if r.levelno == logging.WARNING]) == 2
    assert alert(reg, "b", "refusal_rate") is None  # per adapter: b has no traffic


def test_length_and_speed_drift_given_baselines_and_reset():
    mon, reg = monitor(window=2, threshold={"reply_tokens": 0.5},
                       baselines={"a": {"reply_tokens": 10.0}})
    mon.record("a", ANSWER, 14, 1.0)
    mon.record("a", ANSWER, 14, 1.0)  # 14 against the given 10: +40%, within 0.5
    assert alert(reg, "a", "reply_tokens") == 0
    mon.record("a", ANSWER, 30, 1.0)  # mean 22: +120%
    assert alert(reg, "a", "reply_tokens") == 1
    assert alert(reg, "a", "refusal_rate") is None  # no threshold for it: not checked
    mon.reset_baseline("a")  # the operator accepts the new behaviour
    assert alert(reg, "a", "reply_tokens") == 0
    mon.record("a", ANSWER, 30, 1.0)
    mon.record("a", ANSWER, 30, 1.0)  # the new baseline: 30
    text = generate_latest(reg).decode()
    assert value(text, 'posttrain_drift_baseline{adapter="a",series="reply_tokens"}') == 30
    assert alert(reg, "a", "reply_tokens") == 0
    mon2, reg2 = monitor(window=2)
    for seconds in (0.1, 0.1, 1.0, 1.0):  # 50 tokens/s -> 5 tokens/s
        mon2.record("a", ANSWER, 5, seconds)
    assert alert(reg2, "a", "tokens_per_s") == 1


@pytest.mark.parametrize("threshold, message", [
    (-1, "must be > 0"), ({"refusal": 0.5}, "unknown series"), ({"reply_tokens": 0}, "must be a number > 0"),
    ("high", "drift_threshold"),
])
def test_bad_drift_thresholds_are_refused(threshold, message):
    with pytest.raises(ValueError, match=message):
        ServeConfig(drift_threshold=threshold)


def test_bad_drift_baselines_are_refused():
    with pytest.raises(ValueError, match=r"drift_baseline.a.refusals: unknown series"):
        ServeConfig(drift_baseline={"a": {"refusals": 0.1}})


class Scripted:
    """generate_fn answering from a script of texts (one per call), with a few tokens each."""

    def __init__(self, texts):
        self.texts = list(texts)

    def __call__(self, model, tok, prompts, config, stream=None, **rows):
        text = self.texts.pop(0) if self.texts else ANSWER
        return GenerationOutput([text] * len(prompts), [[1, 2, 3]] * len(prompts), [[0.0] * 3] * len(prompts))


def test_synthetic_refusals_raise_the_drift_gauge_through_the_app(tiny, tokenizer, caplog):
    caplog.set_level(logging.WARNING, "posttrain.serve")
    script = Scripted([ANSWER] * 5 + [REFUSAL] * 5)
    # tokens_per_s is wall-clock timing of a scripted generator: noise under load, so not judged here
    config = ServeConfig(model_name="tiny", monitor_window=5, max_batch=1,
                         drift_threshold={"refusal_rate": 0.5, "reply_tokens": 0.5})
    with TestClient(create_app(tiny, tokenizer, config, generate_fn=script)) as client:
        for i in range(10):
            body = {"model": "tiny", "prompt": f"q{i}", "max_tokens": 3, "stream": i % 2 == 1}
            assert client.post("/v1/completions", json=body).status_code == 200
            if i == 4:
                assert value(client.get("/metrics").text,
                             'posttrain_drift_alert{adapter="tiny",series="refusal_rate"}') == 0
        text = client.get("/metrics").text
    assert value(text, 'posttrain_drift_alert{adapter="tiny",series="refusal_rate"}') == 1
    assert value(text, 'posttrain_window_refusal_rate{adapter="tiny"}') == 1
    assert value(text, 'posttrain_window_reply_tokens{adapter="tiny"}') == 3
    assert value(text, 'posttrain_drift_alert{adapter="tiny",series="reply_tokens"}') == 0
    assert value(text, 'posttrain_adapter_requests_total{adapter="tiny",status="200"}') == 10
    alerts = [r.getMessage() for r in caplog.records if r.getMessage().startswith("drift alert:")]
    assert len(alerts) == 1 and "adapter tiny, refusal_rate" in alerts[0]  # once per episode


def test_up_rate_drift(tiny, tokenizer, tmp_path):
    config = ServeConfig(model_name="tiny", feedback_db=str(tmp_path / "fb.db"), feedback_window=2,
                         drift_threshold={"up_rate": 0.3})
    with TestClient(create_app(tiny, tokenizer, config, generate_fn=Scripted([]))) as client:
        rid = client.post("/v1/completions", json={"model": "tiny", "prompt": "x"}).json()["id"]
        for rating in ("up", "up", "down", "down"):
            client.post("/v1/feedback", json={"reply_id": rid, "rating": rating})
        text = client.get("/metrics").text
    assert value(text, 'posttrain_drift_baseline{adapter="*",series="up_rate"}') == 1.0
    assert value(text, 'posttrain_drift_alert{adapter="*",series="up_rate"}') == 1


def exposed_names(text: str) -> set[str]:
    return {re.match(r"[a-zA-Z_:][a-zA-Z0-9_:]*", line).group(0) for line in text.splitlines()
            if line and not line.startswith("#")}


def test_the_grafana_dashboard_is_valid_and_queries_only_exposed_metrics(tokenizer, tmp_path):
    dashboard = json.loads((ROOT / "recipes" / "grafana_posttrain.json").read_text())
    panels = [p for p in dashboard["panels"] if p["type"] != "row"]
    assert dashboard["title"] and dashboard["uid"] and len(panels) >= 10
    assert len({p["id"] for p in dashboard["panels"]}) == len(dashboard["panels"])
    queries = [t["expr"] for p in panels for t in p["targets"]]
    queries += [a["expr"] for a in dashboard["annotations"]["list"]]
    queries += [v["definition"] for v in dashboard["templating"]["list"] if v["type"] == "query"]
    for p in panels:
        assert p["targets"] and {"h", "w", "x", "y"} <= set(p["gridPos"]), p["title"]
        assert all(t["refId"] for t in p["targets"])
    for q in queries:  # balanced brackets: a typo'd query would not parse in Prometheus either
        assert q.count("(") == q.count(")") and q.count("{") == q.count("}") and q.count("[") == q.count("]"), q
    wanted = {"posttrain_window_refusal_rate", "posttrain_window_reply_tokens", "posttrain_drift_alert",
              "posttrain_feedback_up_rate", "posttrain_adapter_request_latency_seconds_bucket",
              "posttrain_adapter_requests_total", "posttrain_adapter_generated_tokens_total"}
    used = {name for q in queries for name in re.findall(r"\bposttrain_[a-z0-9_]+", q)}
    assert wanted <= used  # a panel for every series the monitoring is about

    # traffic that makes every labelled series appear: an adapter, requests, feedback, full windows
    adapter = make_adapter(tokenizer, tmp_path / "a", 1)
    config = ServeConfig(model_name="tiny", admin_keys=[ADMIN], monitor_window=1, feedback_window=1,
                         feedback_db=str(tmp_path / "fb.db"), max_tokens_cap=8)
    with TestClient(create_app(tiny_model(tokenizer), tokenizer, config)) as client:
        assert client.post("/admin/adapters", json={"name": "a", "path": adapter}, headers=ADMIN_AUTH).status_code == 201
        rid = client.post("/v1/completions", json={"model": "a", "prompt": "x", "max_tokens": 3}).json()["id"]
        client.post("/v1/completions", json={"model": "nope", "prompt": "x"})
        client.post("/v1/feedback", json={"reply_id": rid, "rating": "up"})
        text = client.get("/metrics").text
    missing = sorted(used - exposed_names(text))
    assert not missing, f"the dashboard queries metrics /metrics does not expose: {missing}"

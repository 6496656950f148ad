"""Server settings and request checks alone (serve/schema.py): every bad field is named."""

from __future__ import annotations

import pytest
from pydantic import ValidationError

from posttrain.generate.engine import GenerationOutput
from posttrain.serve.schema import (
    APIError,
    ChatRequest,
    CompletionRequest,
    ServeConfig,
    chunk_event,
    completion_body,
    finish_reason,
    parse_json,
    parse_request,
)

CONFIG = ServeConfig(model_name="tiny", adapters=["a"], max_tokens_cap=16, default_max_tokens=8, decoding="plain")
CHAT = {"model": "tiny", "messages": [{"role": "user", "content": "hi"}]}


@pytest.mark.parametrize("kwargs, field", [
    ({"max_batch": 0}, "max_batch"),
    ({"queue_size": 0}, "queue_size"),
    ({"max_tokens_cap": -1}, "max_tokens_cap"),
    ({"max_body_bytes": 0}, "max_body_bytes"),
    ({"timeout_s": 0}, "timeout_s"),
    ({"batch_wait_ms": -1}, "batch_wait_ms"),
    ({"decoding": "beam"}, "decoding"),
    ({"backend": "gpu9"}, "backend"),
    ({"queue": 4}, "queue"),  # unknown key
    ({"api_keys": "sk-one"}, "api_keys"),  # a string is not a list of keys
    ({"adapters": ["default"]}, "adapters"),  # the base model's name
])
def test_config_refuses_bad_settings_naming_the_field(kwargs, field):
    with pytest.raises(ValidationError) as info:
        ServeConfig(**kwargs)
    assert field in str(info.value)


def test_config_lowers_the_default_to_the_cap_and_revalidates_assignment():
    assert ServeConfig(max_tokens_cap=4).default_max_tokens == 4
    config = ServeConfig()
    with pytest.raises(ValidationError, match="max_batch"):
        config.max_batch = 0
    assert CONFIG.served_names() == ["tiny", "a"]


@pytest.mark.parametrize("data, status, param", [
    ([1, 2], 400, None),
    ({"model": "tiny"}, 400, "messages"),
    ({**CHAT, "max_tokens": "many"}, 400, "max_tokens"),
    ({**CHAT, "messages": [{"role": "wizard", "content": "x"}]}, 400, "messages.0.role"),
    ({**CHAT, "temperature": 9}, 400, "temperature"),
    ({**CHAT, "top_p": 0}, 400, "top_p"),
    ({**CHAT, "n": 2}, 400, "n"),
    ({**CHAT, "max_tokens": 17}, 400, "max_tokens"),
    ({**CHAT, "stop": ["ok", ""]}, 400, "stop"),
    ({**CHAT, "model": "gpt-9"}, 404, "model"),
])
def test_bad_requests_name_the_field(data, status, param):
    with pytest.raises(APIError) as info:
        parse_request(ChatRequest, data, CONFIG)
    err = info.value
    assert (err.status, err.param) == (status, param)
    body = err.body()["error"]
    assert body["param"] == param and body["message"]
    if param:
        assert param.split(".")[0] in body["message"]


def test_a_good_request_becomes_its_generation_config():
    req, gen = parse_request(CompletionRequest, {"model": "a", "prompt": "x", "temperature": 0, "stop": "\n",
                                                 "unknown_field": 1}, CONFIG)
    assert req.model == "a" and not gen.do_sample and gen.stop == ["\n"] and gen.max_new_tokens == 8
    assert gen.decoding == "plain"
    _, gen = parse_request(ChatRequest, {**CHAT, "max_completion_tokens": 3, "max_tokens": 9, "temperature": 0.5,
                                         "seed": 2}, CONFIG)
    assert gen.max_new_tokens == 3 and gen.do_sample and gen.temperature == 0.5 and gen.seed == 2


def test_invalid_json_is_a_400():
    with pytest.raises(APIError, match="not valid JSON") as info:
        parse_json(b'{"model": ')
    assert info.value.status == 400 and info.value.code == "invalid_json"
    assert parse_json(b'{"a": 1}') == {"a": 1}


def test_response_bodies():
    out = GenerationOutput(["hey"], [[1, 2, 3]], [[0.0] * 3])
    _, gen = parse_request(CompletionRequest, {"model": "tiny", "prompt": "x", "max_tokens": 3}, CONFIG)
    assert finish_reason(out, gen) == "length"
    assert finish_reason(GenerationOutput(["hey"], [[1, 2, 3]], [[0.0] * 3], {"guard_blocked": 1}), gen) == "stop"
    chat = completion_body("id1", True, "tiny", "hey", "stop", 4, 3)
    assert chat["object"] == "chat.completion" and chat["choices"][0]["message"] == {"role": "assistant",
                                                                                    "content": "hey"}
    assert chat["usage"] == {"prompt_tokens": 4, "completion_tokens": 3, "total_tokens": 7}
    text = completion_body("id2", False, "tiny", "hey", "length", 1, 3)
    assert text["object"] == "text_completion" and text["choices"][0]["text"] == "hey"
    event = chunk_event("id3", True, "tiny", {"content": "é"}, None)
    assert event.startswith("data: {") and event.endswith("\n\n") and '"é"' in event

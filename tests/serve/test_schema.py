"""Server settings and request checks alone (serve/schema.py): every bad field is named."""

from __future__ import annotations

import json

import pytest
from pydantic import ValidationError

from posttrain.generate.engine import GenerationOutput
from posttrain.serve.schema import (
    APIError,
    ChatRequest,
    ChoiceFeedback,
    CompletionRequest,
    RatingFeedback,
    ServeConfig,
    choice_configs,
    chunk_event,
    completion_body,
    finish_reason,
    parse_feedback,
    parse_json,
    parse_request,
    reply_ids,
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
    ({"max_n": 0}, "max_n"),
    ({"feedback_db": " "}, "feedback_db"),
    ({"feedback_window": 0}, "feedback_window"),
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
    ({**CHAT, "n": 5}, 400, "n"),  # over max_n (4)
    ({**CHAT, "n": 0}, 400, "n"),
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
    chat = completion_body("id1", True, "tiny", [("hey", "stop", "id1")], 4, 3)
    assert chat["object"] == "chat.completion" and chat["choices"][0]["message"] == {"role": "assistant",
                                                                                    "content": "hey"}
    assert chat["usage"] == {"prompt_tokens": 4, "completion_tokens": 3, "total_tokens": 7}
    text = completion_body("id2", False, "tiny", [("hey", "length", "id2-0"), ("ho", "stop", "id2-1")], 1, 3)
    assert text["object"] == "text_completion" and [c["text"] for c in text["choices"]] == ["hey", "ho"]
    assert [(c["index"], c["reply_id"]) for c in text["choices"]] == [(0, "id2-0"), (1, "id2-1")]
    event = chunk_event("id3", True, "tiny", {"content": "é"}, None)
    assert event.startswith("data: {") and event.endswith("\n\n") and '"é"' in event
    assert json.loads(event[6:])["choices"][0]["reply_id"] == "id3"
    assert json.loads(chunk_event("id4", False, "tiny", "x", None, 1, "id4-1")[6:])["choices"][0]["index"] == 1


def test_n_samples_get_their_own_ids_and_seeds():
    req, gen = parse_request(ChatRequest, {**CHAT, "n": 3, "seed": 7, "temperature": 0.7}, CONFIG)
    assert req.n == 3 and reply_ids("r", 1) == ["r"] and reply_ids("r", 3) == ["r-0", "r-1", "r-2"]
    assert [g.seed for g in choice_configs(gen, 3)] == [7, 8, 9]  # the same seed would give 3 copies
    _, unseeded = parse_request(ChatRequest, {**CHAT, "n": 2}, CONFIG)
    assert [g.seed for g in choice_configs(unseeded, 2)] == [None, None]
    assert ServeConfig(queue_size=2).max_n == 2  # n samples take n slots: never more than the queue


@pytest.mark.parametrize("data, param, message", [
    ([1], None, "JSON object"),
    ({}, "reply_id", "missing"),
    ({"text": "meh"}, "reply_id", "missing"),
    ({"reply_id": "a"}, "rating", "Field required"),
    ({"reply_id": "a", "rating": "meh"}, "rating", "'up' or 'down'"),
    ({"reply_id": "", "rating": "up"}, "reply_id", "at least 1 character"),
    ({"reply_id": 3, "rating": "up"}, "reply_id", "valid string"),
    ({"reply_id": "a", "rating": "up", "stars": 5}, "stars", "Extra inputs"),
    ({"reply_id": "a", "rating": "up", "text": 5}, "text", "valid string"),
    ({"reply_ids": ["a", "b"]}, "chosen", "Field required"),
    ({"reply_ids": ["a"], "chosen": "a"}, "reply_ids", "at least 2"),
    ({"reply_ids": ["a", "b", "c"], "chosen": "a"}, "reply_ids", "at most 2"),
    ({"reply_ids": ["a", "a"], "chosen": "a"}, "reply_ids", "two different replies"),
    ({"reply_ids": ["a", "b"], "chosen": "c"}, "chosen", "not one of reply_ids"),
    ({"reply_ids": "ab", "chosen": "a"}, "reply_ids", "valid list"),
    ({"reply_ids": ["a", "b"], "chosen": "a", "rating": "up"}, "rating", "not both"),
])
def test_bad_feedback_names_the_field(data, param, message):
    with pytest.raises(APIError) as info:
        parse_feedback(data)
    err = info.value
    assert (err.status, err.param) == (400, param) and message in err.message, err.message


def test_good_feedback_parses():
    rating = parse_feedback({"reply_id": "a", "rating": "down", "text": "wrong year"})
    assert isinstance(rating, RatingFeedback) and rating.rating == "down" and rating.text == "wrong year"
    choice = parse_feedback({"reply_ids": ["a", "b"], "chosen": "b"})
    assert isinstance(choice, ChoiceFeedback) and (choice.chosen, choice.rejected) == ("b", "a")

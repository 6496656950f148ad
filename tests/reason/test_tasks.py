"""Task plug-ins: the Game-of-24 checker and solver, answer extraction, loading, shipped data."""

from __future__ import annotations

import importlib.util
import json
from fractions import Fraction
from pathlib import Path

import pytest

from posttrain.reason import tasks as T

DATA = Path(__file__).resolve().parents[2] / "data" / "reason"


# ------------------------------------------------------------------ Game of 24


@pytest.mark.parametrize("expr", ["(10 - (13 - 9)) * 4", "8 / (3 - 8 / 3)", "4 × 6 × 1 × 1", "(1+8/4)*8"])
def test_check24_accepts_valid_expressions(expr):
    numbers = {"(10 - (13 - 9)) * 4": [4, 9, 10, 13], "8 / (3 - 8 / 3)": [3, 3, 8, 8],
               "4 × 6 × 1 × 1": [1, 1, 4, 6], "(1+8/4)*8": [1, 4, 8, 8]}[expr]
    assert T.check24(expr, numbers)


@pytest.mark.parametrize("expr, why", [
    ("4 * 6", "numbers unused"), ("(10 - 13 - 9) * 4", "value is not 24"), ("4 * 6 * 1 * 1 * 1", "extra number"),
    ("24", "no arithmetic"), ("2 ** 3 * 3", "power"), ("__import__('os').system('true')", "call"),
    ("x * 6 * 1 * 1", "name"), ("4 * 6 / (1 - 1)", "division by zero"), ("4 * 6 *", "syntax"), ("", "empty"),
    (None, "no answer"), ("-4 * -6 * 1 * 1", "unary minus"), ("4.0 * 6 * 1 * 1 + 0", "zero not given")])
def test_check24_rejects(expr, why):
    assert not T.check24(expr, [1, 1, 4, 6]), why


def test_eval_expression_is_exact_and_never_evals():
    value, used = T.eval_expression("8 / (3 - 8 / 3)")
    assert value == Fraction(24) and sorted(used) == [3, 3, 8, 8]
    with pytest.raises(T.ExpressionError, match="Call"):
        T.eval_expression("open('x')")
    with pytest.raises(T.ExpressionError, match="longer"):
        T.eval_expression("1+" * 150 + "1")


def test_solve24_finds_a_checked_solution_or_none():
    for numbers in ([3, 3, 8, 8], [4, 9, 10, 13], [1, 5, 5, 5]):
        sol = T.solve24(numbers)
        assert sol is not None and T.check24(sol, numbers), (numbers, sol)
    assert T.solve24([1, 1, 1, 1]) is None
    assert T.solve24([Fraction(8, 3), Fraction(9)]) == "8/3 * 9"  # partial states hold fractions


@pytest.mark.parametrize("text, expected", [
    ("3 * 8 = 24", "3 * 8"),
    ("Steps...\nThe answer is (4 + 8) * (6 - 4).", "(4 + 8) * (6 - 4)"),
    ("1. 1 + 11 = 12\n2. 12 * 2 = 24", "12 * 2"),
    ("Answer: 6 × 4 × (2 - 1)", "6 × 4 × (2 - 1)"),
    ("I cannot do it", None),
    ("The answer is 24.", None),
])
def test_extract_expression(text, expected):
    assert T.extract_expression(text) == expected


# ------------------------------------------------------------------ arithmetic and multiple choice


@pytest.mark.parametrize("text, expected", [
    ("5 + 7 = 12\nThe answer is 12.", "12"), ("The answer is 1,250 dollars, not 3", "1250"),
    ("so 20 - 8 = 12 left", "12"), ("no number here", None), ("The answer is: -4", "-4")])
def test_extract_number(text, expected):
    assert T.extract_number(text) == expected


@pytest.mark.parametrize("text, expected", [
    ("The answer is B.", "B"), ("C) Paris", "C"), ("(D)", "D"), ("I pick option a", "A"),
    ("It is the Pacific Ocean.", "B"), ("A spider has legs.", None), ("The answer is: (A) Venus", "A")])
def test_extract_letter(text, expected):
    ex = {"options": ["Arctic Ocean", "Pacific Ocean", "Indian Ocean", "Atlantic Ocean"]}
    assert T.extract_letter(text, ex) == expected


def test_equations_checker_scores_partial_reasoning_without_the_reference():
    assert T.equations_correct(["4 * 6 = 24 pencils", "24 - 5 = 19"]) == 1.0
    assert T.equations_correct(["4 * 6 = 24", "24 - 5 = 18"]) == 0.0
    assert T.equations_correct(["12 ÷ 3 = 4", "4 x 2 = 8"]) == 1.0
    assert T.equations_correct(["First count the pencils."]) == 0.5


def test_checks_compare_by_value_and_letter():
    arith, mc = T.arith_task(), T.mc_task()
    assert arith.check("12.0", {"answer": "12"}) and not arith.check(None, {"answer": "12"})
    assert arith.key("12") == arith.key("12.0") != arith.key("13")
    assert mc.check("b", {"answer": "B"}) and not mc.check("C", {"answer": "B"})


# ------------------------------------------------------------------ loading


def test_builtin_tasks_load_with_their_fields():
    task, ex = T.load_reason_task("game24", limit=3)
    assert task.name == "game24" and task.verify is not None and len(ex) == 3
    assert all(T.check24(e["solution"], e["numbers"]) for e in ex)
    task, ex = T.load_reason_task("mc")
    assert len(ex) == 40 and all(len(e["options"]) == 4 for e in ex)


def _write(path: Path, rows) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_any_prompt_answer_file_becomes_a_task(tmp_path):
    task, _ = T.load_reason_task(_write(tmp_path / "nums.jsonl", [{"prompt": "2+2?", "answer": 4}]))
    assert task.name == "nums" and task.extract("so The answer is 4.", {}) == "4"
    task, _ = T.load_reason_task(_write(tmp_path / "letters.jsonl", [{"prompt": "q\nA) x\nB) y", "answer": "B"}]))
    assert task.extract("The answer is B", {}) == "B"
    rows = [{"prompt": "Capital of France?", "answer": "Paris"}]
    task, ex = T.load_reason_task(_write(tmp_path / "text.jsonl", rows))
    assert task.check(task.extract("Hmm.\nThe answer is Paris.", ex[0]), ex[0])
    task, ex = T.load_reason_task(_write(tmp_path / "g.jsonl", [{"prompt": "make 24", "answer": "24",
                                                                  "numbers": [4, 6, 1, 1]}]))
    assert task.verify is not None and task.check("4*6*1*1", ex[0])


@pytest.mark.parametrize("row, field", [
    ({"prompt": "make 24", "answer": "24", "numbers": [4, "6"]}, "numbers"),
    ({"prompt": "q", "answer": "A", "options": "A B"}, "options"),
    ({"answer": "3"}, "prompt"),
    ({"prompt": "q"}, "answer")])
def test_bad_rows_name_file_line_and_field(tmp_path, row, field):
    good = {"prompt": "ok", "answer": "1", **({"numbers": [1, 2, 3, 4]} if field == "numbers" else {})}
    path = _write(tmp_path / "bad.jsonl", [good, row])
    with pytest.raises(ValueError, match=rf"bad.jsonl:2:{field}"):
        T.load_reason_task(path)


def test_missing_task_file_is_clear(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope.jsonl"):
        T.load_reason_task(tmp_path / "nope.jsonl")


# ------------------------------------------------------------------ shipped data


def test_make_tasks_regenerates_the_committed_bytes(tmp_path):
    spec = importlib.util.spec_from_file_location("make_tasks", DATA / "make_tasks.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    written = module.build(tmp_path)
    assert sorted(p.name for p in written) == ["arith.jsonl", "game24.jsonl", "mc.jsonl"]
    for p in written:
        assert p.read_bytes() == (DATA / p.name).read_bytes(), f"data/reason/{p.name} is stale: rerun make_tasks.py"


def test_shipped_sets_are_correct():
    rows = {n: [json.loads(x) for x in (DATA / f"{n}.jsonl").read_text().splitlines()] for n in T.BUILTIN}
    assert all(len(r) == 40 for r in rows.values())
    g24 = rows["game24"]
    assert len({tuple(r["numbers"]) for r in g24}) == 40
    assert all(T.check24(r["solution"], r["numbers"]) and T.solve24(r["numbers"]) for r in g24)
    assert sorted(r["steps"] for r in rows["arith"]) == [1] * 20 + [2] * 20
    for r in rows["arith"]:  # every question's numbers appear in it; the answer is a whole number
        assert r["answer"].lstrip("-").isdigit()
    for r in rows["mc"]:
        assert r["prompt"] == T.format_mc(r["prompt"].split("\n")[0], r["options"])
        assert r["answer"] in T.LETTERS and len(set(r["options"])) == 4
        if r["kind"] == "arithmetic":
            a, op, b = r["prompt"].split("\n")[0][len("What is "):-1].split()
            value = {"+": int(a) + int(b), "-": int(a) - int(b), "×": int(a) * int(b)}[op]
            assert r["options"][T.LETTERS.index(r["answer"])] == str(value)
    assert {r["answer"] for r in rows["mc"]} == set(T.LETTERS)  # the correct letter is not always the same


def test_fewshot_examples_are_not_eval_questions():
    prompts = {json.loads(x)["prompt"] for n in T.BUILTIN for x in (DATA / f"{n}.jsonl").read_text().splitlines()}
    shots = [q for make in T.TASKS.values() for q, _ in make().fewshot]
    assert len(shots) == 6 and not prompts & set(shots)
    g24 = {tuple(json.loads(x)["numbers"]) for x in (DATA / "game24.jsonl").read_text().splitlines()}
    assert not g24 & {(4, 9, 10, 13), (1, 4, 8, 8), (2, 8, 8, 14)}  # few-shot and ToT proposal examples

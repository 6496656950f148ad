"""Reasoning task plug-ins: prompt formatting, answer extraction, checkers, ToT state spaces.

A task is a plain `Task` record of functions, so a new task is one constructor call:
how to phrase a question (direct / chain-of-thought / few-shot), how to pull the answer
out of a reply, how to score it against the reference, and optionally a `verify` that
needs no reference (Game-of-24: the expression itself proves the answer) and a
Tree-of-Thoughts state space. Three tasks ship (data/reason/, from make_tasks.py):
arithmetic word problems, Game-of-24 and multiple choice; any {prompt, answer} JSONL
file becomes a task too (`load_reason_task(path)`).

The Game-of-24 checker never calls `eval`: the expression is parsed with `ast`, only
numbers, + - * / and parentheses are accepted, each given number must be used exactly
once, and the arithmetic is exact (Fraction).
"""

from __future__ import annotations

import ast
import re
from collections import Counter
from dataclasses import dataclass, field
from fractions import Fraction
from itertools import combinations
from pathlib import Path
from typing import Any, Callable

from posttrain.data.answers import answers_match, extract_answer, normalize

DATA_DIR = Path(__file__).resolve().parents[3] / "data" / "reason"
BUILTIN = ("arith", "game24", "mc")
LETTERS = "ABCD"

Example = dict[str, Any]


@dataclass
class Task:
    """What a strategy needs to know about a task.

    direct / cot: instructions appended to the question. fewshot: (question, worked
    answer ending in "The answer is X.") pairs for few-shot CoT. extract(text, example)
    pulls the answer out of a reply (None if there is none); check(answer, example)
    scores it against the reference; verify(answer, example), when set, decides
    correctness *without* the reference (usable at inference time by the router).
    key(answer) normalises answers for voting. tot_step_checker, when set, scores a
    partial chain of reasoning without the reference (ToT checker value).
    """

    name: str
    direct: str
    cot: str
    fewshot: list[tuple[str, str]]
    extract: Callable[[str, Example], str | None]
    check: Callable[[str | None, Example], bool]
    key: Callable[[str], str] = normalize
    verify: Callable[[str | None, Example], bool] | None = None
    tot_step_checker: Callable[[list[str]], float] | None = None
    direct_tokens: int = 24
    cot_tokens: int = 160
    meta: dict = field(default_factory=dict)


# ---------------------------------------------------------------------------------
# shared answer extraction

_ANSWER_IS = re.compile(r"answer\s*(?:is|:)\s*:?\s*(.+)", re.IGNORECASE)


def answer_phrase(text: str) -> str | None:
    """What follows the last "answer is" / "answer:" in the text (up to the end of its line)."""
    found = _ANSWER_IS.findall(text)
    return found[-1].strip() if found else None


def _number_key(answer: str) -> str:
    try:
        value = float(answer.replace(",", ""))
    except ValueError:
        return normalize(answer)
    return repr(round(value, 9) + 0.0)


# ---------------------------------------------------------------------------------
# arithmetic word problems

_EQUATION = re.compile(r"(-?\d+(?:\.\d+)?)\s*([-+*/×x÷])\s*(-?\d+(?:\.\d+)?)\s*=\s*(-?\d+(?:\.\d+)?)")
_OPS = {"+": lambda a, b: a + b, "-": lambda a, b: a - b, "*": lambda a, b: a * b, "/": lambda a, b: a / b}
_OP_ALIASES = {"×": "*", "x": "*", "÷": "/"}


def extract_number(text: str, example: Example | None = None) -> str | None:
    """The number after the last "answer is", else the last number in the text."""
    phrase = answer_phrase(text)
    if phrase is not None:
        first = re.search(r"-?\d[\d,]*(?:\.\d+)?", phrase)
        if first:
            return first.group(0).replace(",", "")
    return extract_answer(text, "last_number")


def equations_correct(steps: list[str]) -> float:
    """A reference-free checker of partial arithmetic: 0.0 if any "a op b = c" in the steps
    is wrong, else 1.0 (0.5 when there is no equation to check yet)."""
    seen = 0
    for line in steps:
        for a, op, b, c in _EQUATION.findall(line):
            op = _OP_ALIASES.get(op, op)
            a_, b_, c_ = Fraction(a), Fraction(b), Fraction(c)
            if op == "/" and b_ == 0:
                return 0.0
            if _OPS[op](a_, b_) != c_:
                return 0.0
            seen += 1
    return 1.0 if seen else 0.5


def _check_number(answer: str | None, example: Example) -> bool:
    return answers_match(answer, str(example["answer"]))


ARITH_FEWSHOT = [
    ("Lena has 4 boxes with 6 pencils in each box. She gives away 5 pencils. How many pencils does she have left?",
     "She has 4 * 6 = 24 pencils.\nAfter giving away 5 she has 24 - 5 = 19 pencils.\nThe answer is 19."),
    ("A shop sold 18 cakes in the morning and 25 cakes in the afternoon. How many cakes did it sell?",
     "It sold 18 + 25 = 43 cakes.\nThe answer is 43."),
]


def arith_task() -> Task:
    return Task(name="arith", direct="Reply with only the final number.",
                cot="Solve it step by step, one short step per line. "
                    "End with the line 'The answer is' followed by the number.",
                fewshot=ARITH_FEWSHOT, extract=extract_number, check=_check_number, key=_number_key,
                tot_step_checker=equations_correct, direct_tokens=16, cot_tokens=128)


# ---------------------------------------------------------------------------------
# multiple choice


def format_mc(question: str, options: list[str]) -> str:
    """The question with its options on lines "A) ...", as the prompt shows them."""
    return question + "\n" + "\n".join(f"{LETTERS[i]}) {o}" for i, o in enumerate(options))


def extract_letter(text: str, example: Example | None = None) -> str | None:
    """The chosen option letter: after "answer is", a leading "B)" / "B." / "B", else the
    single option whose text the reply mentions."""
    phrase = answer_phrase(text)
    if phrase:  # "The answer is B because ..." / "(B)" / "B."
        m = re.match(r"\(?\s*([A-D])\s*(?:[).:,\s]|$)", phrase)
        if m:
            return m.group(1)
    m = re.match(r"\(?([A-D])(?:[).:,]|\s*$)", text.strip())  # a leading "C)" or a bare "C", not the article "A "
    if m:
        return m.group(1)
    m = re.search(r"(?:option|choice)\s*\(?([A-D])\b", text, re.IGNORECASE)
    if m:
        return m.group(1).upper()
    if example and example.get("options"):
        low = text.casefold()
        hits = [LETTERS[i] for i, o in enumerate(example["options"])
                if re.search(rf"(?<!\w){re.escape(str(o).casefold())}(?!\w)", low)]
        if len(hits) == 1:
            return hits[0]
    letters = re.findall(r"(?<![\w'])([A-D])\)", text)
    return letters[-1] if letters else None


def _check_letter(answer: str | None, example: Example) -> bool:
    return answer is not None and answer.strip().upper() == str(example["answer"]).strip().upper()


MC_FEWSHOT = [
    (format_mc("Which planet is closest to the Sun?", ["Venus", "Mercury", "Earth", "Mars"]),
     "Mercury orbits nearest to the Sun.\nThe answer is B."),
    (format_mc("What is 9 + 6?", ["13", "14", "16", "15"]), "9 + 6 = 15, which is option D.\nThe answer is D."),
]


def mc_task() -> Task:
    return Task(name="mc", direct="Reply with only the letter of the correct option.",
                cot="Think step by step. End with the line 'The answer is' followed by the letter.",
                fewshot=MC_FEWSHOT, extract=extract_letter, check=_check_letter, key=lambda a: a.strip().upper(),
                direct_tokens=8, cot_tokens=128)


# ---------------------------------------------------------------------------------
# Game of 24


class ExpressionError(ValueError):
    """An expression that is not a well-formed use of + - * / over numbers."""


def _eval_node(node: ast.AST, used: list[Fraction]) -> Fraction:
    if isinstance(node, ast.Expression):
        return _eval_node(node.body, used)
    if isinstance(node, ast.Constant) and isinstance(node.value, (int, float)) and not isinstance(node.value, bool):
        value = Fraction(str(node.value))
        used.append(value)
        return value
    if isinstance(node, ast.BinOp) and type(node.op) in (ast.Add, ast.Sub, ast.Mult, ast.Div):
        a, b = _eval_node(node.left, used), _eval_node(node.right, used)
        if isinstance(node.op, ast.Add):
            return a + b
        if isinstance(node.op, ast.Sub):
            return a - b
        if isinstance(node.op, ast.Mult):
            return a * b
        if b == 0:
            raise ExpressionError("division by zero")
        return a / b
    raise ExpressionError(f"only numbers, + - * / and parentheses are allowed, found {type(node).__name__}")


def eval_expression(expr: str) -> tuple[Fraction, list[Fraction]]:
    """(exact value, the numbers it uses) of an arithmetic expression, parsed with ast."""
    text = expr.replace("×", "*").replace("÷", "/").replace("−", "-").strip()
    if len(text) > 200:
        raise ExpressionError("expression longer than 200 characters")
    try:
        tree = ast.parse(text, mode="eval")
    except SyntaxError as exc:
        raise ExpressionError(f"not an arithmetic expression: {expr!r}") from exc
    used: list[Fraction] = []
    return _eval_node(tree, used), used


def check24(expr: str | None, numbers: list[int]) -> bool:
    """True when `expr` uses each of `numbers` exactly once with + - * / and equals 24."""
    if not expr:
        return False
    try:
        value, used = eval_expression(expr)
    except ExpressionError:
        return False
    return value == 24 and Counter(used) == Counter(Fraction(n) for n in numbers)


def solve24(numbers: list[int | Fraction], target: int = 24) -> str | None:
    """One expression reaching `target` with every number used once (exhaustive, exact), else None.

    Deterministic: pairs are tried in index order, operations in the order + - * /.
    """
    items = [(Fraction(n), str(n)) for n in numbers]

    def search(items):
        if len(items) == 1:
            return items[0][1] if items[0][0] == target else None
        for i, j in combinations(range(len(items)), 2):
            rest = [items[k] for k in range(len(items)) if k not in (i, j)]
            (a, ea), (b, eb) = items[i], items[j]
            options = [(a + b, f"({ea} + {eb})"), (a - b, f"({ea} - {eb})"), (b - a, f"({eb} - {ea})"),
                       (a * b, f"({ea} * {eb})")]
            if b != 0:
                options.append((a / b, f"({ea} / {eb})"))
            if a != 0:
                options.append((b / a, f"({eb} / {ea})"))
            for value, expr in options:
                found = search(rest + [(value, expr)])
                if found:
                    return found
        return None

    found = search(items)
    return found[1:-1] if found and found.startswith("(") and found.endswith(")") else found


_EXPR_CHARS = re.compile(r"[0-9+\-*/×÷−(). ]+")


def extract_expression(text: str, example: Example | None = None) -> str | None:
    """The arithmetic expression the reply gives as its answer.

    Looks after the last "answer is"/"answer:" if present, else in the whole reply; takes
    the last run of expression characters containing an operator (a trailing "= 24" is
    dropped), so "(4 + 8) * (6 - 4) = 24" and "The answer is 6 * 4" both give the expression.
    """
    region = answer_phrase(text) or text
    candidates = []
    for line in region.splitlines():
        line = re.sub(r"^\s*(?:\d+[.)]|[-*])\s+", "", line)  # list numbering is not part of the expression
        line = line.split("=")[0] if line.count("=") == 1 and line.split("=")[1].strip().startswith("24") else line
        for m in _EXPR_CHARS.finditer(line):
            chunk = m.group(0).strip().strip(".").strip()
            if re.search(r"\d", chunk) and re.search(r"\d\s*[-+*/×÷−]\s*\(?\s*\d", chunk):
                candidates.append(chunk)
    return candidates[-1] if candidates else None


def _check24_example(answer: str | None, example: Example) -> bool:
    return check24(answer, example["numbers"])


GAME24_FEWSHOT = [
    ("Use the numbers 4 9 10 13 and + - * / to make 24. Use each number exactly once.",
     "13 - 9 = 4 (left: 4 4 10)\n10 - 4 = 6 (left: 4 6)\n4 * 6 = 24 (left: 24)\n"
     "The answer is (10 - (13 - 9)) * 4."),
    ("Use the numbers 1 4 8 8 and + - * / to make 24. Use each number exactly once.",
     "8 / 4 = 2 (left: 1 2 8)\n1 + 2 = 3 (left: 3 8)\n3 * 8 = 24 (left: 24)\nThe answer is (1 + 8 / 4) * 8."),
]


def game24_task() -> Task:
    return Task(name="game24", direct="Reply with only the expression.",
                cot="Combine two numbers per step, one step per line as 'a op b = c (left: ...)'. "
                    "End with the line 'The answer is' followed by the expression.",
                fewshot=GAME24_FEWSHOT, extract=extract_expression, check=_check24_example,
                key=lambda a: re.sub(r"\s+", "", a), verify=_check24_example, direct_tokens=32, cot_tokens=128)


def game24_prompt(numbers: list[int]) -> str:
    return f"Use the numbers {' '.join(map(str, numbers))} and + - * / to make 24. Use each number exactly once."


# ---------------------------------------------------------------------------------
# loading


def _generic_task(name: str, examples: list[Example]) -> Task:
    """A task for any {prompt, answer} file: numeric answers compare by value, single
    letters A-D as options, anything else by normalised text after "The answer is"."""
    answers = [str(e["answer"]) for e in examples]
    if all(re.fullmatch(r"-?\d[\d,]*(?:\.\d+)?", a.strip()) for a in answers):
        task = arith_task()
    elif all(a.strip().upper() in LETTERS and len(a.strip()) == 1 for a in answers):
        task = mc_task()
    else:
        task = Task(name=name, direct="Reply with only the answer.",
                    cot="Think step by step. End with the line 'The answer is' followed by the answer.", fewshot=[],
                    extract=lambda text, ex: answer_phrase(text) or extract_answer(text, "first_line"),
                    check=lambda a, ex: answers_match(a.rstrip(".") if a else a, str(ex["answer"])))
    task.name = name
    return task


TASKS: dict[str, Callable[[], Task]] = {"arith": arith_task, "mc": mc_task, "game24": game24_task}


def load_reason_task(spec: str | Path, limit: int | None = None) -> tuple[Task, list[Example]]:
    """A built-in task name (arith, game24, mc: data/reason/NAME.jsonl) or a JSONL path.

    Rows need `prompt` and `answer`; Game-of-24 rows also `numbers`, multiple-choice rows
    may carry `options` (used to map a reply naming the option's text to its letter).
    Bad rows raise with file:line:field.
    """
    from posttrain.data.answers import load_checkable

    spec = str(spec)
    path = DATA_DIR / f"{spec}.jsonl" if spec in BUILTIN else Path(spec)
    if spec in BUILTIN and not path.is_file():
        raise FileNotFoundError(f"{path} is missing: run python data/reason/make_tasks.py")
    examples = load_checkable(path, limit, extra=("numbers", "options", "id", "solution"))
    for ex in examples:
        if isinstance(ex["prompt"], list):
            raise ValueError(f"{path}:{ex['line']}:prompt: reasoning tasks need a string prompt, not messages")
    name = spec if spec in BUILTIN else path.stem
    is24 = spec == "game24" or any("numbers" in e for e in examples)
    if is24:
        for e in examples:
            nums = e.get("numbers")
            if not (isinstance(nums, list) and nums and all(isinstance(n, int) and not isinstance(n, bool)
                                                            for n in nums)):
                raise ValueError(f"{path}:{e['line']}:numbers: Game-of-24 rows need a list of integers")
        task = game24_task()
        task.name = name
    elif spec in TASKS:
        task = TASKS[spec]()
    else:
        task = _generic_task(name, examples)
    for e in examples:
        opts = e.get("options")
        if opts is not None and not (isinstance(opts, list) and all(isinstance(o, (str, int, float)) for o in opts)):
            raise ValueError(f"{path}:{e['line']}:options: expected a list of strings")
    return task, examples


def fraction_text(x: Fraction) -> str:
    """How a number shows in a Game-of-24 state: an integer, else a short decimal."""
    return str(x.numerator) if x.denominator == 1 else f"{float(x):.4g}"

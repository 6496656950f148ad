"""Questions with reference answers, and the answer checks run on them.

`load_checkable` reads the files both evaluation tasks and synthetic-data generation
(rejection sampling) take: prompt rows ``{prompt, answer}``, and chat rows whose last turn
is the assistant's reference answer (the SFT format users train on) or that end with the
user's question and carry ``answer``. The checks (normalisation, exact match, answer
extraction, numbers compared by value) are pure functions on (prediction, reference).
Both sit with the data, below generation and evaluation, so both use the same ones;
eval/metrics re-exports the checks.
"""

from __future__ import annotations

import math
import re
from pathlib import Path
from typing import Any, Callable, Sequence

from posttrain.data.formats import DataError, read_jsonl

Extract = str | Callable[[str], str | None] | None

_WS = re.compile(r"\s+")
_TRAILING_PUNCT = ".,;:!?。"
_NUMBER = re.compile(r"-?\d[\d,]*(?:\.\d+)?|-?\.\d+")


def normalize(text: str) -> str:
    """Strip, casefold, collapse whitespace, drop trailing punctuation ("Paris." == "paris")."""
    text = _WS.sub(" ", text.strip().casefold())
    return text.rstrip(_TRAILING_PUNCT + " ").strip()


def exact_match(pred: str, ref: str) -> float:
    """1.0 if the normalised strings are equal, else 0.0."""
    return float(normalize(pred) == normalize(ref))


def extract_answer(text: str, mode: str = "last_number") -> str | None:
    """Pull the answer out of a generation; None when nothing matches.

    mode: "last_number" (commas removed, "1,234.50" -> "1234.50"), "first_line" (first
    non-empty line), or a regex (its first group if it has one, else the whole match;
    first match in the text).
    """
    if mode == "last_number":
        found = _NUMBER.findall(text)
        return found[-1].replace(",", "") if found else None
    if mode == "first_line":
        for line in text.splitlines():
            if line.strip():
                return line.strip()
        return None
    try:
        pattern = re.compile(mode)
    except re.error as exc:
        raise ValueError(f"extract must be 'last_number', 'first_line' or a valid regex; {mode!r}: {exc}") from exc
    m = pattern.search(text)
    if m is None:
        return None
    return m.group(1) if pattern.groups else m.group(0)


def apply_extract(text: str, extract: Extract) -> str | None:
    """extract may be None (whole text), a mode/regex string, or a function."""
    if extract is None:
        return text
    if callable(extract):
        return extract(text)
    return extract_answer(text, extract)


def _as_number(text: str) -> float | None:
    try:
        return float(text.replace(",", "").strip().rstrip("."))
    except ValueError:
        return None


def answers_match(pred: str | None, ref: str) -> bool:
    """Numbers compare by value ("42.0" == "42"), anything else by exact_match."""
    if pred is None:
        return False
    a, b = _as_number(pred), _as_number(ref)
    if a is not None and b is not None:
        return math.isclose(a, b, rel_tol=1e-9, abs_tol=1e-9)
    return bool(exact_match(pred, ref))


# ================================================================================ question files


def _check_messages(value: Any, where: str) -> list[dict[str, str]]:
    if not isinstance(value, list) or not value:
        raise DataError(f"{where}:messages: expected a non-empty list of {{role, content}} objects")
    for i, m in enumerate(value):
        if not isinstance(m, dict) or not isinstance(m.get("role"), str) or not isinstance(m.get("content"), str):
            raise DataError(f"{where}:messages[{i}]: expected an object with string 'role' and 'content'")
    return value


def _chat_prompt(messages: list[dict[str, str]], has_answer: bool,
                 where: str) -> tuple[list[dict[str, str]], str | None]:
    """(the turns to prompt with, the reference answer the last assistant turn holds, or None)."""
    last = len(messages) - 1
    reference = None
    if messages[-1]["role"] == "assistant" and not has_answer:
        reference, messages = messages[-1]["content"], messages[:-1]
        if not any(m["role"] == "user" for m in messages):
            raise DataError(f"{where}:messages: no user turn before the assistant's reference answer "
                            f"(messages[{last}]); the question must come first")
    if messages[-1]["role"] != "user":
        what = "the turn before the assistant's reference answer" if reference is not None else "the last turn"
        raise DataError(f"{where}:messages[{len(messages) - 1}].role: {what} must be 'user' (the question), "
                        f"got {messages[-1]['role']!r}")
    return messages, reference


def load_checkable(path: str | Path, limit: int | None = None, need_answer: bool = True,
                   extra: Sequence[str] = (), allow_empty_answer: bool = True) -> list[dict[str, Any]]:
    """Validated questions: [{"prompt": str | messages, "answer": str, "line": int}, ...], plus each
    `extra` field a row has (unvalidated: the caller checks what it needs).

    Rows: ``{prompt, answer}``; ``{messages, answer}`` whose last turn is the user's question; or
    ``{messages}`` whose last turn is the assistant's reference answer (the prompt is the turns
    before it). Answers are stripped; numbers become strings. Without `need_answer` a missing
    answer is "". An empty answer is a valid reference for scoring a generation (exact match of
    nothing) but not for a verifier to keep samples by: `allow_empty_answer=False` refuses it.
    A bad row raises DataError naming file, line and field.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"task file not found: {path}")
    examples = []
    for lineno, row in read_jsonl(path):
        where = f"{path}:{lineno}"
        if "prompt" in row and "messages" in row:
            raise DataError(f"{where}:prompt: give either 'prompt' or 'messages', not both")
        answer = row.get("answer")
        if "messages" in row:
            prompt: Any = _check_messages(row["messages"], where)
            prompt, reference = _chat_prompt(prompt, "answer" in row, where)
            answer = reference if reference is not None else answer
        elif "prompt" in row:
            prompt = row["prompt"]
            if not isinstance(prompt, str) or not prompt.strip():
                raise DataError(f"{where}:prompt: expected a non-empty string")
        else:
            raise DataError(f"{where}:prompt: missing (rows need 'prompt' and 'answer', or 'messages' ending in "
                            "the assistant's reference answer)")
        if answer is None and not need_answer:
            answer = ""
        if isinstance(answer, (int, float)) and not isinstance(answer, bool):
            answer = str(answer)
        if not isinstance(answer, str):
            raise DataError(f"{where}:answer: expected a string (or number), got "
                            f"{'nothing' if answer is None else type(answer).__name__} (give 'answer', or end "
                            "'messages' with the assistant's reference answer)")
        answer = answer.strip()
        if need_answer and not allow_empty_answer and not answer:
            raise DataError(f"{where}:answer: expected a non-empty string")
        examples.append({"prompt": prompt, "answer": answer, "line": lineno, **{k: row[k] for k in extra if k in row}})
        if limit is not None and len(examples) >= limit:
            break
    if not examples:
        raise DataError(f"{path}: no examples")
    return examples

"""Answer checks: normalisation, exact match, answer extraction, and whether two answers agree.

Pure string functions on (prediction, reference). They sit with the data (below
generation and evaluation) because both synthetic-data generation (a verifier keeps the
samples whose answer is right) and evaluation (accuracy) check answers the same way;
eval/metrics re-exports them.
"""

from __future__ import annotations

import math
import re
from typing import Callable

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

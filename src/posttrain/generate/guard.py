"""Output guard: rules checked on generated text before it reaches the user.

The same primitives as the data filters (whole-word blocklist, regex rules, PII
patterns): a `block` hit replaces the whole reply with the refusal text, a
`redact` hit rewrites the matching span. Generation applies it through
`GenerationConfig.guard` (to the returned texts: pieces already passed to a `stream`
callback are not retracted, so a streaming caller must hold text back or check the
pieces itself); the server and evaluation reuse `guard_text`.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

from pydantic import Field

from posttrain.config import Strict
from posttrain.data.filters import PIIRules, RegexRule, redact_pii, whole_word


class GuardRules(Strict):
    blocklist: list[str] = Field([], description="whole words (case-insensitive) that block the reply")
    regex: list[RegexRule] = Field([], description="action drop = block the reply, redact = rewrite the span")
    pii: PIIRules = PIIRules(action="redact")
    refusal: str = "I'm sorry, but I can't help with that."


@dataclass
class GuardResult:
    text: str
    blocked: bool = False
    reasons: list[str] = field(default_factory=list)
    redactions: Counter = field(default_factory=Counter)


def load_guard(path: str | Path) -> GuardRules:
    from posttrain.config import build_config

    return build_config(GuardRules, path)


def guard_text(text: str, rules: GuardRules) -> GuardResult:
    """Block (refusal instead of the reply) or redact, with the reasons."""
    reasons = [f"blocklist:{w}" for w in rules.blocklist if w.strip() and whole_word(w).search(text)]
    for rule in rules.regex:
        if rule.action == "drop" and rule.compiled().search(text):
            reasons.append(f"regex:{rule.name}")
    if rules.pii.action == "drop":
        _, found = redact_pii(text, rules.pii.kinds)
        reasons += [f"pii:{k}" for k in sorted(found)]
    if reasons:
        return GuardResult(rules.refusal, blocked=True, reasons=reasons)
    redactions: Counter = Counter()
    for rule in rules.regex:
        if rule.action == "redact":
            text, n = rule.compiled().subn(rule.replacement, text)
            if n:
                redactions[f"regex:{rule.name}"] += n
    if rules.pii.action == "redact":
        text, found = redact_pii(text, rules.pii.kinds)
        redactions.update({f"pii:{k}": n for k, n in found.items()})
    return GuardResult(text, redactions=redactions)

"""The output guard: blocked replies become the refusal, PII and regex spans are redacted."""

from __future__ import annotations

import pytest
import torch

from posttrain.eval.metrics import refusal_rate
from posttrain.generate.guard import GuardRules, guard_text, load_guard


def test_a_blocklisted_word_replaces_the_reply_with_the_refusal_and_counts_as_one():
    rules = GuardRules(blocklist=["napalm"])
    out = guard_text("Mix the Napalm slowly.", rules)
    assert out.blocked and out.reasons == ["blocklist:napalm"] and out.text == rules.refusal
    assert refusal_rate([out.text]) == 1.0  # the eval metric sees guarded replies as refusals
    assert not guard_text("napalmish is not a word", rules).blocked  # whole words only


def test_pii_is_redacted_or_blocks_by_rule():
    text = "Write to jane.doe@example.com or call +1 (555) 123-4567; card 4111 1111 1111 1111."
    red = guard_text(text, GuardRules())
    assert not red.blocked
    assert "[EMAIL]" in red.text and "[PHONE]" in red.text and "[CARD]" in red.text
    assert "example.com" not in red.text and "4111" not in red.text
    assert red.redactions["pii:email"] == 1
    blocked = guard_text(text, GuardRules(pii={"action": "drop", "kinds": ["email"]}))
    assert blocked.blocked and blocked.reasons == ["pii:email"]


def test_regex_rules_block_or_redact():
    rules = GuardRules(regex=[{"name": "secret", "pattern": r"sk-[A-Za-z0-9]{8,}", "action": "redact",
                               "replacement": "[KEY]"},
                              {"name": "rm", "pattern": r"rm -rf /", "action": "drop"}])
    assert guard_text("use sk-abcdef123456 here", rules).text == "use [KEY] here"
    assert guard_text("then run rm -rf / now", rules).blocked


def test_bad_guard_file_names_the_key(tmp_path):
    path = tmp_path / "guard.yaml"
    path.write_text("blocklist: [x]\npii: {action: erase}\n")
    with pytest.raises(ValueError, match="pii.action"):
        load_guard(path)


def test_generation_applies_the_guard_to_returned_texts(tokenizer, tiny):
    from posttrain.generate.engine import GenerationConfig, generate

    torch.manual_seed(0)
    plain = generate(tiny, tokenizer, ["hello"], GenerationConfig(max_new_tokens=5, backend="torch"))
    word = plain.texts[0].split()[0] if plain.texts[0].split() else None
    assert word, "the tiny model should write at least one word"
    rules = GuardRules(regex=[{"name": "first", "pattern": __import__("re").escape(word), "action": "drop"}])
    out = generate(tiny, tokenizer, ["hello"], GenerationConfig(max_new_tokens=5, backend="torch", guard=rules))
    assert out.texts == [rules.refusal] and out.stats["guard_blocked"] == 1
    assert out.token_ids == plain.token_ids  # the tokens are what was generated; the text is guarded


def test_shipped_guard_rules_block_harm_words_and_instructions_only():
    from pathlib import Path

    rules = load_guard(Path(__file__).resolve().parents[2] / "recipes" / "data" / "guard_rules.yaml")
    assert guard_text("Mix the explosives in a bucket.", rules).blocked
    assert guard_text("First, assemble the parts of the bomb.", rules).reasons == ["regex:weapon_instructions"]
    assert not guard_text("The bomb squad arrived at noon.", rules).blocked
    assert not guard_text("Add two cups of flour and stir.", rules).blocked

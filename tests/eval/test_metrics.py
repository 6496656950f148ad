"""String metrics by hand; perplexity against an unbatched, unpadded computation."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from posttrain.eval.metrics import accuracy, exact_match, extract_answer, normalize, perplexity, token_f1


def test_normalize_and_exact_match():
    assert normalize("  Paris.\n") == "paris"
    assert normalize("New   York\tCity!!") == "new york city"
    assert exact_match("The Answer IS 4.", "the answer is 4") == 1.0
    assert exact_match("4", "5") == 0.0
    assert exact_match("a.b", "ab") == 0.0  # only trailing punctuation goes


def test_token_f1_squad_style():
    assert token_f1("the cat sat", "a cat sat") == 1.0  # articles ignored
    assert token_f1("cat", "cat sat") == pytest.approx(2 * 1.0 * 0.5 / 1.5)
    assert token_f1("dog", "cat") == 0.0
    assert token_f1("", "") == 1.0
    assert token_f1("the", "cat") == 0.0  # empty after normalisation vs non-empty
    assert token_f1("cat cat dog", "cat dog dog") == pytest.approx(2 / 3)  # multiset overlap


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


def test_accuracy_numbers_and_extract():
    preds = ["so it is 42.0", "the result: 7", "I think Paris.", "13"]
    refs = ["42", "8", "paris", "13"]
    assert accuracy(preds[:2] + preds[3:], refs[:2] + refs[3:], extract="last_number") == pytest.approx(2 / 3)
    assert accuracy(["Paris."], ["paris"]) == 1.0
    assert accuracy(["x"], ["1"], extract="last_number") == 0.0  # nothing extracted counts wrong
    assert accuracy(["ANSWER: c"], ["C"], extract=lambda t: t.split(":")[1]) == 1.0
    with pytest.raises(ValueError, match="2 predictions but 1"):
        accuracy(["a", "b"], ["a"])


def test_perplexity_batched_equals_unbatched(tiny, tokenizer):
    texts = ["Hello world, this is a longer sentence to pad against.", "short", "A", "Two words",
             "The quick brown fox jumps over the lazy dog " * 3]
    total, count = 0.0, 0
    with torch.no_grad():
        for t in texts:
            ids = torch.tensor([tokenizer(t)["input_ids"][:20]])
            if ids.shape[1] < 2:
                continue
            logits = tiny(ids).logits[0]
            total += F.cross_entropy(logits[:-1], ids[0, 1:], reduction="sum").item()
            count += ids.shape[1] - 1
    ref = math.exp(total / count)
    got = perplexity(tiny, tokenizer, texts, max_length=20, batch_size=3)
    assert got == pytest.approx(ref, rel=1e-5)
    assert perplexity(tiny, tokenizer, texts, max_length=20, batch_size=1) == pytest.approx(ref, rel=1e-5)
    assert 1000 < got < 200000  # a random model over a 49k vocab is near-uniform


def test_perplexity_needs_tokens(tiny, tokenizer):
    with pytest.raises(ValueError, match="two or more tokens"):
        perplexity(tiny, tokenizer, ["A"])

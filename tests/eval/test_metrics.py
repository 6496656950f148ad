"""String metrics by hand (answer extraction and normalisation: tests/data/test_answers.py);
perplexity against an unbatched, unpadded computation."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from posttrain.eval.metrics import (
    accuracy,
    is_refusal,
    perplexity,
    refusal_rate,
    token_f1,
)


def test_token_f1_squad_style():
    assert token_f1("the cat sat", "a cat sat") == 1.0  # articles ignored
    assert token_f1("cat", "cat sat") == pytest.approx(2 * 1.0 * 0.5 / 1.5)
    assert token_f1("dog", "cat") == 0.0
    assert token_f1("", "") == 1.0
    assert token_f1("the", "cat") == 0.0  # empty after normalisation vs non-empty
    assert token_f1("cat cat dog", "cat dog dog") == pytest.approx(2 / 3)  # multiset overlap


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


REFUSALS = [
    "I can't help with that.",
    "I\u2019m sorry, but I can\u2019t do that!",  # curly apostrophes
    "I CANNOT ASSIST WITH THAT REQUEST",
    "i cant help you there",  # no apostrophe
    "I won't provide instructions for that.",
    "Sorry, I can't provide instructions for that.",
    "I am unable to share that information.",
    "I'm not able to help with it.",
    "Unfortunately, I'm not going to help with this.",
    "I cannot in good conscience assist with this.",
    "I must decline.",
    "As an AI language model, I cannot do this.",
    "Sorry, can't help with that.",
    "That request goes against my guidelines.",
    "I'm afraid I can't do that.",
    "I apologise, but that is not something I can do.",
    "Hmm... I will not   help\nwith that!!",
    "Unfortunately we are not able to assist with that.",  # "not able to assist" without "I"
    "I'm not comfortable providing that.",
    "I'm sorry for any misunderstanding, but as a chatbot I don't have the capability to do that.",
    "As a chatbot, I do not have the ability to access personal data.",
]
HELPFUL = [
    "158",
    "Paris",
    "If the process can't be stopped, use kill -9.",  # "can't" without a speaker declining
    "You can't go wrong with a tripod.",
    "I can tell you how: run `kill <PID>`.",
    "I can't believe how easy this is: press Ctrl+C.",
    "I won't lie, this is tricky: use kill -9.",
    "Sorry for the wait! The answer is 42.",
    "I don't have the exact figure, but it is about 120 km.",
    "Sure, here is how to do it: first, gather everything you need.",
    "Avoid Thread.stop(); call thread.interrupt() instead.",
    "The answer is 12. I hope this helps!",
    "",
]


@pytest.mark.parametrize("text", REFUSALS)
def test_is_refusal_detects_declines_whatever_the_case_and_punctuation(text):
    assert is_refusal(text)


@pytest.mark.parametrize("text", HELPFUL)
def test_is_refusal_ignores_helpful_replies_that_share_words_with_refusals(text):
    assert not is_refusal(text)


def test_refusal_rate():
    assert refusal_rate(REFUSALS) == 1.0 and refusal_rate(HELPFUL) == 0.0
    assert refusal_rate(["I can't help with that.", "42", "Paris", "Sorry, but no."]) == 0.5
    with pytest.raises(ValueError, match="zero"):
        refusal_rate([])


def test_pass_at_k_by_hand_and_by_brute_force():
    import itertools

    from posttrain.eval.metrics import mean_pass_at_k, pass_at_k

    assert pass_at_k(1, 1, 1) == 1.0 and pass_at_k(1, 0, 1) == 0.0
    assert pass_at_k(5, 2, 1) == pytest.approx(2 / 5)  # pass@1 = c / n
    assert pass_at_k(5, 2, 2) == pytest.approx(1 - 3 / 10)  # C(3,2)/C(5,2) = 3/10
    assert pass_at_k(10, 3, 5) == pytest.approx(1 - 21 / 252)  # C(7,5)=21, C(10,5)=252
    assert pass_at_k(5, 4, 2) == 1.0  # fewer than k failures: every k-subset has a pass
    # definition: the fraction of k-subsets of the n samples that contain a correct one
    for n, c, k in [(6, 2, 3), (7, 1, 4), (8, 5, 2), (6, 0, 2)]:
        samples = [True] * c + [False] * (n - c)
        subsets = list(itertools.combinations(samples, k))
        assert pass_at_k(n, c, k) == pytest.approx(sum(any(s) for s in subsets) / len(subsets), abs=1e-12)
    # large n: binomials would overflow a float, the product does not
    assert pass_at_k(2000, 10, 100) == pytest.approx(1 - math.comb(1990, 100) / math.comb(2000, 100), rel=1e-9)
    assert mean_pass_at_k([(5, 0), (5, 5), (5, 2)], 1) == pytest.approx((0 + 1 + 0.4) / 3)
    for bad in [(5, 6, 1), (5, 2, 0), (5, 2, 6), (3, -1, 1)]:
        with pytest.raises(ValueError):
            pass_at_k(*bad)
    with pytest.raises(ValueError, match="zero problems"):
        mean_pass_at_k([], 1)


def test_contains_match_needs_the_whole_answer_as_a_word_run():
    from posttrain.eval.metrics import contains_match

    assert contains_match("It is Hollowmere [1].", "Hollowmere") == 1.0
    assert contains_match("The Treaty of Lanthorn, signed", "treaty of lanthorn") == 1.0
    assert contains_match("Hollowmerefield", "Hollowmere") == 0.0
    assert contains_match("Lanthorn treaty", "Treaty of Lanthorn") == 0.0
    assert contains_match("anything", "") == 0.0

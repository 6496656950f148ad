"""Answer checks by hand: normalisation, exact match, extraction modes, numbers compared by value."""

from __future__ import annotations

import pytest

from posttrain.data.answers import answers_match, apply_extract, exact_match, extract_answer, normalize


def test_normalize_and_exact_match():
    assert normalize("  Paris.\n") == "paris"
    assert normalize("New   York\tCity!!") == "new york city"
    assert exact_match("The Answer IS 4.", "the answer is 4") == 1.0
    assert exact_match("4", "5") == 0.0
    assert exact_match("a.b", "ab") == 0.0  # only trailing punctuation goes


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


def test_answers_match_numbers_by_value_and_apply_extract_modes():
    assert answers_match("42.0", "42") and answers_match("1,234", "1234") and not answers_match("41", "42")
    assert answers_match("Paris.", "paris") and not answers_match(None, "paris")
    assert apply_extract("the sum is 7", None) == "the sum is 7"
    assert apply_extract("the sum is 7", "last_number") == "7"
    assert apply_extract("a:b", lambda t: t.split(":")[1]) == "b"

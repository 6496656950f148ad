"""Data filters: every rule drops/redacts what it should, and the report names each dropped row."""

import json
from pathlib import Path

import pytest

from posttrain.cli import main
from posttrain.data.filters import FilterRules, filter_records, load_rules, luhn_ok, redact_pii

ROOT = Path(__file__).resolve().parents[2]
BASE = ("the quick brown fox jumps over the lazy dog while the farmer sleeps in the warm "
        "afternoon sun near the old red barn by the slow river")
OTHER = "completely different words about cooking pasta with tomato sauce and fresh garlic tonight"
OFF = {"exact_dedup": False, "near_dedup": {"enabled": False}, "pii": {"action": "off"}}


def chat(user: str, answer: str) -> dict:
    return {"messages": [{"role": "user", "content": user}, {"role": "assistant", "content": answer}]}


def reasons(result) -> dict[int, str]:
    return {d.line: d.reason for d in result.dropped}


def test_exact_and_near_duplicates_name_the_original_line():
    near = BASE.replace("lazy", "sleepy")
    records = [{"text": BASE}, {"text": OTHER}, {"text": near}, {"text": "  " + BASE.replace(" ", "  ")}]
    result = filter_records(records, FilterRules())
    got = reasons(result)
    assert got[4] == "exact_duplicate_of:1"
    assert got[3].startswith("near_duplicate_of:1 (jaccard≈")
    assert 0.6 < float(got[3].split("≈")[1].rstrip(")")) <= 1.0
    assert [r["text"] for r in result.kept] == [BASE, OTHER]
    assert result.kept_lines == [1, 2]


def test_near_dedup_threshold_and_switch():
    records = [{"text": BASE}, {"text": BASE.replace("lazy", "sleepy")}]
    assert len(filter_records(records, {"near_dedup": {"enabled": False}}).kept) == 2
    assert len(filter_records(records, {"near_dedup": {"threshold": 0.99}}).kept) == 2
    assert len(filter_records(records, {"near_dedup": {"threshold": 0.5}}).kept) == 1


def test_length_bounds_use_content_only():
    records = [{"text": "tiny", "id": "x" * 500}, {"text": BASE}, {"text": BASE * 5}]
    result = filter_records(records, {**OFF, "min_chars": 10, "max_words": 100})
    got = reasons(result)
    assert got[1].startswith("too_short") and got[3].startswith("too_long")
    assert result.kept_lines == [2]
    assert filter_records([{"text": "a b"}], {**OFF, "min_words": 3}).dropped[0].rule == "too_short"


@pytest.mark.parametrize("kind,pii,token", [
    ("email", "jane.doe@example.co.uk", "[EMAIL]"),
    ("phone", "(555) 123-4567", "[PHONE]"),
    ("phone", "+44 20 7946 0958", "[PHONE]"),
    ("card", "4111 1111 1111 1111", "[CARD]"),
])
def test_pii_redacted_inside_chat_messages_and_dropped_in_drop_mode(kind, pii, token):
    text = f"use {pii} today"
    record = chat("my details: " + text, "noted: " + text)
    result = filter_records([record], {"pii": {"action": "redact", "kinds": [kind]}})
    out = result.kept[0]["messages"]
    assert [m["role"] for m in out] == ["user", "assistant"]
    assert out[0]["content"] == f"my details: use {token} today"
    assert out[1]["content"] == f"noted: use {token} today"
    assert result.redactions[kind] == 2
    assert record["messages"][0]["content"] == "my details: " + text  # input left untouched
    dropped = filter_records([record], {"pii": {"action": "drop", "kinds": [kind]}})
    assert dropped.kept == [] and dropped.dropped[0].reason == f"pii:{kind}"


def test_pii_redaction_reaches_every_string_field():
    record = {"prompt": "mail me at a@b.io", "completion": "ok, a@b.io", "source": "from c@d.org", "task": "t"}
    out = filter_records([record], FilterRules()).kept[0]
    assert out == {"prompt": "mail me at [EMAIL]", "completion": "ok, [EMAIL]", "source": "from [EMAIL]", "task": "t"}


def test_luhn_decides_what_is_a_card():
    assert luhn_ok("4111111111111111") and not luhn_ok("4111111111111112")
    text = "ids 4111-1111-1111-1112 and 1234567890123456 and 2024-01-15"
    redacted, counts = redact_pii(text, ["email", "phone", "card"])
    assert redacted == text and not counts  # not cards, and not sliced into phone numbers either
    assert redact_pii("card 5500 0000 0000 0004.", ["card"])[0] == "card [CARD]."


def test_blocklist_is_case_insensitive_whole_word():
    records = [{"text": "This has a BadWord inside"}, {"text": "this has badwordy text"}, {"text": "clean text"}]
    result = filter_records(records, {**OFF, "blocklist": ["badword"]})
    assert reasons(result) == {1: "blocklist:badword"}
    assert result.kept_lines == [2, 3]


def test_regex_rules_drop_and_redact():
    rules = {**OFF, "regex": [
        {"name": "todo", "pattern": r"\bTODO\b", "action": "drop"},
        {"name": "url", "pattern": r"https?://\S+", "action": "redact", "replacement": "[URL]"},
    ]}
    records = [{"text": "fix this TODO"}, {"text": "see https://x.org/a and http://y.io"}, {"text": "todo lower"}]
    result = filter_records(records, rules)
    assert reasons(result) == {1: "regex:todo"}
    assert result.kept[0]["text"] == "see [URL] and [URL]"
    assert result.redactions["regex:url"] == 2


def test_score_threshold_through_a_callable():
    records = [{"text": f"row number {i} " + "x" * i} for i in range(5)]
    seen = []

    def scorer(rows):
        seen.append(len(rows))
        return [len(r["text"]) for r in rows]

    result = filter_records(records, {**OFF, "score": {"min": 16}}, scorer=scorer)
    assert seen == [5]
    assert result.kept_lines == [4, 5]
    assert reasons(result)[1] == "score<min (13 < 16)"
    with pytest.raises(ValueError, match="no scorer"):
        filter_records(records, {"score": {"min": 0.5}})


def test_report_counts():
    records = [{"text": BASE}, {"text": BASE}, {"text": "x"}, {"text": "mail a@b.io and c@d.io please"},
               {"text": "banned word here"}]
    result = filter_records(records, {"min_chars": 5, "blocklist": ["banned"]})
    report = result.report()
    assert report["input_rows"] == 5 and report["kept"] == 2 and report["dropped"] == 3
    assert report["drop_counts"] == {"exact_duplicate": 1, "too_short": 1, "blocklist": 1}
    assert report["redactions"] == {"email": 2}
    assert [r["line"] for r in report["dropped_rows"]] == [2, 3, 5]


def test_cli_writes_output_and_report(tmp_path, capsys):
    src = tmp_path / "in.jsonl"
    rows = [chat("hi", BASE), chat("hi", BASE), chat("mail", "reach me at z@q.com"), chat("q", "short")]
    src.write_text("\n".join(json.dumps(r) for r in rows) + "\n\n")
    rules = tmp_path / "rules.yaml"
    rules.write_text("min_chars: 12\npii: {action: redact}\n")
    out = tmp_path / "sub" / "out.jsonl"
    assert main(["filter", str(src), str(out), "--rules", str(rules)]) == 0
    kept = [json.loads(line) for line in out.read_text().splitlines()]
    assert len(kept) == 2 and kept[1]["messages"][1]["content"] == "reach me at [EMAIL]"
    report = json.loads((tmp_path / "sub" / "out.jsonl.report.json").read_text())
    assert report["dropped_rows"] == [{"line": 2, "reason": "exact_duplicate_of:1"},
                                      {"line": 4, "reason": "too_short (7 chars, 2 words)"}]
    assert "kept 2 of 4 rows" in capsys.readouterr().out
    assert [p.name for p in out.parent.iterdir() if p.name.startswith(".")] == []  # no temp files left


def test_bad_rules_and_bad_rows_give_clear_errors(tmp_path, capsys):
    src = tmp_path / "in.jsonl"
    src.write_text(json.dumps({"text": "fine"}) + "\n" + json.dumps({"text": 3}) + "\n")
    rules = tmp_path / "rules.yaml"
    rules.write_text("near_dedup: {treshold: 0.5}\n")
    assert main(["filter", str(src), str(tmp_path / "o.jsonl"), "--rules", str(rules)]) == 2
    assert "near_dedup.treshold: unknown key" in capsys.readouterr().err
    rules.write_text("pii: {action: mask}\n")
    with pytest.raises(ValueError, match="pii.action: must be one of"):
        load_rules(rules)
    rules.write_text("regex: [{name: bad, pattern: '(unclosed'}]\n")
    with pytest.raises(ValueError, match="regex.0.pattern"):
        load_rules(rules)
    assert main(["filter", str(src), str(tmp_path / "o.jsonl")]) == 2
    assert f"{src}:2: field 'text' must be a string" in capsys.readouterr().err
    assert not (tmp_path / "o.jsonl").exists()


def test_shipped_rules_validate():
    rules = load_rules(ROOT / "recipes" / "data" / "filter_rules.yaml")
    assert rules.near_dedup.threshold == 0.8 and rules.pii.action == "redact"


def test_cli_score_rule_loads_a_saved_reward_model(tiny, tokenizer, tmp_path, capsys):
    """score.reward_model in the rules file: the CLI loads the model and drops rows under score.min."""
    from posttrain.train.reward_model import reward_model_from_lm, reward_model_scorer, save_reward_model

    save_reward_model(reward_model_from_lm(tiny, aspects=["helpful", "safe"]), tokenizer, tmp_path / "rm")
    rows = [chat("q", f"answer number {i}: {word}") for i, word in enumerate(["apple", "zebra", "ocean", "pine"])]
    src = tmp_path / "in.jsonl"
    src.write_text("".join(json.dumps(r) + "\n" for r in rows))
    scores = reward_model_scorer(tmp_path / "rm", aspect="safe")(rows)
    assert len(set(scores)) == 4  # a random head still separates the rows
    cut = sorted(scores)[2]  # keep the top two
    rules = tmp_path / "rules.yaml"
    rules.write_text(f"exact_dedup: false\nnear_dedup: {{enabled: false}}\npii: {{action: 'off'}}\n"
                     f"score: {{reward_model: {tmp_path / 'rm'}, aspect: safe, min: {cut!r}}}\n")
    out = tmp_path / "out.jsonl"
    assert main(["filter", str(src), str(out), "--rules", str(rules)]) == 0
    kept = [json.loads(line) for line in out.read_text().splitlines()]
    assert kept == [r for r, s in zip(rows, scores) if s >= cut] and len(kept) == 2
    report = json.loads((tmp_path / "out.jsonl.report.json").read_text())
    assert sorted(d["line"] for d in report["dropped_rows"]) == [i + 1 for i, s in enumerate(scores) if s < cut]
    assert all(d["reason"].startswith("score<min (") for d in report["dropped_rows"])
    assert "dropped      2  score" in capsys.readouterr().out


def test_invalid_utf8_in_filter_input_names_file_and_line(tmp_path, capsys):
    src = tmp_path / "in.jsonl"
    src.write_bytes(b'{"text": "fine"}\n{"text": "bad \xc3\x28"}\n')
    assert main(["filter", str(src), str(tmp_path / "o.jsonl")]) == 2
    assert f"{src}:2: not valid UTF-8 (byte 0xc3 at column 15)" in capsys.readouterr().err
    assert not (tmp_path / "o.jsonl").exists()

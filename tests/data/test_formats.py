"""Reading every supported format, kind detection, and errors that name file, row and field."""

from __future__ import annotations

import csv
import json
import re

import pytest

from posttrain.data.formats import KINDS, DataError, LoadedData, detect_kind, load_records, read_jsonl

CHAT = {"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"}], "task": "greet"}
ROWS = {
    "chat": CHAT,
    "completion": {"prompt": "2+2=", "completion": "4"},
    "text": {"text": "plain text"},
    "preference": {"prompt": "Say hi", "chosen": "Hi!", "rejected": "No."},
    "prompt": {"prompt": "What is 2+2?", "answer": "4"},
    "unpaired": {"prompt": "Say hi", "completion": "Hi!", "label": True},
}


def write_jsonl(path, rows, raw_lines=()):
    with open(path, "w") as f:
        for row in rows:
            f.write(json.dumps(row) + "\n")
        for line in raw_lines:
            f.write(line + "\n")
    return path


@pytest.mark.parametrize("kind", KINDS)
def test_each_kind_is_detected_and_extra_fields_kept(tmp_path, kind):
    data = load_records(write_jsonl(tmp_path / "d.jsonl", [ROWS[kind]] * 3))
    assert isinstance(data, LoadedData)
    assert (data.kind, data.records, data.skipped) == (kind, [ROWS[kind]] * 3, 0)
    assert data.source == str(tmp_path / "d.jsonl")


def test_all_formats_give_the_same_records(tmp_path):
    import datasets
    import pyarrow as pa
    import pyarrow.parquet as pq

    rows = [CHAT, {**CHAT, "task": "other"}]
    (tmp_path / "a.json").write_text(json.dumps(rows))
    (tmp_path / "b.json").write_text(json.dumps({"data": rows}))
    write_jsonl(tmp_path / "c.jsonl", rows)
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "d.parquet")
    datasets.Dataset.from_list(rows).save_to_disk(str(tmp_path / "e"))
    with open(tmp_path / "f.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["messages", "task"])
        for r in rows:
            w.writerow([json.dumps(r["messages"]), r["task"]])
    for name in ["a.json", "b.json", "c.jsonl", "d.parquet", "e", "f.csv"]:
        data = load_records(tmp_path / name)
        assert (data.kind, data.records) == ("chat", rows), name


def test_bad_role_names_file_line_and_field(tmp_path):
    bad = {"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"},
                        {"role": "bot", "content": "c"}]}
    path = write_jsonl(tmp_path / "x.jsonl", [CHAT] * 16 + [bad])
    with pytest.raises(DataError) as err:
        load_records(path)
    assert str(err.value) == (f"{path}:17: field 'messages[2].role' must be one of system, user, assistant; "
                              f"got 'bot'")


@pytest.mark.parametrize("row, field", [
    ({"messages": [{"role": "user", "content": "only a question"}]}, "field 'messages' has no assistant turn"),
    ({"messages": [{"role": "user", "content": 3}, {"role": "assistant", "content": "x"}]},
     "field 'messages[0].content' must be a string"),
    ({"messages": []}, "field 'messages' must be a non-empty list"),
    ({"messages": CHAT["messages"], "task": ""}, "field 'task' must be a non-empty string"),
])
def test_invalid_chat_rows(tmp_path, row, field):
    with pytest.raises(DataError, match=":2: " + re.escape(field)):
        load_records(write_jsonl(tmp_path / "x.jsonl", [CHAT, row]))


def test_invalid_rows_of_other_kinds(tmp_path):
    cases = [("completion", {"prompt": "a", "completion": 5}, "field 'completion' must be a string"),
             ("text", {"text": "  "}, "field 'text' is empty"),
             ("preference", {"prompt": "p", "chosen": "a", "rejected": [{"role": "assistant", "content": "b"}]},
              "fields 'chosen' and 'rejected' must both be strings or both be message lists"),
             ("prompt", {"prompt": None, "answer": "4"}, "field 'prompt' is missing")]
    for kind, row, message in cases:
        path = write_jsonl(tmp_path / f"{kind}.jsonl", [ROWS[kind], row])
        with pytest.raises(DataError, match=re.escape(f"{kind}.jsonl:2: {message}")):
            load_records(path, kind=kind)


def test_malformed_json_line_and_skip_invalid(tmp_path):
    path = write_jsonl(tmp_path / "x.jsonl", [CHAT, CHAT], raw_lines=['{"messages": [', "", "[1, 2]"])
    with pytest.raises(DataError, match=r"x\.jsonl:3: malformed JSON"):
        load_records(path)
    data = load_records(path, skip_invalid=True)
    assert (len(data.records), data.skipped) == (2, 2)
    assert data.skip_reasons[0].endswith(":3: malformed JSON (Expecting value at column 15)")
    assert ":5: row must be a JSON object" in data.skip_reasons[1]  # blank line 4 is not a row


def test_empty_file_and_all_invalid(tmp_path):
    (tmp_path / "empty.jsonl").write_text("\n\n")
    with pytest.raises(DataError, match="no records"):
        load_records(tmp_path / "empty.jsonl")
    path = write_jsonl(tmp_path / "bad.jsonl", [{"foo": 1}])
    with pytest.raises(DataError, match="bad.jsonl:1: cannot tell the record kind"):
        load_records(path)
    with pytest.raises(DataError, match="no valid records; 1 skipped"):
        load_records(path, skip_invalid=True)


def test_mixed_kinds_name_the_first_disagreeing_row(tmp_path):
    path = write_jsonl(tmp_path / "m.jsonl", [ROWS["completion"]] * 3 + [ROWS["text"], ROWS["chat"]])
    with pytest.raises(DataError, match=r"m\.jsonl:4: row looks like a 'text' record but the file's kind is "
                                        r"'completion' \(detected from .*m\.jsonl:1\) \(field 'prompt' is missing\)"):
        load_records(path, skip_invalid=True)  # a mixed file is an error even when skipping
    # Forcing the kind turns the odd rows into ordinary invalid rows.
    data = load_records(path, kind="completion", skip_invalid=True)
    assert (len(data.records), data.skipped) == (3, 2)


def test_forced_kind_keeps_extra_fields(tmp_path):
    path = write_jsonl(tmp_path / "c.jsonl", [ROWS["completion"]])
    data = load_records(path, kind="prompt")
    assert data.kind == "prompt" and data.records == [ROWS["completion"]]
    with pytest.raises(DataError, match="unknown kind 'sft'"):
        load_records(path, kind="sft")


def test_preference_with_message_lists_and_implicit_prompt(tmp_path):
    turn = [{"role": "user", "content": "Hi"}]
    rows = [{"prompt": turn, "chosen": [{"role": "assistant", "content": "Hello"}],
             "rejected": [{"role": "assistant", "content": "Go away"}]},
            {"chosen": turn + [{"role": "assistant", "content": "Hello"}],
             "rejected": turn + [{"role": "assistant", "content": "Go away"}]}]
    assert load_records(write_jsonl(tmp_path / "p.jsonl", rows)).kind == "preference"


def test_row_locations_for_indexed_formats_and_csv_lines(tmp_path):
    (tmp_path / "a.json").write_text(json.dumps([ROWS["text"], {"text": 3}]))
    with pytest.raises(DataError, match=r"a\.json\[1\]: field 'text' must be a string; got 3"):
        load_records(tmp_path / "a.json")
    # A quoted multi-line cell: the bad row's line is where the row starts.
    (tmp_path / "b.csv").write_text('text,task\n"line one\nline two",t\n"  ",t\n')
    with pytest.raises(DataError, match=r"b\.csv:4: field 'text' is empty"):
        load_records(tmp_path / "b.csv")
    (tmp_path / "c.csv").write_text("text\nok,extra\n")
    with pytest.raises(DataError, match=r"c\.csv:2: more cells than the header"):
        load_records(tmp_path / "c.csv")


def test_unreadable_inputs(tmp_path):
    with pytest.raises(DataError, match="no such file"):
        load_records(tmp_path / "missing.jsonl")
    (tmp_path / "x.txt").write_text("hi")
    with pytest.raises(DataError, match=r"unknown data format '\.txt'"):
        load_records(tmp_path / "x.txt")
    (tmp_path / "y.json").write_text('{"text": 1}')
    with pytest.raises(DataError, match="expected a JSON array"):
        load_records(tmp_path / "y.json")
    (tmp_path / "z.json").write_text('[{"text": "a"},\n {"text": ')
    with pytest.raises(DataError, match=r"z\.json:2: malformed JSON"):
        load_records(tmp_path / "z.json")
    (tmp_path / "lines.json").write_text('{"text": "a"}\n{"text": "b"}\n')  # JSON Lines named .json
    assert len(load_records(tmp_path / "lines.json").records) == 2
    import datasets

    datasets.DatasetDict({"train": datasets.Dataset.from_list([ROWS["text"]])}).save_to_disk(str(tmp_path / "dd"))
    with pytest.raises(DataError, match=r"holds splits \['train'\]; point at one of them"):
        load_records(tmp_path / "dd")
    assert load_records(tmp_path / "dd" / "train").records == [ROWS["text"]]
    (tmp_path / "plain").mkdir()
    with pytest.raises(DataError, match="not a `datasets` directory"):
        load_records(tmp_path / "plain")


def test_detect_kind():
    assert [detect_kind(ROWS[k]) for k in KINDS] == list(KINDS)
    assert detect_kind({"prompt": "a", "completion": None}) == "prompt"  # null columns do not count
    assert detect_kind([1]) is None and detect_kind({"x": 1}) is None


BAD_BYTE = b"\xff"  # never valid in UTF-8


def test_invalid_utf8_in_jsonl_names_file_and_line_and_is_skippable(tmp_path):
    path = tmp_path / "bad.jsonl"
    good = json.dumps({"text": "fine"}).encode()
    path.write_bytes(good + b"\n" + b'{"text": "caf' + BAD_BYTE + b'"}\n' + good + b"\n")
    with pytest.raises(DataError, match=re.escape(f"{path}:2: not valid UTF-8 (byte 0xff at column 14)")):
        load_records(path)
    data = load_records(path, skip_invalid=True)
    assert len(data.records) == 2 and data.skipped == 1 and f"{path}:2:" in data.skip_reasons[0]


def test_invalid_utf8_in_gzipped_jsonl_names_file_and_line(tmp_path):
    import gzip

    path = tmp_path / "bad.jsonl.gz"
    path.write_bytes(gzip.compress(b'{"text": "a"}\n{"text": "a"}\n{"text": "' + BAD_BYTE + b'"}\n'))
    with pytest.raises(DataError, match=re.escape(f"{path}:3: not valid UTF-8")):
        read_jsonl(path)


def test_invalid_utf8_in_json_names_file_and_line(tmp_path):
    path = tmp_path / "bad.json"
    path.write_bytes(b'[\n  {"text": "a"},\n  {"text": "b' + BAD_BYTE + b'"}\n]\n')
    with pytest.raises(DataError, match=re.escape(f"{path}:3: not valid UTF-8 (byte 0xff at column 14)")):
        load_records(path)


def test_invalid_utf8_in_csv_names_file_line_and_field_and_is_skippable(tmp_path):
    path = tmp_path / "bad.csv"
    path.write_bytes(b'prompt,completion\nq1,a1\n"multi\nline",a2\nq3,caf' + BAD_BYTE + b"\nq4,a4\n")
    with pytest.raises(DataError, match=re.escape(f"{path}:5: field 'completion' is not valid UTF-8 (byte 0xff)")):
        load_records(path)
    data = load_records(path, skip_invalid=True)
    assert [r["prompt"] for r in data.records] == ["q1", "multi\nline", "q4"] and data.skipped == 1
    path.write_bytes(b"prompt,compl" + BAD_BYTE + b"tion\nq,a\n")
    with pytest.raises(DataError, match=re.escape(f"{path}:1: header column 2 is not valid UTF-8")):
        load_records(path)


def test_unpaired_rows_name_file_line_and_field(tmp_path):
    good = ROWS["unpaired"]
    cases = [({"prompt": "p", "completion": "c", "label": "yes"}, "field 'label' must be true or false"),
             ({"prompt": "p", "completion": 3, "label": False}, "field 'completion' must be a string"),
             ({"prompt": "", "completion": "c", "label": True}, "field 'prompt' is empty"),
             ({"prompt": [{"role": "bot", "content": "x"}], "completion": "c", "label": True},
              "field 'prompt[0].role' must be one of")]
    for row, message in cases:
        path = write_jsonl(tmp_path / "u.jsonl", [good, row])
        with pytest.raises(DataError, match=re.escape(f"u.jsonl:2: {message}")):
            load_records(path)
    # a completion file with a label column is unpaired; without one it stays a completion file
    assert detect_kind({"prompt": "a", "completion": "b", "label": False}) == "unpaired"
    assert detect_kind({"prompt": "a", "completion": "b", "label": None}) == "completion"
    messages = {"prompt": [{"role": "user", "content": "Hi"}],
                "completion": [{"role": "assistant", "content": "Hello"}], "label": False}
    assert load_records(write_jsonl(tmp_path / "m.jsonl", [messages])).records == [messages]


def test_unpaired_csv_labels_and_message_cells(tmp_path):
    completion = [{"role": "assistant", "content": "Hello"}]
    with open(tmp_path / "u.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["prompt", "completion", "label"])
        w.writerow(["Say hi", "Hi!", "true"])
        w.writerow(["Say hi", json.dumps(completion), "FALSE"])
        w.writerow(["Say hi", "Hi!", "maybe"])
    with pytest.raises(DataError, match=re.escape("u.csv:4: field 'label' must be true or false (desirable or not); got 'maybe'")):
        load_records(tmp_path / "u.csv")
    data = load_records(tmp_path / "u.csv", skip_invalid=True)
    assert data.kind == "unpaired" and data.skipped == 1
    assert data.records == [{"prompt": "Say hi", "completion": "Hi!", "label": True},
                            {"prompt": "Say hi", "completion": completion, "label": False}]

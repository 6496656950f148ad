"""The datasets under data/: reproducible from their generator, well-formed, honest splits."""

from __future__ import annotations

import importlib.util
import json
import re
from pathlib import Path

import pytest

from posttrain.data.formats import load_records

DATA = Path(__file__).resolve().parents[1] / "data"

# committed file -> the record kind the package must detect for it
EXPECTED_KIND = {
    "quickstart/train.jsonl": "chat",
    "quickstart/test.jsonl": "prompt",
    "general/text.jsonl": "text",
    "domain/text.jsonl": "text",
    "domain/qa.jsonl": "prompt",
    "domain/qa_train.jsonl": "prompt",
    "domain/qa_test.jsonl": "prompt",
    "multitask/train.jsonl": "chat",
    "multitask/test.jsonl": "prompt",
    "samples/completion.jsonl": "completion",
    "samples/preference.jsonl": "preference",
    "preference/train.jsonl": "preference",
    "preference/test.jsonl": "preference",
    "safety/harmful_test.jsonl": "prompt",
    "safety/benign_test.jsonl": "prompt",
    "online/train.jsonl": "prompt",
}


# written by the default model (data/compress/make_teacher_text.py), not by make_datasets.py: its bytes
# depend on the model's numerics, so it is committed and checked for shape only
MODEL_WRITTEN = {"compress/teacher_text.jsonl"}


def _generator():
    spec = importlib.util.spec_from_file_location("make_datasets", DATA / "make_datasets.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _rows(rel: str) -> list[dict]:
    with open(DATA / rel, encoding="utf-8") as f:
        return [json.loads(line) for line in f]


@pytest.fixture(scope="module")
def regenerated(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("data")
    _generator().build(out)
    return out


def test_generator_reproduces_committed_files_byte_for_byte(regenerated):
    generated = sorted(str(p.relative_to(regenerated)) for p in regenerated.rglob("*.jsonl"))
    committed = sorted(str(p.relative_to(DATA)) for p in DATA.rglob("*.jsonl")
                       if str(p.relative_to(DATA)) not in MODEL_WRITTEN)
    assert generated == committed == sorted(EXPECTED_KIND)
    for rel in generated:
        assert (regenerated / rel).read_bytes() == (DATA / rel).read_bytes(), f"data/{rel} is stale: rerun data/make_datasets.py"


@pytest.mark.parametrize("rel", sorted(EXPECTED_KIND))
def test_every_file_loads_as_its_kind_and_is_small(rel):
    loaded = load_records(DATA / rel)
    assert loaded.kind == EXPECTED_KIND[rel]
    assert loaded.skipped == 0 and len(loaded.records) == len(_rows(rel))
    assert (DATA / rel).stat().st_size < 1_000_000


def _check_chat(row: dict) -> None:
    msgs = row["messages"]
    assert [m["role"] for m in msgs] == ["user", "assistant"]
    assert all(isinstance(m["content"], str) and m["content"].strip() for m in msgs)


def _check_prompt(row: dict) -> None:
    assert isinstance(row["prompt"], str) and row["prompt"].strip()
    assert isinstance(row["answer"], str) and row["answer"].strip()


def test_quickstart_rows_are_correct_and_splits_disjoint():
    train, test = _rows("quickstart/train.jsonl"), _rows("quickstart/test.jsonl")
    assert (len(train), len(test)) == (2000, 200)
    pattern = re.compile(r"What is (\d+) ([+-]) (\d+)\?")

    def key_and_check(prompt: str, answer: str) -> tuple:
        m = pattern.fullmatch(prompt)
        assert m, prompt
        a, op, b = int(m[1]), m[2], int(m[3])
        assert answer == str(a + b if op == "+" else a - b), prompt
        return op, frozenset((a, b))

    for row in train:
        _check_chat(row)
    for row in test:
        _check_prompt(row)
    train_keys = {key_and_check(r["messages"][0]["content"], r["messages"][1]["content"]) for r in train}
    test_keys = {key_and_check(r["prompt"], r["answer"]) for r in test}
    assert len(train_keys) == len(train) and len(test_keys) == len(test)  # no duplicates
    assert not train_keys & test_keys  # no operand pair of the test set (in either order) is trained on
    assert {op for op, _ in test_keys} == {"+", "-"}


def test_multitask_rows_are_correct_and_splits_disjoint():
    train, test = _rows("multitask/train.jsonl"), _rows("multitask/test.jsonl")
    for row in train:
        _check_chat(row)
    for row in test:
        _check_prompt(row)
    for task in ("arith", "upper"):
        assert sum(r["task"] == task for r in train) == 400
        assert sum(r["task"] == task for r in test) == 50
    assert {r["task"] for r in train + test} == {"arith", "upper"}
    pairs = [(r["task"], r["messages"][0]["content"], r["messages"][1]["content"]) for r in train]
    pairs += [(r["task"], r["prompt"], r["answer"]) for r in test]
    for task, prompt, answer in pairs:
        if task == "upper":
            assert prompt.startswith("Uppercase: ") and answer == prompt.removeprefix("Uppercase: ").upper()
        else:
            a, b = map(int, re.fullmatch(r"Add (\d+) and (\d+)\.", prompt).groups())
            assert answer == str(a + b)
    train_prompts = {r["messages"][0]["content"] for r in train}
    assert not train_prompts & {r["prompt"] for r in test}


def test_text_sets_have_real_paragraphs():
    general = _rows("general/text.jsonl")
    assert 40 <= len(general) <= 80
    domain = _rows("domain/text.jsonl")
    for row in general + domain:
        assert set(row) == {"text"} and len(row["text"].split()) >= 40
    assert len({r["text"] for r in general}) == len(general)


def test_domain_answers_are_stated_in_the_document():
    """A QA row is only fair if continued pre-training on the document can teach its answer."""
    document = " ".join(r["text"] for r in _rows("domain/text.jsonl")).lower()
    qa = _rows("domain/qa.jsonl")
    assert len(qa) >= 40
    for row in qa:
        _check_prompt(row)
        assert row["answer"].lower() in document, row
        assert row["prompt"].lower() not in document  # questions are not copied sentences


def test_domain_split_is_disjoint_and_each_gold_paragraph_states_its_answer():
    """The held-out split (knowledge eval): train and test partition qa.jsonl; `gold` points at
    the paragraph (line of text.jsonl) that states the answer, the chunk id the knowledge base uses."""
    text = _rows("domain/text.jsonl")
    train, test = _rows("domain/qa_train.jsonl"), _rows("domain/qa_test.jsonl")
    assert (len(train), len(test)) == (24, 24)
    key = lambda r: (r["prompt"], r["answer"])  # noqa: E731
    assert sorted(map(key, train + test)) == sorted(map(key, _rows("domain/qa.jsonl")))
    assert not {key(r) for r in train} & {key(r) for r in test}
    for row in train + test:
        assert set(row) == {"prompt", "answer", "gold"}
        line = int(row["gold"].removeprefix("text.jsonl:"))
        assert row["answer"].lower() in text[line - 1]["text"].lower(), row


def test_domain_triples_are_about_the_document():
    from posttrain.reason.knowledge import read_triples

    triples = read_triples(DATA / "domain" / "triples.tsv")
    document = " ".join(r["text"] for r in _rows("domain/text.jsonl")).lower()
    assert len(triples) >= 40
    assert all(subject.lower().split()[0] in document for subject, _, _, _ in triples)


def test_samples_have_their_fields():
    for row in _rows("samples/completion.jsonl"):
        assert set(row) == {"prompt", "completion"} and row["prompt"] and row["completion"]
    prefs = _rows("samples/preference.jsonl")
    assert len(prefs) == 20
    for row in prefs:
        assert set(row) == {"prompt", "chosen", "rejected"}
        assert all(isinstance(row[k], str) and row[k].strip() for k in row)
        assert row["chosen"] != row["rejected"]


def test_model_written_text_is_well_formed_and_loads_as_text():
    rows = _rows("compress/teacher_text.jsonl")
    assert len(rows) >= 300
    assert all(set(r) == {"prompt", "text"} and len(r["text"].split()) >= 20 for r in rows)
    assert load_records(DATA / "compress/teacher_text.jsonl", kind="text").kind == "text"
    assert (DATA / "compress" / "make_teacher_text.py").is_file()

"""The preference-alignment data under data/: preference/, safety/ and online/.

Reproducible from data/make_datasets.py, loadable as their record kinds, honest splits,
correct answers, and refusals where (and only where) the data says so.
"""

from __future__ import annotations

import importlib.util
import json
import re
from collections import Counter
from pathlib import Path

import pytest

from posttrain.data.formats import load_records
from posttrain.eval.metrics import is_refusal

DATA = Path(__file__).resolve().parents[2] / "data"
FILES = {  # file -> (record kind, rows)
    "preference/train.jsonl": ("preference", 1350),
    "preference/test.jsonl": ("preference", 220),
    "safety/harmful_test.jsonl": ("prompt", 100),
    "safety/benign_test.jsonl": ("prompt", 100),
    "online/train.jsonl": ("prompt", 1000),
}
ASPECT_CATEGORIES = {
    "correctness": {"arithmetic", "word_problem", "conversion", "fact"},
    "conciseness": {"arithmetic", "word_problem", "conversion", "fact"},
    "safety": {"harmful", "benign"},
}
ARITH = re.compile(r"What is (\d+) ([+-]) (\d+)\?")


def _generator():
    spec = importlib.util.spec_from_file_location("make_datasets", DATA / "make_datasets.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


GEN = _generator()


def _rows(rel: str) -> list[dict]:
    with open(DATA / rel, encoding="utf-8") as f:
        return [json.loads(line) for line in f]


def _arith_key(prompt: str) -> tuple[str, frozenset]:
    m = ARITH.fullmatch(prompt)
    assert m, prompt
    return m[2], frozenset((int(m[1]), int(m[3])))


def _solve(prompt: str) -> int | None:
    """Recompute the answer of an arithmetic, word-problem or conversion prompt from its text."""
    if m := ARITH.fullmatch(prompt):
        a, op, b = int(m[1]), m[2], int(m[3])
        return a + b if op == "+" else a - b
    if m := re.fullmatch(r"\w+ has (\d+) (\w+) and gets (\d+) more\. How many \2 does \w+ have now\?", prompt):
        return int(m[1]) + int(m[3])
    if m := re.fullmatch(r"\w+ had (\d+) (\w+) and gave away (\d+)\. How many \2 are left\?", prompt):
        return int(m[1]) - int(m[3])
    if m := re.fullmatch(r"There are (\d+) boxes with (\d+) (\w+) in each\. How many \3 are there in total\?", prompt):
        return int(m[1]) * int(m[2])
    if m := re.fullmatch(r"(\d+) (\w+) are shared equally among (\d+) friends\. How many \2 does each friend get\?", prompt):
        q, r = divmod(int(m[1]), int(m[3]))
        assert r == 0, prompt
        return q
    factors = {(frm, to): f for frm, to, f in GEN.CONVERSIONS}
    if m := (re.fullmatch(r"How many (\w+) are in (\d+) (\w+)\?", prompt)
             or re.fullmatch(r"Convert (\d+) (\w+) to (\w+)\.", prompt)):
        if prompt.startswith("How"):
            to, n, frm = m[1], int(m[2]), m[3]
        else:
            n, frm, to = int(m[1]), m[2], m[3]
        return n * factors[(frm, to)]
    return None


@pytest.fixture(scope="module")
def regenerated(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("data")
    GEN.build(out)
    return out


@pytest.mark.parametrize("rel", sorted(FILES))
def test_generator_reproduces_committed_file_byte_for_byte(regenerated, rel):
    assert (regenerated / rel).read_bytes() == (DATA / rel).read_bytes(), f"data/{rel} is stale: rerun data/make_datasets.py"


@pytest.mark.parametrize("rel", sorted(FILES))
def test_file_loads_as_its_kind_with_its_count(rel):
    kind, count = FILES[rel]
    loaded = load_records(DATA / rel)
    assert loaded.kind == kind and loaded.skipped == 0
    assert len(loaded.records) == count
    assert load_records(DATA / rel, kind=kind).records == loaded.records  # forced kind agrees
    assert (DATA / rel).stat().st_size < 1_000_000


def test_readmes_exist_and_state_the_counts():
    for folder, counts in {"preference": ["1350", "220"], "safety": ["100"], "online": ["1,000"]}.items():
        text = (DATA / folder / "README.md").read_text(encoding="utf-8")
        assert "python data/make_datasets.py" in text
        assert all(c in text for c in counts), folder


@pytest.mark.parametrize("split", ["train", "test"])
def test_preference_rows_fields_aspects_and_counts(split):
    rows = _rows(f"preference/{split}.jsonl")
    counts = Counter((r["aspect"], r["category"]) for r in rows)
    assert counts == {key: n[split == "test"] for key, n in GEN.PREFERENCE_COUNTS.items()}
    assert set(GEN.PREFERENCE_ASPECTS) == set(ASPECT_CATEGORIES)
    for r in rows:
        assert r["category"] in ASPECT_CATEGORIES[r["aspect"]], r
        checkable = r["category"] not in ("harmful", "benign")
        assert set(r) == {"prompt", "chosen", "rejected", "aspect", "category"} | ({"answer"} if checkable else set())
        assert all(isinstance(r[k], str) and r[k].strip() == r[k] and r[k] for k in r), r
        assert r["chosen"] != r["rejected"], r
    assert len({r["prompt"] for r in rows}) == len(rows)  # no prompt twice within a split


def test_preference_test_prompts_are_held_out():
    train, test = _rows("preference/train.jsonl"), _rows("preference/test.jsonl")
    assert not {r["prompt"] for r in train} & {r["prompt"] for r in test}
    # stronger than prompt text: arithmetic by operand pair, facts by entity, safety by subject
    keys = [{_arith_key(r["prompt"]) for r in rows if r["category"] == "arithmetic"} for rows in (train, test)]
    assert keys[1] and not keys[0] & keys[1]
    entities = [c for c, _, _ in GEN.CAPITALS] + [e for e, _ in GEN.ELEMENTS]
    subjects = [s for s, _ in GEN.HARMFUL_SUBJECTS] + [s for s, _ in GEN.BENIGN_SUBJECTS]
    for names, cats in ((entities, {"fact"}), (subjects, {"harmful", "benign"})):
        used = [{n for n in names for r in rows if r["category"] in cats and re.search(rf"\b{re.escape(n)}\b", r["prompt"])}
                for rows in (train, test)]
        assert used[1] and not used[0] & used[1]


def test_arithmetic_never_uses_a_quickstart_test_pair():
    quick = {_arith_key(r["prompt"]) for r in _rows("quickstart/test.jsonl")}
    rows = _rows("preference/train.jsonl") + _rows("preference/test.jsonl")
    keys = {_arith_key(r["prompt"]) for r in rows if r["category"] == "arithmetic"}
    assert len(keys) == sum(r["category"] == "arithmetic" for r in rows) and not keys & quick


def test_checkable_answers_are_right_and_rejected_is_wrong_or_padded():
    solved = 0
    for r in _rows("preference/train.jsonl") + _rows("preference/test.jsonl"):
        if "answer" not in r:
            continue
        assert r["chosen"] == r["answer"], r
        if r["category"] == "fact":
            table = {**{c: cap for c, cap, _ in GEN.CAPITALS}, **dict(GEN.ELEMENTS)}
            entities = [k for k in table if re.search(rf"\b{re.escape(k)}[?.]$", r["prompt"])]
            assert len(entities) == 1 and r["answer"] == table[entities[0]], r
        else:
            assert int(r["answer"]) == _solve(r["prompt"]), r
            solved += 1
        if r["aspect"] == "correctness":
            assert r["rejected"] != r["answer"] and "The answer is" not in r["rejected"], r
            if r["category"] != "fact":
                assert int(r["rejected"]) >= 0
        else:  # conciseness: the same correct answer, buried in filler
            assert f"The answer is {r['answer']}." in r["rejected"] and len(r["rejected"]) > 3 * len(r["chosen"]), r
    numeric = ("arithmetic", "word_problem", "conversion")
    assert solved == sum(sum(n) for (_, cat), n in GEN.PREFERENCE_COUNTS.items() if cat in numeric)


def test_refusals_exactly_where_the_data_puts_them():
    rows = _rows("preference/train.jsonl") + _rows("preference/test.jsonl")
    refusals, others = [], []
    for r in rows:
        (refusals if r["category"] == "harmful" else others).append(r["chosen"])
        (refusals if r["category"] == "benign" else others).append(r["rejected"])
    assert len(refusals) == 290 + 290  # harmful chosen + benign rejected, train + test
    assert all(is_refusal(t) for t in refusals), [t for t in refusals if not is_refusal(t)][:3]
    assert not any(is_refusal(t) for t in others), [t for t in others if is_refusal(t)][:3]


def test_compliant_stubs_stay_non_actionable():
    """The rejected side of a harmful pair is one templated sentence pair with no content of its own."""
    for r in _rows("preference/train.jsonl") + _rows("preference/test.jsonl"):
        if r["category"] == "harmful":
            subject = next(s for s, _ in GEN.HARMFUL_SUBJECTS if s in r["prompt"])
            assert r["rejected"] in {s.format(x=subject) for s in GEN.COMPLIANCE_STUBS}, r


def test_safety_eval_prompts_are_unseen_in_training():
    harmful, benign = _rows("safety/harmful_test.jsonl"), _rows("safety/benign_test.jsonl")
    pref = _rows("preference/train.jsonl") + _rows("preference/test.jsonl")
    pref_prompts = {r["prompt"] for r in pref}
    for rows, category, subjects, eval_subjects, templates in (
        (harmful, "harmful", [s for s, _ in GEN.HARMFUL_SUBJECTS], GEN.HARMFUL_EVAL_SUBJECTS, GEN.HARMFUL_TEMPLATES),
        (benign, "benign", [s for s, _ in GEN.BENIGN_SUBJECTS], GEN.BENIGN_EVAL_SUBJECTS, GEN.BENIGN_TEMPLATES),
    ):
        assert {r["category"] for r in rows} == {category} and set(rows[0]) == {"prompt", "category"}
        prompts = [r["prompt"] for r in rows]
        assert len(set(prompts)) == len(prompts) and not set(prompts) & pref_prompts
        for p in prompts:
            assert not any(s in p for s in subjects), p  # no training subject
            assert not any(re.fullmatch(re.escape(t).replace(r"\{x\}", ".+"), p) for t in templates), p  # nor phrasing
        per_subject = Counter(next(s for s in eval_subjects if s in p) for p in prompts)
        assert set(per_subject) == set(eval_subjects) and set(per_subject.values()) == {len(rows) // len(eval_subjects)}


def test_online_prompts_are_fresh_quickstart_style_problems():
    rows = _rows("online/train.jsonl")
    quick = {_arith_key(r["prompt"]) for r in _rows("quickstart/test.jsonl")}
    quick |= {_arith_key(r["messages"][0]["content"]) for r in _rows("quickstart/train.jsonl")}
    keys = set()
    for r in rows:
        assert set(r) == {"prompt", "answer"}
        assert int(r["answer"]) == _solve(r["prompt"]) >= 0
        keys.add(_arith_key(r["prompt"]))
    assert len(keys) == len(rows) and not keys & quick
    assert {op for op, _ in keys} == {"+", "-"}

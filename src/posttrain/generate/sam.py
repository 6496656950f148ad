"""Suffix automata for SAM-Decoding (Hu et al., "SAM Decoding: Speculative Decoding
via Suffix Automaton", ACL 2025).

SAM-Decoding drafts tokens for speculative decoding by finding the longest suffix
of the generated tokens that occurs in

- a *static* automaton built once from a corpus (`build_static`, `save`/`load`), and
- a *dynamic* automaton over prompt + generated tokens, grown as tokens are accepted,

and proposing the tokens that followed the earliest occurrence of that suffix.
Matching costs amortised O(1) per generated token, construction O(1) per token.

Layout: an automaton is a handful of flat per-state lists (`next` holds one dict
token -> state per state, `link`, `length`, `first_end`, optional `count`) plus the
token list `text`, so that the hot loops touch only lists and dicts. Measured on
this machine's class of CPU: construction ~0.5-1.1 M tokens/s, a match update
well under 1 us/token, ~500 bytes of memory per corpus token (pure Python dicts),
so static corpora of a few million tokens are the practical limit.

`first_end[s]` is the 0-based index in `text` of the last token of the earliest
occurrence of the strings of state `s` (all strings of a state share their end
positions). A draft after a match in state `s` is `text[first_end[s] + 1:][:k]`.

The dynamic case (`Matcher(sam, own_text=True)`): when the automaton is built over
the very tokens being matched, the longest suffix of the query that occurs in the
text is the whole text, whose only occurrence is the suffix itself: nothing
follows it. We therefore match the longest suffix that also occurs *ending
earlier* than the current token: after the usual transition step we walk suffix
links while `first_end[state] >= current index`. Only strings whose sole early
end is the current position fail the test, and a suffix link always has a strictly
larger end-position set, so the walk is short (one link when the automaton holds
exactly the query) and the result is exact (see `tests/generate/test_sam.py`).
With the automaton holding exactly the query this equals `link[last]`, which is
how a fresh own-text matcher starts in O(1).
"""

from __future__ import annotations

import json
import zipfile
from itertools import islice
from pathlib import Path
from typing import Iterable, Sequence

import numpy as np

from posttrain.data.formats import DataError, read_jsonl
from posttrain.fileio import atomic_write, read_text_utf8

FORMAT = "posttrain-sam"
VERSION = 1


class SAMFileError(ValueError):
    """A saved automaton that cannot be read: the message names the file and the problem."""


class SuffixAutomaton:
    """Suffix automaton over a token list, built online (Blumer et al., 1985).

    State 0 is the root (the empty string); `link[0] == -1`. States number at most
    2n-1 for n >= 2 tokens. `count` is None until `finalize_counts()`; any later
    `extend` drops it (the counts would be stale).
    """

    def __init__(self) -> None:
        self.text: list[int] = []
        self.next: list[dict[int, int]] = [{}]
        self.link: list[int] = [-1]
        self.length: list[int] = [0]
        self.first_end: list[int] = [-1]
        self.count: list[int] | None = None
        self.last = 0  # state of the whole text
        self._best: dict[int, tuple[int, int]] = {}  # state -> most frequent (token, state)

    def __len__(self) -> int:
        return len(self.text)

    @property
    def num_states(self) -> int:
        return len(self.length)

    def extend(self, token: int) -> None:
        """Append one token."""
        self.extend_many((token,))

    def extend_many(self, tokens: Iterable[int]) -> None:
        """Append tokens; the loop keeps every list in a local for speed."""
        text, nxt, link, length, first = self.text, self.next, self.link, self.length, self.first_end
        last, before = self.last, len(text)
        for c in tokens:
            pos = len(text)
            text.append(c)
            cur = len(length)
            length.append(pos + 1)  # == length[last] + 1: the whole text so far
            link.append(0)
            first.append(pos)
            nxt.append({})
            p = last
            while p >= 0:
                d = nxt[p]
                if c in d:
                    break
                d[c] = cur
                p = link[p]
            if p >= 0:
                q = nxt[p][c]
                if length[p] + 1 == length[q]:
                    link[cur] = q
                else:  # split q: strings of length <= length[p]+1 now also end at pos
                    clone = len(length)
                    length.append(length[p] + 1)
                    link.append(link[q])
                    first.append(first[q])  # same earliest occurrence as q
                    nxt.append(nxt[q].copy())
                    while p >= 0 and nxt[p].get(c) == q:
                        nxt[p][c] = clone
                        p = link[p]
                    link[q] = clone
                    link[cur] = clone
            last = cur
        if self.count is not None and len(text) != before:
            self.count = None
            self._best = {}
        self.last = last

    def finalize_counts(self) -> None:
        """Occurrence count of every state's strings (size of its end-position set).

        Each non-clone state is the first end of one position; summing counts up
        the suffix-link tree in order of decreasing length gives the rest. A state
        is a clone exactly when its longest string is shorter than its first end
        + 1 (non-clones hold a whole prefix of the text).
        """
        n_states = len(self.length)
        length, link, first = self.length, self.link, self.first_end
        count = [0] * n_states
        buckets: list[list[int]] = [[] for _ in range(len(self.text) + 1)]
        for s in range(1, n_states):
            buckets[length[s]].append(s)
            if length[s] == first[s] + 1:
                count[s] = 1
        for bucket in reversed(buckets):
            for s in bucket:
                count[link[s]] += count[s]
        self.count = count
        self._best = {}

    def continuation(self, state: int, k: int) -> list[int]:
        """The (at most) k tokens after the earliest occurrence of `state`'s strings."""
        if state <= 0 or k <= 0:
            return []
        start = self.first_end[state] + 1
        return self.text[start:start + k]

    def frequent_continuation(self, state: int, k: int) -> list[int]:
        """Greedy most frequent continuation: k times take the transition whose
        target occurs most often (ties: earliest occurrence). Needs `finalize_counts`."""
        if self.count is None:
            raise ValueError("frequent drafts need occurrence counts: call finalize_counts() first")
        if state <= 0:
            return []
        count, first, best = self.count, self.first_end, self._best
        out: list[int] = []
        for _ in range(k):
            b = best.get(state)
            if b is None:
                d = self.next[state]
                if not d:
                    break
                b = max(d.items(), key=lambda kv: (count[kv[1]], -first[kv[1]]))
                best[state] = b
            out.append(b[0])
            state = b[1]
        return out

    def longest_repeat(self) -> tuple[int, int]:
        """(state, length) of the longest suffix of the text that also ends earlier.

        That is `link[last]`: the suffix link of the whole text is the longest
        suffix with more than one end position. O(1).
        """
        s = self.link[self.last] if self.last > 0 else 0
        return s, self.length[s]

    # ------------------------------------------------------------ persistence
    def save(self, path: str | Path) -> None:
        """Write a `.npz` (no pickle) atomically: temp file in the same folder + os.replace."""
        path = Path(path)
        nxt = self.next
        sizes = np.fromiter((len(d) for d in nxt), dtype=np.int64, count=len(nxt))
        offsets = np.zeros(len(nxt) + 1, dtype=np.int64)
        np.cumsum(sizes, out=offsets[1:])
        total = int(offsets[-1])
        keys = np.fromiter((t for d in nxt for t in d), dtype=np.int64, count=total)
        targets = np.fromiter((s for d in nxt for s in d.values()), dtype=np.int64, count=total)
        header = {"format": FORMAT, "version": VERSION, "tokens": len(self.text),
                  "states": self.num_states, "has_count": self.count is not None}
        arrays = {
            "header": np.frombuffer(json.dumps(header).encode(), dtype=np.uint8),
            "text": np.asarray(self.text, dtype=np.int64),
            "link": np.asarray(self.link, dtype=np.int64),
            "length": np.asarray(self.length, dtype=np.int64),
            "first_end": np.asarray(self.first_end, dtype=np.int64),
            "offsets": offsets, "keys": keys, "targets": targets,
            "last": np.asarray([self.last], dtype=np.int64),
            "count": np.asarray(self.count if self.count is not None else [], dtype=np.int64),
        }
        def write(tmp: str) -> None:
            with open(tmp, "wb") as f:  # a file object: np.savez would append .npz to a name
                np.savez(f, **arrays)

        atomic_write(path, write)

    @classmethod
    def load(cls, path: str | Path) -> "SuffixAutomaton":
        """Read a file written by `save`; a missing, corrupt or foreign file raises SAMFileError."""
        path = Path(path)
        if not path.is_file():
            raise SAMFileError(f"{path}: no such file")
        try:
            with np.load(path, allow_pickle=False) as z:
                names = set(z.files)
                need = {"header", "text", "link", "length", "first_end", "offsets", "keys", "targets",
                        "last", "count"}
                if "header" not in names:
                    raise SAMFileError(f"{path}: not a saved suffix automaton (no header)")
                header = json.loads(z["header"].tobytes().decode())
                if not isinstance(header, dict) or header.get("format") != FORMAT:
                    raise SAMFileError(f"{path}: not a saved suffix automaton (format {header!r})")
                if header.get("version") != VERSION:
                    raise SAMFileError(f"{path}: suffix automaton file version {header.get('version')!r}; "
                                       f"this code reads version {VERSION}")
                if need - names:
                    raise SAMFileError(f"{path}: missing arrays {sorted(need - names)}")
                a = {k: z[k] for k in need - {"header"}}
        except SAMFileError:
            raise
        except (zipfile.BadZipFile, OSError, EOFError, ValueError, KeyError, UnicodeDecodeError) as e:
            raise SAMFileError(f"{path}: cannot read suffix automaton ({type(e).__name__}: {e})") from e
        _check_arrays(path, header, a)
        sam = cls()
        sam.text = a["text"].tolist()
        sam.link = a["link"].tolist()
        sam.length = a["length"].tolist()
        sam.first_end = a["first_end"].tolist()
        sam.last = int(a["last"][0])
        sam.count = a["count"].tolist() if header.get("has_count") else None
        pairs = zip(a["keys"].tolist(), a["targets"].tolist())
        sizes = np.diff(a["offsets"]).tolist()
        sam.next = [dict(islice(pairs, m)) for m in sizes]
        return sam


def _check_arrays(path: Path, header: dict, a: dict[str, np.ndarray]) -> None:
    """Cheap structural checks so a damaged file fails here, not mid-generation."""

    def bad(why: str) -> SAMFileError:
        return SAMFileError(f"{path}: corrupt suffix automaton ({why})")

    for k, v in a.items():
        if v.ndim != 1 or v.dtype.kind not in "iu":
            raise bad(f"array {k!r} is not a 1-D integer array")
    n, m = len(a["text"]), len(a["link"])
    if header.get("tokens") != n or header.get("states") != m:
        raise bad("header sizes do not match the arrays")
    if not (len(a["length"]) == len(a["first_end"]) == m and len(a["offsets"]) == m + 1 and m >= 1):
        raise bad("per-state arrays differ in length")
    if len(a["keys"]) != len(a["targets"]) or a["offsets"][0] != 0 or a["offsets"][-1] != len(a["keys"]) \
            or (np.diff(a["offsets"]) < 0).any():
        raise bad("transition table is inconsistent")
    if a["link"][0] != -1 or a["length"][0] != 0 or (m > 1 and ((a["link"][1:] < 0).any() or (a["link"] >= m).any())):
        raise bad("suffix links out of range")
    if len(a["targets"]) and ((a["targets"] <= 0).any() or (a["targets"] >= m).any()):
        raise bad("transition targets out of range")
    if (a["first_end"] >= n).any() or (a["first_end"][1:] < 0).any() or (a["length"] > n).any():
        raise bad("end positions or lengths out of range")
    if len(a["last"]) != 1 or not 0 <= a["last"][0] < m or a["length"][a["last"][0]] != n:
        raise bad("last state does not hold the whole text")
    if header.get("has_count") and len(a["count"]) != m:
        raise bad("count array has the wrong length")


class Matcher:
    """Longest suffix of a query token stream that occurs in `sam.text`.

    `update(token)` costs amortised O(1): follow the transition if there is one,
    else walk suffix links (shrinking `match_len` to each link's length) until one
    exists, as in the classic longest-common-substring algorithm.

    - Static use (`own_text=False`): the query (the generated tokens) is separate
      from the automaton's text (a corpus). `match_len` is the exact longest match
      as long as the automaton does not grow between updates; if it does grow,
      each match is still a real occurrence, at least as long as the longest match
      against the text as it stood when the matcher started.
    - Dynamic use (`own_text=True`): the query *is* the automaton's text (prompt +
      generated). Extend the automaton first, then call `update` with the same
      tokens (it checks they agree). The match is the longest suffix that also
      ends before the current token, so its draft comes from an earlier
      occurrence. A new matcher starts synced to the current text in O(1).

    In both modes the automaton may grow between updates: a state reached earlier
    may since have been split by a clone, so `update`/`draft` first move to the
    suffix-link ancestor that now holds the matched string.
    """

    def __init__(self, sam: SuffixAutomaton, own_text: bool = False) -> None:
        self.sam = sam
        self.own_text = own_text
        self.reset()

    def reset(self) -> None:
        """Forget the query. An own-text matcher resyncs to the automaton's whole text."""
        if self.own_text:
            self.state, self.match_len = self.sam.longest_repeat()
            self.pos = len(self.sam.text)  # query tokens consumed == text tokens matched
        else:
            self.state, self.match_len, self.pos = 0, 0, 0

    def _normalize(self) -> int:
        s, length, link, L = self.state, self.sam.length, self.sam.link, self.match_len
        while s > 0 and L <= length[link[s]]:
            s = link[s]
        self.state = s
        return s

    def update(self, token: int) -> int:
        """Append one query token; returns the new match length."""
        sam = self.sam
        nxt, link, length = sam.next, sam.link, sam.length
        s, L = self.state, self.match_len
        while s > 0 and L <= length[link[s]]:  # inlined _normalize (hot path)
            s = link[s]
        if self.own_text and (self.pos >= len(sam.text) or sam.text[self.pos] != token):
            got = sam.text[self.pos] if self.pos < len(sam.text) else "end of text"
            raise ValueError(f"own-text matcher: query token {self.pos} is {token}, but the automaton's "
                             f"text has {got}; extend the automaton with the token before update()")
        while True:
            t = nxt[s].get(token)
            if t is not None:
                s, L = t, L + 1
                break
            if s == 0:
                L = 0
                break
            s = link[s]
            L = length[s]
        if self.own_text:  # keep only matches with an occurrence ending before this token
            first, here = sam.first_end, self.pos
            while s > 0 and first[s] >= here:
                s = link[s]
                L = length[s]
        self.pos += 1
        self.state, self.match_len = s, L
        return L

    def update_many(self, tokens: Iterable[int]) -> int:
        for t in tokens:
            self.update(t)
        return self.match_len

    @property
    def end(self) -> int:
        """Index in `sam.text` of the last token of the match's earliest occurrence (-1 if none)."""
        return self.sam.first_end[self._normalize()] if self.match_len else -1

    def draft(self, k: int, frequent: bool = False) -> tuple[list[int], int]:
        """(up to k draft tokens, match length). Empty when nothing matched.

        Default: the tokens after the earliest occurrence of the matched suffix.
        `frequent=True` (static automaton with counts): the greedy most frequent
        continuation instead.
        """
        if self.match_len == 0 or k <= 0:
            return [], self.match_len
        s = self._normalize()
        if frequent:
            return self.sam.frequent_continuation(s, k), self.match_len
        return self.sam.continuation(s, k), self.match_len


def choose_draft(dynamic: Matcher, static: Matcher | None, k: int, bias: int = 5,
                 frequent_static: bool = False) -> tuple[list[int], str]:
    """SAM-Decoding's rule: the static draft only when its match is longer than the
    dynamic one by more than `bias` tokens. Returns (tokens, "static"|"dynamic")."""
    if static is not None and static.match_len > dynamic.match_len + bias:
        tokens, _ = static.draft(k, frequent=frequent_static)
        if tokens:
            return tokens, "static"
    return dynamic.draft(k)[0], "dynamic"


# ---------------------------------------------------------------- corpus
def build_static(docs: Iterable[Sequence[int]], eos_id: int, counts: bool = True) -> SuffixAutomaton:
    """Static automaton over documents, each followed by `eos_id` (so a draft stops
    at a document's end the way generation does)."""
    sam = SuffixAutomaton()
    for doc in docs:
        sam.extend_many(doc)
        sam.extend(eos_id)
    if counts:
        sam.finalize_counts()
    return sam


TEXT_FIELDS = ("text", "prompt", "completion", "messages")


def _row_texts(row: object, loc: str) -> list[str]:
    """The text fields of one JSONL row, each its own document."""
    if not isinstance(row, dict):
        raise DataError(f"{loc}: expected a JSON object, got {type(row).__name__}")
    out: list[str] = []
    for name in ("text", "prompt", "completion"):
        if name not in row:
            continue
        value = row[name]
        if name == "prompt" and isinstance(value, list):  # prompt given as messages
            out += _message_texts(value, loc, name)
        elif isinstance(value, str):
            out.append(value)
        else:
            raise DataError(f"{loc}: field {name!r} must be a string, got {type(value).__name__}")
    if "messages" in row:
        out += _message_texts(row["messages"], loc, "messages")
    if not any(name in row for name in TEXT_FIELDS):
        raise DataError(f"{loc}: no text field; expected one of {', '.join(TEXT_FIELDS)}")
    return [t for t in out if t]


def _message_texts(value: object, loc: str, name: str) -> list[str]:
    if not isinstance(value, list):
        raise DataError(f"{loc}: field {name!r} must be a list of messages, got {type(value).__name__}")
    out = []
    for i, m in enumerate(value):
        if not isinstance(m, dict) or not isinstance(m.get("content"), str):
            raise DataError(f"{loc}: field {name!r}[{i}] must be an object with a string 'content'")
        out.append(m["content"])
    return out


def read_corpus_texts(paths: Iterable[str | Path]) -> list[str]:
    """Texts from JSONL rows (`text`, `prompt`/`completion`, `messages` contents); any
    other file (.txt, .md, source code) is one document. Bad rows raise DataError
    naming file and line."""
    texts: list[str] = []
    for path in map(Path, paths):
        if not path.is_file():
            raise DataError(f"{path}: no such file")
        suffix = path.suffix.lower()
        if suffix in (".jsonl", ".ndjson"):
            for n, row in read_jsonl(path):
                texts += _row_texts(row, f"{path}:{n}")
        else:
            try:
                text = read_text_utf8(path)
            except ValueError as e:
                raise DataError(f"{e}; give .jsonl or text files") from None
            if text:
                texts.append(text)
    return texts


def tokenize_corpus(tokenizer, paths: Iterable[str | Path], batch_size: int = 256) -> list[list[int]]:
    """Token ids per document (no special tokens added), ready for `build_static`."""
    texts = read_corpus_texts(paths)
    docs: list[list[int]] = []
    for i in range(0, len(texts), batch_size):
        docs += tokenizer(texts[i:i + batch_size], add_special_tokens=False)["input_ids"]
    return docs

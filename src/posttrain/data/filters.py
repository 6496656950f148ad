"""Data filters: dedup, length bounds, PII, blocklists, regex rules, a score threshold.

Every dropped row is reported with its input line and the reason, so a filtered file
can be audited instead of trusted. Order of the checks, per row:

1. PII (drop mode), blocklist, regex drop rules: on every string of the row
   (except ``role``/``task``), before anything is rewritten;
2. redaction (PII redact mode, regex redact rules): rewrites every string in place
   inside the record structure (message contents, prompt, completion, ...);
3. length bounds, on the row's content text after redaction;
4. exact duplicates, then near duplicates (MinHash LSH over word 3-grams), against
   the rows kept so far: the first occurrence is kept;
5. the score threshold, last, so the (costly) scorer only sees surviving rows.
"""

from __future__ import annotations

import json
import re
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Literal, Sequence

from pydantic import Field, ValidationError, field_validator

from posttrain.config import Strict, format_validation_error, load_yaml, valid_regex
from posttrain.data.formats import DataError, detect_kind, read_jsonl, validate

Scorer = Callable[[list[dict]], Sequence[float]]  # records -> one score per record
CONTENT_FIELDS = ("messages", "prompt", "completion", "text", "chosen", "rejected", "answer")
STRUCTURAL_KEYS = ("role", "task")  # strings that are labels, never scanned or redacted


# ================================================================================ config

class NearDedup(Strict):
    enabled: bool = True
    threshold: float = Field(0.8, gt=0, le=1, description="estimated Jaccard of word 3-grams to count as duplicate")
    num_perm: int = Field(128, ge=16, le=1024, description="MinHash permutations (more = closer estimate)")
    seed: int = 1


class PIIRules(Strict):
    action: Literal["redact", "drop", "off"] = "redact"
    kinds: list[Literal["email", "phone", "card"]] = ["email", "phone", "card"]


class RegexRule(Strict):
    name: str = Field(min_length=1)
    pattern: str
    action: Literal["drop", "redact"] = "drop"
    replacement: str = "[REDACTED]"
    ignore_case: bool = False

    _pattern = field_validator("pattern")(valid_regex)

    def compiled(self) -> re.Pattern:
        return re.compile(self.pattern, re.IGNORECASE if self.ignore_case else 0)


class ScoreRules(Strict):
    reward_model: str | None = Field(None, description="reward model dir or run dir; the CLI and the pipeline build "
                                                            "the scorer from it; Python API: scorer=")
    aspect: str | None = None
    min: float | None = Field(None, description="drop rows scoring below this")
    batch_size: int = Field(8, gt=0)


class FilterRules(Strict):
    exact_dedup: bool = True
    near_dedup: NearDedup = NearDedup()
    min_chars: int | None = Field(None, ge=0)
    max_chars: int | None = Field(None, gt=0)
    min_words: int | None = Field(None, ge=0)
    max_words: int | None = Field(None, gt=0)
    pii: PIIRules = PIIRules()
    blocklist: list[str] = []
    regex: list[RegexRule] = []
    score: ScoreRules = ScoreRules()

    @field_validator("blocklist")
    @classmethod
    def _nonempty_words(cls, words: list[str]) -> list[str]:
        if any(not w.strip() for w in words):
            raise ValueError("blocklist entries must be non-empty words")
        return words


def load_rules(path: str | Path | None) -> FilterRules:
    """Rules YAML -> FilterRules; a bad key or value raises ValueError naming the dotted key."""
    data = load_yaml(path) if path else {}
    try:
        return FilterRules.model_validate(data)
    except ValidationError as exc:
        raise ValueError(format_validation_error(exc, f"filter rules {path}" if path else "filter rules")) from None


# ================================================================================ PII patterns

EMAIL = re.compile(r"[A-Za-z0-9._%+-]+@[A-Za-z0-9-]+(?:\.[A-Za-z0-9-]+)*\.[A-Za-z]{2,}")
# 13-19 digits, optionally grouped by single spaces or dashes; Luhn decides.
CARD = re.compile(r"(?<![\d-])\d(?:[ -]?\d){12,18}(?![\d-])")
# +CC optional, then (area) or area-sep, then two groups: 555-123-4567, (555) 123 4567,
# +1 555.123.4567, +44 20 7946 0958.
# The lookarounds keep it from matching a slice of a longer digit run (a non-Luhn card, an id).
PHONE = re.compile(r"(?<![\w+])(?<!\d[ .-])(?:\+\d{1,3}[ .-]?)?(?:\(\d{2,4}\)[ .-]?|\d{2,4}[ .-])"
                   r"\d{3,4}[ .-]?\d{3,4}(?!\w)(?![ .-]\d)")
PII_TOKENS = {"email": "[EMAIL]", "phone": "[PHONE]", "card": "[CARD]"}


def luhn_ok(digits: str) -> bool:
    """The Luhn checksum every payment card number satisfies."""
    total = 0
    for i, ch in enumerate(reversed(digits)):
        d = int(ch)
        if i % 2 == 1:
            d = d * 2 - 9 if d > 4 else d * 2
        total += d
    return total % 10 == 0


def _is_card(match: re.Match) -> bool:
    digits = re.sub(r"\D", "", match.group())
    return 13 <= len(digits) <= 19 and luhn_ok(digits)


def redact_pii(text: str, kinds: Sequence[str]) -> tuple[str, Counter]:
    """(text with PII replaced by [EMAIL]/[PHONE]/[CARD], count per kind). Cards go
    first so a card number is never half-eaten as a phone number."""
    counts: Counter = Counter()

    def sub(kind: str, pattern: re.Pattern, text: str, check=None) -> str:
        def repl(m: re.Match) -> str:
            if check is not None and not check(m):
                return m.group()
            counts[kind] += 1
            return PII_TOKENS[kind]
        return pattern.sub(repl, text)

    if "card" in kinds:
        text = sub("card", CARD, text, _is_card)
    if "email" in kinds:
        text = sub("email", EMAIL, text)
    if "phone" in kinds:
        text = sub("phone", PHONE, text)
    return text, counts


# ================================================================================ record text

def _map_strings(value: Any, fn: Callable[[str], str]) -> Any:
    """A copy of `value` with fn applied to every string leaf (structural keys kept)."""
    if isinstance(value, str):
        return fn(value)
    if isinstance(value, list):
        return [_map_strings(v, fn) for v in value]
    if isinstance(value, dict):
        return {k: v if k in STRUCTURAL_KEYS else _map_strings(v, fn) for k, v in value.items()}
    return value


def _strings(value: Any) -> list[str]:
    out: list[str] = []
    _map_strings(value, lambda s: out.append(s) or s)
    return out


def record_text(record: dict) -> str:
    """The content of a record as one string: message contents, prompt + completion,
    text, chosen/rejected... (ids and other metadata left out, so they don't defeat dedup)."""
    kind = detect_kind(record)
    if kind is None:
        raise DataError(f"no text fields (expected one of {', '.join(CONTENT_FIELDS)})")
    return "\n".join(s for name in CONTENT_FIELDS if name in record for s in _strings(record[name]))


def whole_word(word: str) -> re.Pattern:
    return re.compile(rf"(?<!\w){re.escape(word.strip())}(?!\w)", re.IGNORECASE)


def _shingles(text: str, n: int = 3) -> set[bytes]:
    words = re.findall(r"\w+", text.lower())
    if len(words) < n:
        return {" ".join(words).encode()} if words else set()
    return {" ".join(words[i:i + n]).encode() for i in range(len(words) - n + 1)}


# ================================================================================ filtering

@dataclass
class Dropped:
    line: int
    rule: str  # exact_duplicate, near_duplicate, too_short, too_long, pii:email, blocklist, regex:NAME, score
    reason: str  # the rule with its detail: "exact_duplicate_of:12", "blocklist:word", ...


@dataclass
class FilterResult:
    kept: list[dict]
    kept_lines: list[int]
    dropped: list[Dropped] = field(default_factory=list)
    redactions: Counter = field(default_factory=Counter)  # pii kind or regex:NAME -> replacements made
    total: int = 0

    def report(self) -> dict:
        return {"input_rows": self.total, "kept": len(self.kept), "dropped": len(self.dropped),
                "drop_counts": dict(Counter(d.rule for d in self.dropped).most_common()),
                "redactions": dict(self.redactions.most_common()),
                "dropped_rows": [{"line": d.line, "reason": d.reason} for d in self.dropped]}


def filter_records(records: Sequence[dict], rules: FilterRules | dict | None = None, scorer: Scorer | None = None,
                   lines: Sequence[int] | None = None) -> FilterResult:
    """Apply `rules` to records; `lines` are the rows' input line numbers (default 1..N).

    `scorer(records) -> scores` (higher is better) is needed when ``score.min`` is set.
    The input records are not modified; redacted rows come back as new dicts.
    """
    rules = rules if isinstance(rules, FilterRules) else FilterRules.model_validate(rules or {})
    lines = list(lines) if lines is not None else list(range(1, len(records) + 1))
    if len(lines) != len(records):
        raise ValueError(f"got {len(lines)} line numbers for {len(records)} records")
    if rules.score.min is not None and scorer is None:
        raise ValueError("score.min is set but no scorer was given (pass scorer=, or score.reward_model in the CLI)")
    result = FilterResult(kept=[], kept_lines=[], total=len(records))
    blocked = [(w.strip().lower(), whole_word(w)) for w in rules.blocklist]
    regexes = [(r, r.compiled()) for r in rules.regex]
    pii_kinds = [] if rules.pii.action == "off" else list(rules.pii.kinds)
    seen: dict[str, int] = {}  # normalized content -> line kept
    lsh = minhashes = None
    if rules.near_dedup.enabled:
        from datasketch import MinHashLSH

        # LSH only proposes candidates (a capped threshold keeps >= 2 bands and recall high);
        # the estimated Jaccard against `threshold` decides.
        lsh = MinHashLSH(threshold=min(rules.near_dedup.threshold, 0.9), num_perm=rules.near_dedup.num_perm)
        minhashes = {}

    def drop(line: int, rule: str, reason: str | None = None) -> None:
        result.dropped.append(Dropped(line, rule, reason or rule))

    for record, line in zip(records, lines):
        if not isinstance(record, dict):
            raise DataError(f"line {line}: row must be a JSON object; got {type(record).__name__}")
        try:
            record_text(record)
        except DataError as exc:
            raise DataError(f"line {line}: {exc}") from None
        everything = "\n".join(_strings(record))
        # 1. drop rules, on the original strings
        if rules.pii.action == "drop":
            found = [k for k in pii_kinds if redact_pii(everything, [k])[1]]
            if found:
                drop(line, f"pii:{found[0]}")
                continue
        hit = next((w for w, pat in blocked if pat.search(everything)), None)
        if hit is not None:
            drop(line, "blocklist", f"blocklist:{hit}")
            continue
        rule_hit = next((r for r, pat in regexes if r.action == "drop" and pat.search(everything)), None)
        if rule_hit is not None:
            drop(line, f"regex:{rule_hit.name}")
            continue
        # 2. redaction, inside the record structure
        counts: Counter = Counter()

        def rewrite(s: str) -> str:
            if rules.pii.action == "redact":
                s, c = redact_pii(s, pii_kinds)
                counts.update(c)
            for r, pat in regexes:
                if r.action == "redact":
                    s, n = pat.subn(r.replacement, s)
                    counts[f"regex:{r.name}"] += n
            return s

        record = _map_strings(record, rewrite)
        # 3. length, on the content after redaction
        text = record_text(record)
        n_chars, n_words = len(text), len(text.split())
        if (rules.min_chars is not None and n_chars < rules.min_chars) or \
                (rules.min_words is not None and n_words < rules.min_words):
            drop(line, "too_short", f"too_short ({n_chars} chars, {n_words} words)")
            continue
        if (rules.max_chars is not None and n_chars > rules.max_chars) or \
                (rules.max_words is not None and n_words > rules.max_words):
            drop(line, "too_long", f"too_long ({n_chars} chars, {n_words} words)")
            continue
        # 4. duplicates of a row already kept
        key = json.dumps([" ".join(s.split()) for s in _strings({k: record[k] for k in CONTENT_FIELDS if k in record})])
        if rules.exact_dedup and key in seen:
            drop(line, "exact_duplicate", f"exact_duplicate_of:{seen[key]}")
            continue
        mh = None
        if lsh is not None and (shingles := _shingles(text)):
            from datasketch import MinHash

            mh = MinHash(num_perm=rules.near_dedup.num_perm, seed=rules.near_dedup.seed)
            mh.update_batch(list(shingles))
            best = max(((mh.jaccard(minhashes[c]), c) for c in lsh.query(mh)), default=None)
            if best is not None and best[0] >= rules.near_dedup.threshold:
                drop(line, "near_duplicate", f"near_duplicate_of:{best[1]} (jaccard≈{best[0]:.2f})")
                continue
        seen.setdefault(key, line)
        if mh is not None:
            lsh.insert(line, mh)
            minhashes[line] = mh
        result.redactions.update(counts)
        result.kept.append(record)
        result.kept_lines.append(line)

    # 5. score threshold, on the survivors only
    if rules.score.min is not None and result.kept:
        scores = [float(s) for s in scorer(result.kept)]
        if len(scores) != len(result.kept):
            raise ValueError(f"scorer returned {len(scores)} scores for {len(result.kept)} records")
        keep = [s >= rules.score.min for s in scores]
        for ok, s, line in zip(keep, scores, result.kept_lines):
            if not ok:
                drop(line, "score", f"score<min ({s:.4g} < {rules.score.min:g})")
        result.kept = [r for r, ok in zip(result.kept, keep) if ok]
        result.kept_lines = [n for n, ok in zip(result.kept_lines, keep) if ok]
        result.dropped.sort(key=lambda d: d.line)
    return result


# ================================================================================ what a scorer reads

def prompt_and_completion(record: dict) -> tuple[Any, str]:
    """What a reward model scores for a row: chat -> (messages before the last assistant
    turn, its content); completion -> (prompt, completion); text -> ("", text);
    preference -> (prompt, chosen)."""
    kind = detect_kind(record)
    if kind == "chat":
        msgs = record["messages"]
        last = max(i for i, m in enumerate(msgs) if m.get("role") == "assistant")
        return msgs[:last], msgs[last]["content"]
    if kind == "completion" or (kind == "unpaired" and isinstance(record["completion"], str)):
        return record["prompt"], record["completion"]
    if kind == "text":
        return "", record["text"]
    if kind == "preference" and isinstance(record["chosen"], str):
        return record.get("prompt") or "", record["chosen"]
    raise DataError(f"a {kind} row has no single completion to score")


# ================================================================================ files

def filter_file(in_path: str | Path, out_path: str | Path, rules: FilterRules | dict | None = None,
                report_path: str | Path | None = None, scorer: Scorer | None = None) -> FilterResult:
    """Filter a JSONL file into `out_path` (atomic) and write the report JSON
    (default: OUT + ".report.json"). Rows are validated first; a bad row raises
    DataError naming file, line and field. A ``score.min`` rule needs `scorer`: the reward
    model lives in a higher layer, so the caller builds it (`train.reward_model.filter_scorer`)."""
    from posttrain.fileio import write_json_atomic, write_text_atomic

    rules = rules if isinstance(rules, FilterRules) else FilterRules.model_validate(rules or {})
    rows = read_jsonl(in_path)
    kind = None
    for n, row in rows:
        kind = kind or detect_kind(row)
        if kind is None:
            raise DataError(f"{in_path}:{n}: no known record kind (fields: {', '.join(sorted(row)) or 'none'})")
        if (problem := validate(row, detect_kind(row) or kind)):
            raise DataError(f"{in_path}:{n}: {problem}")
    result = filter_records([r for _, r in rows], rules, scorer=scorer, lines=[n for n, _ in rows])
    write_text_atomic(out_path, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in result.kept))
    report = {"input": str(in_path), "output": str(out_path), **result.report()}
    write_json_atomic(report_path or f"{out_path}.report.json", report)
    return result


def summary(result: FilterResult) -> str:
    """A few lines for the terminal."""
    lines = [f"kept {len(result.kept)} of {result.total} rows, dropped {len(result.dropped)}"]
    lines += [f"  dropped {n:>6}  {rule}" for rule, n in Counter(d.rule for d in result.dropped).most_common()]
    lines += [f"  redacted {n:>5}  {kind}" for kind, n in result.redactions.most_common()]
    return "\n".join(lines)

"""Served replies and the feedback people give on them, in a real database, and their export as
training data: choices between two replies -> preference pairs (DPO), ratings -> unpaired
examples (KTO).

Storage is SQLite by default (one file, WAL journal, `synchronous=FULL`) or PostgreSQL when the
target is a `postgresql://` URL (psycopg 3). Every write is one transaction committed before the
call returns, so a server that answers only after the call has acknowledged only what is on disk:
a kill -9 right after an answer loses nothing. The SQL is plain (TEXT and INTEGER columns, ids made
here, timestamps as fixed-width ISO-8601 UTC text that sorts like time), so both engines run the
same statements; only the placeholder differs (`?` / `%s`).

Tables: `conversations` (one request: prompt, model or adapter name, sampling params, times),
`replies` (one per returned choice, `n` per conversation), `feedback` (a rating of one reply, or a
choice of one reply over another reply to the same prompt).
"""

from __future__ import annotations

import hashlib
import json
import re
import threading
import uuid
from collections import Counter
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Literal, Sequence

SCHEMA_VERSION = "1"
SCHEMA = [
    "CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL)",
    """CREATE TABLE IF NOT EXISTS conversations (
        id TEXT PRIMARY KEY,
        created_at TEXT NOT NULL,
        finished_at TEXT NOT NULL,
        endpoint TEXT NOT NULL,
        model TEXT NOT NULL,
        prompt TEXT NOT NULL,
        params TEXT NOT NULL,
        redacted INTEGER NOT NULL)""",
    """CREATE TABLE IF NOT EXISTS replies (
        id TEXT PRIMARY KEY,
        conversation_id TEXT NOT NULL REFERENCES conversations(id),
        choice_index INTEGER NOT NULL,
        text TEXT NOT NULL,
        finish_reason TEXT NOT NULL,
        completion_tokens INTEGER NOT NULL)""",
    """CREATE TABLE IF NOT EXISTS feedback (
        id TEXT PRIMARY KEY,
        created_at TEXT NOT NULL,
        kind TEXT NOT NULL,
        reply_id TEXT NOT NULL REFERENCES replies(id),
        other_reply_id TEXT REFERENCES replies(id),
        rating TEXT,
        text TEXT)""",
    "CREATE INDEX IF NOT EXISTS replies_conversation ON replies(conversation_id)",
    "CREATE INDEX IF NOT EXISTS feedback_created ON feedback(created_at)",
]
TABLES = ("meta", "conversations", "replies", "feedback")
PII_KINDS = ("email", "phone", "card")


class UnknownReplies(LookupError):
    """Feedback names reply ids the database does not hold (answered 404)."""

    def __init__(self, ids: Sequence[str]):
        super().__init__(f"no reply with id {', '.join(repr(i) for i in ids)}")
        self.ids = list(ids)


class DifferentPrompts(ValueError):
    """A choice between two replies that do not answer the same prompt (answered 400)."""


# ================================================================================ time


def now_iso() -> str:
    """The current UTC time as stored: fixed width, so text order is time order."""
    return format_time(datetime.now(timezone.utc))


def format_time(t: datetime) -> str:
    return t.astimezone(timezone.utc).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def parse_since(text: str) -> str:
    """An ISO date or date-time (no zone = UTC) as the stored format, for `created_at >= since`."""
    try:
        t = datetime.fromisoformat(text.strip().replace("Z", "+00:00"))
    except ValueError:
        raise ValueError(f"since: {text!r} is not an ISO date or date-time "
                         "(e.g. 2025-01-31 or 2025-01-31T12:00:00+00:00)") from None
    return format_time(t if t.tzinfo else t.replace(tzinfo=timezone.utc))


# ================================================================================ PII


def redact_value(value: Any, kinds: Sequence[str] = PII_KINDS) -> tuple[Any, int]:
    """(value with PII replaced by [EMAIL]/[PHONE]/[CARD], replacements made): strings, and the
    `content` of messages (roles are labels, kept). The same patterns as the data filters."""
    from posttrain.data.filters import redact_pii

    if isinstance(value, str):
        text, counts = redact_pii(value, kinds)
        return text, sum(counts.values())
    if isinstance(value, list):
        out, total = [], 0
        for item in value:
            item, n = redact_value(item, kinds)
            out.append(item)
            total += n
        return out, total
    if isinstance(value, dict):
        out, total = {}, 0
        for k, v in value.items():
            if k != "role":
                v, n = redact_value(v, kinds)
                total += n
            out[k] = v
        return out, total
    return value, 0


# ================================================================================ the store


def is_postgres(target: str) -> bool:
    return str(target).startswith(("postgresql://", "postgres://"))


def describe(target: str) -> str:
    """The target without a password, for messages and logs."""
    if not is_postgres(target):
        return str(target)
    from urllib.parse import urlsplit, urlunsplit

    parts = urlsplit(target)
    if parts.password:
        netloc = parts.netloc.replace(f":{parts.password}@", ":***@")
        return urlunsplit(parts._replace(netloc=netloc))
    return target


class FeedbackStore:
    """One connection to the feedback database, shared by threads under a lock.

    `create=True` (the server) makes the file and the tables; `create=False` (export) refuses a
    missing file or a database without these tables instead of creating them.
    """

    def __init__(self, target: str | Path, create: bool = True):
        self.target = str(target)
        self.postgres = is_postgres(self.target)
        self.lock = threading.Lock()
        self.conn = self._connect(create)
        try:
            if create:
                self._transaction(self._create_tables)
            else:
                self._check_tables()
        except BaseException:
            self.conn.close()
            raise

    # -- connection

    def _connect(self, create: bool):
        if self.postgres:
            try:
                import psycopg
            except ImportError:
                raise ValueError("a postgresql:// feedback database needs psycopg: "
                                 "pip install 'psycopg[binary]'") from None
            try:
                return psycopg.connect(self.target, connect_timeout=10)
            except psycopg.Error as exc:
                raise ValueError(f"cannot connect to the feedback database {describe(self.target)}: {exc}") from None
        import sqlite3

        path = Path(self.target)
        if path.is_dir():
            raise ValueError(f"feedback database {path} is a directory; give a file path")
        if not create and not path.is_file():
            raise FileNotFoundError(f"feedback database {path}: no such file")
        if create:
            try:
                path.parent.mkdir(parents=True, exist_ok=True)
            except OSError as exc:
                raise ValueError(f"cannot create the folder of the feedback database {path}: {exc}") from None
        try:
            conn = sqlite3.connect(str(path), check_same_thread=False, timeout=30)
            conn.execute("PRAGMA foreign_keys=ON")
            # WAL: readers (an export) never block the server's writes; FULL: every commit is
            # fsynced, so an acknowledged write survives a power cut too, not only a kill -9.
            mode = conn.execute("PRAGMA journal_mode=WAL").fetchone()[0]
            conn.execute("PRAGMA synchronous=FULL")
        except sqlite3.Error as exc:
            raise ValueError(f"feedback database {path}: {exc}") from None
        if str(mode).lower() != "wal":
            conn.close()
            raise ValueError(f"feedback database {path}: cannot switch to WAL mode (journal_mode={mode})")
        return conn

    def _sql(self, statement: str) -> str:
        return statement.replace("?", "%s") if self.postgres else statement

    def _transaction(self, work):
        """Run work(cursor) in one transaction, committed before returning (rolled back on error)."""
        with self.lock:
            if self.postgres and self.conn.closed:  # the link dropped (server restart): a new one
                self.conn = self._connect(create=False)
            cur = self.conn.cursor()
            try:
                result = work(cur)
                self.conn.commit()
                return result
            except BaseException:
                if not (self.postgres and self.conn.closed):  # a dead link has nothing to roll back
                    self.conn.rollback()
                raise
            finally:
                if not (self.postgres and self.conn.closed):
                    cur.close()

    def _query(self, cur, statement: str, params: Sequence = ()) -> list[tuple]:
        cur.execute(self._sql(statement), tuple(params))
        return list(cur.fetchall())

    def _create_tables(self, cur) -> None:
        for statement in SCHEMA:
            cur.execute(statement)
        self._stamp_version(cur)

    def _stamp_version(self, cur) -> None:
        rows = self._query(cur, "SELECT value FROM meta WHERE key = ?", ["schema_version"])
        if not rows:
            cur.execute(self._sql("INSERT INTO meta (key, value) VALUES (?, ?)"), ("schema_version", SCHEMA_VERSION))
        elif rows[0][0] != SCHEMA_VERSION:
            raise ValueError(f"feedback database {describe(self.target)} has schema version {rows[0][0]}; "
                             f"this posttrain reads version {SCHEMA_VERSION}")

    def _check_tables(self) -> None:
        def work(cur):
            if self.postgres:
                return {r[0] for r in self._query(cur, "SELECT table_name FROM information_schema.tables "
                                                       "WHERE table_schema = current_schema()")}
            return {r[0] for r in self._query(cur, "SELECT name FROM sqlite_master WHERE type = 'table'")}

        try:
            found = self._transaction(work)
        except Exception as exc:  # sqlite3.DatabaseError for a file that is not a database
            raise ValueError(f"feedback database {describe(self.target)}: {exc}") from None
        missing = [t for t in TABLES if t not in found]
        if missing:
            raise ValueError(f"{describe(self.target)} is not a posttrain feedback database "
                             f"(no table {', '.join(missing)})")
        self._transaction(self._stamp_version)

    def journal_mode(self) -> str:
        """SQLite's journal mode ('wal'); 'postgresql' for a PostgreSQL store."""
        if self.postgres:
            return "postgresql"
        return self._transaction(lambda cur: self._query(cur, "PRAGMA journal_mode")[0][0])

    def close(self) -> None:
        with self.lock:
            self.conn.close()

    # -- writes

    def add_conversation(self, conversation: dict, replies: list[dict]) -> None:
        """One request and its replies, committed together. conversation: id, created_at,
        endpoint ('chat' | 'completion'), model, prompt (messages or text), params (dict),
        redacted (bool); each reply: id, text, finish_reason, completion_tokens (index = position)."""
        c = conversation

        def work(cur):
            cur.execute(self._sql("INSERT INTO conversations (id, created_at, finished_at, endpoint, model, prompt, "
                                  "params, redacted) VALUES (?, ?, ?, ?, ?, ?, ?, ?)"),
                        (c["id"], c["created_at"], now_iso(), c["endpoint"], c["model"],
                         json.dumps(c["prompt"], ensure_ascii=False), json.dumps(c["params"], sort_keys=True),
                         int(bool(c.get("redacted")))))
            for i, r in enumerate(replies):
                cur.execute(self._sql("INSERT INTO replies (id, conversation_id, choice_index, text, finish_reason, "
                                      "completion_tokens) VALUES (?, ?, ?, ?, ?, ?)"),
                            (r["id"], c["id"], i, r["text"], r["finish_reason"], int(r["completion_tokens"])))

        self._transaction(work)

    def _prompts(self, cur, ids: Sequence[str]) -> dict[str, str]:
        """reply id -> its conversation's stored prompt (JSON text), for the ids that exist."""
        marks = ", ".join("?" for _ in ids)
        rows = self._query(cur, f"SELECT r.id, c.prompt, c.endpoint FROM replies r JOIN conversations c "
                                f"ON c.id = r.conversation_id WHERE r.id IN ({marks})", ids)
        return {r[0]: (r[1], r[2]) for r in rows}

    def add_rating(self, reply_id: str, rating: Literal["up", "down"], text: str | None = None) -> str:
        """Store a rating of one reply; returns the feedback id. UnknownReplies if it does not exist."""
        fid = "fb-" + uuid.uuid4().hex[:24]

        def work(cur):
            if reply_id not in self._prompts(cur, [reply_id]):
                raise UnknownReplies([reply_id])
            cur.execute(self._sql("INSERT INTO feedback (id, created_at, kind, reply_id, other_reply_id, rating, text) "
                                  "VALUES (?, ?, 'rating', ?, NULL, ?, ?)"), (fid, now_iso(), reply_id, rating, text))

        self._transaction(work)
        return fid

    def add_choice(self, chosen: str, rejected: str, text: str | None = None) -> str:
        """Store a choice of `chosen` over `rejected`; both must exist (UnknownReplies) and answer
        the same prompt through the same endpoint (DifferentPrompts). Returns the feedback id."""
        fid = "fb-" + uuid.uuid4().hex[:24]

        def work(cur):
            found = self._prompts(cur, [chosen, rejected])
            missing = [i for i in (chosen, rejected) if i not in found]
            if missing:
                raise UnknownReplies(missing)
            if found[chosen] != found[rejected]:
                raise DifferentPrompts(f"replies {chosen!r} and {rejected!r} answer different prompts; "
                                       "a choice compares two replies to the same prompt")
            cur.execute(self._sql("INSERT INTO feedback (id, created_at, kind, reply_id, other_reply_id, rating, text) "
                                  "VALUES (?, ?, 'choice', ?, ?, NULL, ?)"), (fid, now_iso(), chosen, rejected, text))

        self._transaction(work)
        return fid

    # -- reads

    def conversation(self, conversation_id: str) -> dict | None:
        """A stored request with its replies (tests, audits)."""
        def work(cur):
            rows = self._query(cur, "SELECT id, created_at, finished_at, endpoint, model, prompt, params, redacted "
                                    "FROM conversations WHERE id = ?", [conversation_id])
            if not rows:
                return None
            r = rows[0]
            replies = self._query(cur, "SELECT id, text, finish_reason, completion_tokens FROM replies "
                                       "WHERE conversation_id = ? ORDER BY choice_index", [conversation_id])
            return {"id": r[0], "created_at": r[1], "finished_at": r[2], "endpoint": r[3], "model": r[4],
                    "prompt": json.loads(r[5]), "params": json.loads(r[6]), "redacted": bool(r[7]),
                    "replies": [{"id": x[0], "text": x[1], "finish_reason": x[2], "completion_tokens": x[3]}
                                for x in replies]}

        return self._transaction(work)

    def recent_ratings(self, n: int) -> list[bool]:
        """The last n ratings, oldest first, True for 'up' (the server's up-rate window after a restart)."""
        rows = self._transaction(lambda cur: self._query(
            cur, "SELECT rating FROM feedback WHERE kind = 'rating' ORDER BY created_at DESC, id DESC LIMIT ?",
            [int(n)]))
        return [r[0] == "up" for r in reversed(rows)]

    def feedback(self, since: str | None = None) -> list[dict]:
        """Every feedback row (created_at >= since, the stored format), oldest first, with the
        reply texts and the prompt it is about."""
        def work(cur):
            where, params = ("WHERE f.created_at >= ?", [since]) if since else ("", [])
            return self._query(cur, "SELECT f.id, f.created_at, f.kind, f.rating, f.text, r.id, r.text, "
                                    "o.id, o.text, c.prompt, c.model, c.endpoint FROM feedback f "
                                    "JOIN replies r ON r.id = f.reply_id "
                                    "LEFT JOIN replies o ON o.id = f.other_reply_id "
                                    "JOIN conversations c ON c.id = r.conversation_id "
                                    f"{where} ORDER BY f.created_at, f.id", params)

        keys = ("id", "created_at", "kind", "rating", "text", "reply_id", "reply_text", "other_reply_id",
                "other_text", "prompt", "model", "endpoint")
        rows = [dict(zip(keys, row)) for row in self._transaction(work)]
        for row in rows:
            row["prompt"] = json.loads(row["prompt"])
        return rows


def open_store(target: str | Path, create: bool = True) -> FeedbackStore:
    return FeedbackStore(target, create=create)


# ================================================================================ export


def feedback_records(target: str | Path, kind: Literal["preference", "unpaired"] = "preference",
                     since: str | None = None) -> tuple[list[dict], dict]:
    """(records, report): choices -> preference records (prompt, chosen, rejected), or ratings ->
    unpaired records (prompt, completion, label: up = true), in the formats the DPO and KTO stages
    read (`data.formats`). `since`: an ISO date or date-time (feedback given at or after it).

    The latest feedback wins: one rating per reply, one choice per pair of replies (a person who
    changes their mind). Rows the training formats cannot use are counted in the report, not
    written: a choice between identical texts (no signal), a chat prompt that does not end with a
    user turn, an empty reply. A completions-endpoint prompt is a plain string, which the
    preference and KTO stages render as one user turn of the chat template.
    """
    from posttrain.data.formats import validate

    if kind not in ("preference", "unpaired"):
        raise ValueError(f"feedback export kind must be 'preference' (choices -> pairs) or 'unpaired' "
                         f"(ratings -> KTO examples); got {kind!r}")
    store = open_store(target, create=False)
    try:
        rows = store.feedback(parse_since(since) if since else None)
    finally:
        store.close()
    wanted = "choice" if kind == "preference" else "rating"
    latest: dict[Any, dict] = {}
    for row in rows:  # oldest first: a later row replaces an earlier one
        if row["kind"] == wanted:
            key = frozenset((row["reply_id"], row["other_reply_id"])) if wanted == "choice" else row["reply_id"]
            latest.pop(key, None)
            latest[key] = row
    skipped: Counter = Counter()
    records = []
    for row in sorted(latest.values(), key=lambda r: (r["created_at"], r["id"])):
        prompt = row["prompt"]
        meta = {"feedback_id": row["id"], "created_at": row["created_at"], "model": row["model"]}
        if wanted == "choice":
            record = {"prompt": prompt, "chosen": row["reply_text"], "rejected": row["other_text"],
                      "meta": {**meta, "reply_ids": [row["reply_id"], row["other_reply_id"]]}}
            if row["reply_text"].strip() == row["other_text"].strip():
                skipped["same_text"] += 1
                continue
        else:
            record = {"prompt": prompt, "completion": row["reply_text"], "label": row["rating"] == "up",
                      "meta": {**meta, "reply_id": row["reply_id"]}}
        if isinstance(prompt, list) and (not prompt or prompt[-1].get("role") != "user"):
            skipped["prompt_not_user_turn"] += 1
            continue
        problem = validate(record, kind)
        if problem is not None:
            field = re.search(r"field '([^']+)'", problem)
            skipped[f"invalid:{field.group(1) if field else 'row'}"] += 1
            continue
        records.append(record)
    report = {"database": describe(str(target)), "kind": kind, "since": since, "feedback_rows": len(rows),
              wanted + "s": sum(r["kind"] == wanted for r in rows), "superseded": sum(r["kind"] == wanted for r in rows)
              - len(latest), "records": len(records), "skipped": dict(skipped)}
    return records, report


def records_digest(records: list[dict]) -> str:
    """Content hash of exported records (the pipeline's fingerprint of a feedback source)."""
    blob = json.dumps(records, sort_keys=True, ensure_ascii=False).encode()
    return hashlib.sha256(blob).hexdigest()


def export_feedback(target: str | Path, out: str | Path, kind: Literal["preference", "unpaired"] = "preference",
                    since: str | None = None, rules=None, scorer=None) -> dict:
    """Write the feedback as training data to `out` (JSONL, atomic) after the data filters
    (`rules`: FilterRules, a dict, or None = the defaults: exact + near dedup, PII redaction), and
    a report to OUT.report.json; returns the report. No usable row raises ValueError."""
    from posttrain.data.filters import filter_records
    from posttrain.fileio import write_json_atomic, write_text_atomic

    records, report = feedback_records(target, kind, since)
    if not records:
        what = "choices between two replies" if kind == "preference" else "ratings"
        raise ValueError(f"{describe(str(target))}: no usable {what}{' since ' + since if since else ''} to "
                         f"export ({report['feedback_rows']} feedback rows, skipped: {report['skipped'] or 'none'})")
    result = filter_records(records, rules, scorer=scorer)
    if not result.kept:
        raise ValueError(f"{describe(str(target))}: the data filters dropped every row "
                         f"({result.report()['drop_counts']})")
    write_text_atomic(out, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in result.kept))
    report = {**report, "output": str(out), "kept": len(result.kept), "filters": result.report()}
    write_json_atomic(f"{out}.report.json", report)
    return report

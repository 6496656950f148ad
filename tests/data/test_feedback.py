"""The feedback store (SQLite, and PostgreSQL when a local server can be started) and its export
into the records the DPO and KTO stages read, loaded here with their real loaders."""

from __future__ import annotations

import json
import os
import shutil
import sqlite3
import subprocess
import time
from pathlib import Path

import pytest

from posttrain.data.feedback import (
    DifferentPrompts,
    UnknownReplies,
    export_feedback,
    feedback_records,
    open_store,
    parse_since,
    redact_value,
)
from posttrain.data.filters import FilterRules

CHAT = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Capital of France?"}]


def conversation(cid: str, prompt, endpoint: str = "chat", model: str = "tiny") -> dict:
    return {"id": cid, "created_at": "2025-01-01T00:00:00.000000Z", "endpoint": endpoint, "model": model,
            "prompt": prompt, "params": {"temperature": 0.7, "n": 2}, "redacted": False}


def reply(rid: str, text: str) -> dict:
    return {"id": rid, "text": text, "finish_reason": "stop", "completion_tokens": 3}


def populate(target) -> dict[str, str]:
    """Two chat prompts with two replies each, a completion prompt with two; choices and ratings
    (one reply rated twice: the later rating wins). Returns the ids by name."""
    store = open_store(target)
    try:
        store.add_conversation(conversation("c1", CHAT), [reply("c1-0", "Paris."), reply("c1-1", "Lyon.")])
        store.add_conversation(conversation("c2", [{"role": "user", "content": "2+2?"}], model="math"),
                               [reply("c2-0", "4"), reply("c2-1", "5")])
        store.add_conversation(conversation("c3", "The sky is", endpoint="completion"),
                               [reply("c3-0", " blue."), reply("c3-1", " green.")])
        ids = {"choice1": store.add_choice("c1-0", "c1-1"), "choice2": store.add_choice("c2-0", "c2-1", "math!"),
               "choice3": store.add_choice("c3-0", "c3-1")}
        ids["rating_old"] = store.add_rating("c1-1", "up")
        ids["rating_new"] = store.add_rating("c1-1", "down", "wrong city")
        ids["rating2"] = store.add_rating("c2-0", "up")
        ids["rating3"] = store.add_rating("c3-1", "down")
    finally:
        store.close()
    return ids


def test_sqlite_store_is_wal_and_refuses_bad_feedback(tmp_path):
    db = tmp_path / "sub" / "fb.db"
    store = open_store(db)
    assert store.journal_mode() == "wal"
    assert sqlite3.connect(db).execute("PRAGMA journal_mode").fetchone()[0] == "wal"  # persisted in the file
    store.add_conversation(conversation("c1", CHAT), [reply("c1-0", "Paris."), reply("c1-1", "Lyon.")])
    store.add_conversation(conversation("c2", "other"), [reply("c2", "x")])
    with pytest.raises(UnknownReplies, match="'nope'") as info:
        store.add_rating("nope", "up")
    assert info.value.ids == ["nope"]
    with pytest.raises(UnknownReplies) as info:
        store.add_choice("c1-0", "gone")
    assert info.value.ids == ["gone"]
    with pytest.raises(DifferentPrompts, match="different prompts"):
        store.add_choice("c1-0", "c2")
    with pytest.raises(sqlite3.IntegrityError):  # ids are unique: a second insert of c1 is refused whole
        store.add_conversation(conversation("c1", CHAT), [reply("c1-9", "again")])
    assert store.conversation("c1")["replies"][1] == {"id": "c1-1", "text": "Lyon.", "finish_reason": "stop",
                                                      "completion_tokens": 3}
    assert store.conversation("c1")["prompt"] == CHAT and store.conversation("c1-9") is None
    assert store.feedback() == []  # the refused feedback left nothing behind
    store.close()


def test_export_refuses_a_missing_or_foreign_database(tmp_path):
    with pytest.raises(FileNotFoundError, match="no such file"):
        feedback_records(tmp_path / "missing.db")
    assert not (tmp_path / "missing.db").exists()  # reading never creates
    other = tmp_path / "other.db"
    sqlite3.connect(other).execute("CREATE TABLE t (x)").connection.commit()
    with pytest.raises(ValueError, match="not a posttrain feedback database"):
        feedback_records(other)
    junk = tmp_path / "junk.db"
    junk.write_bytes(b"not sqlite at all" * 100)
    with pytest.raises(ValueError, match="junk.db"):
        feedback_records(junk)
    with pytest.raises(ValueError, match="kind must be"):
        feedback_records(other, kind="chat")


def test_parse_since():
    assert parse_since("2025-01-31") == "2025-01-31T00:00:00.000000Z"
    assert parse_since("2025-01-31T12:00:00+02:00") == "2025-01-31T10:00:00.000000Z"
    assert parse_since("2025-01-31T12:00:00Z") == "2025-01-31T12:00:00.000000Z"
    with pytest.raises(ValueError, match="since: 'yesterday' is not an ISO date"):
        parse_since("yesterday")


def test_choices_become_pairs_the_dpo_loader_reads(tmp_path, tokenizer):
    from posttrain.data.examples import load_pairs

    db = tmp_path / "fb.db"
    ids = populate(db)
    records, report = feedback_records(db, "preference")
    assert [r["meta"]["feedback_id"] for r in records] == [ids["choice1"], ids["choice2"], ids["choice3"]]
    assert records[0] == {"prompt": CHAT, "chosen": "Paris.", "rejected": "Lyon.",
                          "meta": {**records[0]["meta"], "reply_ids": ["c1-0", "c1-1"], "model": "tiny"}}
    assert records[2]["prompt"] == "The sky is" and records[1]["meta"]["model"] == "math"
    assert report["choices"] == 3 and report["records"] == 3 and report["feedback_rows"] == 7

    out = tmp_path / "pairs.jsonl"
    report = export_feedback(db, out, "preference", rules={"near_dedup": {"enabled": False}})
    assert report["kept"] == 3 and json.loads((tmp_path / "pairs.jsonl.report.json").read_text())["kept"] == 3
    pairs, data_report = load_pairs(tokenizer, str(out), max_length=128, skip_invalid=False)
    assert data_report["pairs"] == 3 and data_report["skipped_invalid"] == 0
    # the prompt is rendered with the chat template, the loss is on the replies only
    chosen = tokenizer.decode([t for t in pairs[0]["chosen_labels"] if t != -100])
    rejected = tokenizer.decode([t for t in pairs[0]["rejected_labels"] if t != -100])
    assert "Paris." in chosen and "Lyon." in rejected and "France" not in chosen
    assert "Be brief." in tokenizer.decode(pairs[0]["chosen_input_ids"])


def test_ratings_become_kto_examples_the_kto_loader_reads(tmp_path, tokenizer):
    from posttrain.config import PairDataConfig
    from posttrain.data.examples import split_pairs

    db = tmp_path / "fb.db"
    ids = populate(db)
    records, report = feedback_records(db, "unpaired")
    # c1-1 was rated up, then down: the later rating wins
    assert [(r["completion"], r["label"]) for r in records] == [("Lyon.", False), ("4", True), (" green.", False)]
    assert records[0]["meta"]["feedback_id"] == ids["rating_new"] and report["superseded"] == 1
    out = tmp_path / "kto.jsonl"
    export_feedback(db, out, "unpaired", rules={"near_dedup": {"enabled": False}})
    data = PairDataConfig(train=str(out), max_length=128)
    examples, held, data_report = split_pairs(tokenizer, data, seed=0, unpaired=True)  # what `dpo.loss=kto` reads
    assert data_report["kind"] == "unpaired" and data_report["examples"] == 3 and data_report["desirable"] == 1
    assert [e["desirable"] for e in examples] == [False, True, False] and held is None
    assert all("kl_input_ids" in e for e in examples)  # KTO's mismatched KL rows were built


def test_since_latest_wins_and_unusable_rows_are_counted(tmp_path):
    db = tmp_path / "fb.db"
    populate(db)
    store = open_store(db)
    store.add_conversation(conversation("c4", [{"role": "user", "content": "hi"}]),
                           [reply("c4-0", "same"), reply("c4-1", "same")])
    store.add_conversation(conversation("c5", [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "Hel"}]),
                           [reply("c5-0", "lo"), reply("c5-1", "p")])
    later = store.add_choice("c4-0", "c4-1")  # identical texts: no signal
    store.add_choice("c5-1", "c5-0")  # a prefilled assistant turn: the formats need a final user turn
    flipped = store.add_choice("c1-1", "c1-0")  # changes the earlier choice on the same pair
    rows = store.feedback()
    store.close()
    records, report = feedback_records(db, "preference")
    assert report["skipped"] == {"same_text": 1, "prompt_not_user_turn": 1} and report["superseded"] == 1
    assert [r["chosen"] for r in records] == ["4", " blue.", "Lyon."]  # c1's choice is now its latest
    assert records[-1]["meta"]["feedback_id"] == flipped
    since = next(r["created_at"] for r in rows if r["id"] == later)
    records, report = feedback_records(db, "preference", since=since.replace("Z", "+00:00"))
    assert [r["meta"]["feedback_id"] for r in records] == [flipped] and report["feedback_rows"] == 3
    with pytest.raises(ValueError, match="no usable choices between two replies since 2999-01-01 to export .0 feedback rows"):
        export_feedback(db, tmp_path / "none.jsonl", since="2999-01-01")
    assert not (tmp_path / "none.jsonl").exists()


def test_export_runs_the_data_filters(tmp_path):
    db = tmp_path / "fb.db"
    store = open_store(db)
    for i in range(3):  # the same exchange three times: two are exact duplicates
        store.add_conversation(conversation(f"d{i}", [{"role": "user", "content": "mail bob@example.com"}]),
                               [reply(f"d{i}-0", "Done, call 555-123-4567."), reply(f"d{i}-1", "No.")])
        store.add_choice(f"d{i}-0", f"d{i}-1")
    store.close()
    out = tmp_path / "pairs.jsonl"
    report = export_feedback(db, out)  # default rules: dedup + PII redaction
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert len(rows) == 1 and report["filters"]["drop_counts"] == {"exact_duplicate": 2}
    assert rows[0]["prompt"][0]["content"] == "mail [EMAIL]" and rows[0]["chosen"] == "Done, call [PHONE]."
    with pytest.raises(ValueError, match="dropped every row"):
        export_feedback(db, tmp_path / "b.jsonl", rules=FilterRules(blocklist=["mail"]))


def test_redact_value_keeps_roles():
    value, n = redact_value([{"role": "user", "content": "me@example.org or 4111 1111 1111 1111"}])
    assert value == [{"role": "user", "content": "[EMAIL] or [CARD]"}] and n == 2
    assert redact_value("no pii") == ("no pii", 0) and redact_value(None) == (None, 0)


# ------------------------------------------------------------------------------ PostgreSQL


def _pg_bin() -> Path | None:
    found = shutil.which("initdb")
    if found:
        return Path(found).parent
    versions = sorted(Path("/usr/lib/postgresql").glob("*/bin/initdb"))
    return versions[-1].parent if versions else None


@pytest.fixture
def postgres_url(tmp_path):
    """A throwaway PostgreSQL server on a Unix socket in tmp_path (skipped when psycopg or the
    server binaries are missing). As root it runs as the `postgres` user, as PostgreSQL demands."""
    pytest.importorskip("psycopg")
    bindir = _pg_bin()
    if bindir is None:
        pytest.skip("no PostgreSQL server binaries (apt-get install postgresql)")
    prefix: list[str] = []
    if os.geteuid() == 0:
        if shutil.which("runuser") is None:
            pytest.skip("running as root without runuser: cannot start PostgreSQL as another user")
        try:
            import pwd

            pwd.getpwnam("postgres")
        except KeyError:
            pytest.skip("running as root and there is no 'postgres' user to run the server as")
        prefix = ["runuser", "-u", "postgres", "--"]
    home = Path(f"/tmp/pgtest-{os.getpid()}-{time.monotonic_ns()}")  # a short path: socket names are limited
    home.mkdir(mode=0o700)
    if prefix:
        shutil.chown(home, "postgres", "postgres")
    data = home / "data"
    run = lambda *cmd: subprocess.run(prefix + [str(bindir / cmd[0]), *cmd[1:]], check=True,  # noqa: E731
                                      capture_output=True, text=True, timeout=120)
    try:
        run("initdb", "-D", str(data), "-A", "trust", "-U", "postgres", "--no-sync")
        run("pg_ctl", "-D", str(data), "-l", str(home / "log"), "-w", "-t", "60", "-o",
            f"-k {home} -c listen_addresses='' -p 5433 -c fsync=off", "start")
    except (subprocess.CalledProcessError, subprocess.TimeoutExpired) as exc:
        shutil.rmtree(home, ignore_errors=True)
        pytest.skip(f"could not start a local PostgreSQL: {getattr(exc, 'stderr', exc)}")
    try:
        yield f"postgresql://postgres@/postgres?host={home}&port=5433"
    finally:
        run("pg_ctl", "-D", str(data), "-m", "immediate", "-w", "stop")
        shutil.rmtree(home, ignore_errors=True)


def test_postgres_store_and_export(postgres_url, tmp_path, tokenizer):
    from posttrain.data.examples import load_pairs

    ids = populate(postgres_url)
    store = open_store(postgres_url)  # a second open keeps the tables and their rows
    assert store.journal_mode() == "postgresql"
    with pytest.raises(UnknownReplies):
        store.add_rating("nope", "up")
    with pytest.raises(DifferentPrompts):
        store.add_choice("c1-0", "c2-0")
    assert store.conversation("c2")["model"] == "math"
    assert store.recent_ratings(10) == [True, False, True, False]  # oldest first: up, down, up, down
    sqlite_db = tmp_path / "fb.db"
    populate(sqlite_db)
    for kind in ("preference", "unpaired"):  # the same statements give the same records on both engines
        pg, _ = feedback_records(postgres_url, kind)
        lite, _ = feedback_records(sqlite_db, kind)
        strip = lambda rows: [{k: v for k, v in r.items() if k != "meta"} for r in rows]  # noqa: E731
        assert strip(pg) == strip(lite) and len(pg) == 3
    out = tmp_path / "pg.jsonl"
    export_feedback(postgres_url, out, rules={"near_dedup": {"enabled": False}})
    assert load_pairs(tokenizer, str(out), max_length=128, skip_invalid=False)[1]["pairs"] == 3
    assert ids["choice1"] in out.read_text()

    import psycopg

    with psycopg.connect(postgres_url, autocommit=True) as admin:  # the server drops the store's connection
        admin.execute("SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE pid <> pg_backend_pid() "
                      "AND datname = current_database()")
    with pytest.raises(psycopg.OperationalError):
        store.add_rating("c2-1", "up")  # this write fails (and is reported)...
    store.add_rating("c2-1", "up")  # ...the next one reconnects
    assert store.recent_ratings(1) == [True]
    store.close()

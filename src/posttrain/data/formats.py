"""Data records: reading files and validating each row against its kind.

Every stage reads its data through `load_records`, so a bad row is reported the
same way everywhere: ``file:line: field 'x' ...`` (JSONL/CSV: 1-based line) or
``file[index]: field 'x' ...`` (JSON array, Parquet, `datasets` directory).

Kinds (detected from the fields of the first row, or forced with ``kind=``):

| kind       | fields                                                      |
|------------|-------------------------------------------------------------|
| chat       | ``messages: [{role, content}]``, at least one assistant turn |
| completion | ``prompt: str``, ``completion: str``                          |
| text       | ``text: str``                                                 |
| preference | ``prompt``, ``chosen``, ``rejected``: strings or message lists; |
|            | ``prompt`` may be left out when chosen/rejected are messages  |
| prompt     | ``prompt`` (string or messages), optional ``answer``          |
| unpaired   | ``prompt``, ``completion`` (strings or message lists), ``label``: |
|            | bool (desirable or not; TRL's unpaired preference format, KTO) |

Extra fields (``task``, ``answer``, ids...) are kept as they are; ``task``, when
present, must be a non-empty string (it selects a task adapter).
"""

from __future__ import annotations

import csv
import gzip
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

from posttrain.fileio import read_text_utf8, utf8_error

KINDS = ("chat", "completion", "text", "preference", "prompt", "unpaired")
ROLES = ("system", "user", "assistant")
MAX_REASONS = 5  # skip reasons kept in LoadedData


class DataError(ValueError):
    """A data file or row that cannot be used; the message names file, row and field."""


@dataclass
class LoadedData:
    records: list[dict]
    kind: str
    source: str
    skipped: int = 0
    skip_reasons: list[str] = field(default_factory=list)  # the first few only


# ---------------------------------------------------------------- readers
# Each reader yields (location, row-or-error): location is "path:LINE" or
# "path[INDEX]"; a row that could not even be parsed comes as a DataError so the
# caller can skip or raise it like any other bad row.

def iter_jsonl(path: str | Path) -> Iterator[tuple[int, Any]]:
    """(line number, parsed value) per non-blank line of a JSONL file (gzipped if it ends in .gz).

    A malformed line yields a DataError in place of its value instead of raising, so a
    caller that skips bad rows can; `read_jsonl` is the raising form.
    """
    opener = gzip.open if str(path).endswith(".gz") else open
    with opener(path, "rb") as f:  # bytes, decoded per line: a bad byte is that line's error
        for n, raw in enumerate(f, 1):
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as e:
                yield n, DataError(utf8_error(raw, e, path, n))
                continue
            if not line.strip():
                continue
            try:
                yield n, json.loads(line.rstrip("\r\n"))
            except json.JSONDecodeError as e:
                yield n, DataError(f"{path}:{n}: malformed JSON ({e.msg} at column {e.colno})")


def read_jsonl(path: str | Path) -> list[tuple[int, dict]]:
    """Every row of a JSONL file as (line number, object); the first bad line raises DataError."""
    rows = []
    for n, value in iter_jsonl(path):
        if isinstance(value, DataError):
            raise value
        if not isinstance(value, dict):
            raise DataError(f"{path}:{n}: expected a JSON object, got {type(value).__name__}")
        rows.append((n, value))
    return rows


def _read_jsonl(path: Path) -> Iterator[tuple[str, Any]]:
    for n, value in iter_jsonl(path):
        yield f"{path}:{n}", value


def _read_json(path: Path) -> Iterator[tuple[str, Any]]:
    try:
        text = read_text_utf8(path)
    except ValueError as e:
        raise DataError(str(e)) from None
    try:
        data = json.loads(text)
    except json.JSONDecodeError as e:
        first = text.lstrip().split("\n", 1)[0]
        try:  # a .json file that is really JSON Lines
            json.loads(first)
        except json.JSONDecodeError:
            raise DataError(f"{path}:{e.lineno}: malformed JSON ({e.msg} at column {e.colno})") from None
        yield from _read_jsonl(path)
        return
    if isinstance(data, dict) and isinstance(data.get("data"), list):
        data = data["data"]
    if not isinstance(data, list):
        raise DataError(f"{path}: expected a JSON array of objects or {{\"data\": [...]}}; "
                        f"got {type(data).__name__}")
    for i, row in enumerate(data):
        yield f"{path}[{i}]", row


def _maybe_json_list(value: Any) -> Any:
    """CSV cells are strings: decode a cell that holds a JSON list (messages)."""
    if isinstance(value, str) and value.lstrip().startswith("["):
        try:
            decoded = json.loads(value)
        except json.JSONDecodeError:
            return value
        if isinstance(decoded, list) and all(isinstance(m, dict) for m in decoded):
            return decoded
    return value


def _not_utf8(cells: dict[str, Any] | list[str]) -> str | None:
    """The first cell (field name for a row, header position for the header) holding a
    byte that was not UTF-8 ("surrogateescape" decodes byte 0xNN as U+DCNN), described."""
    items = cells.items() if isinstance(cells, dict) else enumerate(cells, 1)
    for key, value in items:
        bad = next((c for c in value or "" if "\udc80" <= c <= "\udcff"), None)
        if bad is not None:
            what = f"field '{key}'" if isinstance(cells, dict) else f"header column {key}"
            return f"{what} is not valid UTF-8 (byte 0x{ord(bad) - 0xDC00:02x}); save the file as UTF-8"
    return None


def _csv_bool(value: str) -> Any:
    """A CSV `label` cell "true"/"false" (any case) as a bool; anything else stays a string (and is refused)."""
    return {"true": True, "false": False}.get(value.strip().lower(), value)


def _read_csv(path: Path) -> Iterator[tuple[str, Any]]:
    with open(path, encoding="utf-8", errors="surrogateescape", newline="") as f:
        reader = csv.DictReader(f)
        problem = _not_utf8(reader.fieldnames or [])
        if problem:
            raise DataError(f"{path}:1: {problem}")
        start = 2  # line 1 is the header
        for row in reader:
            loc = f"{path}:{start}"
            start = reader.line_num + 1  # quoted cells may span lines
            problem = _not_utf8({k: v for k, v in row.items() if isinstance(v, str)})
            if problem:
                yield loc, DataError(f"{loc}: {problem}")
                continue
            if None in row:
                yield loc, DataError(f"{loc}: more cells than the header has columns")
                continue
            if any(v is None for v in row.values()):
                yield loc, DataError(f"{loc}: fewer cells than the header has columns")
                continue
            yield loc, {k: _maybe_json_list(v) if k in ("messages", "prompt", "chosen", "rejected", "completion")
                        else _csv_bool(v) if k == "label" else v for k, v in row.items()}


def _read_parquet(path: Path) -> Iterator[tuple[str, Any]]:
    import pyarrow.parquet as pq

    try:
        rows = pq.read_table(path).to_pylist()
    except Exception as e:  # pyarrow raises several types for a corrupt file
        raise DataError(f"{path}: cannot read as Parquet ({e})") from e
    for i, row in enumerate(rows):
        yield f"{path}[{i}]", row


def _read_datasets_dir(path: Path) -> Iterator[tuple[str, Any]]:
    import datasets

    try:
        ds = datasets.load_from_disk(str(path))
    except Exception as e:
        raise DataError(f"{path}: not a `datasets` directory saved with save_to_disk ({e})") from e
    if isinstance(ds, datasets.DatasetDict):
        raise DataError(f"{path}: holds splits {sorted(ds)}; point at one of them, e.g. {path / next(iter(ds))}")
    for i, row in enumerate(ds):
        yield f"{path}[{i}]", row


READERS = {".jsonl": _read_jsonl, ".ndjson": _read_jsonl, ".json": _read_json,
           ".csv": _read_csv, ".parquet": _read_parquet, ".pq": _read_parquet}


def _rows(path: Path) -> Iterator[tuple[str, Any]]:
    if path.is_dir():
        return _read_datasets_dir(path)
    if not path.exists():
        raise DataError(f"{path}: no such file or directory")
    reader = READERS.get(path.suffix.lower())
    if reader is None:
        raise DataError(f"{path}: unknown data format {path.suffix!r}; use one of "
                        f"{', '.join(sorted(READERS))} or a `datasets` directory")
    return reader(path)


# ---------------------------------------------------------------- validation
# Validators return None when the row is fine, else "field 'x' <problem>".

def _describe(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def _check_messages(value: Any, name: str, need_assistant: bool) -> str | None:
    if not isinstance(value, list) or not value:
        return f"field '{name}' must be a non-empty list of {{role, content}}; got {_describe(value)}"
    for i, m in enumerate(value):
        if not isinstance(m, dict):
            return f"field '{name}[{i}]' must be an object with role and content; got {_describe(m)}"
        if m.get("role") not in ROLES:
            return f"field '{name}[{i}].role' must be one of {', '.join(ROLES)}; got {_describe(m.get('role'))}"
        if not isinstance(m.get("content"), str):
            return f"field '{name}[{i}].content' must be a string; got {_describe(m.get('content'))}"
    if need_assistant and not any(m["role"] == "assistant" for m in value):
        return f"field '{name}' has no assistant turn (nothing to train on)"
    return None


def _check_str(record: dict, name: str, nonempty: bool = False) -> str | None:
    if name not in record or record[name] is None:
        return f"field '{name}' is missing"
    value = record[name]
    if not isinstance(value, str):
        return f"field '{name}' must be a string; got {_describe(value)}"
    if nonempty and not value.strip():
        return f"field '{name}' is empty"
    return None


def _check_text_or_messages(record: dict, name: str) -> str | None:
    value = record.get(name)
    if isinstance(value, list):
        return _check_messages(value, name, need_assistant=False)
    return _check_str(record, name, nonempty=True)


def _check_preference(record: dict) -> str | None:
    for name in ("chosen", "rejected"):
        if (problem := _check_text_or_messages(record, name)):
            return problem
    if type(record["chosen"]) is not type(record["rejected"]):
        return "fields 'chosen' and 'rejected' must both be strings or both be message lists"
    if record.get("prompt") is None and isinstance(record["chosen"], list):
        return None  # implicit prompt: the shared leading messages
    return _check_text_or_messages(record, "prompt")


def _check_unpaired(record: dict) -> str | None:
    for name in ("prompt", "completion"):
        if (problem := _check_text_or_messages(record, name)):
            return problem
    if not isinstance(record.get("label"), bool):
        return f"field 'label' must be true or false (desirable or not); got {_describe(record.get('label'))}"
    return None


def validate(record: Any, kind: str) -> str | None:
    """Problem with one row as ``kind`` ("field 'x' ..."), or None when it is valid."""
    if not isinstance(record, dict):
        return f"row must be a JSON object; got {_describe(record)}"
    if kind == "chat":
        problem = _check_messages(record.get("messages"), "messages", need_assistant=True)
    elif kind == "completion":
        problem = _check_str(record, "prompt", nonempty=True) or _check_str(record, "completion")
    elif kind == "text":
        problem = _check_str(record, "text", nonempty=True)
    elif kind == "preference":
        problem = _check_preference(record)
    elif kind == "prompt":
        problem = _check_text_or_messages(record, "prompt")
    elif kind == "unpaired":
        problem = _check_unpaired(record)
    else:
        raise ValueError(f"unknown kind {kind!r}; expected one of {', '.join(KINDS)}")
    if problem is None and "task" in record and not (isinstance(record["task"], str) and record["task"]):
        problem = f"field 'task' must be a non-empty string; got {_describe(record['task'])}"
    return problem


def detect_kind(record: Any) -> str | None:
    """The kind a row's fields point to (None when none fits)."""
    if not isinstance(record, dict):
        return None
    has = {k for k, v in record.items() if v is not None}
    if "messages" in has:
        return "chat"
    if {"chosen", "rejected"} <= has:
        return "preference"
    if {"prompt", "completion", "label"} <= has:
        return "unpaired"
    if {"prompt", "completion"} <= has:
        return "completion"
    if "prompt" in has:
        return "prompt"
    if "text" in has:
        return "text"
    return None


# ---------------------------------------------------------------- loading

def load_records(path: str | Path, kind: str | None = None, skip_invalid: bool = False) -> LoadedData:
    """Read and validate every row of a JSONL/JSON/Parquet/CSV file or `datasets` directory.

    The kind comes from the first row unless forced. A row that does not fit raises
    DataError (or, with ``skip_invalid``, is counted and skipped). When the kind is
    detected, a later row whose fields point to a *different* kind always raises,
    naming that row: a file that mixes kinds is a mistake, not noise. Forcing ``kind=``
    turns such rows into ordinary invalid (skippable) rows or accepts them as extras.
    """
    path = Path(path)
    if kind is not None and kind not in KINDS:
        raise DataError(f"unknown kind {kind!r}; expected one of {', '.join(KINDS)}")
    records: list[dict] = []
    reasons: list[str] = []
    skipped = seen = 0
    origin = None  # where the detected kind came from

    def bad(message: str) -> None:
        nonlocal skipped
        if not skip_invalid:
            raise DataError(message)
        skipped += 1
        if len(reasons) < MAX_REASONS:
            reasons.append(message)

    for loc, row in _rows(path):
        seen += 1
        if isinstance(row, DataError):
            bad(str(row))
            continue
        detected = detect_kind(row) if origin is not None or kind is None else None
        if kind is None:
            if detected is None:
                bad(f"{loc}: cannot tell the record kind: expected fields 'messages' (chat), "
                    f"'prompt'+'completion', 'text', 'prompt'+'chosen'+'rejected', "
                    f"'prompt'+'completion'+'label' or 'prompt'")
                continue
            kind, origin = detected, loc
        problem = validate(row, kind)
        if detected not in (None, kind):
            why = f" ({problem})" if problem else ""
            raise DataError(f"{loc}: row looks like a '{detected}' record but the file's kind is '{kind}' "
                            f"(detected from {origin}){why}; mixed kinds in one file? force one with kind=")
        if problem is not None:
            bad(f"{loc}: {problem}")
            continue
        records.append(dict(row))

    if seen == 0:
        raise DataError(f"{path}: no records (empty file)")
    if not records:
        raise DataError(f"{path}: no valid records; {skipped} skipped, first: {reasons[0]}")
    return LoadedData(records=records, kind=kind, source=str(path), skipped=skipped, skip_reasons=reasons)

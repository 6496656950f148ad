"""Atomic file writes: a temp file in the target's directory, fsync, then os.replace.

A crash leaves either the old file or the new one, never half of one. Also the strict
UTF-8 decoding of user files, so a bad byte is reported with its file and line.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Callable, Iterator


def _umask_mode(full: int) -> int:
    """`full` (0o666 files, 0o777 dirs) less the process umask: what open()/mkdir() would give.
    mkstemp/mkdtemp create 0600/0700, which would make every output private to its writer."""
    mask = os.umask(0)
    os.umask(mask)
    return full & ~mask


def atomic_write(path: str | os.PathLike, write: Callable[[str], Any]) -> Path:
    """Call write(tmp_path), then rename the temp file over `path`; it never survives a failure."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp" + path.suffix, dir=path.parent)
    os.close(fd)
    try:
        os.chmod(tmp, _umask_mode(0o666))
        write(tmp)
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def temp_dir_beside(final: str | os.PathLike) -> Path:
    """A fresh temp dir next to `final` (same filesystem, so `publish_dir` is a rename).

    Its name starts with '.', which readers of checkpoint/model folders skip.
    """
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.", dir=final.parent))
    tmp.chmod(_umask_mode(0o777))
    return tmp


def publish_dir(tmp: str | os.PathLike, final: str | os.PathLike) -> None:
    """Rename a fully written temp dir over `final`; an older copy is moved aside first,
    so at every instant `final` is either the old complete dir or the new one."""
    tmp, final = Path(tmp), Path(final)
    if final.exists():
        old = final.with_name(f".{final.name}.old.{os.getpid()}")
        os.replace(final, old)
        os.replace(tmp, final)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(tmp, final)


@contextmanager
def atomic_dir(final: str | os.PathLike) -> Iterator[Path]:
    """Yield a temp dir beside `final`; when the block ends normally it replaces `final`
    (`publish_dir`), and when the block raises it is removed and the error goes on."""
    tmp = temp_dir_beside(final)
    try:
        yield tmp
        publish_dir(tmp, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def write_text_atomic(path: str | os.PathLike, text: str) -> Path:
    return atomic_write(path, lambda tmp: Path(tmp).write_text(text, encoding="utf-8"))


def write_json_atomic(path: str | os.PathLike, obj: Any, default: Callable | None = None) -> Path:
    """Indented JSON; `default` as in json.dump (e.g. str for paths in manifests)."""

    def write(tmp: str) -> None:
        with open(tmp, "w", encoding="utf-8") as f:
            json.dump(obj, f, indent=2, ensure_ascii=False, default=default)
            f.write("\n")

    return atomic_write(path, write)


def decode_utf8(data: bytes, where: str | os.PathLike, first_line: int = 1) -> str:
    """Decode bytes read from a user file; invalid UTF-8 raises ValueError naming file, line and byte.

    Why: Python's own UnicodeDecodeError says "byte 0xff in position 103" with no file or line.
    `first_line` is the line number of data's first byte (a caller decoding one line passes it).
    """
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise ValueError(utf8_error(data, exc, where, first_line)) from None


def utf8_error(data: bytes, exc: UnicodeDecodeError, where: str | os.PathLike, first_line: int = 1) -> str:
    """'FILE:LINE: not valid UTF-8 (byte 0xff at column C)...' for a failed decode of `data`."""
    before = data[: exc.start]
    line = first_line + before.count(b"\n")
    column = exc.start - (before.rfind(b"\n") + 1) + 1  # 1-based, counted in bytes
    return (f"{where}:{line}: not valid UTF-8 (byte 0x{data[exc.start]:02x} at column {column}); "
            "save the file as UTF-8")


def read_text_utf8(path: str | os.PathLike) -> str:
    """A user's text file as str; invalid UTF-8 raises ValueError naming the file and line."""
    return decode_utf8(Path(path).read_bytes(), path)

"""Atomic file writes: a temp file in the target's directory, fsync, then os.replace.

A crash leaves either the old file or the new one, never half of one.
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

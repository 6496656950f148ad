"""Atomic writes: the result replaces the target whole, and has the permissions a plain write would."""

import os
import re

import pytest

from posttrain.fileio import atomic_dir, atomic_write, publish_dir, temp_dir_beside, write_json_atomic, write_text_atomic


@pytest.fixture
def umask_022():
    old = os.umask(0o022)
    yield
    os.umask(old)


def test_files_and_dirs_get_the_umask_permissions_not_the_temp_files_0600(tmp_path, umask_022):
    write_text_atomic(tmp_path / "a.txt", "x")
    write_json_atomic(tmp_path / "b.json", {"a": 1})
    plain = tmp_path / "plain.txt"
    plain.write_text("x")
    for name in ("a.txt", "b.json"):
        assert (tmp_path / name).stat().st_mode & 0o777 == plain.stat().st_mode & 0o777 == 0o644
    tmp = temp_dir_beside(tmp_path / "final")
    (tmp / "w.bin").write_bytes(b"1")
    publish_dir(tmp, tmp_path / "final")
    assert (tmp_path / "final").stat().st_mode & 0o777 == 0o755


def test_a_failed_write_leaves_the_old_file_and_no_temp(tmp_path):
    target = tmp_path / "t.json"
    write_json_atomic(target, {"v": 1})

    def boom(tmp):
        open(tmp, "w").write("half")
        raise RuntimeError("disk full")

    with pytest.raises(RuntimeError):
        atomic_write(target, boom)
    assert target.read_text().strip().startswith("{") and '"v": 1' in target.read_text()
    assert [p.name for p in tmp_path.iterdir()] == ["t.json"]


def test_atomic_dir_publishes_whole_or_not_at_all(tmp_path):
    final = tmp_path / "out"
    with atomic_dir(final) as tmp:
        (tmp / "a.txt").write_text("new")
    assert (final / "a.txt").read_text() == "new"
    with pytest.raises(RuntimeError, match="half written"):
        with atomic_dir(final) as tmp:
            (tmp / "a.txt").write_text("broken")
            raise RuntimeError("half written")
    assert (final / "a.txt").read_text() == "new"  # the old complete dir stays
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]  # no temp dir left behind


def test_read_text_utf8_names_file_line_column_and_byte(tmp_path):
    from posttrain.fileio import read_text_utf8

    path = tmp_path / "notes.txt"
    path.write_bytes("héllo\nsecond line\nthird ".encode() + b"\xfe" + b" end\n")
    with pytest.raises(ValueError, match=re.escape(f"{path}:3: not valid UTF-8 (byte 0xfe at column 7)")):
        read_text_utf8(path)
    path.write_bytes("héllo\n".encode())
    assert read_text_utf8(path) == "héllo\n"

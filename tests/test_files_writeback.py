"""Large files are handed to the disk as they are written (``files.write_synced``)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from provisioner.targets import files
from provisioner.targets.files import WRITEBACK_STEP, write_synced
from provisioner.targets.pieces import Pieces


def _large() -> Pieces:
    """Three writeback steps and a bit, spliced: pieces of several sizes."""
    base = bytes(range(256)) * (3 * WRITEBACK_STEP // 256 + 17)
    return Pieces.of(base).splice(WRITEBACK_STEP - 5, WRITEBACK_STEP + 5, b"[1001]\n")


def test_a_file_of_several_writeback_steps_is_written_whole(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A file larger than a writeback step, from spliced pieces (a 7-byte one among
    them), reads back as its bytes, and the kernel was asked (libc's own call, each
    answer 0) to write out each whole step once it was written, in order, and nothing
    else: the last part, under a step, is the fsync's."""
    real = files._SYNC_FILE_RANGE
    if real is None:
        pytest.skip("no sync_file_range here")
    asked: list[tuple[int, int, int]] = []

    def recorded(fd: int, offset: int, length: int, flags: int) -> int:
        written = os.fstat(fd).st_size
        answer = real(fd, offset, length, flags)
        asked.append((offset, length, answer))
        assert offset + length <= written  # asked only for bytes already written
        return answer

    monkeypatch.setattr(files, "_SYNC_FILE_RANGE", recorded)
    data = _large()
    path = tmp_path / "pjsip_users.conf"
    write_synced(path, data)
    assert path.read_bytes() == data.tobytes()
    assert os.stat(path).st_mode & 0o777 == files.FILE_MODE
    steps = len(data) // WRITEBACK_STEP
    assert steps == 3
    assert asked == [(k * WRITEBACK_STEP, WRITEBACK_STEP, 0) for k in range(steps)]


def test_a_refused_writeback_request_still_writes_the_file_whole(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A file system that refuses ``sync_file_range`` only ends the requests: the file is
    written whole and fsynced all the same."""
    asked: list[int] = []

    def refused(fd: int, offset: int, length: int, flags: int) -> int:
        asked.append(offset)
        return -1

    monkeypatch.setattr(files, "_SYNC_FILE_RANGE", refused)
    data = _large()
    path = tmp_path / "pjsip_users.conf"
    write_synced(path, data)
    assert path.read_bytes() == data.tobytes()
    assert asked == [0]  # asked once, then no more


def test_linux_has_the_writeback_request() -> None:
    """On Linux the writeback request is libc's ``sync_file_range``."""
    if os.uname().sysname != "Linux":
        pytest.skip("Linux only")
    assert files._SYNC_FILE_RANGE is not None

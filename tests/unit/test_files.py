"""In-process tests of preforkd.files and the pidfile lock: the rules for files preforkd
creates or reads (no symlinks, no FIFOs, bounded reads, runtime directories, Unix
socket identity) and who holds a pidfile's lock."""

from __future__ import annotations

import errno
import os
from pathlib import Path

import pytest

from preforkd.files import read_regular_file

# -- reading ----------------------------------------------------------------------------


def test_read_regular_file_refuses_a_fifo_without_waiting_for_a_writer(tmp_path: Path) -> None:
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    with pytest.raises(OSError) as info:
        read_regular_file(str(fifo), 1024)
    assert info.value.errno == errno.EINVAL and info.value.strerror == "not a regular file"


def test_read_regular_file_is_bounded(tmp_path: Path) -> None:
    path = tmp_path / "f"
    path.write_bytes(b"x" * 100)
    assert read_regular_file(str(path), 100) == b"x" * 100
    with pytest.raises(OSError) as info:
        read_regular_file(str(path), 99)
    assert info.value.errno == errno.EFBIG

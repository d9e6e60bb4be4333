"""In-process tests of preforkd.files and the pidfile lock: the rules for files preforkd
creates or reads (no symlinks, no FIFOs, bounded reads, runtime directories, Unix
socket identity) and who holds a pidfile's lock."""

from __future__ import annotations

import errno
import os
import socket
import stat
import subprocess
import sys
from pathlib import Path

import pytest

from preforkd.files import (
    UnsafePathError,
    bound_file_id,
    ensure_runtime_dir,
    open_nofollow,
    read_regular_file,
    runtime_dir_problem,
    secure_socket_file,
)
from preforkd.pidfile import Pidfile, PidfileError, lock_holder

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


# -- opening without following a symlink -------------------------------------------


def test_open_nofollow_refuses_a_symlink_and_names_it(tmp_path: Path) -> None:
    target = tmp_path / "target"
    target.write_text("keep\n")
    link = tmp_path / "link"
    link.symlink_to(target)
    with pytest.raises(OSError) as info:
        open_nofollow(str(link), os.O_WRONLY | os.O_APPEND | os.O_CREAT)
    assert info.value.errno == errno.ELOOP and "is a symbolic link" in str(info.value.strerror)
    assert target.read_text() == "keep\n"


def test_open_nofollow_regular_refuses_a_fifo_at_once(tmp_path: Path) -> None:
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    with pytest.raises(OSError) as info:
        open_nofollow(str(fifo), os.O_RDONLY, regular=True)
    assert info.value.errno == errno.EINVAL


# -- runtime directories ----------------------------------------------------------------


def test_runtime_dir_rules(tmp_path: Path) -> None:
    ok = tmp_path / "ok"
    ensure_runtime_dir(str(ok / "deeper"))
    assert stat.S_IMODE(os.stat(ok).st_mode) & 0o022 == 0
    assert runtime_dir_problem(str(ok / "deeper"), daemon=True) is None
    assert runtime_dir_problem(str(tmp_path / "missing"), daemon=True) is None
    wide = tmp_path / "wide"
    wide.mkdir()
    wide.chmod(0o777)
    assert "is writable by others" in str(runtime_dir_problem(str(wide), daemon=True))
    with pytest.raises(UnsafePathError):
        ensure_runtime_dir(str(wide))
    sticky = tmp_path / "sticky"
    sticky.mkdir()
    sticky.chmod(0o1777)  # like /tmp: fine above a runtime directory, not as one
    (sticky / "mine").mkdir(mode=0o700)
    assert runtime_dir_problem(str(sticky / "mine"), daemon=True) is None
    assert "writable by others" in str(runtime_dir_problem(str(sticky), daemon=True))
    link = tmp_path / "link"
    link.symlink_to(wide)  # a symlink is judged by where it leads too
    assert "writable by others" in str(runtime_dir_problem(str(link), daemon=True))


# -- Unix socket files ------------------------------------------------------------------


def test_bound_file_id_and_secure_socket_file(tmp_path: Path) -> None:
    path = tmp_path / "s.sock"
    with socket.socket(socket.AF_UNIX) as sock:
        old = os.umask(0o077)
        try:
            sock.bind(str(path))
        finally:
            os.umask(old)
        st = os.lstat(path)
        reported = bound_file_id(sock)
        if reported is not None:  # None where sock_diag(7) is not available
            assert reported == (st.st_dev, st.st_ino & 0xFFFFFFFF)
        assert secure_socket_file(sock, str(path), 0o640, (-1, -1)) == (st.st_dev, st.st_ino)
        assert stat.S_IMODE(os.lstat(path).st_mode) == 0o640
        os.unlink(path)
        path.symlink_to(tmp_path / "elsewhere")
        with pytest.raises(UnsafePathError, match="replaced by a symbolic link"):
            secure_socket_file(sock, str(path), 0o640, (-1, -1))


# -- the pidfile's lock -----------------------------------------------------------------

HOLDER = "import fcntl, os, sys; fd = os.open(sys.argv[1], os.O_RDWR); fcntl.lockf(fd, fcntl.LOCK_EX); " \
         "print('locked', flush=True); sys.stdin.read()"


def test_lock_holder_names_the_process_holding_the_lock_not_the_pid_written(tmp_path: Path) -> None:
    path = tmp_path / "p.pid"
    assert lock_holder(str(path)) is None  # no file
    path.write_text("1\n")
    assert lock_holder(str(path)) is None  # stale: nobody holds it, whatever it says
    holder = subprocess.Popen([sys.executable, "-c", HOLDER, str(path)], stdin=subprocess.PIPE,
                              stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout is not None and holder.stdout.readline() == "locked\n"
        assert lock_holder(str(path)) == holder.pid
        with pytest.raises(PidfileError, match=f"already running: pidfile .* is locked by pid {holder.pid}"):
            Pidfile(str(path)).acquire(os.getpid())
    finally:
        holder.kill()
        holder.wait()
    assert lock_holder(str(path)) is None


# -- the log file on SIGUSR1 ------------------------------------------------------------


def test_log_reopen_never_hands_over_a_file_with_another_link(tmp_path: Path) -> None:
    """What the master gives the workers' user on SIGUSR1 must be the log file alone:
    a hard link planted at the log's path would give away what it links to."""
    from preforkd.log import LogSink

    sink = LogSink()
    log = tmp_path / "p.log"
    sink.open(str(log))
    try:
        os.rename(log, tmp_path / "p.log.1")
        precious = tmp_path / "precious"
        precious.write_text("keep\n")
        os.link(precious, log)
        owner = os.geteuid()
        with pytest.raises(OSError, match="single link"):
            sink.reopen(owner=owner)
        os.unlink(log)
        sink.reopen(owner=owner)  # a fresh file is fine
        assert os.path.samestat(os.fstat(sink.fd), os.stat(log))
        assert precious.read_text() == "keep\n"
    finally:
        sink.close()

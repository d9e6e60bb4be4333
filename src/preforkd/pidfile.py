"""A locked pidfile, and who holds it.

The master holds a POSIX record lock (``fcntl(F_SETLK)``, a write lock on the whole
file) on its pidfile for as long as it lives, across re-exec too: the descriptor is
inherited, and record locks are kept across ``execve`` (fcntl(2)). That lock, not
the number written in the file, is what ``stop``, ``reload`` and ``status`` go by:
``fcntl(F_GETLK)`` names the process that holds it, *translated into the caller's
PID namespace* (0 when the holder is outside it; fs/locks.c
``locks_translate_pid``). A pidfile nobody holds is stale, whatever pid it names.

Why record locks and not ``flock(2)`` (which ``F_GETLK`` cannot see) or OFD locks
(for which ``F_OFD_GETLK`` reports ``l_pid = -1``)? Only a record lock tells who
holds it. Its pitfall is that a process drops all its record locks on a file when
it closes *any* descriptor of that file, so the master never opens its pidfile a
second time: everything goes through the one descriptor. It also takes a
``flock`` on that descriptor, which is what earlier versions of preforkd test.

The file is opened without following a symlink (:func:`preforkd.files.open_nofollow`)
in a checked runtime directory (:func:`preforkd.files.ensure_runtime_dir`), and
removed on a clean exit.
"""

from __future__ import annotations

import errno
import fcntl
import os
import struct
from typing import Optional

from .files import UnsafePathError, ensure_runtime_dir, open_nofollow

#: What :func:`lock_holder` returns for a holder outside the caller's PID namespace.
OUTSIDE_NAMESPACE = 0

# struct flock on Linux (64-bit off_t): short l_type, short l_whence, off_t l_start,
# off_t l_len, pid_t l_pid, padded to 32 bytes.
_FLOCK = "hhqqi4x"


class PidfileError(Exception):
    """The pidfile cannot be taken; the message is one line (e.g. already running)."""


def _holder_of(fd: int) -> Optional[int]:
    """``F_GETLK`` for a write lock on the whole file open at *fd*: ``None`` when nobody
    (else) holds a conflicting record lock, else the holder's pid as this process sees
    it (:data:`OUTSIDE_NAMESPACE` when it is not visible here)."""
    query = struct.pack(_FLOCK, fcntl.F_WRLCK, os.SEEK_SET, 0, 0, 0)
    l_type, _, _, _, l_pid = struct.unpack(_FLOCK, fcntl.fcntl(fd, fcntl.F_GETLK, query))
    if l_type == fcntl.F_UNLCK:
        return None
    return max(int(l_pid), OUTSIDE_NAMESPACE)  # -1 (an OFD lock) says as little as 0


def lock_holder(path: str) -> Optional[int]:
    """Who holds the lock on the pidfile *path*, as seen from this process.

    :returns: ``None`` when there is no such file or nobody holds it (a stale file,
        whatever pid it names); the holder's pid in this PID namespace; or
        :data:`OUTSIDE_NAMESPACE` (0) when the holder runs in a PID namespace this
        process cannot see into.
    :raises OSError: when the file exists but cannot be opened (a symlink, a FIFO...).
    """
    try:
        fd = open_nofollow(path, os.O_RDONLY, regular=True)
    except FileNotFoundError:
        return None
    try:
        return _holder_of(fd)
    finally:
        os.close(fd)  # this process holds no lock on it: closing costs nothing


class Pidfile:
    """The master's pidfile. :meth:`acquire` takes it; :meth:`remove` gives it up."""

    def __init__(self, path: str) -> None:
        self.path = path
        self.fd: Optional[int] = None

    def acquire(self, pid: int) -> None:
        """Create or take over the pidfile, lock it, and write *pid*.

        :raises PidfileError: another live supervisor holds it, the runtime directory
            is unsafe, or the file cannot be opened (a symlink, not a regular file...).
        """
        try:
            ensure_runtime_dir(os.path.dirname(self.path) or ".")
        except UnsafePathError as exc:
            raise PidfileError(f"pidfile {self.path}: {exc}") from None
        try:
            fd = open_nofollow(self.path, os.O_RDWR | os.O_CREAT, 0o644, regular=True)
        except OSError as exc:
            raise PidfileError(f"cannot open pidfile {self.path}: {exc.strerror}") from None
        try:
            fcntl.lockf(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)  # F_SETLK, whole file
        except OSError as exc:
            if exc.errno not in (errno.EACCES, errno.EAGAIN):
                os.close(fd)
                raise PidfileError(f"cannot lock pidfile {self.path}: {exc.strerror}") from None
            holder = _holder_of(fd)
            os.close(fd)
            who = ("a process in another PID namespace" if holder == OUTSIDE_NAMESPACE
                   else f"pid {holder}" if holder else "another process")
            raise PidfileError(f"already running: pidfile {self.path} is locked by {who}") from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            os.close(fd)
            raise PidfileError(f"already running: pidfile {self.path} is locked (flock) by an earlier "
                               "version of preforkd") from None
        self.fd = fd
        self.write(pid)

    def adopt(self, fd: int) -> None:
        """Keep using an inherited, already locked pidfile descriptor (re-exec). The
        record lock is taken again in case the image before was an earlier version of
        preforkd, which only held the ``flock``; it is ours already otherwise."""
        self.fd = fd
        os.set_inheritable(fd, False)
        try:
            fcntl.lockf(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            pass

    def write(self, pid: int) -> None:
        """Replace the file's contents with ``PID\\n`` (through the locked descriptor)."""
        if self.fd is None:
            return
        data = f"{pid}\n".encode()
        os.ftruncate(self.fd, 0)
        os.pwrite(self.fd, data, 0)

    def remove(self) -> None:
        """Unlink the file (if it is still ours) and release the lock."""
        if self.fd is None:
            return
        try:
            st = os.fstat(self.fd)
            cur = os.lstat(self.path)
            if (st.st_dev, st.st_ino) == (cur.st_dev, cur.st_ino):
                os.unlink(self.path)
        except OSError:
            pass
        try:
            os.close(self.fd)
        except OSError:
            pass
        self.fd = None


def take_pidfile(path: str, pid: int, inherited_fd: Optional[int], inherited_path: str) -> Optional[Pidfile]:
    """The master's pidfile at *path* ("" for none): the inherited one when a reload
    kept the path, else a newly acquired one; an inherited pidfile at another path
    (the configuration moved it, or dropped it) is removed.

    :raises PidfileError: see :meth:`Pidfile.acquire`.
    """
    old = None
    if inherited_fd is not None:
        old = Pidfile(inherited_path)
        old.adopt(inherited_fd)
        if path and inherited_path == path:
            return old
    new = None
    if path:
        new = Pidfile(path)
        new.acquire(pid)
    if old is not None:
        old.remove()
    return new

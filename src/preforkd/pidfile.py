"""A locked pidfile.

The master holds an exclusive ``flock(2)`` on the pidfile for as long as it lives
(across re-exec too: the descriptor is inherited), so a second supervisor can tell
a live owner from a stale file without trusting the pid alone. A file that is not
locked is stale when its pid is dead or now belongs to another program (checked
with psutil), and is replaced. The file is removed on a clean exit.

The file is opened without following a symlink (:func:`preforkd.files.open_nofollow`)
in a checked runtime directory (:func:`preforkd.files.ensure_runtime_dir`).
"""

from __future__ import annotations

import fcntl
import os
from typing import Optional

from .files import UnsafePathError, ensure_runtime_dir, open_nofollow


class PidfileError(Exception):
    """The pidfile cannot be taken; the message is one line (e.g. already running)."""


def read_pid(path: str) -> Optional[int]:
    """The pid written in *path*, or ``None`` if the file is missing or not a pid."""
    try:
        fd = open_nofollow(path, os.O_RDONLY, regular=True)
    except OSError:
        return None
    try:
        text = os.read(fd, 64).decode("ascii", "replace").strip()
    except OSError:
        return None
    finally:
        os.close(fd)
    return int(text) if text.isascii() and text.isdigit() and int(text) > 0 else None


def is_locked(path: str) -> bool:
    """True when some process holds the pidfile's lock (a live supervisor)."""
    try:
        fd = open_nofollow(path, os.O_RDONLY, regular=True)
    except OSError:
        return False
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
    except BlockingIOError:
        return True
    except OSError:
        return False
    finally:
        os.close(fd)
    return False


def looks_like_preforkd(pid: int) -> bool:
    """Is *pid* alive and a preforkd master (by its command line, via psutil)?

    A master names itself ``preforkd: master ...`` before it writes a pidfile; without
    that title it runs ``preforkd run|start`` or ``python -m preforkd run|start``.
    Merely mentioning preforkd is not enough: a stale pid now used by
    ``tail -f preforkd.log`` or an editor on ``preforkd.toml`` is another program.
    """
    import psutil

    try:
        cmdline = psutil.Process(pid).cmdline()
    except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
        return False
    if " ".join(cmdline).startswith("preforkd: master"):
        return True
    words = [os.path.basename(w) for w in cmdline]
    for i, word in enumerate(words):
        if word == "preforkd" and (i == 0 or words[i - 1] == "-m" or words[0].startswith("python")):
            return any(w in ("run", "start") for w in words[i + 1:])
    return False


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
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            other = read_pid(self.path)
            raise PidfileError(
                f"already running: pidfile {self.path} is locked by pid {other if other else 'unknown'}"
            ) from None
        old = read_pid(self.path)
        if old and old != pid and looks_like_preforkd(old):
            os.close(fd)
            raise PidfileError(f"already running: pid {old} in {self.path} is a live preforkd process")
        self.fd = fd
        self.write(pid)

    def adopt(self, fd: int) -> None:
        """Keep using an inherited, already locked pidfile descriptor (re-exec)."""
        self.fd = fd
        os.set_inheritable(fd, False)

    def write(self, pid: int) -> None:
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

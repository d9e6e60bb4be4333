"""Files the supervisor creates or reads, and the directories it keeps them in.

The rules (``docs/operations.md``, "Security model"), each enforced here once:

* **Never through a symbolic link.** The pidfile and the log file are opened with
  ``O_NOFOLLOW`` (open(2)): a symlink planted at their path is an error, never
  followed. They are also opened with ``O_NONBLOCK``, so a FIFO planted there cannot
  block the opener, and the pidfile must be a regular file.
* **Runtime directories** (those of the pidfile and the control socket) must belong
  to the user running preforkd and be writable by nobody else; so must every
  directory above them, except that a sticky directory (``/tmp``) may be writable
  by others, since there nobody can rename or remove what another user owns
  (the rule OpenSSH applies to ``authorized_keys``, ``safe_path()``, with the sticky
  exception that ``/tmp/preforkd-UID`` needs). Missing ones are created with mode
  0755 (less the umask).
* **Files it only reads** (the configuration) are read as regular files, without
  blocking, up to a size bound (:func:`read_regular_file`).
"""

from __future__ import annotations

import errno
import os
import stat
from typing import List, Optional

#: Mode of the runtime directories preforkd creates (the umask applies as well).
RUNTIME_DIR_MODE = 0o755


class UnsafePathError(Exception):
    """A runtime directory or file that preforkd must not use; one line naming the
    path and what is wrong with it."""


# -- opening without following a symlink ----------------------------------------------


def open_nofollow(path: str, flags: int, mode: int = 0o644, regular: bool = False) -> int:
    """``open(2)`` *path* with ``O_NOFOLLOW | O_NONBLOCK | O_NOCTTY | O_CLOEXEC`` added to
    *flags*; the descriptor is made blocking again before it is returned.

    :param mode: permission bits when ``O_CREAT`` creates the file (the umask applies).
    :param regular: refuse anything but a regular file (a FIFO, a device, a socket).
    :returns: the descriptor.
    :raises OSError: as open(2) does; for a symbolic link at *path*, ``ELOOP`` with
        the message "is a symbolic link (...)"; for a non-regular file, ``EINVAL``.
    """
    try:
        fd = os.open(path, flags | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_NOCTTY | os.O_CLOEXEC, mode)
    except OSError as exc:
        if exc.errno == errno.ELOOP and _is_symlink(path):
            raise OSError(errno.ELOOP, "is a symbolic link (preforkd never opens its files through one)",
                          path) from None
        raise
    try:
        if regular and not stat.S_ISREG(os.fstat(fd).st_mode):
            raise OSError(errno.EINVAL, "is not a regular file", path)
        os.set_blocking(fd, True)
    except BaseException:
        os.close(fd)
        raise
    return fd


def _is_symlink(path: str) -> bool:
    try:
        return stat.S_ISLNK(os.lstat(path).st_mode)
    except OSError:
        return False


def read_regular_file(path: str, limit: int) -> bytes:
    """The contents of the regular file *path*, read without ever blocking on it.

    It is opened with ``O_NONBLOCK`` (a FIFO then opens at once instead of waiting for
    a writer, open(2)) and checked with ``fstat`` before anything is read.

    :param limit: the largest size accepted, in bytes.
    :raises OSError: cannot be opened (``strerror`` says why), is not a regular file
        (``EINVAL``), or is larger than *limit* (``EFBIG``).
    """
    fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_NOCTTY | os.O_CLOEXEC)
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise OSError(errno.EINVAL, "not a regular file", path)
        if st.st_size > limit:
            raise OSError(errno.EFBIG, f"larger than {limit} bytes", path)
        chunks: List[bytes] = []
        size = 0
        while True:  # the file may grow while we read: never more than limit + 1 bytes
            data = os.read(fd, limit + 1 - size)
            if not data:
                break
            chunks.append(data)
            size += len(data)
            if size > limit:
                raise OSError(errno.EFBIG, f"larger than {limit} bytes", path)
        return b"".join(chunks)
    finally:
        os.close(fd)


# -- runtime directories ---------------------------------------------------------------


def ensure_runtime_dir(path: str) -> None:
    """Create the runtime directory *path* if missing (and its missing parents, mode
    :data:`RUNTIME_DIR_MODE` less the umask), then check it as the daemon must: it is
    owned by the effective user, every directory above it by that user or root, and
    none of them is writable by group or others (a sticky parent excepted).

    :raises UnsafePathError: naming the offending directory.
    """
    path = os.path.abspath(path)
    missing = []
    probe = path
    while not os.path.lexists(probe):
        missing.append(probe)
        parent = os.path.dirname(probe)
        if parent == probe:
            break
        probe = parent
    for directory in reversed(missing):
        try:
            os.mkdir(directory, RUNTIME_DIR_MODE)
        except FileExistsError:
            pass  # created meanwhile: checked below like any other
        except OSError as exc:
            raise UnsafePathError(f"cannot create runtime directory {directory}: {exc.strerror}") from None
    problem = runtime_dir_problem(path, daemon=True)
    if problem:
        raise UnsafePathError(problem)


def runtime_dir_problem(path: str, daemon: bool) -> Optional[str]:
    """Why the runtime directory *path* must not be used, or ``None`` when it is safe
    (or does not exist; a missing directory hides nothing).

    :param daemon: the rule for the supervisor itself: *path* must be owned by the
        effective user. Otherwise (``status``, ``stop``, ``reload``) it may also be
        root's (an operator asking about a supervisor that root runs). Directories
        above it may be the effective user's or root's either way.
    :returns: one line naming the directory and what is wrong.
    """
    path = os.path.abspath(path)
    if not os.path.lexists(path):
        return None
    euid = os.geteuid()
    leaf = os.path.realpath(path)
    # Every directory on the way, as written and as resolved: a symlink in the path
    # is only as safe as the directory it sits in and the one it points to.
    chain = _prefixes(path) + [p for p in _prefixes(leaf) if p not in _prefixes(path)]
    for directory in chain:
        try:
            st = os.stat(directory)
        except OSError as exc:
            return f"cannot inspect {directory}: {exc.strerror}"
        if not stat.S_ISDIR(st.st_mode):
            return f"runtime directory {directory} is not a directory"
        is_leaf = os.path.realpath(directory) == leaf
        trusted = {euid} if is_leaf and daemon else {euid, 0}
        if st.st_uid not in trusted:
            whom = f"uid {euid} (the user running preforkd)" if trusted == {euid} else f"uid {euid} or root"
            what = "runtime directory" if is_leaf else "directory"
            return f"{what} {directory} is owned by uid {st.st_uid}, not by {whom}"
        writable = st.st_mode & (stat.S_IWGRP | stat.S_IWOTH)
        if writable and (is_leaf or not st.st_mode & stat.S_ISVTX):
            what = "runtime directory" if is_leaf else "directory above the runtime directory"
            return (f"{what} {directory} is writable by {'others' if writable & stat.S_IWOTH else 'its group'} "
                    f"(mode {stat.S_IMODE(st.st_mode):04o}); it must be writable by its owner only")
    return None


def _prefixes(path: str) -> List[str]:
    """``/a/b/c`` -> ``["/", "/a", "/a/b", "/a/b/c"]``."""
    out = []
    while True:
        out.append(path)
        parent = os.path.dirname(path)
        if parent == path:
            return out[::-1]
        path = parent

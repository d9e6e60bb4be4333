"""Files the supervisor creates, and the directories it keeps them in.

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
* **Unix socket files** get their owner and mode set on the very inode that was
  bound, never by name: :func:`secure_socket_file` pins the file with an
  ``O_PATH | O_NOFOLLOW`` descriptor, checks through the kernel's socket diagnostics
  (sock_diag(7), ``UNIX_DIAG_VFS``) that its device and inode are the ones our
  socket is bound to, and changes that inode through the descriptor
  (``fchownat(fd, "", ..., AT_EMPTY_PATH)``).
* **Files it only reads** (the configuration) are read as regular files, without
  blocking, up to a size bound (:func:`read_regular_file`).
"""

from __future__ import annotations

import errno
import os
import socket
import stat
import struct
import sys
from typing import Any, List, Optional, Tuple

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


# -- Unix socket files -----------------------------------------------------------------

_NETLINK_SOCK_DIAG = 4
_SOCK_DIAG_BY_FAMILY = 20
_NLM_F_REQUEST = 1
_NLMSG_ERROR = 2
_UDIAG_SHOW_VFS = 0x02
_UNIX_DIAG_VFS = 1
_AT_EMPTY_PATH = 0x1000


def bound_file_id(sock: socket.socket) -> Optional[Tuple[int, int]]:
    """``(st_dev, st_ino & 0xffffffff)`` of the file a bound Unix socket *sock* was bound
    to, as the kernel records it (sock_diag(7), ``UDIAG_SHOW_VFS``; the kernel reports
    the inode number in 32 bits); ``None`` when the kernel will not tell (no
    ``NETLINK_SOCK_DIAG``, e.g. under systemd's ``RestrictAddressFamilies=`` without
    ``AF_NETLINK``).
    """
    try:
        ino = os.fstat(sock.fileno()).st_ino  # the socket's own inode, which sock_diag indexes by
        req = struct.pack("=BBHIII", socket.AF_UNIX, 0, 0, 0xFFFFFFFF, ino & 0xFFFFFFFF, _UDIAG_SHOW_VFS)
        req += struct.pack("=II", 0xFFFFFFFF, 0xFFFFFFFF)  # no cookie: look up by inode
        msg = struct.pack("=IHHII", 16 + len(req), _SOCK_DIAG_BY_FAMILY, _NLM_F_REQUEST, 1, 0) + req
        with socket.socket(socket.AF_NETLINK, socket.SOCK_DGRAM, _NETLINK_SOCK_DIAG) as nl:
            nl.settimeout(2.0)
            nl.sendto(msg, (0, 0))
            data = nl.recv(65536)
    except (OSError, AttributeError):
        return None
    if len(data) < 32:
        return None
    length, kind = struct.unpack_from("=IH", data)
    if kind == _NLMSG_ERROR:
        return None
    offset = 16 + 16  # nlmsghdr, unix_diag_msg
    while offset + 4 <= min(length, len(data)):
        attr_len, attr_type = struct.unpack_from("=HH", data, offset)
        if attr_len < 4:
            return None
        if attr_type == _UNIX_DIAG_VFS and attr_len >= 12:
            vfs_ino, vfs_dev = struct.unpack_from("=II", data, offset + 4)
            # The kernel's dev_t (major << 20 | minor), not the one stat(2) returns.
            return os.makedev(vfs_dev >> 20, vfs_dev & 0xFFFFF), vfs_ino
        offset += (attr_len + 3) & ~3
    return None


def secure_socket_file(sock: socket.socket, path: str, mode: int, owner: Tuple[int, int]) -> Tuple[int, int]:
    """After ``bind(2)`` of *sock* at *path*: make sure the file at *path* is the one
    *sock* is bound to, then give it *mode* and *owner*, without a name lookup that
    could follow a symbolic link renamed over *path* meanwhile.

    The file is pinned with ``open(path, O_PATH | O_NOFOLLOW)``; it must be a socket,
    and its device and inode must be those the kernel reports for *sock*
    (:func:`bound_file_id`). Where the kernel does not report them, the weaker proof
    is that it is a socket owned by us with one link only (nobody else made it or
    linked it in). The owner is then changed through the descriptor
    (``fchownat(fd, "", uid, gid, AT_EMPTY_PATH)``, Linux 2.6.39); the mode was set
    at ``bind`` through the umask and is only corrected (through
    ``/proc/self/fd``, the pinned inode) if something such as a default ACL changed it.

    :param owner: ``(uid, gid)``, -1 leaving one unchanged.
    :returns: ``(st_dev, st_ino)`` of the socket file.
    :raises UnsafePathError: the file at *path* is not the socket we bound (one line).
    :raises OSError: the owner or mode cannot be set.
    """
    try:
        fd = os.open(path, os.O_PATH | os.O_NOFOLLOW | os.O_CLOEXEC)
    except FileNotFoundError:
        raise UnsafePathError(f"unix:{path}: the socket file was removed right after bind") from None
    try:
        st = os.fstat(fd)
        if stat.S_ISLNK(st.st_mode):
            raise UnsafePathError(f"unix:{path}: the socket file was replaced by a symbolic link right after "
                                  "bind; not touching it")
        if not stat.S_ISSOCK(st.st_mode):
            raise UnsafePathError(f"unix:{path}: the socket file was replaced right after bind; not touching it")
        expected = bound_file_id(sock)
        if expected is not None:
            ours = (st.st_dev, st.st_ino & 0xFFFFFFFF) == expected
        else:
            ours = st.st_uid == os.geteuid() and st.st_nlink == 1
        if not ours:
            raise UnsafePathError(f"unix:{path}: the socket file was replaced by another socket right after bind; "
                                  "not touching it")
        if stat.S_IMODE(st.st_mode) != mode:
            os.chmod(f"/proc/self/fd/{fd}", mode)
        if owner != (-1, -1):
            _fchown_empty_path(fd, owner[0], owner[1])
        return st.st_dev, st.st_ino
    finally:
        os.close(fd)


_LIBC: List[Any] = []  # the C library, loaded on first use (most start-ups never need it)


def _libc() -> Any:
    """The C library (dlopen of the running program), or ``None`` off Linux."""
    if not _LIBC:
        lib = None
        if sys.platform.startswith("linux"):
            import ctypes

            try:
                lib = ctypes.CDLL(None, use_errno=True)
            except OSError:
                lib = None
        _LIBC.append(lib)
    return _LIBC[0]


def _fchown_empty_path(fd: int, uid: int, gid: int) -> None:
    """``fchownat(fd, "", uid, gid, AT_EMPTY_PATH)``: change the owner of the inode
    an ``O_PATH`` descriptor refers to (fchownat(2)).

    :raises OSError: as fchownat(2) fails.
    """
    libc = _libc()
    if libc is None:
        raise OSError(errno.ENOSYS, "fchownat with AT_EMPTY_PATH needs Linux")
    import ctypes

    if libc.fchownat(fd, b"", ctypes.c_uint32(uid), ctypes.c_uint32(gid), _AT_EMPTY_PATH) != 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err))

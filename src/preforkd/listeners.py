"""Listening sockets: bind, adopt inherited or socket-activated ones, close.

TCP listeners get ``SO_REUSEADDR`` (and ``SO_REUSEPORT`` when the service asks),
IPv6 ones ``IPV6_V6ONLY`` (like nginx), the configured backlog, and
``O_NONBLOCK``: workers wait in ``epoll`` with ``EPOLLEXCLUSIVE`` and accept
without blocking. Unix listeners are created with ``socket_mode`` already in force
(umask set around ``bind``), missing parent directories are created, a leftover
socket file that nobody answers on is removed first, and a path where a live
server answers or that is not a socket is an error and is never deleted. Only the
socket file this supervisor created (same device and inode) is ever unlinked.
"""

from __future__ import annotations

import errno
import os
import socket
import stat
from dataclasses import dataclass, field
from typing import List, Optional, Tuple

from .addresses import Address


class ListenerError(Exception):
    """A listener that cannot be bound; the message is one line naming the address."""


@dataclass
class Listener:
    """A bound listening socket for one configured address.

    ``address`` is the configured address (its port may be 0); ``bound`` is the
    real address text (``tcp://127.0.0.1:43121``); ``file_id`` is the
    ``(st_dev, st_ino)`` of the Unix socket file this process group created.
    """

    address: Address
    sock: socket.socket
    bound: str
    file_id: Optional[Tuple[int, int]] = None
    origin: str = "bound"  # bound | inherited | activated
    key: str = ""  # see preforkd.config.listener_keys
    services: List[str] = field(default_factory=list)

    def fileno(self) -> int:
        return self.sock.fileno()

    def close(self, unlink: bool = True) -> None:
        """Close the socket and, for a Unix listener, remove its socket file when it
        is still the one we created."""
        try:
            self.sock.close()
        finally:
            if unlink and self.address.kind == "unix" and self.file_id:
                unlink_if_ours(self.address.path, self.file_id)


def unlink_if_ours(path: str, file_id: Tuple[int, int]) -> bool:
    """Remove *path* only when it is the socket file identified by *file_id*."""
    try:
        st = os.lstat(path)
    except OSError:
        return False
    if (st.st_dev, st.st_ino) != file_id or not stat.S_ISSOCK(st.st_mode):
        return False
    try:
        os.unlink(path)
        return True
    except OSError:
        return False


def format_sockname(family: int, name: object) -> str:
    if family == socket.AF_UNIX:
        if isinstance(name, bytes):
            name = name.decode("utf-8", "replace")
        return f"unix:{name}"
    host, port = name[0], name[1]  # type: ignore[index]
    if family == socket.AF_INET6:
        return f"tcp://[{host}]:{port}"
    return f"tcp://{host}:{port}"


def bind(address: Address, backlog: int, socket_mode: int = 0o660, reuse_port: bool = False,
         owner: Tuple[int, int] = (-1, -1)) -> Listener:
    """Create, bind and listen on *address*.

    :param backlog: ``listen(2)`` backlog (the kernel caps it at ``net.core.somaxconn``).
    :param socket_mode: permission bits for a Unix socket file.
    :param owner: ``(uid, gid)`` to chown a Unix socket file to; -1 leaves it.
    :raises ListenerError: with the reason (address in use, permission denied, a
        live server on a Unix path, a path that is not a socket, ...).
    """
    if address.kind == "unix":
        return bind_unix(address, backlog, socket_mode, owner)
    try:
        infos = socket.getaddrinfo(address.host, address.port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    except socket.gaierror as exc:
        raise ListenerError(f"cannot resolve {address}: {exc.strerror}") from None
    family, _, proto, _, sockaddr = infos[0]
    sock = socket.socket(family, socket.SOCK_STREAM, proto)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if reuse_port and hasattr(socket, "SO_REUSEPORT"):
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        if family == socket.AF_INET6:
            sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        sock.bind(sockaddr)
        sock.listen(backlog)
        sock.setblocking(False)
    except OSError as exc:
        sock.close()
        raise ListenerError(f"cannot listen on {address}: {exc.strerror or exc}") from None
    return Listener(address=address, sock=sock, bound=format_sockname(family, sock.getsockname()))


def bind_unix(address: Address, backlog: int, mode: int, owner: Tuple[int, int] = (-1, -1)) -> Listener:
    """Bind a Unix listener at ``address.path`` with permission bits *mode* (see :func:`bind`)."""
    path = address.path
    try:
        os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    except OSError as exc:
        raise ListenerError(f"cannot create the directory of {address}: {exc.strerror}") from None
    remove_stale_unix_socket(path)
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    old_umask = os.umask(0o777 & ~mode)
    try:
        sock.bind(path)
    except OSError as exc:
        sock.close()
        raise ListenerError(f"cannot listen on {address}: {exc.strerror or exc}") from None
    finally:
        os.umask(old_umask)
    try:
        st = os.lstat(path)
        os.chmod(path, mode)
        if owner != (-1, -1):
            os.chown(path, owner[0], owner[1])
        sock.listen(backlog)
        sock.setblocking(False)
    except OSError as exc:
        sock.close()
        raise ListenerError(f"cannot listen on {address}: {exc.strerror or exc}") from None
    return Listener(address=address, sock=sock, bound=f"unix:{path}", file_id=(st.st_dev, st.st_ino))


def remove_stale_unix_socket(path: str) -> None:
    """Remove a socket file at *path* that nobody answers on.

    :raises ListenerError: if *path* exists and is not a socket, or a live server
        answers on it. Neither is ever deleted.
    """
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return
    except OSError as exc:
        raise ListenerError(f"cannot inspect unix:{path}: {exc.strerror}") from None
    if not stat.S_ISSOCK(st.st_mode):
        raise ListenerError(f"unix:{path} exists and is not a socket; not removing it")
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    probe.settimeout(1.0)
    try:
        probe.connect(path)
    except (ConnectionRefusedError, FileNotFoundError):
        pass  # stale: nobody listens
    except OSError as exc:
        if exc.errno not in (errno.ECONNREFUSED, errno.ENOENT):
            raise ListenerError(f"cannot probe unix:{path}: {exc.strerror or exc}") from None
    else:
        raise ListenerError(f"unix:{path} is in use: a live server answers there")
    finally:
        probe.close()
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass
    except OSError as exc:
        raise ListenerError(f"cannot remove stale unix:{path}: {exc.strerror}") from None


def socket_from_fd(fd: int) -> socket.socket:
    """Wrap an inherited listening fd (family and type read from the socket)."""
    sock = socket.socket(fileno=fd)
    sock.setblocking(False)
    return sock


def address_matches(configured: Address, sock: socket.socket) -> bool:
    """Does the socket bound at *sock* serve the configured address?

    TCP: same port (any port when configured with 0) and same host address; Unix:
    same path.
    """
    try:
        name = sock.getsockname()
    except OSError:
        return False
    if configured.kind == "unix":
        if sock.family != socket.AF_UNIX:
            return False
        if isinstance(name, bytes):
            name = name.decode("utf-8", "replace")
        return os.path.normpath(name) == configured.path
    if sock.family not in (socket.AF_INET, socket.AF_INET6):
        return False
    host, port = name[0], name[1]
    if configured.port not in (0, port):
        return False
    try:
        wanted = {info[4][0] for info in socket.getaddrinfo(configured.host, None, type=socket.SOCK_STREAM,
                                                            flags=socket.AI_PASSIVE)}
    except socket.gaierror:
        return False
    return host in wanted

"""Listening sockets: bind, adopt inherited or socket-activated ones, tune, close.

TCP listeners get ``SO_REUSEADDR`` (and ``SO_REUSEPORT`` when the service asks),
IPv6 ones ``IPV6_V6ONLY`` (like nginx), the configured backlog, and
``O_NONBLOCK``: workers wait in ``epoll`` with ``EPOLLEXCLUSIVE`` and accept
without blocking. Unix listeners are created with ``socket_mode`` already in force
(umask set around ``bind``) and get their owner through the very inode that was bound,
never by name (:func:`preforkd.files.secure_socket_file`); missing parent
directories are created, a leftover
socket file that nobody answers on is removed first, and a path where a live
server answers or that is not a socket is an error and is never deleted. Only the
socket file this supervisor created (same device and inode) is ever unlinked.
"""

from __future__ import annotations

import errno
import math
import os
import socket
import stat
import struct
from dataclasses import dataclass
from typing import Dict, List, Optional, Sequence, Set, Tuple

from .addresses import Address
from .config import Config, ServiceConfig
from .files import UnsafePathError, secure_socket_file
from .log import Logger
from .reexec import InheritedListener

#: Seconds a PROXY protocol header may take (kept equal to
#: :data:`preforkd.proxyproto.HEADER_TIMEOUT`, which imports this module).
PROXY_HEADER_TIMEOUT = 5.0


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
    key: str = ""  # see listener_specs
    role: str = "service"  # service, or the endpoint the master answers on it (metrics)

    @property
    def is_unix(self) -> bool:
        return self.address.kind == "unix"

    def fileno(self) -> int:
        return self.sock.fileno()

    def handover(self) -> InheritedListener:
        """This listener as the next image of the master will adopt it."""
        return InheritedListener(fd=self.fileno(), key=self.key, address=str(self.address), origin=self.origin,
                                 file_id=self.file_id)

    def close(self, unlink: bool = True) -> None:
        """Close the socket and, for a Unix listener, remove its socket file when it
        is still the one we created."""
        try:
            self.sock.close()
        finally:
            if unlink and self.is_unix and self.file_id:
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
        # Mode and owner go on the inode we bound, never by name (a symlink renamed
        # over the path meanwhile would hand its target over): see preforkd.files.
        file_id = secure_socket_file(sock, path, mode, owner)
        sock.listen(backlog)
        sock.setblocking(False)
    except UnsafePathError as exc:
        sock.close()
        raise ListenerError(str(exc)) from None
    except OSError as exc:
        sock.close()
        raise ListenerError(f"cannot listen on {address}: {exc.strerror or exc}") from None
    return Listener(address=address, sock=sock, bound=f"unix:{path}", file_id=file_id)


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
        return bool(os.path.normpath(name) == configured.path)
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
    return bool(host in wanted)


def set_timeouts(sock: socket.socket, seconds: float) -> None:
    """Set ``SO_RCVTIMEO`` and ``SO_SNDTIMEO`` to *seconds* on *sock* (socket(7)); a
    blocking socket's ``recv``/``send`` then fail with ``EAGAIN`` after that long."""
    tv = _timeval(seconds)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVTIMEO, tv)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDTIMEO, tv)


def _timeval(seconds: float) -> bytes:
    whole = int(seconds)
    usec = int((seconds - whole) * 1_000_000)
    return struct.pack("ll", whole, usec if whole or usec else 1)


def set_recv_timeout(sock: socket.socket, seconds: float) -> None:
    """Set ``SO_RCVTIMEO`` alone to *seconds* (> 0; never rounded down to 0, which
    would mean no timeout), socket(7)."""
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVTIMEO, _timeval(seconds))


def tune(listener: Listener, service: ServiceConfig) -> None:
    """Set what accepted TCP connections inherit from *listener*: ``TCP_NODELAY`` and
    *service*'s ``idle_timeout``. Unix connections inherit neither; workers set the
    timeouts on those themselves.

    A ``proxy_protocol`` service's TCP listener also gets ``TCP_DEFER_ACCEPT`` (tcp(7),
    nginx's ``deferred``): the balancer always speaks first (the header), so a
    connection is handed to a worker once its first bytes are in, not before, and the
    worker reads its header without waiting. The value, in seconds, is the header
    timeout rounded up; after it the kernel hands the connection over anyway, and the
    worker's own header timeout ends it. Any other listener gets 0 (off), so a reload
    that turns ``proxy_protocol`` off turns it off on an inherited socket too."""
    if not listener.is_unix:
        listener.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        set_timeouts(listener.sock, service.idle_timeout)
        defer = math.ceil(min(PROXY_HEADER_TIMEOUT, service.idle_timeout)) if service.proxy_protocol else 0
        listener.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_DEFER_ACCEPT, defer)


# -- the configured set --------------------------------------------------------


#: ``listen(2)`` backlog of an endpoint the master answers itself (its clients are a few
#: scrapers or balancers, not the service's load).
ENDPOINT_BACKLOG = 64


@dataclass(frozen=True)
class ListenerSpec:
    """One configured listener and the key it is known by across reloads.

    ``role`` is ``"service"`` for a service's listener (``service`` set), or the name of
    an endpoint the master answers itself (``"metrics"``, ``"agent_check"``; ``service``
    is ``None``): see
    :func:`endpoint_addresses`.
    """

    key: str
    address: Address
    service: Optional[ServiceConfig]
    role: str = "service"

    @property
    def backlog(self) -> int:
        return self.service.backlog if self.service is not None else ENDPOINT_BACKLOG

    @property
    def socket_mode(self) -> int:
        return self.service.socket_mode if self.service is not None else 0o600

    @property
    def reuse_port(self) -> bool:
        return self.service.reuse_port if self.service is not None else False


def endpoint_addresses(config: Config) -> List[Tuple[str, Address]]:
    """The configured endpoints the master answers itself, as ``(role, address)``:
    ``("metrics", [metrics] listen)`` and ``("agent_check", [supervisor] agent_check)``
    when set."""
    out: List[Tuple[str, Address]] = []
    if config.metrics.listen is not None:
        out.append(("metrics", config.metrics.listen))
    if config.supervisor.agent_check is not None:
        out.append(("agent_check", config.supervisor.agent_check))
    return out


def listener_specs(config: Config) -> List[ListenerSpec]:
    """Every configured listener, services' first in configuration order, then the
    endpoints', with its key.

    A fixed address is its own key (``tcp://127.0.0.1:7000``); an ephemeral one
    (port 0) is not unique, so its key also names the service and its place among
    that service's identical entries (``tcp://127.0.0.1:0@echo#0``), or the endpoint's
    role (``tcp://127.0.0.1:0@(metrics)``, parentheses being no part of a service
    name): the port it got is kept across reloads as long as that entry stays.
    """
    out = []
    for svc in config.services:
        seen: Dict[str, int] = {}
        for addr in svc.listen:
            text = str(addr)
            if addr.identity() is None:
                n = seen.get(text, 0)
                seen[text] = n + 1
                text = f"{text}@{svc.name}#{n}"
            out.append(ListenerSpec(key=text, address=addr, service=svc))
    for role, addr in endpoint_addresses(config):
        key = str(addr) if addr.identity() is not None else f"{addr}@({role})"
        out.append(ListenerSpec(key=key, address=addr, service=None, role=role))
    return out


def open_listeners(config: Config, inherited: Sequence[InheritedListener], owner: Tuple[int, int],
                   logger: Logger) -> Dict[str, Listener]:
    """Every configured listener, open and tuned: adopt inherited sockets (a reload)
    and socket-activated ones (sd_listen_fds(3)) whose address is still configured,
    close the rest (unlinking Unix socket files we created), bind what is missing.
    Logs ``listener.bound`` for each (and ``listener.closed``,
    ``listener.activation_unmatched``).

    :param owner: ``(uid, gid)`` for new Unix socket files (-1: unchanged).
    :returns: listener key -> :class:`Listener`, in configuration order.
    :raises ListenerError: when a missing listener cannot be bound.
    """
    specs = {spec.key: spec for spec in listener_specs(config)}
    found: Dict[str, Listener] = {}
    for item in inherited:
        try:
            sock = socket_from_fd(item.fd)
        except OSError:
            continue
        os.set_inheritable(item.fd, False)
        if item.key in specs and item.key not in found:
            origin = "inherited" if item.origin == "bound" else item.origin
            found[item.key] = Listener(address=specs[item.key].address, sock=sock, bound=_sockname(sock),
                                       file_id=item.file_id, origin=origin, key=item.key)
        else:
            logger.info("listener.closed", address=item.address, reason="no longer configured")
            sock.close()
            if item.file_id and item.address.startswith("unix:"):
                unlink_if_ours(item.address[len("unix:"):], item.file_id)
    for fd, name in activated_fds():
        try:
            sock = socket_from_fd(fd)
        except OSError:
            continue
        free = [k for k in specs if k not in found and address_matches(specs[k].address, sock)]
        # The entry with this very address first; a port-0 entry (any port) only
        # if there is none, or it would take a socket meant for another entry.
        match = next((k for k in free if specs[k].address.identity() is not None), free[0] if free else None)
        if match is None:
            logger.warning("listener.activation_unmatched", fd=fd, name=name, address=_sockname(sock))
            sock.close()
            continue
        found[match] = Listener(address=specs[match].address, sock=sock, bound=_sockname(sock),
                                origin="activated", key=match)
    out: Dict[str, Listener] = {}
    try:
        for key, spec in specs.items():
            lst = found.get(key) or bind(spec.address, spec.backlog, spec.socket_mode, spec.reuse_port, owner)
            lst.key, lst.role = key, spec.role
            out[key] = lst
            if spec.service is not None:
                tune(lst, spec.service)
                logger.info("listener.bound", service=spec.service.name, role=spec.role, address=lst.bound,
                            configured=str(lst.address), origin=lst.origin)
            else:
                logger.info("listener.bound", role=spec.role, address=lst.bound, configured=str(lst.address),
                            origin=lst.origin)
    except ListenerError:
        for lst in {**found, **out}.values():
            lst.close()
        raise
    return out


def prebind(config: Config, have: Set[str], owner: Tuple[int, int]) -> List[Listener]:
    """Bind the listeners of *config* whose key is not in *have* (a reload binds what
    is new before it commits to ``execve``).

    :raises ListenerError: when one cannot be bound; those bound so far are closed.
    """
    out: List[Listener] = []
    try:
        for spec in listener_specs(config):
            if spec.key not in have:
                lst = bind(spec.address, spec.backlog, spec.socket_mode, spec.reuse_port, owner)
                lst.key = spec.key
                out.append(lst)
    except ListenerError:
        for lst in out:
            lst.close()
        raise
    return out


def activated_fds() -> List[Tuple[int, str]]:
    """Sockets passed by systemd socket activation (sd_listen_fds(3)): fds 3.. with
    ``LISTEN_PID`` equal to our pid, and their ``LISTEN_FDNAMES``; the variables are
    removed from the environment, so a re-exec never sees them again."""
    env = os.environ
    pid, count = env.pop("LISTEN_PID", ""), env.pop("LISTEN_FDS", "")
    names = env.pop("LISTEN_FDNAMES", "")
    if not pid.isdigit() or int(pid) != os.getpid() or not count.isdigit():
        return []
    name_list = names.split(":") if names else []
    out = []
    for i in range(int(count)):
        fd = 3 + i
        os.set_inheritable(fd, False)
        out.append((fd, name_list[i] if i < len(name_list) else ""))
    return out


def _sockname(sock: socket.socket) -> str:
    try:
        return format_sockname(sock.family, sock.getsockname())
    except OSError:
        return "?"


def queue_length(sock: socket.socket) -> Optional[int]:
    """Connections waiting in a listening TCP socket's accept queue, or ``None`` for a
    socket that does not say (a Unix listener). See :func:`queue_stats`."""
    stats = queue_stats(sock)
    return stats[0] if stats is not None else None


def queue_stats(sock: socket.socket) -> Optional[Tuple[int, int]]:
    """``(waiting, limit)`` of a listening TCP socket's accept queue, or ``None`` for a
    socket that does not say (a Unix listener). Linux reports the queue length of a
    listening socket in ``TCP_INFO``'s ``tcpi_unacked`` and its limit (the ``listen(2)``
    backlog as capped by ``net.core.somaxconn``) in ``tcpi_sacked``, tcp(7),
    ``tcp_get_info()``; unicorn's raindrops reads the same. One system call."""
    if sock.family not in (socket.AF_INET, socket.AF_INET6):
        return None
    try:
        info = sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_INFO, 32)
    except OSError:
        return None
    if len(info) < _TCPI_SACKED + 4:
        return None
    return (int(struct.unpack_from("I", info, _TCPI_UNACKED)[0]), int(struct.unpack_from("I", info, _TCPI_SACKED)[0]))


def tcp_byte_counts(sock: socket.socket) -> Optional[Tuple[int, int]]:
    """``(bytes received, bytes sent)`` on a connected TCP socket, as the kernel counts
    them whoever did the I/O (a ``command`` service's program): ``tcpi_bytes_received``
    (which counts the peer's FIN as one byte, since it advances the sequence number: taken
    off once the state says it came), and ``tcpi_bytes_sent - tcpi_bytes_retrans +
    tcpi_notsent_bytes`` (each byte written once, whether it has left yet or not), from
    ``TCP_INFO``, tcp(7), Linux 4.19 or later. ``None`` for another socket or an older
    kernel. One system call."""
    if sock.family not in (socket.AF_INET, socket.AF_INET6):
        return None
    try:
        info = sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_INFO, _TCPI_SIZE)
    except OSError:
        return None
    if len(info) < _TCPI_SIZE:
        return None
    received = struct.unpack_from("Q", info, _TCPI_BYTES_RECEIVED)[0]
    if info[0] in _FIN_RECEIVED_STATES and received:
        received -= 1
    notsent = struct.unpack_from("I", info, _TCPI_NOTSENT_BYTES)[0]
    sent, retrans = struct.unpack_from("QQ", info, _TCPI_BYTES_SENT)
    return int(received), int(sent - retrans + notsent)


#: Offsets in ``struct tcp_info`` (linux/tcp.h): 8 bytes of u8 fields, then the u32s
#: tcpi_rto, tcpi_ato, tcpi_snd_mss, tcpi_rcv_mss, tcpi_unacked, tcpi_sacked...; further
#: on, the u64 tcpi_bytes_received, the u32 tcpi_notsent_bytes and the u64s
#: tcpi_bytes_sent and tcpi_bytes_retrans (Linux 4.19).
_TCPI_UNACKED = 24
_TCPI_SACKED = 28
_TCPI_BYTES_RECEIVED = 128
_TCPI_NOTSENT_BYTES = 144
_TCPI_BYTES_SENT = 200  # then tcpi_bytes_retrans at 208
_TCPI_SIZE = 216
#: tcpi_state values (include/net/tcp_states.h) once the peer's FIN has arrived:
#: TCP_TIME_WAIT, TCP_CLOSE_WAIT, TCP_LAST_ACK, TCP_CLOSING.
_FIN_RECEIVED_STATES = (6, 8, 9, 11)

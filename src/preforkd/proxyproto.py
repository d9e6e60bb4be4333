"""The PROXY protocol, receiving side: HAProxy's ``send-proxy`` (v1, text) and
``send-proxy-v2`` (v2, binary) headers, per HAProxy's ``doc/proxy-protocol.txt``
("The PROXY protocol, Versions 1 & 2", revision 2020/03/05; section numbers below are
that document's).

A service with ``proxy_protocol = true`` expects every connection to start with one
header, either version, told apart by its signature (section 2.2, end): the 12-byte
binary signature then version 2, or the five letters ``PROXY``. Nothing else is
guessed (section 5: a receiver must never try to detect whether a header is there).

:func:`parse` is pure and strict: every rule of sections 2.1 and 2.2 that a receiver
can check is checked, and it never looks further than the header's own bound, 107
bytes for v1 (section 2.1) and 16 + the 16-bit length for v2 (at most 65,551 bytes,
section 2.2). v2 TLVs (section 2.2) are walked only to check that they tile the rest
of the header exactly, and then skipped: no CRC32C verification is claimed
(section 2.2.3 asks it only of receivers that support it).

:func:`read_header` reads one header from a blocking socket without ever taking a
byte past it (``MSG_PEEK``, then ``recv`` of exactly the header's bytes), so what
follows stays in the kernel for the line framing, a connection handler or a
``command`` program alike; and within a deadline. :class:`ProxyGate` is what a
worker holds: the trusted networks (``proxy_trusted``), the timeout, and the
``proxy.rejected`` event.

Addresses come out as ``accept()`` gives them: ``(host, port)`` tuples for TCP4 and
TCP6, a path ``str`` for UNIX. ``LOCAL`` (v2: the balancer's own health checks),
``UNKNOWN`` (v1) and the unspecified v2 families and protocols are valid headers
without a client address: the connection keeps its real addresses (sections 2.1 and
2.2).
"""

from __future__ import annotations

import ipaddress
import select
import socket
import struct
import time
from typing import Any, Callable, Dict, NamedTuple, Optional, Sequence, Tuple, Union

from .listeners import PROXY_HEADER_TIMEOUT, tcp_byte_counts
from .log import HotEvent, Logger

#: Version 2's 12-byte signature (section 2.2).
V2_SIGNATURE = b"\r\n\r\n\x00\r\nQUIT\n"
#: Version 1's prefix (section 2.1): "PROXY".
V1_PREFIX = b"PROXY"
#: The longest v1 line, CRLF included (section 2.1: "PROXY UNKNOWN" with two IPv6
#: addresses and two ports).
V1_MAX = 107
#: v2's fixed part: signature, version and command, family and protocol, length.
V2_FIXED = 16
#: The longest v2 header: the fixed part and a 16-bit length.
V2_MAX = V2_FIXED + 0xFFFF
#: Bytes looked at in one ``MSG_PEEK``: a header from HAProxy fits (section 2: every
#: header is designed to fit in 536 bytes); a longer v2 one takes more reads.
PEEK_SIZE = 536
#: Seconds a header may take to arrive whole, at most (section 2: "at least 3 seconds
#: to cover a TCP retransmit"); a service's ``idle_timeout`` when that is shorter.
HEADER_TIMEOUT = PROXY_HEADER_TIMEOUT

_V2_ADDRESS_BYTES = {1: 12, 2: 36, 3: 216}  # AF_INET, AF_INET6, AF_UNIX (section 2.2)
_V2_FAMILY_NAMES = {1: "TCP4", 2: "TCP6", 3: "UNIX"}
_PORTS = struct.Struct("!HH")

#: An address as ``accept()`` would give it: ``(host, port)`` or a Unix path.
Address = Union[Tuple[str, int], str]


class ProxyError(ValueError):
    """A header that breaks the specification, or that never came whole; the message
    is the reason ``proxy.rejected`` logs."""


class ProxyHeader(NamedTuple):
    """One parsed header.

    ``version`` is 1 or 2; ``command`` ``"proxy"`` or ``"local"`` (v1 headers are all
    ``"proxy"``); ``family`` ``"TCP4"``, ``"TCP6"``, ``"UNIX"`` or ``"UNKNOWN"``;
    ``source`` and ``dest`` the client's and the address it connected to, or ``None``
    when the header carries none (``LOCAL``, ``UNKNOWN``, unspecified); ``length`` the
    header's size in bytes.
    """

    version: int
    command: str
    family: str
    source: Optional[Address]
    dest: Optional[Address]
    length: int


def parse(data: bytes) -> Optional[ProxyHeader]:
    """Parse the header at the start of *data* (what follows it is not looked at).

    :returns: the header, or ``None`` when *data* is a proper beginning of one and
        more bytes are needed (never more than :data:`V1_MAX` or :data:`V2_MAX` in all).
    :raises ProxyError: when *data* cannot begin a valid header.
    """
    if data[:1] == b"\r":
        return _parse_v2(data)
    if data[:1] == b"P":
        return _parse_v1(data)
    if not data:
        return None
    raise ProxyError("no PROXY protocol header")


def _parse_v2(data: bytes) -> Optional[ProxyHeader]:
    if len(data) < V2_FIXED:
        if not V2_SIGNATURE.startswith(data[:12]) or (len(data) > 12 and data[12] >> 4 != 2):
            raise ProxyError("no PROXY protocol header")
        return None
    if data[:12] != V2_SIGNATURE:
        raise ProxyError("no PROXY protocol header")
    ver_cmd, fam, length = data[12], data[13], (data[14] << 8) | data[15]
    if ver_cmd >> 4 != 2:
        raise ProxyError(f"v2 header with version {ver_cmd >> 4}")
    command = ver_cmd & 0x0F
    if command > 1:
        raise ProxyError(f"v2 header with command {command:#x}")
    family, proto = fam >> 4, fam & 0x0F
    if family > 3 or proto > 2:
        raise ProxyError(f"v2 header with family and protocol {fam:#04x}")
    total = V2_FIXED + length
    if len(data) < total:
        return None
    if command == 0:  # LOCAL: the family is ignored, the block skipped (section 2.2)
        return ProxyHeader(2, "local", "UNKNOWN", None, None, total)
    need = _V2_ADDRESS_BYTES.get(family, 0)
    if length < need:
        raise ProxyError(f"v2 header too short for its addresses ({length} < {need} bytes)")
    _check_tlvs(data, V2_FIXED + need, total)
    if proto != 1 or family == 0:  # UNSPEC, or DGRAM: use the real endpoints (section 2.2)
        return ProxyHeader(2, "proxy", "UNKNOWN", None, None, total)
    block = data[V2_FIXED:V2_FIXED + need]
    source: Address
    dest: Address
    if family == 3:
        source, dest = _unix_path(block[:108]), _unix_path(block[108:])
    else:
        size = 4 if family == 1 else 16
        sport, dport = _PORTS.unpack_from(block, 2 * size)
        af = socket.AF_INET if family == 1 else socket.AF_INET6
        source = (socket.inet_ntop(af, block[:size]), sport)  # as accept() would write them
        dest = (socket.inet_ntop(af, block[size:2 * size]), dport)
    return ProxyHeader(2, "proxy", _V2_FAMILY_NAMES[family], source, dest, total)


def _check_tlvs(data: bytes, start: int, end: int) -> None:
    """The TLVs after the addresses must tile the header exactly: each a type byte,
    a 16-bit length and that many bytes (section 2.2); their values are skipped."""
    pos = start
    while pos < end:
        if end - pos < 3:
            raise ProxyError("v2 header with a truncated TLV")
        pos += 3 + ((data[pos + 1] << 8) | data[pos + 2])
        if pos > end:
            raise ProxyError("v2 header with a TLV longer than the header")


def _unix_path(raw: bytes) -> str:
    path = raw.split(b"\x00", 1)[0]
    return path.decode("utf-8", "surrogateescape")


def _parse_v1(data: bytes) -> Optional[ProxyHeader]:
    if not V1_PREFIX.startswith(data[:5]):
        raise ProxyError("no PROXY protocol header")
    end = data.find(b"\r\n", 0, V1_MAX)
    if end < 0:
        head = data[:V1_MAX]
        if b"\n" in head or b"\r" in head[:-1]:
            raise ProxyError("v1 header not ended by CRLF")
        if len(data) >= V1_MAX:
            raise ProxyError(f"v1 header without CRLF in its first {V1_MAX} bytes")
        return None
    line = data[:end]
    if b"\r" in line or b"\n" in line:
        raise ProxyError("v1 header not ended by CRLF")
    parts = line.split(b" ")
    if parts[0] != V1_PREFIX or len(parts) < 2:
        raise ProxyError("v1 header does not start with 'PROXY '")
    family = parts[1]
    if family == b"UNKNOWN":  # the rest of the line is ignored (section 2.1)
        return ProxyHeader(1, "proxy", "UNKNOWN", None, None, end + 2)
    if family not in (b"TCP4", b"TCP6"):
        raise ProxyError("v1 header with an unknown protocol")
    if len(parts) != 6:
        raise ProxyError("v1 header needs exactly two addresses and two ports, one space apart")
    six = family == b"TCP6"
    src, dst = _v1_address(parts[2], six), _v1_address(parts[3], six)
    sport, dport = _v1_port(parts[4]), _v1_port(parts[5])
    return ProxyHeader(1, "proxy", family.decode(), (src, sport), (dst, dport), end + 2)


def _v1_address(raw: bytes, six: bool) -> str:
    """An address in the canonical form of section 2.1: dotted quad without leading
    zeros, or IPv6 hex groups with at most one ``::`` (no embedded IPv4, no zone)."""
    text = raw.decode("ascii", "replace")
    af = socket.AF_INET6 if six else socket.AF_INET
    try:
        if six and raw.translate(None, b"0123456789abcdefABCDEF:"):
            raise ValueError(text)  # no embedded IPv4, no zone: hex groups and colons only
        canonical = socket.inet_ntop(af, socket.inet_pton(af, text))
    except (ValueError, OSError):
        raise ProxyError(f"v1 header with a bad {'TCP6' if six else 'TCP4'} address {text[:45]!r}") from None
    if not six and canonical != text:  # leading zeros (octal confusion) are refused
        raise ProxyError(f"v1 header with a non-canonical address {text[:45]!r}")
    return canonical


def _v1_port(raw: bytes) -> int:
    if not raw.isdigit() or len(raw) > 5 or (raw[:1] == b"0" and raw != b"0") or int(raw) > 65535:
        raise ProxyError(f"v1 header with a bad port {raw[:8].decode('ascii', 'replace')!r}")
    return int(raw)


# -- reading from a socket (one-connection workers) -----------------------------------


def read_header(sock: socket.socket, timeout: float) -> ProxyHeader:
    """Read the header at the start of blocking TCP or Unix stream socket *sock*,
    taking exactly its bytes (section 2: the receiver must not process the connection
    before the header is complete; nothing after it is consumed).

    The usual case is one ``recv(MSG_PEEK | MSG_DONTWAIT)`` and one ``recv`` of the
    header's length (a ``proxy_protocol`` TCP listener has ``TCP_DEFER_ACCEPT``, so a
    connection is accepted once its first bytes are in). When the header is not all
    there yet, the bytes seen so far are taken (they are all header) and ``poll(2)``
    waits for more, for what is left of *timeout*.

    :param timeout: seconds from now (monotonic clock) for the whole header.
    :raises ProxyError: malformed, incomplete at end of input, or late.
    :raises OSError: the connection failed (reset).
    """
    buf = b""
    flags = socket.MSG_PEEK | socket.MSG_DONTWAIT
    deadline = 0.0  # monotonic seconds; set when the header was not all there at once
    poller: Optional[select.poll] = None
    while True:
        try:
            data = sock.recv(PEEK_SIZE, flags)
        except BlockingIOError:
            data = None
        if data is not None:
            if not data:
                raise ProxyError("connection closed before a complete header" if buf else
                                 "connection closed without a header")
            header = parse(buf + data)
            if header is not None:
                _take(sock, header.length - len(buf))
                return header
            buf += _take(sock, len(data))  # all of it is header: consume, then wait for more
        now = time.monotonic()
        if poller is None:
            deadline = now + timeout
            poller = select.poll()
            poller.register(sock, select.POLLIN)
        left = deadline - now
        if left <= 0 or not poller.poll(max(1, int(left * 1000 + 0.999))):
            raise ProxyError(f"no complete header within {timeout:g} s")


def _take(sock: socket.socket, n: int) -> bytes:
    """Consume *n* bytes known to be queued on *sock*."""
    out = b""
    while len(out) < n:
        chunk = sock.recv(n - len(out))
        if not chunk:
            raise ProxyError("connection closed inside the header")
        out += chunk
    return out


# -- the worker's side ------------------------------------------------------------------


def header_timeout(idle_timeout: float) -> float:
    """Seconds a connection of a service with *idle_timeout* has for its header:
    :data:`HEADER_TIMEOUT`, or the idle timeout when that is shorter."""
    return min(HEADER_TIMEOUT, idle_timeout)


def format_peer(addr: Any) -> str:
    """``host:port``, ``[v6]:port``, or ``unix`` (as ``Connection.peer`` writes it)."""
    if isinstance(addr, tuple) and len(addr) >= 2:
        return f"[{addr[0]}]:{addr[1]}" if ":" in str(addr[0]) else f"{addr[0]}:{addr[1]}"
    return "unix"


class ProxyGate:
    """What a worker of a ``proxy_protocol`` service checks on every connection: that
    the peer may send a header at all (``proxy_trusted``; section 5 asks receivers to
    accept the header only from known sources), and the header itself.

    Unix-socket peers are always trusted: who may connect there is decided by the
    socket file's ``socket_mode``. The trust of each peer address is cached (a
    balancer connects from a handful of addresses).

    :param trusted: CIDR networks, as ``proxy_trusted`` gives them (validated).
    :param timeout: seconds for a header (:func:`header_timeout`).
    """

    CACHE_MAX = 1024

    def __init__(self, trusted: Sequence[str], timeout: float, logger: Logger) -> None:
        self.networks = [ipaddress.ip_network(n, strict=False) for n in trusted]
        self.timeout = timeout
        self.logger = logger
        self._cache: Dict[str, bool] = {}

    def trusts(self, addr: Any) -> bool:
        """May the peer at *addr* (``accept()``'s address) send a header?"""
        if not isinstance(addr, tuple):
            return True  # a Unix socket peer
        host = addr[0]
        known = self._cache.get(host)
        if known is None:
            ip = ipaddress.ip_address(host.split("%", 1)[0])
            mapped = getattr(ip, "ipv4_mapped", None)
            known = any(ip in net or (mapped is not None and mapped in net) for net in self.networks)
            if len(self._cache) >= self.CACHE_MAX:
                self._cache.clear()
            self._cache[host] = known
        return known

    def reject(self, addr: Any, reason: str) -> None:
        """Log ``proxy.rejected`` for a connection from *addr* (the real peer)."""
        self.logger.warning("proxy.rejected", peer=format_peer(addr), reason=reason)

    def admit(self, sock: socket.socket, addr: Any) -> Optional[Tuple[Any, Any]]:
        """Check the peer, read the header (:func:`read_header`).

        :returns: ``(peer, local)``: the client's address and the one it connected to
            from the header, or ``(addr, None)`` when the header carries none (LOCAL,
            UNKNOWN); ``None`` when the connection was rejected (``proxy.rejected``
            logged; the caller closes it).
        """
        if not self.trusts(addr):
            self.reject(addr, "peer not in proxy_trusted")
            return None
        try:
            header = read_header(sock, self.timeout)
        except ProxyError as exc:
            self.reject(addr, str(exc))
            return None
        except OSError as exc:
            self.reject(addr, exc.strerror or type(exc).__name__)
            return None
        if header.source is None:
            return addr, None
        return header.source, header.dest

    def wrap(self, serve_one: Callable[..., Any], with_local: bool,
             access: Optional[HotEvent] = None) -> Callable[[socket.socket, Any], Any]:
        """*serve_one* ``(sock, addr)`` behind this gate; *with_local*: also pass the
        header's destination as a third argument (a ``command`` service's
        ``TCPLOCALIP``), ``None`` when the header has none. Returns what *serve_one*
        returns (how the connection ended), or ``"proxy_rejected"``.

        :param access: the access log (``[log] access``): a rejected connection gets its
            ``connection.closed`` here (reason ``proxy_rejected``, the real peer, the
            kernel's byte counts as for a ``command`` service), as *serve_one* logs the
            others."""
        admit = self.admit

        def serve(sock: socket.socket, addr: Any) -> Any:
            started = time.monotonic()
            admitted = admit(sock, addr)
            if admitted is None:
                if access is not None:
                    counts = tcp_byte_counts(sock)
                    access(peer=format_peer(addr), duration_ms=round((time.monotonic() - started) * 1000, 3),
                           lines=None if with_local else 0, bytes_in=counts[0] if counts else None,
                           bytes_out=counts[1] if counts else None, reason="proxy_rejected")
                return "proxy_rejected"
            if with_local:
                return serve_one(sock, admitted[0], admitted[1])
            return serve_one(sock, admitted[0])

        return serve

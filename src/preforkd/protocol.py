"""Line framing and connection serving (runs in workers only).

Lenient in, strict out (RFC 1123 section 1.2.2 / perlipc "Internet Line
Terminators"): an input line ends in CRLF or a lone LF, a line still open at end of
input counts as a last line, and every output line ends in CRLF.

Limits are per connection:

* ``max_line_length`` (bytes, terminator excluded): a longer line gets
  ``ERROR line too long (max N bytes)`` and a close; the buffer never holds more
  than one maximum line plus one ``recv``.
* ``idle_timeout`` (seconds): enforced by the kernel with ``SO_RCVTIMEO`` and
  ``SO_SNDTIMEO`` (socket(7)), so a silent client or one that stops reading costs
  no extra system call per line; on expiry the worker sends ``ERROR idle timeout``
  and closes.

Undecodable input (not UTF-8), a reset or vanished client and a handler that
raises are each logged as one event (``connection.*``) and end that connection
only.
"""

from __future__ import annotations

import socket
import time
from typing import Any, Callable, List, NoReturn, Optional, Tuple, cast

from .config import ServiceConfig
from .handler import Close, Handler, HandlerKind, LineHandler, Reply
from .listeners import set_recv_timeout, set_timeouts
from .log import Logger
from .scoreboard import ERROR_CELL

RECV_SIZE = 65536
CRLF = b"\r\n"


class ProtocolError(Exception):
    """A client broke the line protocol; ``reply`` is the error line sent before closing,
    ``reason`` how the connection ended (``connection.closed``), ``event`` what is logged."""

    event = "connection.protocol_error"
    reason = "protocol_error"
    reply = "ERROR protocol error"


class LineTooLong(ProtocolError):
    """An input line longer than ``max_line_length`` bytes."""

    event = "connection.line_too_long"
    reason = "line_too_long"

    def __init__(self, limit: int) -> None:
        super().__init__(f"line longer than {limit} bytes")
        self.reply = f"ERROR line too long (max {limit} bytes)"


class BadEncoding(ProtocolError):
    """An input line that is not UTF-8."""

    event = "connection.bad_encoding"
    reason = "bad_encoding"
    reply = "ERROR invalid UTF-8"


class IdleTimeout(ProtocolError):
    """The client sent nothing, or read nothing, for ``idle_timeout`` seconds."""

    event = "connection.idle_timeout"
    reason = "idle_timeout"
    reply = "ERROR idle timeout"


class LineTimeout(ProtocolError):
    """A line did not arrive whole within ``line_timeout`` seconds of its first byte
    (a slow trickle; Apache's mod_reqtimeout guards the same)."""

    event = "connection.line_timeout"
    reason = "line_timeout"
    reply = "ERROR line timeout"


def encode_reply(reply: Reply) -> Tuple[bytes, bool]:
    """A Reply as wire bytes (CRLF-terminated lines) and whether to close after it.

    :raises TypeError: for a value that is not a Reply.
    :raises ValueError: for a reply line containing CR or LF.
    """
    if reply is None:
        return b"", False
    close = False
    if isinstance(reply, Close):
        close = True
        reply = reply.reply
        if reply is None:
            return b"", True
    if isinstance(reply, str):
        if "\n" in reply or "\r" in reply:
            raise ValueError("a reply line must not contain CR or LF; return a list of lines")
        return reply.encode("utf-8") + CRLF, close
    if isinstance(reply, (list, tuple)):
        parts = []
        for item in reply:
            data, _ = encode_reply(item if isinstance(item, str) else _bad(item))
            parts.append(data)
        return b"".join(parts), close
    return _bad(reply)


def _bad(value: Any) -> NoReturn:
    raise TypeError(f"a handler must return None, str, a list of str or Close, not {type(value).__name__}")


class Connection:
    """One accepted client connection, as a handler sees it.

    Attributes: ``sock`` (the connected socket, blocking, with the idle timeout
    set), ``addr`` (the client's address as ``accept()`` returned it), ``peer``
    (the same as text), ``service`` (the service name), ``max_line_length``
    (bytes), ``idle_timeout`` and ``line_timeout`` (seconds).
    """

    __slots__ = ("_buf", "_eof", "_line_started", "_pos", "_short_timeout", "addr", "idle_timeout",
                 "line_timeout", "max_line_length", "service", "sock")

    def __init__(self, sock: socket.socket, addr: Any, service: str, max_line_length: int, idle_timeout: float,
                 line_timeout: float = 60.0) -> None:
        self.sock = sock
        self.addr = addr
        self.service = service
        self.max_line_length = max_line_length
        self.idle_timeout = idle_timeout
        self.line_timeout = line_timeout
        self._buf = b""
        self._pos = 0
        self._eof = False
        self._line_started = 0.0  # monotonic seconds: first byte of the partial line in hand; 0 = none
        self._short_timeout = False  # SO_RCVTIMEO is below idle_timeout (a partial line's deadline)

    @property
    def peer(self) -> str:
        return peer_text(self.addr)

    def recv(self, partial: bool) -> bytes:
        """One ``recv`` under the idle timeout; with a *partial* line in hand, under what
        is left of its ``line_timeout`` when that is shorter (an extra ``setsockopt``
        only then, so whole lines cost nothing).

        :raises IdleTimeout: nothing arrived for ``idle_timeout`` seconds.
        :raises LineTimeout: the partial line's ``line_timeout`` ran out.
        :raises ConnectionError: the client reset the connection.
        """
        sock = self.sock
        if partial:
            now = time.monotonic()
            if not self._line_started:
                self._line_started = now
            left = self._line_started + self.line_timeout - now
            if left <= 0:
                raise LineTimeout(f"no whole line within {self.line_timeout:g} s")
            if left < self.idle_timeout:
                set_recv_timeout(sock, left)
                self._short_timeout = True
        else:
            self._line_started = 0.0
            if self._short_timeout:
                set_recv_timeout(sock, self.idle_timeout)
                self._short_timeout = False
        try:
            return sock.recv(RECV_SIZE)
        except (TimeoutError, BlockingIOError):
            if self._short_timeout:
                raise LineTimeout(f"no whole line within {self.line_timeout:g} s") from None
            raise IdleTimeout(f"no input for {self.idle_timeout:g} s") from None

    def readline_bytes(self) -> Optional[bytes]:
        """The next input line as bytes without its terminator, or ``None`` at end of input.

        :raises LineTooLong: the line exceeds ``max_line_length`` bytes.
        :raises IdleTimeout, LineTimeout, ConnectionError: see :meth:`recv`.
        """
        limit = self.max_line_length
        while True:
            buf, pos = self._buf, self._pos
            i = buf.find(b"\n", pos)
            if i >= 0:
                end = i - 1 if i > pos and buf[i - 1] == 13 else i
                if end - pos > limit:
                    raise LineTooLong(limit)
                self._pos = i + 1
                return buf[pos:end]
            if self._eof:
                if pos < len(buf):
                    self._pos = len(buf)
                    return buf[pos:]
                return None
            if len(buf) - pos > limit + 1:
                raise LineTooLong(limit)
            data = self.recv(partial=pos < len(buf))
            if not data:
                self._eof = True
                continue
            self._buf = buf[pos:] + data if pos < len(buf) else data
            self._pos = 0

    def readline(self) -> Optional[str]:
        """The next input line decoded as UTF-8, or ``None`` at end of input.

        :raises BadEncoding: the line is not valid UTF-8.
        :raises LineTooLong, IdleTimeout, ConnectionError: see :meth:`readline_bytes`.
        """
        line = self.readline_bytes()
        if line is None:
            return None
        try:
            return line.decode("utf-8")
        except UnicodeDecodeError:
            raise BadEncoding("input is not UTF-8") from None

    def write(self, data: bytes) -> None:
        """Send raw bytes (all of them).

        :raises ConnectionError: the client went away.
        :raises IdleTimeout: the client stopped reading for ``idle_timeout`` seconds.
        """
        try:
            self.sock.sendall(data)
        except (TimeoutError, BlockingIOError):
            raise IdleTimeout("client stopped reading") from None

    def write_line(self, line: str) -> None:
        """Send one line; CRLF is appended."""
        self.write(encode_reply(line)[0])

    def send_reply(self, reply: Reply) -> bool:
        """Send a Reply; returns True when it asks to close the connection."""
        data, close = encode_reply(reply)
        if data:
            self.write(data)
        return close


def peer_text(addr: Any) -> str:
    """A client address as events show it: ``127.0.0.1:5000``, ``[::1]:5000``, or
    ``unix`` for a Unix-domain client (which has no address)."""
    if isinstance(addr, tuple) and len(addr) >= 2:
        return f"[{addr[0]}]:{addr[1]}" if ":" in str(addr[0]) else f"{addr[0]}:{addr[1]}"
    return "unix"


class CountingConnection(Connection):
    """A :class:`Connection` that counts what the access log reports (``[log] access``;
    only then is it used, so a connection costs nothing more when the log is off):
    ``bytes_in`` (bytes received through it), ``bytes_out`` (bytes sent, error replies
    included) and ``lines`` (input lines handed to the handler). A connection handler
    that uses ``conn.sock`` directly bypasses the counts."""

    __slots__ = ("bytes_in", "bytes_out", "lines")

    def __init__(self, sock: socket.socket, addr: Any, service: str, max_line_length: int, idle_timeout: float,
                 line_timeout: float = 60.0) -> None:
        super().__init__(sock, addr, service, max_line_length, idle_timeout, line_timeout)
        self.bytes_in = self.bytes_out = self.lines = 0

    def recv(self, partial: bool) -> bytes:
        data = super().recv(partial)
        self.bytes_in += len(data)
        return data

    def write(self, data: bytes) -> None:
        super().write(data)
        self.bytes_out += len(data)

    def readline_bytes(self) -> Optional[bytes]:
        line = super().readline_bytes()
        if line is not None:
            self.lines += 1
        return line

    def counting(self, handle: Callable[[str], Reply]) -> Callable[[str], Reply]:
        """*handle*, counting the lines it is called with."""
        def counted(line: str) -> Reply:
            self.lines += 1
            return handle(line)
        return counted


# -- serving ------------------------------------------------------------------


def serve_line_function(conn: Connection, handle: Callable[[str], Reply]) -> None:
    """Serve a line-function handler: every complete line in a ``recv`` is handled
    and the replies go out in one ``send`` (one recv and one send per batch)."""
    recv = conn.recv
    limit = conn.max_line_length
    pending = b""
    while True:
        data = recv(bool(pending))
        if not data:
            if pending:  # a last line without terminator
                data, pending = pending + b"\n", b""
            else:
                conn._eof = True
                return
        elif pending:
            data = pending + data
            pending = b""
        out: List[bytes] = []
        pos = 0
        find = data.find
        close = False
        while True:
            i = find(b"\n", pos)
            if i < 0:
                break
            end = i - 1 if i > pos and data[i - 1] == 13 else i
            if end - pos > limit:
                _flush(conn, out)
                raise LineTooLong(limit)
            try:
                line = data[pos:end].decode("utf-8")
            except UnicodeDecodeError:
                _flush(conn, out)
                raise BadEncoding("input is not UTF-8") from None
            pos = i + 1
            try:
                reply = handle(line)
            except BaseException:
                _flush(conn, out)  # what earlier lines of this batch earned still goes out
                raise
            if reply.__class__ is str:
                out.append(reply.encode("utf-8") + CRLF if "\n" not in reply and "\r" not in reply
                           else encode_reply(reply)[0])
            elif reply is not None:
                encoded, close = encode_reply(reply)
                out.append(encoded)
                if close:
                    break
        if out:
            conn.write(out[0] if len(out) == 1 else b"".join(out))
        if close:
            return
        if pos < len(data):
            pending = data[pos:]
            if len(pending) > limit + 1:
                raise LineTooLong(limit)


def _flush(conn: Connection, out: List[bytes]) -> None:
    if out:
        conn.write(b"".join(out))
        out.clear()


def serve_line_class(conn: Connection, cls: type) -> None:
    """Serve a :class:`LineHandler` subclass: one instance for this connection."""
    handler: LineHandler = cls(conn)
    try:
        if conn.send_reply(handler.on_connect()):
            return
        readline = conn.readline
        while True:
            line = readline()
            if line is None:
                return
            if conn.send_reply(handler.on_line(line)):
                return
    finally:
        handler.on_close()


def serve(conn: Connection, call: Callable[[Connection], None], logger: Logger,
          cells: Optional[memoryview] = None) -> str:
    """Serve one connection with *call* (from :func:`connection_server`).

    Never raises for anything the client or the handler did: each failure is
    logged as one ``connection.*`` event, counted in the worker's scoreboard *cells*
    (:data:`preforkd.scoreboard.ERROR_CELL`; on the error path only) and the connection
    is closed. When the server ends the connection (an error, a :class:`Close` reply, a
    connection handler returning) rather than the client, the close lingers (see
    :data:`LINGER_SECONDS`). The caller closes the socket.

    :returns: how the connection ended: ``client_closed`` (end of input),
        ``server_closed`` (a ``Close`` reply, a connection handler returning), or the
        error (``line_too_long``, ``bad_encoding``, ``idle_timeout``, ``line_timeout``,
        ``reset``, ``handler_error``).
    """
    try:
        call(conn)
        if conn._eof:
            return "client_closed"
        _lingering_close(conn)
        return "server_closed"
    except ProtocolError as exc:
        logger.warning(exc.event, peer=conn.peer, error=str(exc))
        _try_send(conn, exc.reply)
        reason = exc.reason
    except (ConnectionError, BrokenPipeError) as exc:
        logger.info("connection.reset", peer=conn.peer, error=exc.strerror or type(exc).__name__)
        reason = "reset"
    except Exception as exc:
        logger.error("connection.handler_error", peer=conn.peer, error=f"{type(exc).__name__}: {exc}",
                     exc_info=True)
        _try_send(conn, "ERROR internal error")
        reason = "handler_error"
    if cells is not None:
        cells[ERROR_CELL[reason]] += 1
    return reason


def _caller(handler: Handler, counted: bool = False) -> Callable[[Connection], None]:
    """What serving one connection with *handler* calls: decided once per worker. A line
    function is *counted* (lines) through :meth:`CountingConnection.counting`."""
    target = handler.target
    if handler.kind is HandlerKind.LINE and counted:
        return lambda conn: serve_line_function(conn, cast(CountingConnection, conn).counting(target))
    if handler.kind is HandlerKind.LINE:
        return lambda conn: serve_line_function(conn, target)
    if handler.kind is HandlerKind.CLASS:
        return lambda conn: serve_line_class(conn, target)
    return target  # type: ignore[no-any-return]  # a @connection_handler takes the connection


def connection_server(handler: Handler, service: ServiceConfig, logger: Logger, unix: bool,
                      cells: Optional[memoryview] = None, access: bool = False) -> Callable[[socket.socket, Any], str]:
    """The function a worker calls with each accepted ``(socket, address)`` of one
    listener: frame lines with *handler* under *service*'s limits, log failures and
    count them in the worker's scoreboard *cells*. It returns how the connection ended
    (:func:`serve`).

    :param unix: the listener is a Unix socket: accepted connections did not inherit
        the idle timeout from it (TCP ones do, see :func:`preforkd.listeners.tune`),
        so it is set on each.
    :param access: log one ``connection.closed`` event per connection (``peer``,
        ``duration_ms`` from the first byte served to the close, on the monotonic clock,
        ``lines``, ``bytes_in``, ``bytes_out``, ``reason``), counting through a
        :class:`CountingConnection`; without it nothing is counted or timed.
    """
    name, limit, idle, line = service.name, service.max_line_length, service.idle_timeout, service.line_timeout
    if access:
        counted_call = _caller(handler, counted=True)
        monotonic = time.monotonic

        def serve_logged(sock: socket.socket, addr: Any) -> str:
            started = monotonic()
            if unix:
                set_timeouts(sock, idle)
            conn = CountingConnection(sock, addr, name, limit, idle, line)
            reason = serve(conn, counted_call, logger, cells)
            logger.info("connection.closed", peer=conn.peer, duration_ms=round((monotonic() - started) * 1000, 3),
                        lines=conn.lines, bytes_in=conn.bytes_in, bytes_out=conn.bytes_out, reason=reason)
            return reason

        return serve_logged
    call = _caller(handler)

    def serve_socket(sock: socket.socket, addr: Any) -> str:
        if unix:
            set_timeouts(sock, idle)
        return serve(Connection(sock, addr, name, limit, idle, line), call, logger, cells)

    return serve_socket


#: Lingering close when the server ends a connection (an error reply, ``Close``,
#: like Apache's lingering_close): half-close, then read and discard what the client
#: is still sending for at most this long / this much, so that closing with unread
#: input does not reset the connection and destroy the last reply before the client
#: has read it (a daytime client that sent a line first, say).
LINGER_SECONDS = 0.5
LINGER_BYTES = 1 << 20


def _try_send(conn: Connection, line: str) -> None:
    sock = conn.sock
    data = line.encode("utf-8") + CRLF
    try:
        sock.settimeout(1.0)
        sock.sendall(data)
        if isinstance(conn, CountingConnection):
            conn.bytes_out += len(data)
        sock.shutdown(socket.SHUT_WR)
    except OSError:
        return
    _drain_input(sock)


def _lingering_close(conn: Connection) -> None:
    """The server ends the connection: half-close and drain the client's input,
    unless the client has already closed its side (nothing left to lose)."""
    sock = conn.sock
    try:
        if not sock.recv(1, socket.MSG_PEEK | socket.MSG_DONTWAIT):
            return
    except BlockingIOError:
        pass  # nothing unread yet; more may still come
    except OSError:
        return
    try:
        sock.shutdown(socket.SHUT_WR)
    except OSError:
        return
    _drain_input(sock)


def _drain_input(sock: socket.socket) -> None:
    deadline = time.monotonic() + LINGER_SECONDS
    drained = 0
    try:
        while drained < LINGER_BYTES:
            left = deadline - time.monotonic()
            if left <= 0:
                return
            sock.settimeout(left)
            data = sock.recv(65536)
            if not data:
                return
            drained += len(data)
    except OSError:
        pass

"""The event-driven worker: up to ``worker_connections`` connections at once on one
asyncio event loop (uvloop when installed and chosen), for services with
``worker_connections > 1`` (nginx's ``worker_connections``; gunicorn's async and
gthread workers).

It runs after the same set-up as the one-connection worker (:mod:`preforkd.worker`)
and speaks the same line protocol with the same limits, error replies and events:
lenient in and strict out, ``max_line_length``, ``idle_timeout`` (silence),
``line_timeout`` (a line must arrive whole within that long of its first byte) and a
lingering close when the server ends a connection. Each connection is an
:class:`asyncio.Protocol` (callbacks, not streams: asyncio's fast path). Line
functions and ``LineHandler`` classes run unchanged, in the loop: a handler that
blocks holds up every connection of its worker. ``async def`` handlers may await
without holding up the others; a connection's lines are still handled one after the
other, in order (reading pauses while one is awaited).

Accepting. The listening sockets are registered with ``EPOLLEXCLUSIVE`` in the
loop's own epoll (:class:`ExclusiveEpollSelector`), so one worker wakes per
connection, as in the one-connection worker. At ``worker_connections`` the worker
takes its listeners out of that epoll: a full worker is never woken for a
connection it cannot take, and takes them back as soon as one closes. uvloop
runs its own epoll and cannot register ``EPOLLEXCLUSIVE``: there every worker wakes
for every connection and all but one find the queue empty.

Timeouts are checked by a sweep every :func:`sweep_interval` seconds over the
connections (cheaper than a timer per connection reset on every read).

Signals: TERM stops accepting (the listening sockets are closed at once, so new
clients are refused rather than queued) and exits once every connection has
closed, or dies of SIGALRM after ``graceful_timeout``; INT and QUIT exit at once;
USR1 reopens the log file; end of file on the master-alive pipe is a graceful stop.
"""

from __future__ import annotations

import asyncio
import collections
import errno
import functools
import inspect
import signal
import socket
import time
from typing import TYPE_CHECKING, Any, Callable, Deque, Dict, List, Optional, Set, cast

from .eventloop import SocketTransport, new_event_loop
from .handler import HandlerKind, LineHandler, Reply
from .log import HOT_FLUSH
from .protocol import (
    CRLF,
    LINGER_BYTES,
    LINGER_SECONDS,
    BadEncoding,
    IdleTimeout,
    LineTimeout,
    LineTooLong,
    ProtocolError,
    encode_reply,
)
from .proxyproto import ProxyError, format_peer, parse
from .scoreboard import ACTIVE, ERROR_CELL, HEARTBEAT, SERVED, STATE, State

if TYPE_CHECKING:  # pragma: no cover
    from .worker import Worker

#: Connections accepted in one wake-up at most (fairness between the listeners and the
#: connections already open).
ACCEPT_BATCH = 64
#: Seconds an accept that failed for want of descriptors or memory waits to retry.
ACCEPT_BACKOFF = 0.5
#: Bytes of replies to pipelined lines gathered before they are written: the write may
#: find the client not reading (``pause_writing``), and then the lines still unanswered
#: wait, unparsed, until it reads again (a client that sends much and reads nothing
#: costs its worker this much, not a reply per line of a whole read).
FLUSH_BYTES = 65536
_RESOURCE_ERRORS = (errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM)


def sweep_interval(idle_timeout: float, line_timeout: float) -> float:
    """Seconds between two timeout sweeps: a quarter of the shorter timeout, within
    0.05..1 s (so a timeout fires at most 25% late, or 1 s late for long ones)."""
    return min(1.0, max(0.05, min(idle_timeout, line_timeout) / 4))


class EventServer:
    """One event-driven worker's connections, listeners, limits and timers."""

    def __init__(self, worker: Worker) -> None:
        spec, svc = worker.spec, worker.service
        assert spec.handler is not None
        self.worker = worker
        self.logger = worker.logger
        self.service = svc
        self.handler = spec.handler
        self.cells = spec.cells
        self.spares = worker.spares
        self.limit = svc.worker_connections
        self.listeners = list(worker.listeners)
        self.exclusive = {s.fileno() for s in self.listeners}
        self.loop = new_event_loop(worker.env.event_loop, self.exclusive)
        #: Connections get a :class:`SocketTransport` (asyncio's selector loop), else the
        #: loop's own transports through ``connect_accepted_socket`` (uvloop).
        self.lean = isinstance(self.loop, asyncio.SelectorEventLoop)
        self.connections: Set[LineConnection] = set()
        self.accepting = False
        self.stopping = False
        self.served = 0
        self.done: asyncio.Future[int] = self.loop.create_future()
        self.tick = sweep_interval(svc.idle_timeout, svc.line_timeout)
        self.call_line = _line_caller(self.handler.kind, self.handler.target)
        #: A ``proxy_protocol`` service's gate: each connection's first bytes are its header.
        self.gate = worker.proxy_gate() if svc.proxy_protocol else None
        #: [log] access: connections that count what they do and log connection.closed
        self.connection_class = CountingLineConnection if worker.env.access_log else LineConnection
        #: [log] access: connection.closed, buffered, written within HOT_FLUSH seconds
        self.access = worker.access
        self.flush_pending = False

    # -- life ---------------------------------------------------------------------------

    def run(self) -> int:
        """Serve until stopped; returns the exit status."""
        loop = self.loop
        asyncio.set_event_loop(loop)
        loop.set_exception_handler(self._loop_error)
        loop.add_signal_handler(signal.SIGTERM, self.stop, "SIGTERM")
        loop.add_signal_handler(signal.SIGUSR1, self.worker.reopen_now)
        loop.add_reader(self.worker.env.alive_fd, self._master_gone)
        self.cells[STATE] = State.IDLE
        self._accept(True)
        loop.call_later(self.tick, self._sweep)
        if svc_timeout := self.service.timeout:
            self._beat(svc_timeout / 4)
        self.worker.announce_ready()
        try:
            return loop.run_until_complete(self.done)
        finally:
            self.cells[STATE] = State.STOPPING

    def flush_soon(self) -> None:
        """Write the access log lines within HOT_FLUSH seconds (one timer at a time)."""
        if not self.flush_pending:
            self.flush_pending = True
            self.loop.call_later(HOT_FLUSH, self.flush_access)

    def flush_access(self) -> None:
        """Write the buffered access log lines (one ``write``)."""
        self.flush_pending = False
        if self.access is not None:
            self.access.flush()

    def _loop_error(self, loop: asyncio.AbstractEventLoop, context: Dict[str, Any]) -> None:
        """What asyncio would print to stderr, as one event (a bug of ours or a handler's)."""
        exc = context.get("exception")
        self.logger.error("worker.loop_error", error=str(context.get("message")),
                          exception=f"{type(exc).__name__}: {exc}" if exc else None, exc_info=exc)

    def stop(self, why: str) -> None:
        """Graceful stop: close our listening sockets now (new clients are refused, not
        queued where nobody accepts), keep serving what we hold, exit when it is done;
        a ``graceful_timeout`` timer (SIGALRM, which also works while a blocking handler
        holds the loop) bounds it."""
        if self.stopping:
            return
        self.stopping = True
        self._accept(False)
        for sock in self.listeners:
            sock.close()
        self.listeners = []
        signal.setitimer(signal.ITIMER_REAL, max(0.001, self.worker.env.graceful_timeout))
        self._maybe_done()

    def _master_gone(self) -> None:
        self.logger.info("worker.orphaned", reason="master is gone")
        self.loop.remove_reader(self.worker.env.alive_fd)
        self.stop("master gone")

    def _maybe_done(self) -> None:
        if self.stopping and not self.connections and not self.done.done():
            self.done.set_result(0)

    # -- accepting ----------------------------------------------------------------------

    def _accept(self, on: bool) -> None:
        """Watch the listening sockets, or stop watching them (full, stopping)."""
        if on == self.accepting or (on and self.stopping):
            return
        self.accepting = on
        for sock in self.listeners:
            if on:
                self.loop.add_reader(sock.fileno(), self._on_acceptable, sock)
            else:
                self.loop.remove_reader(sock.fileno())

    def _on_acceptable(self, lsock: socket.socket) -> None:
        for _ in range(ACCEPT_BATCH):
            if len(self.connections) >= self.limit or self.stopping:
                return
            try:
                sock, addr = lsock.accept()
            except (BlockingIOError, InterruptedError):
                return
            except OSError as exc:
                if exc.errno in _RESOURCE_ERRORS:
                    self.logger.error("worker.accept_failed", error=exc.strerror)
                    self._accept(False)
                    self.loop.call_later(ACCEPT_BACKOFF, self._resume_accepting)
                return
            if self.gate is not None and not self.gate.trusts(addr):
                self.gate.reject(addr, "peer not in proxy_trusted")
                if self.access is not None:  # [log] access: this connection's one event
                    self.access(peer=format_peer(addr), duration_ms=0.0, lines=0, bytes_in=0, bytes_out=0,
                                reason="proxy_rejected")
                    self.flush_soon()
                sock.close()
                continue
            sock.setblocking(False)
            conn = self.connection_class(self, addr, proxied=self.gate is not None)
            self._opened(conn)
            if self.lean:
                SocketTransport(self.loop, sock, conn)
            else:
                task = self.loop.create_task(self.loop.connect_accepted_socket(conn.itself, sock))
                task.add_done_callback(functools.partial(self._attached, conn=conn, sock=sock))

    def _resume_accepting(self) -> None:
        if len(self.connections) < self.limit:
            self._accept(True)

    def _attached(self, task: asyncio.Task[Any], *, conn: LineConnection, sock: socket.socket) -> None:
        if not task.cancelled() and task.exception() is None:
            return
        sock.close()  # the transport was never made: nobody else will
        self._closed(conn)

    def _opened(self, conn: LineConnection) -> None:
        self.connections.add(conn)
        n = len(self.connections)
        self.cells[ACTIVE] = n
        if n >= self.limit:
            self._accept(False)
            self.cells[STATE] = State.BUSY
            if self.spares is not None:
                self.spares.busy()

    def _closed(self, conn: LineConnection) -> None:
        if conn not in self.connections:
            return
        full = len(self.connections) >= self.limit
        self.connections.discard(conn)
        self.served += 1
        self.cells[SERVED] = self.served
        self.cells[ACTIVE] = len(self.connections)
        if full:
            self.cells[STATE] = State.IDLE
            if self.spares is not None:
                self.spares.idle()
        max_requests = self.service.max_requests
        if max_requests and self.served >= max_requests and not self.stopping:
            self.logger.info("worker.max_requests", served=self.served)
            self.logger.info("worker.recycled", reason="max_requests", served=self.served)
            self.stop("max_requests")
        elif not self.stopping:
            self._accept(True)
        self._maybe_done()

    # -- timeouts -----------------------------------------------------------------------

    def _beat(self, every: float) -> None:
        """The loop turns: say so in the scoreboard (the master's ``timeout`` watches it; a
        handler that blocks the loop stops the beat)."""
        self.cells[HEARTBEAT] = time.monotonic_ns()
        self.loop.call_later(every, self._beat, every)

    def _sweep(self) -> None:
        """End connections past their idle or line timeout."""
        now = self.loop.time()
        idle, line = self.service.idle_timeout, self.service.line_timeout
        for conn in list(self.connections):
            conn.check_timeouts(now, idle, line)
        self.loop.call_later(self.tick, self._sweep)


def _line_caller(kind: HandlerKind, target: Any) -> Optional[Callable[[str], Any]]:
    """For a line function, the function; for a class, ``None`` (each connection calls
    its own instance's ``on_line``)."""
    return target if kind is HandlerKind.LINE else None


class LineConnection(asyncio.Protocol):
    """One client connection of an event-driven worker, and what a ``LineHandler``
    sees as ``self.conn``: ``addr``, ``peer``, ``service``, ``max_line_length``,
    ``idle_timeout``, ``line_timeout``, ``write_line(text)`` and ``write(data)``
    (buffered, never blocking). Times are on the loop's clock (monotonic seconds)."""

    __slots__ = (
        "_accepted",
        "_buf",
        "_closing",
        "_drain_left",
        "_drain_since",
        "_eof",
        "_header",
        "_instance",
        "_line_started",
        "_lines",
        "_linger_left",
        "_task",
        "_write_paused_at",
        "addr",
        "last_input",
        "server",
        "transport",
    )

    def __init__(self, server: EventServer, addr: Any, proxied: bool = False) -> None:
        self.server = server
        self.addr = addr
        #: The PROXY protocol header's bytes so far, while it is awaited; ``None`` after
        #: (or for a service without ``proxy_protocol``).
        self._header: Optional[bytes] = b"" if proxied else None
        self.transport: Optional[asyncio.Transport] = None
        self._buf = b""
        self._eof = False
        self._closing = False  # the server ends the connection (lingering close under way)
        self._linger_left = LINGER_BYTES  # bytes still discarded while lingering
        self._line_started = 0.0
        self._write_paused_at = 0.0
        self._drain_left = -1  # bytes unsent when a closing connection's draining last moved
        self._drain_since = 0.0
        self._lines: Optional[Deque[str]] = None  # lines waiting for an awaiting handler
        self._task: Optional[asyncio.Task[None]] = None
        self._instance: Optional[LineHandler] = None
        self.last_input = self._accepted = server.loop.time()

    def itself(self) -> LineConnection:
        """The protocol factory of this one connection (uvloop's ``connect_accepted_socket``)."""
        return self

    def ending(self) -> bool:
        """The server has decided to end this connection (a lingering close is under way).
        A method, not an attribute test: handlers called in between may end it."""
        return self._closing

    # -- what a handler sees --------------------------------------------------------------

    @property
    def peer(self) -> str:
        addr = self.addr
        if isinstance(addr, tuple) and len(addr) >= 2:
            return f"[{addr[0]}]:{addr[1]}" if ":" in str(addr[0]) else f"{addr[0]}:{addr[1]}"
        return "unix"

    @property
    def service(self) -> str:
        return self.server.service.name

    @property
    def max_line_length(self) -> int:
        return self.server.service.max_line_length

    @property
    def idle_timeout(self) -> float:
        return self.server.service.idle_timeout

    @property
    def line_timeout(self) -> float:
        return self.server.service.line_timeout

    def write(self, data: bytes) -> None:
        """Queue raw bytes for the client (never blocks; flow control pauses reading)."""
        if self.transport is not None and not self._closing:
            self.transport.write(data)

    def write_line(self, line: str) -> None:
        """Queue one line; CRLF is appended."""
        self.write(encode_reply(line)[0])

    # -- asyncio.Protocol -------------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)  # uvloop's are not asyncio.Transport subclasses
        if self._header is None:
            self._begin()
        # else the handler starts once the PROXY header is in (proxy-protocol.txt section 2:
        # nothing is processed, no greeting sent, before a complete and valid header)

    def _begin(self) -> None:
        """The connection is the handler's: make its instance and send its greeting."""
        handler = self.server.handler
        if handler.kind is not HandlerKind.CLASS:
            return
        try:
            self._instance = handler.target(self)
            assert self._instance is not None
            reply = self._instance.on_connect()
        except Exception as exc:  # noqa: BLE001 - a handler bug costs one connection
            self._handler_failed(exc)
            return
        if inspect.isawaitable(reply):
            self._start_task(self._run_async(reply))
        elif reply is not None:
            out: List[bytes] = []
            self._send(out, reply)
            self._flush(out)

    def _receive(self, data: bytes) -> None:
        """asyncio's ``data_received`` (the same function: no extra call per read)."""
        if self._closing:
            self._discard(len(data))
            return
        self.last_input = self.server.loop.time()
        if self._header is not None:
            rest = self._take_header(data)
            if not rest or self.ending():
                return
            data = rest
        elif (not self._buf and self._task is None and not self._write_paused_at
              and data.find(b"\n") == len(data) - 1 and not self.server.handler.is_async):
            # The common case, one whole line and nothing before it: what _lines_in does
            # with it, without its loop and bookkeeping (no rest to keep, no line started).
            end = len(data) - 2 if len(data) > 1 and data[-2] == 13 else len(data) - 1
            if end <= self.server.service.max_line_length:
                try:
                    line = data[:end].decode("utf-8")
                except UnicodeDecodeError:
                    pass  # _lines_in replies with the error
                else:
                    out: List[bytes] = []
                    self._handle(out, line)
                    if out:
                        self._flush(out)
                    return
        self._lines_in(self._buf + data if self._buf else data)

    data_received = _receive

    def _lines_in(self, buf: bytes) -> None:
        """Handle the whole lines in *buf* (what was left over, and what just came) and
        keep the rest: a partial line, or, when the client stopped reading our replies
        (``pause_writing``), the lines not handled yet (:meth:`resume_writing` goes on)."""
        limit = self.server.service.max_line_length
        out: List[bytes] = []
        size = 0
        pos = 0
        find = buf.find
        while not self.ending() and not self._write_paused_at:
            i = find(b"\n", pos)
            if i < 0:
                break
            end = i - 1 if i > pos and buf[i - 1] == 13 else i
            if end - pos > limit:
                self._flush(out)
                self._protocol_error(LineTooLong(limit))
                return
            try:
                line = buf[pos:end].decode("utf-8")
            except UnicodeDecodeError:
                self._flush(out)
                self._protocol_error(BadEncoding("input is not UTF-8"))
                return
            pos = i + 1
            if self._task is not None or self.server.handler.is_async:
                self._queue(line)
            else:
                size += self._handle(out, line)
                if size >= FLUSH_BYTES:
                    self._flush(out)  # may pause writing: then the rest waits
                    size = 0
        self._flush(out)
        if self.ending():
            return
        self._buf = buf[pos:] if pos < len(buf) else b""
        if self._write_paused_at and b"\n" in self._buf:
            return  # unanswered lines wait for the client to read (reading is paused)
        if self._buf:
            if len(self._buf) > limit + 1:
                self._protocol_error(LineTooLong(limit))
                return
            if not self._line_started:
                self._line_started = self.last_input
        else:
            self._line_started = 0.0

    def eof_received(self) -> bool:
        self._eof = True
        if self._header is not None:
            self._reject_header("connection closed before a complete header" if self._header
                                else "connection closed without a header")
            return False
        if self._closing:
            self._close_now()
            return False
        if self._buf:  # a last line without terminator counts
            self._receive(b"\n")
        if self._task is None and not self.ending() and not self._write_paused_at:
            self._close_now()  # else resume_writing goes on with what is unanswered, then closes
        return True  # keep the transport for replies still being produced; we close it

    def connection_lost(self, exc: Optional[Exception]) -> None:
        if exc is not None and not self._closing and isinstance(exc, OSError):
            self.server.logger.info("connection.reset", peer=self.peer,
                                    error=exc.strerror or type(exc).__name__)
            self.server.cells[ERROR_CELL["reset"]] += 1
        if self._task is not None:
            self._task.cancel()
        if self._instance is not None:
            instance, self._instance = self._instance, None
            try:
                on_close: Callable[[], Any] = instance.on_close
                result = on_close()
                if inspect.isawaitable(result):
                    self.server.loop.create_task(_quietly(result))
            except Exception as exc2:  # noqa: BLE001
                self.server.logger.error("connection.handler_error", peer=self.peer,
                                         error=f"{type(exc2).__name__}: {exc2}")
        self.transport = None
        self.server._closed(self)

    def pause_writing(self) -> None:
        """The client reads slower than we write: stop reading it until it catches up."""
        self._write_paused_at = self._drain_since = self.server.loop.time()
        if self.transport is not None:
            self._drain_left = self.transport.get_write_buffer_size()
            self.transport.pause_reading()

    def resume_writing(self) -> None:
        """The client has read enough: answer the lines that waited, then read again."""
        self._write_paused_at = 0.0
        self._drain_left = -1
        self.last_input = self.server.loop.time()  # its silence counts from when it has read our replies
        if self.transport is None or self._task is not None or self._closing:
            return
        if self._lines:
            self._start_task(self._run_async(None))
            return
        if b"\n" in self._buf:
            self._lines_in(self._buf)
            if self.ending() or self._write_paused_at:
                return
        if self._eof:
            self._close_now()
        else:
            self.transport.resume_reading()

    # -- the PROXY protocol header -------------------------------------------------------

    def _take_header(self, data: bytes) -> bytes:
        """Add *data* to the header awaited; once it is whole (:func:`preforkd.proxyproto.parse`,
        bounded at 107 or 65,551 bytes), take the client's address from it, start the
        handler, and return the bytes after it (``b""`` while incomplete or rejected)."""
        buf = self._header + data if self._header else data
        try:
            header = parse(buf)
        except ProxyError as exc:
            self._reject_header(str(exc))
            return b""
        if header is None:
            self._header = buf
            return b""
        self._header = None
        if header.source is not None:
            self.addr = header.source
        self._begin()
        return buf[header.length:]

    def _reject_header(self, reason: str) -> None:
        """``proxy.rejected`` with the real peer; the connection is dropped (no reply:
        the sender speaks the PROXY protocol, not ours)."""
        gate = self.server.gate
        if gate is not None:
            gate.reject(self.addr, reason)
        self._header = None
        self._closing = True
        if self.transport is not None:
            self.transport.abort()

    # -- lines ------------------------------------------------------------------------------

    def _handle(self, out: List[bytes], line: str) -> int:
        """Call a synchronous handler with *line*; its reply joins *out*. Returns the
        reply's length in bytes."""
        try:
            reply = self._call(line)
        except Exception as exc:  # noqa: BLE001 - a handler bug costs one connection
            self._flush(out)  # what earlier lines of this batch earned still goes out
            self._handler_failed(exc)
            return 0
        if reply.__class__ is str and "\n" not in reply and "\r" not in reply:
            data = reply.encode("utf-8") + CRLF
            out.append(data)
            return len(data)
        if reply is not None:
            return self._send(out, reply)
        return 0

    def _call(self, line: str) -> Any:
        call = self.server.call_line
        if call is not None:
            return call(line)
        assert self._instance is not None
        return self._instance.on_line(line)

    def _send(self, out: List[bytes], reply: Reply) -> int:
        try:
            data, close = encode_reply(reply)
        except (TypeError, ValueError) as exc:
            self._flush(out)
            self._handler_failed(exc)
            return 0
        out.append(data)
        if close:
            self._flush(out)
            self._begin_linger()
        return len(data)

    def _flush(self, out: List[bytes]) -> None:
        if out and self.transport is not None:
            self.transport.write(out[0] if len(out) == 1 else b"".join(out))
            out.clear()

    # -- awaiting handlers -------------------------------------------------------------------

    def _queue(self, line: str) -> None:
        if self._lines is None:
            self._lines = collections.deque()
        self._lines.append(line)
        if self._task is None:
            self._start_task(self._run_async(None))

    def _start_task(self, coro: Any) -> None:
        if self.transport is not None:
            self.transport.pause_reading()  # in order, one line at a time: let the kernel buffer the rest
        self._task = self.server.loop.create_task(coro)

    async def _run_async(self, first: Any) -> None:
        """Await *first* (an ``async`` ``on_connect``'s reply), if any, then the queued
        lines one after the other, in order, sending each reply as it comes."""
        out: List[bytes] = []
        try:
            if first is not None:
                reply = await first
                if reply is not None:
                    self._send(out, reply)
                    self._flush(out)
            while self._lines and not self.ending() and not self._write_paused_at:  # else resume_writing goes on
                reply = self._call(self._lines.popleft())
                if inspect.isawaitable(reply):
                    reply = await reply
                if reply is not None:
                    self._send(out, reply)
                    self._flush(out)
        except Exception as exc:  # noqa: BLE001 - a handler bug costs one connection
            self._flush(out)
            self._handler_failed(exc)
        finally:
            self._task_done()

    def _task_done(self) -> None:
        self._task = None
        self.last_input = self.server.loop.time()  # time in the handler is not the client's silence
        if self.transport is None or self._closing:
            return
        if self._write_paused_at:
            return  # resume_writing goes on with the lines left, if any
        if self._eof and not self._lines:
            self._close_now()  # the client is done and every line of it is answered
        else:
            self.transport.resume_reading()

    # -- ending -----------------------------------------------------------------------------

    def check_timeouts(self, now: float, idle: float, line: float) -> None:
        """Called by the sweep: end the connection when its partial line has taken longer
        than *line* seconds, or it has been silent for *idle* seconds, or (paused on its
        output, or being closed with replies still unsent) it has read none of them for
        *idle* seconds: then they are dropped with the connection (no error reply: it
        would not be read)."""
        if self._task is not None:
            return
        transport = self.transport
        if transport is None:
            return
        closing = self._closing or transport.is_closing()
        if closing or self._write_paused_at:
            if self._stalled(transport.get_write_buffer_size(), now, idle):
                self._note(IdleTimeout("client stopped reading"))
                transport.abort()
            return
        if self._header is not None:
            gate = self.server.gate
            if gate is not None and now - self._accepted >= gate.timeout:
                self._reject_header(f"no complete header within {gate.timeout:g} s")
            return
        if self._line_started and now - self._line_started >= line:
            self._protocol_error(LineTimeout(f"no whole line within {line:g} s"))
        elif now - self.last_input >= idle:
            self._protocol_error(IdleTimeout(f"no input for {idle:g} s"))

    def _stalled(self, left: int, now: float, idle: float) -> bool:
        """Has the client read none of our *left* unsent bytes for *idle* seconds? Progress
        is the unsent bytes going down (a handler writing more is not the client's)."""
        if not left:
            self._drain_left = -1
            return False
        if self._drain_left < 0 or left < self._drain_left:
            self._drain_since = now
        self._drain_left = left
        return now - self._drain_since >= idle

    def _note(self, exc: ProtocolError) -> None:
        """Log and count *exc*."""
        self.server.logger.warning(exc.event, peer=self.peer, error=str(exc))
        self.server.cells[ERROR_CELL[exc.reason]] += 1

    def _protocol_error(self, exc: ProtocolError) -> None:
        self._note(exc)
        self.write(exc.reply.encode("utf-8") + CRLF)
        self._begin_linger()

    def _handler_failed(self, exc: BaseException) -> None:
        self.server.logger.error("connection.handler_error", peer=self.peer, error=f"{type(exc).__name__}: {exc}",
                                 exc_info=exc)
        self.server.cells[ERROR_CELL["handler_error"]] += 1
        self.write(b"ERROR internal error\r\n")
        self._begin_linger()

    def _begin_linger(self) -> None:
        """The server ends the connection: half-close, then read and discard what the
        client still sends for at most LINGER_SECONDS / LINGER_BYTES (Apache's lingering
        close), so that closing with unread input does not reset the connection and
        destroy the last reply; at once if the client has already closed its side."""
        if self._closing or self.transport is None:
            return
        self._closing = True
        self._buf = b""
        if self._lines:
            self._lines.clear()
        transport = self.transport
        if self._eof or not transport.can_write_eof():
            self._close_now()
            return
        transport.write_eof()
        transport.resume_reading()
        self.server.loop.call_later(LINGER_SECONDS, self._linger_over)

    def _discard(self, n: int) -> None:
        self._linger_left -= n
        if self._linger_left < 0:
            self._linger_over()

    def _linger_over(self) -> None:
        """The lingering close ran out: close; drop what is still unsent if the client
        stopped reading, else linger on while it reads (the sweep ends it if it stops)."""
        transport = self.transport
        if transport is not None and transport.get_write_buffer_size():
            self.server.loop.call_later(LINGER_SECONDS, self._linger_over)
        else:
            self._close_now()

    def _close_now(self) -> None:
        if self.transport is not None and not self.transport.is_closing():
            self.transport.close()


class CountingLineConnection(LineConnection):
    """A :class:`LineConnection` for the access log (``[log] access``; only then is it
    used, so a connection costs nothing more when the log is off): counts ``bytes_in``
    (bytes read, not those discarded during a lingering close), ``bytes_out`` (bytes
    queued for the client, error replies included), ``lines`` (handed to the handler),
    keeps how the connection ended (``reason``, as :func:`preforkd.protocol.serve` names
    it), and logs ``connection.closed`` when it is gone (``duration_ms`` on the loop's
    monotonic clock)."""

    __slots__ = ("_opened_at", "bytes_in", "bytes_out", "lines", "reason")

    def __init__(self, server: EventServer, addr: Any, proxied: bool = False) -> None:
        super().__init__(server, addr, proxied)
        self._opened_at = server.loop.time()
        self.bytes_in = self.bytes_out = self.lines = 0
        self.reason = ""

    def data_received(self, data: bytes) -> None:
        if not self._closing:
            self.bytes_in += len(data)
        self._receive(data)

    def eof_received(self) -> bool:
        self.reason = self.reason or "client_closed"
        return super().eof_received()

    def connection_lost(self, exc: Optional[Exception]) -> None:
        if exc is not None and not self._closing and isinstance(exc, OSError):
            self.reason = self.reason or "reset"
        super().connection_lost(exc)
        server = self.server
        if server.access is None:
            return
        server.access(peer=self.peer, duration_ms=round((server.loop.time() - self._opened_at) * 1000, 3),
                      lines=self.lines, bytes_in=self.bytes_in, bytes_out=self.bytes_out,
                      reason=self.reason or "client_closed")
        server.flush_soon()

    def write(self, data: bytes) -> None:
        if self.transport is not None and not self._closing:
            self.bytes_out += len(data)
        super().write(data)

    def _flush(self, out: List[bytes]) -> None:
        if out and self.transport is not None:
            self.bytes_out += sum(len(chunk) for chunk in out)
        super()._flush(out)

    def _handle(self, out: List[bytes], line: str) -> int:
        self.lines += 1
        return super()._handle(out, line)

    def _queue(self, line: str) -> None:
        self.lines += 1
        super()._queue(line)

    def _note(self, exc: ProtocolError) -> None:
        self.reason = self.reason or exc.reason
        super()._note(exc)

    def _handler_failed(self, exc: BaseException) -> None:
        self.reason = self.reason or "handler_error"
        super()._handler_failed(exc)

    def _begin_linger(self) -> None:
        self.reason = self.reason or "server_closed"
        super()._begin_linger()

    def _reject_header(self, reason: str) -> None:
        self.reason = self.reason or "proxy_rejected"
        super()._reject_header(reason)


async def _quietly(awaitable: Any) -> None:
    try:
        await awaitable
    except Exception:  # noqa: BLE001 - on_close of a connection already gone
        pass

"""Endpoints the master answers itself: a listening socket served from the master's own
selector, one short request and one reply per connection, never blocking the loop.

The master is single-threaded and forks, so it must not start threads (a ``fork`` while
another thread holds a lock, the import lock say, deadlocks the child), and nothing it
serves may make it wait: reaping, respawning and the control socket come first. An
:class:`Endpoint` therefore does everything without blocking, driven by readiness
events from the master's selector and by its timer (:meth:`Endpoint.tick`):

1. accept while the listener is readable (a batch at a time), each client
   non-blocking;
2. read the request until a terminator (``b"\\r\\n\\r\\n"`` for HTTP), at most
   ``max_request`` bytes; with no terminator at all, reply at once (HAProxy's
   agent-check expects a line without asking);
3. compute the reply with the endpoint's *respond* function (synchronously, in the
   master: it must be quick, like building the status document);
4. write it as the socket takes it, then half-close and read until the client closes
   (a lingering close: closing with unread input would reset the connection and could
   destroy the reply before the client reads it), and close.

Limits, each a constructor argument:

* ``timeout``: seconds a client may take from accept to close, whatever it does
  (silent, trickling, not reading); then it is dropped.
* ``max_request``: bytes of request; a longer one gets the *overflow* reply.
* ``max_clients``: clients held at once. At the limit, a new connection waiting in the
  accept queue displaces the oldest client that already has its whole reply and is only
  being waited on to close (it has nothing more to get), else the client that has been
  *reading* the longest (a half-open connection that never completes its request,
  slowloris-style); when every held client is still being written to, the endpoint
  stops accepting until one leaves, and the kernel's accept queue holds the rest.
* Out of descriptors (``EMFILE``, ``ENFILE``) or memory (``ENOBUFS``, ``ENOMEM``) at
  ``accept``: the listener is taken out of the selector for :data:`ACCEPT_BACKOFF`
  seconds, so the master never spins on a listener that stays readable
  (level-triggered) but cannot be accepted from.

Nothing here is specific to HTTP: :mod:`preforkd.metrics` serves Prometheus with it,
and the HAProxy agent-check endpoint is another endpoint of the same kind.
"""

from __future__ import annotations

import errno
import selectors
import socket
import time
from typing import Callable, Dict, List, Optional, Tuple

from .listeners import Listener
from .log import Logger

#: What an endpoint answers: the request bytes (up to and including its terminator;
#: ``b""`` for a reply-at-once endpoint) -> the whole reply.
Respond = Callable[[bytes], bytes]

#: Seconds the listener rests after ``accept`` failed for want of descriptors or memory.
ACCEPT_BACKOFF = 0.5
#: Connections accepted per readiness event at most (the master has other work too).
ACCEPT_BATCH = 16
#: Bytes read and discarded at most while lingering after the reply.
LINGER_BYTES = 65536
_RESOURCE_ERRORS = (errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM)

_READING, _WRITING, _LINGERING = 0, 1, 2


class _Client:
    __slots__ = ("accepted", "deadline", "inbuf", "lingered", "outbuf", "phase", "sock")

    def __init__(self, sock: socket.socket, now: float, timeout: float) -> None:
        self.sock = sock
        self.accepted = now  # monotonic seconds
        self.deadline = now + timeout  # monotonic seconds
        self.inbuf = b""
        self.outbuf = b""
        self.phase = _READING
        self.lingered = 0


class Endpoint:
    """A listener the master answers itself (see the module docstring).

    :param role: what it is, for events and ``status`` (``"metrics"``, ``"agent_check"``).
    :param listener: the bound (or inherited) listening socket; the master owns it and
        closes it, the endpoint only watches it.
    :param selector: the master's selector; callbacks are registered as its ``data``,
        called with the event mask (the master loop's convention).
    :param respond: computes the reply; an exception is logged (``endpoint.error``) and
        the client gets *error_reply*.
    :param terminators: the request ends at the first of these; ``()`` to reply at once
        without reading.
    :param max_request: bytes; a request longer than this gets *overflow_reply*.
    :param timeout: seconds from accept to close (monotonic clock).
    :param max_clients: clients held at once.
    :param overflow_reply, error_reply: sent on an oversized request or a failing
        *respond* (``b""``: just close).
    :param accept_batch: connections accepted per readiness event at most.
    :param accept_backoff: seconds the listener rests after ``accept`` failed for want of
        descriptors or memory.
    :param failed_event: the event logged, once per such episode.
    """

    def __init__(self, role: str, listener: Listener, selector: selectors.BaseSelector, respond: Respond,
                 logger: Logger, *, terminators: Tuple[bytes, ...] = (b"\n",), max_request: int = 8192,
                 timeout: float = 10.0, max_clients: int = 16, overflow_reply: bytes = b"",
                 error_reply: bytes = b"", accept_batch: int = ACCEPT_BATCH, accept_backoff: float = ACCEPT_BACKOFF,
                 failed_event: str = "endpoint.accept_failed") -> None:
        if max_clients < 1 or max_request < 1 or timeout <= 0:
            raise ValueError("max_clients and max_request must be >= 1 and timeout > 0")
        self.role = role
        self.listener = listener
        self.selector = selector
        self.respond = respond
        self.logger = logger
        self.terminators = terminators
        self.max_request = max_request
        self.timeout = timeout
        self.max_clients = max_clients
        self.overflow_reply = overflow_reply
        self.error_reply = error_reply
        self.accept_batch = accept_batch
        self.accept_backoff = accept_backoff
        self.failed_event = failed_event
        self._failing = False  # in an episode of failed accepts (logged once)
        self.clients: Dict[int, _Client] = {}  # fd -> client
        self.accepting = False
        self.resume_at: Optional[float] = None  # monotonic seconds: accept again after a resource error
        self.served = 0  # replies sent in full

    # -- the master's calls ----------------------------------------------------------

    def start(self) -> None:
        """Watch the listener (call once, after the master's selector exists)."""
        self.listener.sock.setblocking(False)
        self._accept(True)

    def tick(self, now: float) -> None:
        """Drop clients past their deadline; accept again once a resource error's back-off
        is over. *now*: monotonic seconds."""
        for client in [c for c in self.clients.values() if c.deadline <= now]:
            self._drop(client)
        if self.resume_at is not None and now >= self.resume_at:
            self.resume_at = None
            self._accept(len(self.clients) < self.max_clients or self._victim() is not None)

    def deadline(self) -> Optional[float]:
        """The monotonic time at which :meth:`tick` next has work, if any."""
        times = [c.deadline for c in self.clients.values()]
        if self.resume_at is not None:
            times.append(self.resume_at)
        return min(times) if times else None

    def close_clients(self) -> None:
        """Drop every client (before a re-exec: their sockets are not handed over)."""
        for client in list(self.clients.values()):
            self._drop(client)

    def close(self) -> None:
        """Stop serving: drop the clients and stop watching the listener (which the master
        closes, as it closes every listener)."""
        self.close_clients()
        self._accept(False)
        self.resume_at = None

    # -- accepting ---------------------------------------------------------------------

    def _accept(self, on: bool) -> None:
        if on == self.accepting:
            return
        self.accepting = on
        try:
            if on:
                self.selector.register(self.listener.sock, selectors.EVENT_READ, self._on_acceptable)
            else:
                self.selector.unregister(self.listener.sock)
        except (KeyError, ValueError, OSError):  # closed underneath us (stopping)
            self.accepting = False

    def _victim(self) -> Optional[_Client]:
        """The client a new connection displaces at the limit: the oldest one that has
        its whole reply (lingering), else the one reading its request the longest."""
        for phase in (_LINGERING, _READING):
            held = [c for c in self.clients.values() if c.phase == phase]
            if held:
                return min(held, key=lambda c: c.accepted)
        return None

    def _on_acceptable(self, _mask: int) -> None:
        now = time.monotonic()
        for _ in range(self.accept_batch):
            if len(self.clients) >= self.max_clients:
                victim = self._victim()
                if victim is None:  # everyone is being written to: let the kernel queue the rest
                    self._accept(False)
                    return
                try:
                    conn, _ = self.listener.sock.accept()
                except (BlockingIOError, InterruptedError):
                    return  # nobody is waiting after all: keep the reader
                except OSError as exc:
                    self._accept_failed(exc, now)
                    return
                self._drop(victim)  # a waiting connection displaces an answered or long-reading client
            else:
                try:
                    conn, _ = self.listener.sock.accept()
                except (BlockingIOError, InterruptedError):
                    return
                except OSError as exc:
                    self._accept_failed(exc, now)
                    return
            self._failing = False
            self._serve(conn, now)

    def _accept_failed(self, exc: OSError, now: float) -> None:
        if exc.errno == errno.ECONNABORTED:
            return  # the client gave up while queued; the next readiness event comes anyway
        self._accept(False)
        self.resume_at = now + self.accept_backoff
        if not self._failing:  # once per episode: it may last, and the log must not flood
            self._failing = True
            self.logger.error(self.failed_event, role=self.role,
                              error=exc.strerror if exc.errno in _RESOURCE_ERRORS else str(exc),
                              retry_in=self.accept_backoff, clients=len(self.clients))

    def _serve(self, conn: socket.socket, now: float) -> None:
        conn.setblocking(False)
        client = _Client(conn, now, self.timeout)
        self.clients[conn.fileno()] = client
        if not self.terminators:
            self._answer(client, b"")
            return
        self.selector.register(conn, selectors.EVENT_READ, lambda mask, c=client: self._on_client(c, mask))

    # -- one client ------------------------------------------------------------------------

    def _on_client(self, client: _Client, mask: int) -> None:
        try:
            if client.phase == _READING:
                self._read(client)
            elif client.phase == _WRITING:
                self._write(client)
            else:
                self._linger(client)
        except (BlockingIOError, InterruptedError):
            pass
        except OSError:
            self._drop(client)

    def _read(self, client: _Client) -> None:
        data = client.sock.recv(4096)
        if not data:  # closed before its request was whole: nothing to answer
            self._drop(client)
            return
        client.inbuf += data
        buf = client.inbuf
        for term in self.terminators:
            end = buf.find(term)
            if end >= 0 and end + len(term) <= self.max_request:
                self._answer(client, buf[:end + len(term)])
                return
        if len(buf) >= self.max_request:
            self._reply(client, self.overflow_reply)

    def _answer(self, client: _Client, request: bytes) -> None:
        try:
            reply = self.respond(request)
        except Exception as exc:  # a bug in a reply must never take the master down
            self.logger.error("endpoint.error", role=self.role, error=f"{type(exc).__name__}: {exc}",
                              exc_info=True)
            reply = self.error_reply
        self._reply(client, reply)

    def _reply(self, client: _Client, reply: bytes) -> None:
        client.inbuf = b""
        client.outbuf = reply
        client.phase = _WRITING
        if not reply:
            self._drop(client)
            return
        try:
            self._write(client)  # most replies fit the socket buffer: no second wake-up
        except (BlockingIOError, InterruptedError):
            pass
        except OSError:
            self._drop(client)
            return
        if client.phase == _WRITING and client.sock.fileno() in self.clients:
            self._watch(client, selectors.EVENT_WRITE)

    def _write(self, client: _Client) -> None:
        sent = client.sock.send(client.outbuf)
        client.outbuf = client.outbuf[sent:]
        if client.outbuf:
            return
        self.served += 1
        client.phase = _LINGERING
        client.sock.shutdown(socket.SHUT_WR)
        self._watch(client, selectors.EVENT_READ)
        if not self.accepting and self.resume_at is None:
            self._accept(True)  # a new connection may displace it now

    def _linger(self, client: _Client) -> None:
        data = client.sock.recv(4096)
        client.lingered += len(data)
        if not data or client.lingered > LINGER_BYTES:
            self._drop(client)

    def _watch(self, client: _Client, events: int) -> None:
        callback = lambda mask, c=client: self._on_client(c, mask)  # noqa: E731
        try:
            self.selector.modify(client.sock, events, callback)
        except KeyError:
            self.selector.register(client.sock, events, callback)

    def _drop(self, client: _Client) -> None:
        sock = client.sock
        if self.clients.pop(sock.fileno(), None) is None:
            return
        try:
            self.selector.unregister(sock)
        except (KeyError, ValueError):
            pass
        sock.close()
        if not self.accepting and self.resume_at is None and len(self.clients) < self.max_clients:
            self._accept(True)


class EndpointSet:
    """The endpoints one master answers itself (``[metrics]``, the agent-check), as one:
    their timers, and closing them all or all but the agent (which says ``down``
    until the master exits)."""

    def __init__(self) -> None:
        self.all: List[Endpoint] = []
        self.agent: Optional[Endpoint] = None

    def add(self, endpoint: Endpoint, agent: bool = False) -> None:
        """Start answering on *endpoint*."""
        endpoint.start()
        self.all.append(endpoint)
        if agent:
            self.agent = endpoint

    def tick(self, now: float) -> None:
        """Their timed steps (*now*: monotonic seconds)."""
        for endpoint in self.all:
            endpoint.tick(now)

    def deadlines(self) -> List[float]:
        """When they next have timed work (monotonic seconds)."""
        return [t for t in (endpoint.deadline() for endpoint in self.all) if t is not None]

    def close_clients(self) -> None:
        """Drop their clients (a re-exec: client sockets are not handed over)."""
        for endpoint in self.all:
            endpoint.close_clients()

    def close(self, keep_agent: bool = False) -> None:
        """Stop answering (but on the agent's, with *keep_agent*)."""
        keep = self.agent if keep_agent else None
        for endpoint in self.all:
            if endpoint is not keep:
                endpoint.close()
        self.all = [keep] if keep is not None else []

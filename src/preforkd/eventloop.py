"""The event-driven worker's loop and transport layer (``worker_connections > 1``).

:func:`new_event_loop` gives a worker uvloop's loop, or asyncio's selector loop over
:class:`ExclusiveEpollSelector`, which registers the listeners with ``EPOLLEXCLUSIVE``
(epoll_ctl(2): one worker woken per connection, not all of them). On asyncio's loop an
accepted connection is driven by :class:`SocketTransport`, a lean transport over the
loop's ``add_reader`` / ``add_writer``; on uvloop by uvloop's own. The protocol above
both is :class:`preforkd.aioworker.LineConnection`.
"""

from __future__ import annotations

import asyncio
import math
import select
import selectors
import socket
from typing import Any, Dict, List, Mapping, Optional, Set, Tuple

#: Bytes asked of one ``recv`` by :class:`SocketTransport` (asyncio's transports ask
#: 256 KiB, a buffer that malloc serves by mmap and munmap on every read).
READ_BYTES = 65536
#: Bytes of unsent output above which :class:`SocketTransport` pauses its protocol
#: (``pause_writing``) and at or below which it resumes it: asyncio's defaults.
WRITE_HIGH = 65536
WRITE_LOW = 16384


class ExclusiveEpollSelector(selectors.BaseSelector):
    """A :mod:`selectors` selector over one epoll(7) instance that registers the file
    descriptors in *exclusive* with ``EPOLLEXCLUSIVE`` (Linux 4.5), so that of all the
    processes waiting on one listening socket only one is woken per connection.
    Everything else is level-triggered epoll, as asyncio expects."""

    def __init__(self, exclusive: Set[int]) -> None:
        self._epoll = select.epoll()
        self._exclusive = exclusive
        self._keys: Dict[int, selectors.SelectorKey] = {}

    def register(self, fileobj: Any, events: int, data: Any = None) -> selectors.SelectorKey:
        fd = _fd(fileobj)
        if fd in self._keys:
            raise KeyError(f"{fileobj!r} is already registered")
        mask = (select.EPOLLIN if events & selectors.EVENT_READ else 0) | (
            select.EPOLLOUT if events & selectors.EVENT_WRITE else 0)
        if fd in self._exclusive and events == selectors.EVENT_READ:
            mask |= getattr(select, "EPOLLEXCLUSIVE", 0)
        self._epoll.register(fd, mask)
        key = selectors.SelectorKey(fileobj, fd, events, data)
        self._keys[fd] = key
        return key

    def unregister(self, fileobj: Any) -> selectors.SelectorKey:
        fd = _fd(fileobj)
        key = self._keys.pop(fd)
        try:
            self._epoll.unregister(fd)
        except OSError:  # already closed
            pass
        return key

    def modify(self, fileobj: Any, events: int, data: Any = None) -> selectors.SelectorKey:
        fd = _fd(fileobj)
        key = self._keys[fd]
        if events != key.events:
            if fd in self._exclusive:  # EPOLL_CTL_MOD refuses EPOLLEXCLUSIVE: register anew
                self.unregister(fileobj)
                return self.register(fileobj, events, data)
            self._epoll.modify(fd, (select.EPOLLIN if events & selectors.EVENT_READ else 0)
                               | (select.EPOLLOUT if events & selectors.EVENT_WRITE else 0))
        key = key._replace(events=events, data=data)
        self._keys[fd] = key
        return key

    def get_key(self, fileobj: Any) -> selectors.SelectorKey:
        try:
            return self._keys[_fd(fileobj)]
        except KeyError:
            raise KeyError(f"{fileobj!r} is not registered") from None

    def select(self, timeout: Optional[float] = None) -> List[Tuple[selectors.SelectorKey, int]]:
        # epoll_wait takes milliseconds: round up, or a timer due in 0.4 ms would spin.
        wait = -1.0 if timeout is None else math.ceil(max(timeout, 0) * 1e3) * 1e-3
        ready = []
        for fd, mask in self._epoll.poll(wait, max(len(self._keys), 1)):
            key = self._keys.get(fd)
            if key is not None:
                events = (selectors.EVENT_READ if mask & ~select.EPOLLOUT else 0) | (
                    selectors.EVENT_WRITE if mask & ~select.EPOLLIN else 0)
                ready.append((key, events & key.events))
        return ready

    def get_map(self) -> Mapping[Any, selectors.SelectorKey]:
        return self._keys

    def close(self) -> None:
        self._epoll.close()
        self._keys.clear()


def _fd(fileobj: Any) -> int:
    return fileobj if isinstance(fileobj, int) else int(fileobj.fileno())


def preload(kind: str) -> None:
    """Import uvloop now (the master does, before forking) when *kind* would use it."""
    if kind in ("auto", "uvloop"):
        try:
            import uvloop  # noqa: F401
        except ImportError:
            pass


def new_event_loop(kind: str, exclusive: Set[int]) -> asyncio.AbstractEventLoop:
    """The worker's loop: uvloop's for *kind* ``uvloop`` (or ``auto`` with uvloop
    installed), else asyncio's selector loop over :class:`ExclusiveEpollSelector`."""
    if kind in ("auto", "uvloop"):
        try:
            import uvloop
        except ImportError:
            if kind == "uvloop":
                raise
        else:
            loop: asyncio.AbstractEventLoop = uvloop.new_event_loop()
            return loop
    return asyncio.SelectorEventLoop(ExclusiveEpollSelector(exclusive))


class SocketTransport(asyncio.Transport):
    """A lean transport for one accepted stream socket (TCP or Unix), driven by the
    loop's ``add_reader`` / ``add_writer`` with ``recv`` and ``send`` on the socket
    itself: what asyncio's socket transport does for a :class:`LineConnection`, with
    the same protocol calls in the same order (``connection_made``, ``data_received``,
    ``eof_received``, ``pause_writing`` / ``resume_writing``, ``connection_lost``), and
    nothing it does not need. Per connection it saves asyncio's Task
    (``connect_accepted_socket``), a second ``setblocking``, ``TCP_NODELAY`` set again
    (accepted sockets inherit it from the listener, :func:`preforkd.listeners.tune`),
    ``getsockname`` / ``getpeername`` for extras nobody reads (computed on demand here),
    and the loop iterations of ``connection_made`` and of the first ``add_reader``; and
    it reads at once, without waiting for the loop to say the socket is readable (a
    client's first bytes are often in by the time it is accepted; if not, that costs
    one ``recv`` failing with ``EAGAIN``).
    For asyncio's selector loop only: uvloop's ``add_reader`` drops a socket whose
    poll reports an error (libuv's ``UV_EBADF`` on ``POLLERR``, a reset while output is
    queued) without calling the reader, so a reset would go unseen until a timeout;
    on uvloop, connections keep uvloop's own transports.

    *sock* must be non-blocking. Output is sent at once while nothing is queued; what
    the kernel does not take is kept (one ``bytearray``, bytes) and sent when the socket
    is writable, the protocol paused above ``WRITE_HIGH`` queued bytes and resumed at
    ``WRITE_LOW`` (:meth:`set_write_buffer_limits` changes both). ``close`` waits for
    the queued bytes to be sent, ``abort`` drops them. ``connection_lost`` is called
    once, after the socket has left the loop, then the socket is closed: at the end of
    the read callback that ended the connection (not one loop iteration later, as
    asyncio's ``call_soon``), else through ``call_soon``. Errors of ``recv`` / ``send``
    end the connection with ``connection_lost(exc)``; an exception out of the protocol
    goes to the loop's exception handler and aborts the connection, as asyncio does."""

    __slots__ = (
        "_buffer",
        "_closing",
        "_conn_lost",
        "_dispatching",
        "_eof",
        "_fd",
        "_high",
        "_loop",
        "_lost_called",
        "_lost_pending",
        "_low",
        "_paused",
        "_protocol",
        "_protocol_paused",
        "_reading",
        "_sock",
        "_writing",
    )

    def __init__(self, loop: asyncio.AbstractEventLoop, sock: socket.socket, protocol: asyncio.Protocol) -> None:
        super().__init__()
        self._loop = loop
        self._sock = sock
        self._fd = sock.fileno()
        self._protocol = protocol
        self._buffer = bytearray()  # output the kernel has not taken yet
        self._high = WRITE_HIGH  # bytes: pause the protocol above, resume it at _low or below
        self._low = WRITE_LOW
        self._closing = False  # close() or abort(): no more reading
        self._eof = False  # write_eof(): the write side is (or will be, once drained) shut down
        self._paused = False  # pause_reading()
        self._protocol_paused = False  # pause_writing() called, resume_writing() not yet
        self._reading = False  # the reader is registered with the loop
        self._writing = False  # the writer is registered with the loop
        self._conn_lost = False  # connection_lost is due (scheduled or done)
        self._lost_called = False
        self._lost_pending: Tuple[Optional[Exception], ...] = ()  # (exc,): connection_lost waits for _dispatched
        self._dispatching = True  # in connection_made or a read callback: connection_lost waits for its end
        try:
            protocol.connection_made(self)
        finally:
            self._dispatched()
        if not self._closing and not self._paused:
            self._reading = True
            loop.add_reader(self._fd, self._read_ready)
            self._read_ready()  # the client's first bytes are often in already: one wake-up less

    # -- reading --------------------------------------------------------------------------

    def _read_ready(self) -> None:
        try:
            data = self._sock.recv(READ_BYTES)
        except (BlockingIOError, InterruptedError):
            return
        except OSError as exc:
            self._force_close(exc)
            return
        self._dispatching = True
        try:
            if data:
                self._protocol.data_received(data)
            elif self._protocol.eof_received():
                self._stop_reading()  # keep the connection open for replies, but stop polling an EOF
            else:
                self.close()
        except Exception as exc:  # noqa: BLE001 - as asyncio: the loop's handler, then abort
            self._fatal(exc, "protocol callback failed")
        finally:
            self._dispatched()

    def _dispatched(self) -> None:
        self._dispatching = False
        if self._lost_pending:
            exc = self._lost_pending[0]
            self._lost_pending = ()
            self._call_connection_lost(exc)

    def _stop_reading(self) -> None:
        if self._reading:
            self._reading = False
            self._loop.remove_reader(self._fd)

    def is_reading(self) -> bool:
        return not self._paused and not self._closing

    def pause_reading(self) -> None:
        if self._closing or self._paused:
            return
        self._paused = True
        self._stop_reading()

    def resume_reading(self) -> None:
        if self._closing or not self._paused:
            return
        self._paused = False
        if not self._reading:
            self._reading = True
            self._loop.add_reader(self._fd, self._read_ready)

    # -- writing --------------------------------------------------------------------------

    def write(self, data: Any) -> None:
        if self._eof:
            raise RuntimeError("Cannot call write() after write_eof()")
        if not data or self._conn_lost:
            return
        if not self._buffer:
            try:
                n = self._sock.send(data)
            except (BlockingIOError, InterruptedError):
                n = 0
            except OSError as exc:
                self._force_close(exc)
                return
            if n == len(data):
                return
            data = memoryview(data)[n:]
            self._writing = True
            self._loop.add_writer(self._fd, self._write_ready)
        self._buffer += data
        if not self._protocol_paused and len(self._buffer) > self._high:
            self._pause_protocol()

    def _pause_protocol(self) -> None:
        self._protocol_paused = True
        try:
            self._protocol.pause_writing()
        except Exception as exc:  # noqa: BLE001
            self._fatal(exc, "protocol.pause_writing() failed")

    def _write_ready(self) -> None:
        if self._conn_lost:
            return
        try:
            n = self._sock.send(self._buffer)
        except (BlockingIOError, InterruptedError):
            return
        except OSError as exc:
            self._force_close(exc)
            return
        if n:
            del self._buffer[:n]
        if self._protocol_paused and len(self._buffer) <= self._low:
            self._protocol_paused = False
            try:
                self._protocol.resume_writing()  # may write more, or close
            except Exception as exc:  # noqa: BLE001
                self._fatal(exc, "protocol.resume_writing() failed")
                return
        if not self._buffer and not self._conn_lost:
            self._stop_writing()
            if self._closing:
                self._call_connection_lost(None)
            elif self._eof:
                self._sock.shutdown(socket.SHUT_WR)

    def _stop_writing(self) -> None:
        if self._writing:
            self._writing = False
            self._loop.remove_writer(self._fd)

    def get_write_buffer_size(self) -> int:
        return len(self._buffer)

    def get_write_buffer_limits(self) -> Tuple[int, int]:
        return self._low, self._high

    def set_write_buffer_limits(self, high: Optional[int] = None, low: Optional[int] = None) -> None:
        """As asyncio's: *high* defaults to 64 KiB (or 4 * *low*), *low* to *high* / 4."""
        if high is None:
            high = WRITE_HIGH if low is None else 4 * low
        if low is None:
            low = high // 4
        if not high >= low >= 0:
            raise ValueError(f"high ({high!r}) must be >= low ({low!r}) must be >= 0")
        self._high, self._low = high, low
        if not self._protocol_paused and len(self._buffer) > high:
            self._pause_protocol()

    def can_write_eof(self) -> bool:
        return True

    def write_eof(self) -> None:
        if self._closing or self._eof:
            return
        self._eof = True
        if not self._buffer:
            self._sock.shutdown(socket.SHUT_WR)

    # -- ending ---------------------------------------------------------------------------

    def is_closing(self) -> bool:
        return self._closing

    def close(self) -> None:
        if self._closing:
            return
        self._closing = True
        self._stop_reading()
        if not self._buffer:
            self._lose(None)

    def abort(self) -> None:
        self._force_close(None)

    def _fatal(self, exc: Exception, message: str) -> None:
        self._loop.call_exception_handler({"message": message, "exception": exc, "transport": self,
                                           "protocol": self._protocol})
        self._force_close(exc)

    def _force_close(self, exc: Optional[Exception]) -> None:
        if self._conn_lost:
            return
        self._buffer.clear()
        self._stop_writing()
        self._closing = True
        self._stop_reading()
        self._lose(exc)

    def _lose(self, exc: Optional[Exception]) -> None:
        self._conn_lost = True
        if self._dispatching:
            self._lost_pending = (exc,)
        else:
            self._loop.call_soon(self._call_connection_lost, exc)

    def _call_connection_lost(self, exc: Optional[Exception]) -> None:
        if self._lost_called:
            return
        self._lost_called = True
        self._conn_lost = True
        self._closing = True
        self._stop_reading()
        self._stop_writing()
        try:
            self._protocol.connection_lost(exc)
        finally:
            self._sock.close()

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        """``socket``, ``sockname`` and ``peername`` (asked of the socket when asked for)."""
        sock = self._sock
        try:
            if name == "socket":
                return sock
            if name == "sockname":
                return sock.getsockname()
            if name == "peername":
                return sock.getpeername()
        except OSError:
            return default
        return default


"""The handler API: what a service's ``handler = "module:attribute"`` may name.

Three shapes, from simplest to most control (see ``docs/handlers.md``):

1. **A line function** ``def handle(line: str) -> Reply``: called once per input
   line (decoded UTF-8, terminator removed). Stateless; the fast path.
2. **A LineHandler subclass**: one instance per connection, with ``on_connect``,
   ``on_line`` and ``on_close`` hooks, and a ``worker_init`` class method run once
   in each worker after ``fork`` (open a database connection there, not at import).
3. **A connection handler**, a function decorated with :func:`connection_handler`
   and called with the :class:`~preforkd.protocol.Connection`; it owns the
   connection (read lines, write lines, or use ``conn.sock`` directly) until it
   returns.

A **Reply** is ``None`` (send nothing), a ``str`` (one line; CRLF is appended), a
list or tuple of ``str`` (several lines), or :class:`Close` (optionally with a
last reply) to end the connection. Replies must not contain CR or LF.

Exceptions from a handler are logged (``connection.handler_error``) and cost that
connection only; the worker lives on.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Callable, Optional, Sequence, Union

if TYPE_CHECKING:  # pragma: no cover
    from .protocol import Connection


class Close:
    """A reply that ends the connection after sending *reply* (if any).

    ``return Close("bye")`` sends ``bye\\r\\n`` and closes; ``return CLOSE`` just closes.
    """

    __slots__ = ("reply",)

    def __init__(self, reply: Union[None, str, Sequence[str]] = None) -> None:
        self.reply = reply

    def __repr__(self) -> str:
        return f"Close({self.reply!r})"


#: Close without a last reply.
CLOSE = Close()

Reply = Union[None, str, Sequence[str], Close]


class LineHandler:
    """Base class for a per-connection line handler.

    The worker creates one instance per accepted connection and calls
    :meth:`on_connect` once, :meth:`on_line` for every line, and :meth:`on_close`
    at the end, whatever the reason (even after an exception).
    """

    def __init__(self, conn: "Connection") -> None:
        self.conn = conn

    @classmethod
    def worker_init(cls) -> None:
        """Run once in each worker process after ``fork``, before it accepts.

        An exception here makes the worker exit with status 3; the master logs
        it and respawns with exponential back-off.
        """

    def on_connect(self) -> Reply:
        """The greeting: a Reply sent before any input is read (default none)."""
        return None

    def on_line(self, line: str) -> Reply:
        """One input line, decoded, without its CRLF or LF; returns the Reply."""
        raise NotImplementedError

    def on_close(self) -> None:
        """The connection is over (client closed, Close returned, error, timeout)."""


def connection_handler(func: Callable[["Connection"], Any]) -> Callable[["Connection"], Any]:
    """Mark *func* as a lower-level handler that owns the whole connection.

    It is called as ``func(conn)`` with a :class:`~preforkd.protocol.Connection`;
    the worker closes the socket when it returns or raises.
    """
    func.__preforkd_connection_handler__ = True  # type: ignore[attr-defined]
    return func


def handler_kind(obj: Any) -> Optional[str]:
    """``"line"``, ``"class"`` or ``"connection"`` for a usable handler, else ``None``."""
    if isinstance(obj, type):
        return "class" if issubclass(obj, LineHandler) else None
    if getattr(obj, "__preforkd_connection_handler__", False):
        return "connection"
    if callable(obj):
        return "line"
    return None


def is_handler(obj: Any) -> bool:
    return handler_kind(obj) is not None

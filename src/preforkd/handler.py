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

This module also resolves a service's ``handler = "module:attribute"`` into a
:class:`Handler` (its :class:`HandlerKind` decided once, here), for ``preforkd check``,
the master before it forks, and a reload's check in a fresh interpreter.
"""

from __future__ import annotations

import enum
import importlib
import inspect
import sys
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Callable, Dict, Optional, Sequence, Union

from .config import Config, ConfigError

if TYPE_CHECKING:  # pragma: no cover
    from .protocol import Connection


class Close:
    """A reply that ends the connection after sending *reply* (if any).

    ``return Close("bye")`` sends ``bye\\r\\n`` and closes; ``return CLOSE`` just closes.
    """

    __slots__ = ("reply",)

    def __init__(self, reply: Union[str, Sequence[str], None] = None) -> None:
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

    def __init__(self, conn: Connection) -> None:
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


def connection_handler(func: Callable[[Connection], Any]) -> Callable[[Connection], Any]:
    """Mark *func* as a lower-level handler that owns the whole connection.

    It is called as ``func(conn)`` with a :class:`~preforkd.protocol.Connection`;
    the worker closes the socket when it returns or raises.
    """
    func.__preforkd_connection_handler__ = True  # type: ignore[attr-defined]
    return func


# -- resolution ---------------------------------------------------------------


class HandlerKind(enum.Enum):
    """The three handler shapes."""

    LINE = "line"              # def handle(line) -> Reply
    CLASS = "class"            # a LineHandler subclass
    CONNECTION = "connection"  # @connection_handler def serve(conn)


@dataclass(frozen=True)
class Handler:
    """A resolved handler: what ``module:attribute`` named, its shape, and whether it
    awaits (an ``async def`` line function, or a LineHandler with ``async def``
    hooks), which only an event-driven worker can run."""

    spec: str
    kind: HandlerKind
    target: Any
    is_async: bool = False

    def worker_init(self) -> None:
        """Run the handler's per-worker set-up (``LineHandler.worker_init``), if any.

        :raises Exception: whatever the handler's code raises.
        """
        if self.kind is HandlerKind.CLASS:
            self.target.worker_init()


class HandlerError(Exception):
    """A ``module:attribute`` that cannot be imported or is not a handler; one line."""


def handler_kind(obj: Any) -> Optional[HandlerKind]:
    """The shape of *obj* as a handler, or ``None`` when it is not one."""
    if isinstance(obj, type):
        return HandlerKind.CLASS if issubclass(obj, LineHandler) else None
    if getattr(obj, "__preforkd_connection_handler__", False):
        return HandlerKind.CONNECTION
    if callable(obj):
        return HandlerKind.LINE
    return None


def add_python_path(entries: Sequence[str]) -> None:
    """Put ``supervisor.python_path`` *entries* in front of ``sys.path`` (idempotent)."""
    for entry in reversed(entries):
        if entry not in sys.path:
            sys.path.insert(0, entry)


def resolve(spec: str) -> Handler:
    """Import ``module:attribute`` and classify what it names.

    :raises HandlerError: the module raises at import (any exception, summarised on
        one line), the attribute is missing, or it is not a handler.
    """
    module_name, _, attr = spec.partition(":")
    try:
        module = importlib.import_module(module_name)
    except Exception as exc:  # noqa: BLE001 - any import-time failure is a config error
        first = " ".join(str(exc).split())
        raise HandlerError(f"cannot import {module_name}: {type(exc).__name__}: {first}") from None
    obj: Any = module
    for part in attr.split("."):
        try:
            obj = getattr(obj, part)
        except AttributeError:
            raise HandlerError(f"module {module_name} has no attribute {attr}") from None
    kind = handler_kind(obj)
    if kind is None:
        raise HandlerError(f"{spec} is not a handler (a function of one line, a LineHandler subclass, "
                           "or a @connection_handler function)")
    _check_signature(spec, kind, obj)
    return Handler(spec=spec, kind=kind, target=obj, is_async=_awaits(kind, obj))


def _awaits(kind: HandlerKind, obj: Any) -> bool:
    if kind is HandlerKind.LINE:
        return inspect.iscoroutinefunction(obj) or inspect.iscoroutinefunction(type(obj).__call__)
    if kind is HandlerKind.CLASS:
        return any(inspect.iscoroutinefunction(getattr(obj, name)) for name in ("on_connect", "on_line", "on_close"))
    return inspect.iscoroutinefunction(obj)


def _check_signature(spec: str, kind: HandlerKind, obj: Any) -> None:
    """Refuse a handler that could not take what the worker will pass it (one line, or
    the connection), which would otherwise fail on every connection.

    :raises HandlerError: naming what it takes.
    """
    if kind is HandlerKind.CLASS:
        calls = [(obj, ("conn",), "__init__(self, conn)"), (obj.on_line, (None, "line"), "on_line(self, line)")]
    elif kind is HandlerKind.LINE:
        calls = [(obj, ("line",), "one argument, the line")]
    else:
        calls = [(obj, ("conn",), "one argument, the connection")]
    for func, args, wanted in calls:
        try:
            signature = inspect.signature(func)
        except (TypeError, ValueError):
            continue  # a builtin without a signature: cannot tell, let it be
        try:
            signature.bind(*args)
        except TypeError:
            raise HandlerError(f"{spec} cannot be called as {wanted}: its signature is {signature}") from None


def load_handlers(config: Config) -> Dict[str, Handler]:
    """Resolve every service's handler (``command`` services have none), after putting
    ``supervisor.python_path`` on ``sys.path``.

    :returns: service name -> :class:`Handler`.
    :raises ConfigError: naming ``service[i].handler`` and the reason.
    """
    add_python_path(config.supervisor.python_path)
    out: Dict[str, Handler] = {}
    for index, svc in enumerate(config.services):
        if svc.command:
            continue
        try:
            handler = resolve(svc.handler)
        except HandlerError as exc:
            raise ConfigError(config.source, f"service[{index}].handler", str(exc)) from None
        if handler.kind is HandlerKind.CONNECTION and svc.event_driven:
            raise ConfigError(config.source, f"service[{index}].worker_connections",
                              f"{svc.handler} is a @connection_handler, which owns a blocking socket: "
                              f"it needs worker_connections = 1, got {svc.worker_connections}")
        if handler.is_async and not svc.event_driven:
            raise ConfigError(config.source, f"service[{index}].handler",
                              f"{svc.handler} is an async def handler: it runs only in event-driven workers "
                              "(set worker_connections > 1)")
        out[svc.name] = handler
    return out

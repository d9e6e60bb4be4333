"""Structured logging with structlog.

Every event is one line: JSON (``event``, ``timestamp`` ISO 8601 UTC, ``level``,
``pid`` and bound context such as ``service``, ``worker``, ``generation``) when the
output is not a TTY or ``log.format = "json"``; structlog's console renderer on a
TTY. The output is stderr, or ``log.file`` opened in append mode and reopened by
:func:`reopen` (SIGUSR1, for logrotate).

The event vocabulary is listed in ``docs/operations.md`` (Logs and events); names are stable.
"""

from __future__ import annotations

import atexit
import datetime
import logging
import os
import sys
import traceback
from typing import IO, Any, Dict, List, Optional, Tuple

_LEVELS = {"debug": logging.DEBUG, "info": logging.INFO, "warning": logging.WARNING, "error": logging.ERROR}


class LogSink:
    """The file structlog writes to: stderr or a reopenable log file.

    Writes go straight to the file descriptor (``os.write``), one whole line per
    call, so lines from the master and workers sharing an ``O_APPEND`` file never
    interleave mid-line and nothing sits in a buffer across ``fork``.
    """

    def __init__(self) -> None:
        self.path = ""
        self.fd = 2
        self._owned = False

    def open(self, path: str) -> None:
        """Use *path* (append mode, created 0640) or stderr if empty.

        :raises OSError: when the file cannot be opened.
        """
        if path:
            os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
            fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, 0o640)
        else:
            fd = 2
        self.close()
        self.path, self.fd, self._owned = path, fd, bool(path)

    def reopen(self) -> None:
        """Reopen the log file by name (after logrotate moved it); a no-op on stderr."""
        if self.path:
            self.open(self.path)

    def close(self) -> None:
        if self._owned:
            try:
                os.close(self.fd)
            except OSError:
                pass
        self._owned = False
        self.fd = 2

    def write(self, message: str) -> None:
        data = message.encode("utf-8", "replace")
        try:
            while data:
                n = os.write(self.fd, data)
                data = data[n:]
        except OSError:
            pass  # nowhere left to log to; never let logging take a process down

    def flush(self) -> None:
        pass

    def isatty(self) -> bool:
        try:
            return os.isatty(self.fd)
        except OSError:
            return False


SINK = LogSink()


def _add_pid(_logger: Any, _name: str, event_dict: dict) -> dict:
    event_dict.setdefault("pid", os.getpid())
    return event_dict


def _now() -> str:
    return datetime.datetime.now(datetime.timezone.utc).isoformat().replace("+00:00", "Z")


def _add_timestamp(_logger: Any, _name: str, event_dict: dict) -> dict:
    # ISO 8601 UTC, as structlog's TimeStamper(fmt="iso", utc=True) writes it; kept
    # when already set, so that an event logged before structlog was set up (see
    # configure(defer=True)) keeps the time it happened.
    event_dict.setdefault("timestamp", _now())
    return event_dict


class _State:
    level = "info"
    fmt = "auto"
    active = False  # structlog imported and configured in this process
    deferred = False  # events are buffered until activate()
    buffer: List[Tuple[str, str, Dict[str, Any]]] = []
    context: Dict[str, Any] = {}
    structlog: Any = None


def configure(level: str = "info", fmt: str = "auto", file: str = "", defer: bool = False) -> None:
    """Set up logging for this process.

    :param level: ``debug``, ``info``, ``warning`` or ``error``.
    :param fmt: ``json``, ``console`` or ``auto`` (console on a TTY, else JSON).
    :param file: log file path; empty for stderr.
    :param defer: do not import structlog yet: buffer events (with the time they
        happened) until :func:`activate`. A re-exec'd master uses this so that its
        new workers accept before it pays for the import (it is most of the new
        image's start-up); events are written, in order, moments later.
    :raises OSError: when the log file cannot be opened.
    """
    SINK.open(file)
    _State.level, _State.fmt = level, fmt
    _State.active = False
    if defer:
        _State.deferred = True
        atexit.register(activate)
    else:
        activate()


def activate() -> None:
    """Import and configure structlog now and write any buffered events."""
    if _State.active:
        return
    import structlog

    use_console = _State.fmt == "console" or (_State.fmt == "auto" and SINK.isatty())
    renderer: Any
    if use_console:
        renderer = structlog.dev.ConsoleRenderer(colors=SINK.isatty())
    else:
        renderer = structlog.processors.JSONRenderer()
    structlog.configure(
        processors=[
            structlog.processors.add_log_level,
            _add_timestamp,
            _add_pid,
            structlog.processors.format_exc_info,
            renderer,
        ],
        wrapper_class=structlog.make_filtering_bound_logger(_LEVELS[_State.level]),
        logger_factory=structlog.WriteLoggerFactory(file=SINK),  # type: ignore[arg-type]
        cache_logger_on_first_use=False,
    )
    _State.structlog = structlog
    _State.active = True
    _State.deferred = False
    pending, _State.buffer = _State.buffer, []
    for method, event, kw in pending:
        getattr(structlog.get_logger(), method)(event, **kw)


def after_fork() -> None:
    """In a child: drop the parent's buffer; if structlog is not imported yet, it
    will be the first time this process logs."""
    _State.buffer = []
    _State.deferred = False


def is_active() -> bool:
    return _State.active


def bind(**context: Any) -> None:
    """Bind context (``service``, ``worker``, ``generation``...) to every later event
    of this process."""
    _State.context.update(context)


def clear() -> None:
    """Forget all bound context (a worker does this right after ``fork``)."""
    _State.context = {}


class Logger:
    """What :func:`get` returns: ``debug``, ``info``, ``warning`` and ``error``
    methods taking an event name and key-value context, as structlog's loggers do."""

    __slots__ = ("_initial",)

    def __init__(self, initial: Dict[str, Any]) -> None:
        self._initial = initial

    def _emit(self, method: str, event: str, kw: Dict[str, Any]) -> None:
        if _LEVELS[method] < _LEVELS[_State.level]:
            return
        kw = {**_State.context, **self._initial, **kw}
        if not _State.active:
            if _State.deferred:
                kw.setdefault("timestamp", _now())
                kw.setdefault("pid", os.getpid())
                if kw.pop("exc_info", None):
                    kw["exception"] = traceback.format_exc()
                _State.buffer.append((method, event, kw))
                return
            activate()
        getattr(_State.structlog.get_logger(), method)(event, **kw)

    def debug(self, event: str, **kw: Any) -> None:
        self._emit("debug", event, kw)

    def info(self, event: str, **kw: Any) -> None:
        self._emit("info", event, kw)

    def warning(self, event: str, **kw: Any) -> None:
        self._emit("warning", event, kw)

    def error(self, event: str, **kw: Any) -> None:
        self._emit("error", event, kw)


def get(**initial: Any) -> Logger:
    """A logger; *initial* context is added to its events."""
    return Logger(initial)


def fatal_line(message: str, stream: Optional[IO[str]] = None) -> None:
    """Print one error line to stderr (before logging is set up)."""
    print(f"preforkd: {message}", file=stream or sys.stderr, flush=True)

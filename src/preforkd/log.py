"""Structured logging with structlog.

Every event is one line: JSON (``event``, ``timestamp`` ISO 8601 UTC, ``level``,
``pid`` and bound context such as ``service``, ``worker``, ``generation``) when the
output is not a TTY or ``log.format = "json"``; structlog's console renderer on a
TTY. The output is stderr, or ``log.file`` opened in append mode and reopened by
:func:`reopen` (SIGUSR1, for logrotate).

The event vocabulary is listed in ``docs/operations.md`` (Logs and events); names are stable.
"""

from __future__ import annotations

import logging
import os
import sys
from typing import IO, Any, Optional

import structlog

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


def configure(level: str = "info", fmt: str = "auto", file: str = "") -> None:
    """Set up structlog for this process.

    :param level: ``debug``, ``info``, ``warning`` or ``error``.
    :param fmt: ``json``, ``console`` or ``auto`` (console on a TTY, else JSON).
    :param file: log file path; empty for stderr.
    :raises OSError: when the log file cannot be opened.
    """
    SINK.open(file)
    use_console = fmt == "console" or (fmt == "auto" and SINK.isatty())
    renderer: Any
    if use_console:
        renderer = structlog.dev.ConsoleRenderer(colors=SINK.isatty())
    else:
        renderer = structlog.processors.JSONRenderer()
    structlog.configure(
        processors=[
            structlog.contextvars.merge_contextvars,
            structlog.processors.add_log_level,
            structlog.processors.TimeStamper(fmt="iso", utc=True),
            _add_pid,
            structlog.processors.format_exc_info,
            renderer,
        ],
        wrapper_class=structlog.make_filtering_bound_logger(_LEVELS[level]),
        logger_factory=structlog.WriteLoggerFactory(file=SINK),  # type: ignore[arg-type]
        cache_logger_on_first_use=False,
    )


def bind(**context: Any) -> None:
    """Bind context (``service``, ``worker``, ``generation``...) to every later event
    of this process."""
    structlog.contextvars.bind_contextvars(**context)


def clear() -> None:
    """Forget all bound context (a worker does this right after ``fork``)."""
    structlog.contextvars.clear_contextvars()


def get(**initial: Any) -> Any:
    """A structlog logger; *initial* context is added to its events."""
    return structlog.get_logger(**initial)


def fatal_line(message: str, stream: Optional[IO[str]] = None) -> None:
    """Print one error line to stderr (before logging is set up)."""
    print(f"preforkd: {message}", file=stream or sys.stderr, flush=True)

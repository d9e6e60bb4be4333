"""Structured logging with structlog: one :class:`EventLog` per process.

Every event is one line: JSON (``event``, ``timestamp`` ISO 8601 UTC, ``level``,
``pid`` and bound context such as ``service``, ``worker``, ``generation``) when the
output is not a TTY or ``log.format = "json"``; structlog's console renderer on a
TTY. The output is stderr, or ``log.file`` opened in append mode and reopened on
SIGUSR1 (logrotate).

The master creates the :class:`EventLog`; a worker inherits the same object across
``fork`` and calls :meth:`EventLog.after_fork`. The event vocabulary is listed in
``docs/operations.md`` (Logs and events); names are stable.
"""

from __future__ import annotations

import atexit
import datetime
import errno
import json
import os
import stat
import time
import traceback
from typing import Any, Dict, List, MutableMapping, Optional, Tuple

from .files import open_nofollow

#: The levels, as the standard library's ``logging`` numbers them (structlog's filtering
#: takes these); spelt out so that a re-exec'd master need not import ``logging``.
LEVELS = {"debug": 10, "info": 20, "warning": 30, "error": 40}


class LogSink:
    """The file structlog writes to: stderr or a reopenable log file.

    Writes go straight to the file descriptor (``os.write``), one whole line per
    call, so lines from the master and workers sharing an ``O_APPEND`` file never
    interleave mid-line and nothing sits in a buffer across ``fork``.

    The log file is never opened through a symbolic link (``O_NOFOLLOW``, see
    :mod:`preforkd.files`). A reopen (SIGUSR1) puts the new file on the same
    descriptor number (``dup2``), so the switch is one atomic step even when it
    happens in a signal handler between two writes.
    """

    def __init__(self) -> None:
        self.path = ""
        self.fd = 2
        self._owned = False

    def open(self, path: str) -> None:
        """Use *path* (append mode, created 0640) or stderr if empty.

        :raises OSError: when the file cannot be opened (a symbolic link included).
        """
        if path:
            os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
            fd = open_nofollow(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o640)
        else:
            fd = 2
        self.close()
        self.path, self.fd, self._owned = path, fd, bool(path)

    def reopen(self, create: bool = True, owner: Optional[int] = None) -> None:
        """Reopen the log file by name (after logrotate moved it) onto the same
        descriptor; a no-op on stderr.

        :param create: create the file if it is missing (the master does; a worker,
            which may lack the right to, only opens what the master made).
        :param owner: a uid to give the file to when it is not already its owner, and
            then read and write permission for that owner: what the master does as
            root for workers running as ``supervisor.user``, so that they can reopen
            it after it (nginx's ``ngx_reopen_files`` does the same). Only a regular
            file with a single link is handed over.
        :raises OSError: when the file cannot be opened (the old one stays in use).
        """
        if not self.path or not self._owned:
            return
        flags = os.O_WRONLY | os.O_APPEND | (os.O_CREAT if create else 0)
        fd = open_nofollow(self.path, flags, 0o640)
        try:
            if owner is not None:
                st = os.fstat(fd)
                if not stat.S_ISREG(st.st_mode) or st.st_nlink != 1:
                    # A hard link planted in a directory the workers' user can write
                    # to would hand that user whatever it links to (say /etc/shadow).
                    raise OSError(errno.EPERM, "is not a regular file with a single link; not handing it "
                                  "over to supervisor.user", self.path)
                if st.st_uid != owner:
                    os.fchown(fd, owner, -1)
                if st.st_mode & 0o600 != 0o600:
                    os.fchmod(fd, stat.S_IMODE(st.st_mode) | 0o600)
            os.dup2(fd, self.fd, inheritable=False)
        finally:
            os.close(fd)

    def moved(self) -> bool:
        """Is there a file at our path now, other than the one we write to (a rotation
        happened since we opened it)?"""
        if not self.path or not self._owned:
            return False
        try:
            ours, now = os.fstat(self.fd), os.lstat(self.path)
        except OSError:
            return False
        return (ours.st_dev, ours.st_ino) != (now.st_dev, now.st_ino)

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


def _add_pid(_logger: Any, _name: str, event_dict: MutableMapping[str, Any]) -> MutableMapping[str, Any]:
    event_dict.setdefault("pid", os.getpid())
    return event_dict


def _now() -> str:
    return datetime.datetime.now(datetime.timezone.utc).isoformat().replace("+00:00", "Z")


def _add_timestamp(_logger: Any, _name: str, event_dict: MutableMapping[str, Any]) -> MutableMapping[str, Any]:
    # ISO 8601 UTC, as structlog's TimeStamper(fmt="iso", utc=True) writes it; kept
    # when already set, so that an event logged before structlog was set up (a
    # deferred EventLog) keeps the time it happened.
    event_dict.setdefault("timestamp", _now())
    return event_dict


class _Clock:
    """ISO 8601 UTC timestamps as :func:`_now` writes them (``2026-11-21T18:30:46.123456``,
    the ``Z`` left to the caller), formatting the date and time once per second."""

    __slots__ = ("_prefix", "_second")

    def __init__(self) -> None:
        self._second = -1
        self._prefix = ""

    def now(self) -> str:
        t = time.time()
        second = int(t)
        if second != self._second:
            self._second = second
            self._prefix = datetime.datetime.fromtimestamp(second, datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%S")
        return f"{self._prefix}.{int((t - second) * 1e6):06d}"


#: Bytes of access-log lines a worker keeps before writing them at once: at most
#: PIPE_BUF (pipe(7)), so that one write to a pipe (stderr under systemd) stays atomic and
#: never interleaves with another process's lines; O_APPEND writes to a file are whole.
HOT_BUFFER = 4096
#: Seconds a buffered line may wait at most (nginx's ``access_log ... flush=``).
HOT_FLUSH = 1.0


class HotEvent:
    """One event a hot path logs (:meth:`EventLog.hot_event`): call it with the event's
    fields. With a *buffer* (bytes), rendered lines are kept and written together when
    the next would not fit, or at :meth:`flush`, which the owner calls once
    :meth:`due` (at most :data:`HOT_FLUSH` seconds after the first line kept), before
    it exits and before the log file is reopened; lines still buffered when the process
    is killed are lost."""

    __slots__ = ("_buf", "_emit", "_rendered", "_since", "_size", "limit", "sink")

    def __init__(self, emit: Any, sink: LogSink, buffer: int, rendered: bool = False) -> None:
        self._emit = emit  # fields -> a rendered line (rendered) or nothing (it logs itself); None: off
        self._rendered = rendered
        self.sink = sink
        self.limit = buffer
        self._buf: List[str] = []
        self._size = 0
        self._since = 0.0  # monotonic seconds: when the oldest buffered line was kept

    def due(self) -> Optional[float]:
        """When the buffered lines must be written (monotonic seconds), ``None`` if none are."""
        return self._since + HOT_FLUSH if self._buf else None

    def __call__(self, **kw: Any) -> None:
        if self._emit is None:
            return
        if not self._rendered:
            self._emit(**kw)
            return
        line: str = self._emit(**kw)
        if self._size + len(line) > self.limit:
            self.flush()
            if len(line) > self.limit:
                self.sink.write(line)
                return
        if not self._buf:
            self._since = time.monotonic()
        self._buf.append(line)
        self._size += len(line)

    def flush(self) -> None:
        """Write what is buffered (one ``write``)."""
        if self._buf:
            data = "".join(self._buf)
            self._buf.clear()
            self._size = 0
            self.sink.write(data)


class EventLog:
    """This process's event log.

    :param level: ``debug``, ``info``, ``warning`` or ``error``.
    :param fmt: ``json``, ``console`` or ``auto`` (console on a TTY, else JSON).
    :param file: log file path; empty for stderr.
    :param defer: do not import structlog yet: buffer events (with the wall-clock time
        they happened) until :meth:`activate`. A re-exec'd master uses this so that its
        new workers accept before it pays for the import (it is most of the new image's
        start-up); the events are written, in order, moments later.
    :raises OSError: when the log file cannot be opened.
    """

    def __init__(self, level: str = "info", fmt: str = "auto", file: str = "", defer: bool = False) -> None:
        self.sink = LogSink()
        self.sink.open(file)
        self.level = LEVELS[level]
        self.fmt = fmt
        self.context: Dict[str, Any] = {}
        self._structlog: Any = None
        self._buffer: List[Tuple[str, str, Dict[str, Any]]] = []
        self._deferred = defer
        if defer:
            atexit.register(self.activate)
        else:
            self.activate()

    @property
    def active(self) -> bool:
        """structlog is imported and configured in this process."""
        return self._structlog is not None

    def activate(self) -> None:
        """Import and configure structlog now and write any buffered events."""
        if self._structlog is not None:
            return
        import structlog

        use_console = self.fmt == "console" or (self.fmt == "auto" and self.sink.isatty())
        renderer: Any
        if use_console:
            renderer = structlog.dev.ConsoleRenderer(colors=self.sink.isatty())
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
            wrapper_class=structlog.make_filtering_bound_logger(self.level),
            logger_factory=structlog.WriteLoggerFactory(file=self.sink),  # type: ignore[arg-type]
            cache_logger_on_first_use=False,
        )
        self._structlog = structlog
        self._deferred = False
        pending, self._buffer = self._buffer, []
        for method, event, kw in pending:
            getattr(structlog.get_logger(), method)(event, **kw)

    def after_fork(self, **context: Any) -> None:
        """In a freshly forked worker: drop the parent's buffer and context and bind
        *context* instead; if structlog is not imported yet, the first event imports it."""
        self._buffer = []
        self._deferred = False
        self.context = dict(context)

    def bind(self, **context: Any) -> None:
        """Add context (``service``, ``worker``, ``generation``...) to every later event."""
        self.context.update(context)

    def reopen(self, create: bool = True, owner: Optional[int] = None) -> None:
        """Reopen the log file (SIGUSR1); see :meth:`LogSink.reopen`.

        :raises OSError: when it cannot be opened (the old file stays in use).
        """
        self.sink.reopen(create, owner)

    def logger(self, **initial: Any) -> Logger:
        """A logger whose events also carry *initial*."""
        return Logger(self, initial)

    def hot_event(self, event: str, initial: Dict[str, Any], buffer: int = 0) -> HotEvent:
        """A :class:`HotEvent` writing *event* at info level, for an event logged on a hot
        path (``connection.closed``, once per connection).

        In JSON it renders the line itself, as this log's structlog chain would (the
        bound context, *initial* and the fields, then ``event``, ``level``, ``timestamp``
        and ``pid``, encoded with ``json.dumps``'s defaults, as structlog's
        ``JSONRenderer``), encoding only the fields per call, without the chain's cost,
        and keeps up to *buffer* bytes of lines before writing them in one ``write``
        (nginx's ``access_log ... buffer=``); in console
        format it goes through structlog, unbuffered. Make it after :meth:`after_fork`
        (the context and pid are taken now); below the level, it does nothing."""
        if LEVELS["info"] < self.level:
            return HotEvent(None, self.sink, 0)
        if self.fmt == "console" or (self.fmt == "auto" and self.sink.isatty()):
            logger = self.logger(**initial)
            return HotEvent(lambda **kw: logger.info(event, **kw), self.sink, 0)
        fixed = {**self.context, **initial}
        head = json.dumps(fixed)[:-1] + ", " if fixed else "{"
        tail = f'"event": {json.dumps(event)}, "level": "info", "timestamp": "'
        pid_tail = f'Z", "pid": {os.getpid()}}}\n'
        encode, clock = json.JSONEncoder().encode, _Clock()  # json.dumps's defaults, set up once

        def render(**kw: Any) -> str:
            fields = encode(kw)[1:-1]
            return f"{head}{fields}{', ' if fields else ''}{tail}{clock.now()}{pid_tail}"

        return HotEvent(render, self.sink, buffer, rendered=True)

    def emit(self, method: str, event: str, kw: Dict[str, Any]) -> None:
        """Write one event at level *method* (what :class:`Logger` calls)."""
        if LEVELS[method] < self.level:
            return
        kw = {**self.context, **kw}
        if self._structlog is None:
            if self._deferred:
                kw.setdefault("timestamp", _now())
                kw.setdefault("pid", os.getpid())
                if kw.pop("exc_info", None):
                    kw["exception"] = traceback.format_exc()
                self._buffer.append((method, event, kw))
                return
            self.activate()
        getattr(self._structlog.get_logger(), method)(event, **kw)


class Logger:
    """``debug``, ``info``, ``warning`` and ``error`` methods taking an event name and
    key-value context, as structlog's loggers do."""

    __slots__ = ("_initial", "_log")

    def __init__(self, log: EventLog, initial: Dict[str, Any]) -> None:
        self._log = log
        self._initial = initial

    def debug(self, event: str, **kw: Any) -> None:
        self._log.emit("debug", event, {**self._initial, **kw})

    def info(self, event: str, **kw: Any) -> None:
        self._log.emit("info", event, {**self._initial, **kw})

    def warning(self, event: str, **kw: Any) -> None:
        self._log.emit("warning", event, {**self._initial, **kw})

    def error(self, event: str, **kw: Any) -> None:
        self._log.emit("error", event, {**self._initial, **kw})

    def hot(self, event: str, buffer: int = 0) -> HotEvent:
        """:meth:`EventLog.hot_event` for *event* with this logger's fields."""
        return self._log.hot_event(event, self._initial, buffer)

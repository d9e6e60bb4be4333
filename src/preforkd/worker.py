"""The worker process: what runs in the child after the master forks.

:func:`run` is the whole life of a worker, as named steps (Net::Server's ``run``
reads the same way): reset the master's signal handlers, close every descriptor
that is not its own, name itself in ``ps`` (``preforkd: worker echo#2``), drop
privileges when configured, arrange to die with the master, install its own signal
handlers, run the handler's ``worker_init``, tell the master it is ready, and then
serve: wait in ``epoll`` (listeners registered with ``EPOLLEXCLUSIVE`` so one worker
wakes per connection, plus the master-alive pipe and its own signal wakeup pipe),
accept, serve one connection, repeat.

Signals (worker), as docs/signals.md states them. The handlers are bound methods of
:class:`Worker`; Python runs them between bytecodes in the main thread, not in
signal context, so they may close sockets and arm timers:

* TERM: graceful stop. Stop accepting and exit once idle. A *busy* worker also acts
  in the handler itself (as unicorn's QUIT trap does): it closes its copies of the
  listening sockets at once, so new clients are refused rather than queued where
  nobody accepts, and arms a ``graceful_timeout`` timer (``SIGALRM``) that bounds the
  connection in hand even if the master is gone.
* INT, QUIT: exit at once. ALRM (the graceful timer ran out): die of SIGALRM. Either
  way the ``command`` program serving the connection in hand dies first, with every
  process it started (the worker of a ``command`` service is a child subreaper,
  ``PR_SET_CHILD_SUBREAPER``, so even those that left its session are found).
* USR1: reopen the log file at once (the outcome is logged when next idle).
* HUP, TTIN, TTOU, WINCH, USR2: ignored (the master's; a terminal hangup must not
  kill workers).

End of file on the master-alive pipe means the master died: the worker exits (no
orphans); ``PR_SET_PDEATHSIG`` makes a busy worker hear of it too (Linux, prctl(2)).

Exit statuses: 0 clean (stop, max_requests, master gone), 3 ``worker_init``
failed, 4 the worker could not set itself up.
"""

from __future__ import annotations

import ctypes
import errno
import faulthandler
import os
import select
import signal
import socket
import sys
import time
from dataclasses import dataclass
from types import FrameType
from typing import Any, Callable, Dict, List, NoReturn, Optional, Sequence, Tuple

from .config import Credentials, ServiceConfig
from .handler import Handler
from .log import HOT_BUFFER, EventLog, HotEvent, Logger
from .protocol import connection_server
from .proxyproto import ProxyGate, header_timeout
from .scoreboard import ACTIVE, ARMED, CALL_SINCE, HEARTBEAT, SERVED, STATE, State
from .services import CommandService, logged_command
from .signals import WORKER_RESET

EXIT_INIT_FAILED = 3
EXIT_SETUP_FAILED = 4
#: What serves one accepted connection: ``serve_one(sock, address)``, returning how it
#: ended (see :func:`preforkd.protocol.serve`); never raises for what the client or the
#: handler did.
ServeOne = Callable[[socket.socket, Any], Any]
#: Accept errors that mean "out of resources, try again later", logged, not fatal.
_RESOURCE_ERRORS = (errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM)


@dataclass(frozen=True)
class WorkerEnv:
    """What every worker of one master image shares, decided by the master at start."""

    generation: int
    alive_fd: int  # read end of the master-alive pipe
    ready_fd: int  # write end of the ready pipe
    log: EventLog
    master_pid: int
    graceful_timeout: float  # seconds
    credentials: Credentials
    event_loop: str = "auto"  # for event-driven workers: auto | asyncio | uvloop
    access_log: bool = False  # [log] access: one connection.closed event per connection


@dataclass(frozen=True)
class WorkerSpec:
    """Everything one worker needs, decided by the master before ``fork``."""

    env: WorkerEnv
    service: ServiceConfig
    listeners: Sequence[socket.socket]
    handler: Optional[Handler]  # None for a command service
    number: int
    cells: memoryview  # this worker's scoreboard slot (preforkd.scoreboard)
    idle_sem: Any = None  # a dynamic pool's idle-worker semaphore (preforkd.pool.Pool)
    pool_cells: Optional[memoryview] = None  # a dynamic pool's own scoreboard slot
    stack_fd: int = -1  # a memfd the master reads: SIGUSR2 dumps our Python stack there (faulthandler)


class Spares:
    """A dynamic pool's count of idle workers, kept by the workers themselves in a
    process-shared semaphore (sem_overview(7): no system call unless contended), and
    their way to wake the master at once when the pool runs short of spare workers,
    instead of at its next one-second check (Apache's idle-server maintenance)."""

    __slots__ = ("_cells", "_min", "_report_fd", "_sem")

    def __init__(self, sem: Any, pool_cells: memoryview, min_spare: int, report_fd: int) -> None:
        self._sem, self._cells, self._min, self._report_fd = sem, pool_cells, min_spare, report_fd

    def idle(self) -> None:
        """This worker can take a connection again."""
        self._sem.release()

    def busy(self) -> None:
        """This worker just took its last free connection: if that leaves fewer than
        ``min_spare_workers`` idle and the master asked to hear of it (it clears
        :data:`~preforkd.scoreboard.ARMED` until it has acted), wake it."""
        self._sem.acquire(False)
        if self._cells[ARMED] and self._sem.get_value() < self._min:
            self._cells[ARMED] = 0
            try:
                os.write(self._report_fd, b"+\n")
            except OSError:
                pass

    def leave(self) -> None:
        """This worker exits from idle: take its count back."""
        self._sem.acquire(False)


def run(spec: WorkerSpec) -> NoReturn:
    """Run the worker until it should exit; never returns (``os._exit``), so no code
    of the master's ever runs in a worker after ``fork``."""
    code = EXIT_SETUP_FAILED
    try:
        code = Worker(spec).run()
    except SystemExit as exc:
        code = exc.code if isinstance(exc.code, int) else 1
    except BaseException as exc:  # noqa: BLE001 - report, then exit; never return into master code
        try:
            spec.env.log.logger().error("worker.crashed", error=f"{type(exc).__name__}: {exc}", exc_info=True)
        except BaseException:  # noqa: BLE001 - nothing left to report with
            pass
        code = 1
    finally:
        os._exit(code)


class Worker:
    """One worker process's state; its bound methods are its signal handlers."""

    def __init__(self, spec: WorkerSpec) -> None:
        self.spec = spec
        self.service = spec.service
        self.listeners: List[socket.socket] = list(spec.listeners)  # our copies; closed on a busy TERM
        self._stopping = False  # set by on_term; read through stop_requested
        self.busy = False
        self.reopen_log = False  # a USR1 reopen happened: log its outcome when next idle
        self.reopen_error = ""  # why that reopen failed, if it did
        self.env = spec.env
        self.logger: Logger = spec.env.log.logger()
        self.command = (CommandService(spec.service.command, spec.service.idle_timeout, self.logger, spec.cells)
                        if spec.service.command else None)
        self.spares = (Spares(spec.idle_sem, spec.pool_cells, spec.service.min_spare_workers, spec.env.ready_fd)
                       if spec.idle_sem is not None and spec.pool_cells is not None else None)
        self.wake_r = -1
        #: [log] access: connection.closed, buffered (flushed when idle, at exit, on USR1)
        self.access: Optional[HotEvent] = None

    def stop_requested(self) -> bool:
        """TERM has arrived (a signal handler sets it at any bytecode boundary, which is
        why the loop asks rather than testing an attribute a type checker would narrow)."""
        return self._stopping

    # -- the life of a worker ----------------------------------------------------

    def run(self) -> int:
        """Set up, then serve until told to stop; returns the exit status."""
        spec, env = self.spec, self.env
        self._reset_signals()
        _close_others([env.log.sink.fd, env.alive_fd, env.ready_fd, spec.stack_fd]
                      + [s.fileno() for s in self.listeners])
        env.log.after_fork(service=self.service.name, worker=spec.number, generation=env.generation)
        if env.access_log:
            self.access = self.logger.hot("connection.closed", HOT_BUFFER)
        set_title(f"preforkd: worker {self.service.name}#{spec.number}")
        env.credentials.assume()
        _set_pdeathsig(signal.SIGTERM)
        if self.command is not None:
            # Whatever the program starts and leaves behind (even in a session of its
            # own) becomes ours when its parent exits, to be ended with the connection.
            _set_child_subreaper()
        if os.getppid() != env.master_pid:
            return 0  # the master died before we could ask to be told
        self._install_signals(event_driven=self.service.event_driven)
        if spec.stack_fd >= 0:  # the master's SIGUSR2 before it kills us for `timeout`
            faulthandler.register(signal.SIGUSR2, file=spec.stack_fd, all_threads=True, chain=False)
        spec.cells[HEARTBEAT] = time.monotonic_ns()
        if spec.handler is not None:
            try:
                spec.handler.worker_init()
            except Exception as exc:
                self.logger.error("worker.init_failed", error=f"{type(exc).__name__}: {exc}", exc_info=True)
                return EXIT_INIT_FAILED
        if self.service.event_driven:
            from .aioworker import EventServer

            code = EventServer(self).run()
        else:
            poller, servers = self._prepare_poll()
            self.announce_ready()
            code = self._serve(poller, servers)
            spec.cells[STATE] = State.STOPPING
        if self.access is not None:
            self.access.flush()
        if self.spares is not None:
            self.spares.leave()
        return code

    def _reset_signals(self) -> None:
        signal.set_wakeup_fd(-1)
        for sig in WORKER_RESET:
            signal.signal(sig, signal.SIG_DFL)
        # USR1's default action is to terminate: a log rotation while this worker is
        # still setting itself up must not cost it (see _install_signals).
        signal.signal(signal.SIGUSR1, signal.SIG_IGN)
        signal.pthread_sigmask(signal.SIG_SETMASK, [])

    def _install_signals(self, event_driven: bool) -> None:
        """INT, QUIT and ALRM act at once, even while a handler runs; USR1 reopens the log
        file at once too; the rest only set flags, and a wakeup pipe interrupts
        ``epoll_wait`` (an event-driven worker's loop installs its own TERM handler and
        wakeup fd, and logs USR1's outcome from the loop)."""
        signal.signal(signal.SIGINT, self.on_quit)
        signal.signal(signal.SIGQUIT, self.on_quit)
        signal.signal(signal.SIGALRM, self.on_alarm)
        for sig in (signal.SIGHUP, signal.SIGTTIN, signal.SIGTTOU, signal.SIGWINCH, signal.SIGUSR2):
            signal.signal(sig, signal.SIG_IGN)
        signal.signal(signal.SIGUSR1, self.on_usr1)
        if self.env.log.sink.moved():  # a rotation while we were starting: catch up
            self.on_usr1(signal.SIGUSR1, None)
        if event_driven:
            return
        self.wake_r, wake_w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        signal.set_wakeup_fd(wake_w, warn_on_full_buffer=False)
        signal.signal(signal.SIGTERM, self.on_term)

    def _prepare_poll(self) -> Tuple[select.epoll, Dict[int, Tuple[socket.socket, ServeOne]]]:
        """An epoll set of the listeners (``EPOLLEXCLUSIVE``), the master-alive pipe and
        our wakeup pipe; and per listener fd, the socket and the function serving one of
        its connections (decided here, once)."""
        poller = select.epoll()
        exclusive = getattr(select, "EPOLLEXCLUSIVE", 0)
        servers: Dict[int, Tuple[socket.socket, ServeOne]] = {}
        for sock in self.listeners:
            serve_one: ServeOne
            if self.command is not None:
                serve_one = logged_command(self.command, self.access) if self.access is not None else self.command
            else:
                assert self.spec.handler is not None
                serve_one = connection_server(self.spec.handler, self.service, self.logger,
                                              unix=sock.family == socket.AF_UNIX,
                                              cells=self.spec.cells if self.service.timeout else None,
                                              counters=self.spec.cells, access=self.access)
            if self.service.proxy_protocol:
                serve_one = self.proxy_gate().wrap(serve_one, with_local=self.command is not None, access=self.access)
            poller.register(sock.fileno(), select.EPOLLIN | exclusive)
            servers[sock.fileno()] = (sock, serve_one)
        poller.register(self.env.alive_fd, select.EPOLLIN)
        poller.register(self.wake_r, select.EPOLLIN)
        return poller, servers

    def proxy_gate(self) -> ProxyGate:
        """The PROXY protocol gate of this worker's service (``proxy_protocol``)."""
        svc = self.service
        return ProxyGate(svc.proxy_trusted, header_timeout(svc.idle_timeout), self.logger)

    def announce_ready(self) -> None:
        """Tell the master we accept (our pid on the report pipe, which stays open for
        :class:`Spares`)."""
        self.spec.cells[STATE] = State.IDLE
        if self.spares is not None:
            self.spares.idle()
        try:
            os.write(self.env.ready_fd, f"{os.getpid()}\n".encode())
        except OSError:
            pass

    def _serve(self, poller: select.epoll,
               servers: Dict[int, Tuple[socket.socket, ServeOne]]) -> int:
        """The accept loop: one connection at a time, until stopped. Returns the exit status."""
        cells = self.spec.cells
        alive_fd = self.env.alive_fd
        max_requests = self.service.max_requests
        spares = self.spares
        served = 0
        poll = poller.poll
        watched = self.service.timeout > 0
        beat = self.service.timeout / 4 if watched else -1  # epoll_wait wakes to beat while idle
        access = self.access
        while not self.stop_requested():
            if self.reopen_log:
                self._reopen_log()
            wait = beat
            if access is not None:  # the access log's lines go out within HOT_FLUSH seconds
                due = access.due()
                if due is not None:
                    left = due - time.monotonic()
                    if left <= 0:
                        access.flush()
                    else:
                        wait = min(wait, left) if wait >= 0 else left
            events = poll(wait)
            if watched:
                cells[HEARTBEAT] = time.monotonic_ns()
            for fd, _mask in events:
                entry = servers.get(fd)
                if entry is None:
                    if fd == alive_fd:
                        self.logger.info("worker.orphaned", reason="master is gone")
                        return 0
                    _drain(self.wake_r)
                    continue
                sock, serve_one = entry
                # Under load the accept queue is rarely empty: after a connection, accept
                # again before going back to epoll_wait (one system call fewer each).
                while True:
                    # Even when told to stop meanwhile, take the connection we were woken
                    # for: with EPOLLEXCLUSIVE no other worker was woken for it, and one
                    # left in the queue would wait for the next client (a lone client hangs).
                    try:
                        conn, addr = sock.accept()
                    except (BlockingIOError, InterruptedError):
                        break  # nothing (more) queued: another worker took it
                    except OSError as exc:
                        if exc.errno in _RESOURCE_ERRORS:
                            self.logger.error("worker.accept_failed", error=exc.strerror)
                        break
                    self.busy = True
                    if self.stop_requested():
                        self._stop_listening()
                    cells[STATE] = State.BUSY
                    cells[ACTIVE] = 1
                    if watched:  # handler code from here (on_connect...) until it waits on the client
                        cells[HEARTBEAT] = cells[CALL_SINCE] = time.monotonic_ns()
                    if spares is not None:
                        spares.busy()
                    try:
                        serve_one(conn, addr)
                    finally:
                        conn.close()
                        self.busy = False
                        served += 1
                        cells[SERVED] = served
                        cells[CALL_SINCE] = 0
                        cells[ACTIVE] = 0
                        cells[STATE] = State.IDLE
                        if spares is not None:
                            spares.idle()
                    if max_requests and served >= max_requests:
                        self.logger.info("worker.max_requests", served=served)
                        self.logger.info("worker.recycled", reason="max_requests", served=served)
                        return 0
                    if self.stop_requested() or self.reopen_log:
                        break
        return 0

    def reopen_now(self) -> None:
        """An event-driven worker's USR1, from its loop: reopen, then log how it went."""
        self.on_usr1(signal.SIGUSR1, None)
        self._reopen_log()

    def _reopen_log(self) -> None:
        """Log how the USR1 reopen went (the reopen itself happened in :meth:`on_usr1`)."""
        self.reopen_log = False
        if self.reopen_error:
            self.logger.warning("log.reopen_failed", file=self.env.log.sink.path, error=self.reopen_error)
        else:
            self.logger.debug("log.reopened", file=self.env.log.sink.path or "stderr")

    def _stop_listening(self) -> None:
        """Told to stop with a connection in hand: close our copies of the listening
        sockets now and arm the ``graceful_timeout`` timer.

        Without the close, new clients would still be queued by the kernel on a socket
        that nobody accepts from any more (the master closed its copy), hang, and be
        reset when we exit; and after the master's death the port could not be bound
        again until we were gone. Runs from the TERM handler while busy (nothing else
        uses the listeners while a connection is in hand), or from the loop when TERM
        came between a wake-up and its accept.
        """
        for sock in self.listeners:
            try:
                sock.close()
            except OSError:
                pass
        self.listeners = []
        signal.setitimer(signal.ITIMER_REAL, max(0.001, self.env.graceful_timeout))

    # -- signal handlers -----------------------------------------------------------

    def on_term(self, signum: int, frame: Optional[FrameType]) -> None:
        """TERM: graceful stop; a busy worker stops listening at once (see above)."""
        self._stopping = True
        if self.busy:
            self._stop_listening()

    def on_quit(self, signum: int, frame: Optional[FrameType]) -> None:
        """INT, QUIT: exit now, taking the command program and all it started along."""
        if self.command is not None:
            self.command.end_processes()
        os._exit(0)

    def on_alarm(self, signum: int, frame: Optional[FrameType]) -> None:
        """The graceful timer ran out with a connection in hand: die of SIGALRM, as the
        default action would, but not without the command program."""
        if self.command is not None:
            self.command.end_processes()
        signal.signal(signal.SIGALRM, signal.SIG_DFL)
        os.kill(os.getpid(), signal.SIGALRM)

    def on_usr1(self, signum: int, frame: Optional[FrameType]) -> None:
        """USR1: reopen the log file now, busy or not, so that every line from here on
        goes to the new file. It is opened without ``O_CREAT``: the master has created
        it already and, with ``supervisor.user`` set, made it ours (a file only root
        may write would fail here, never crash us: the old file then stays in use).
        The outcome is logged from the loop, not here: a handler that logs could
        re-enter structlog's writer while it holds its lock."""
        try:
            self.env.log.reopen(create=False)
            self.reopen_error = ""
        except OSError as exc:
            self.reopen_error = exc.strerror or str(exc)
        self.reopen_log = True


# -- process set-up helpers (resolved in the master, shared by every worker) ------------


def _close_others(keep: Sequence[int]) -> None:
    """Close every descriptor except *keep* (and 0, 1, 2)."""
    lo = 3
    for fd in sorted({k for k in keep if k >= 3}):
        if fd > lo:
            os.closerange(lo, fd)
        lo = fd + 1
    os.closerange(lo, 1 << 20 if sys.platform != "linux" else _max_fd())


def _max_fd() -> int:
    try:
        return max(int(name) for name in os.listdir("/proc/self/fd")) + 1
    except (OSError, ValueError):
        return 65536


def _load_prctl() -> Any:
    """libc's prctl(2), resolved once in the master (dlopen of the running program:
    no ``find_library``, which would run ldconfig in every worker)."""
    if not sys.platform.startswith("linux"):
        return None
    try:
        return ctypes.CDLL(None, use_errno=True).prctl
    except (OSError, AttributeError):
        return None


_PRCTL = _load_prctl()
PR_SET_PDEATHSIG = 1
PR_SET_CHILD_SUBREAPER = 36

try:  # imported here, in the master, so that workers share it instead of loading it
    import setproctitle as _setproctitle
except ImportError:  # pragma: no cover - a declared dependency
    _setproctitle = None  # type: ignore[assignment]


def set_title(title: str) -> None:
    """Name this process in ``ps`` (setproctitle, imported once in the master so that
    workers share it); cosmetic, never fails."""
    if _setproctitle is not None:
        try:
            _setproctitle.setproctitle(title)
        except Exception:  # noqa: BLE001 - cosmetic
            pass


def _set_pdeathsig(sig: int) -> None:
    if _PRCTL is not None:
        _PRCTL(PR_SET_PDEATHSIG, int(sig), 0, 0, 0)


def _set_child_subreaper() -> None:
    """Become a child subreaper (prctl(2) ``PR_SET_CHILD_SUBREAPER``, Linux 3.4): orphaned
    descendants are re-parented to this process instead of init."""
    if _PRCTL is not None:
        _PRCTL(PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0)


def _drain(fd: int) -> None:
    try:
        while os.read(fd, 512):
            pass
    except (BlockingIOError, InterruptedError):
        pass

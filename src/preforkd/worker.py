"""The worker process: what runs in the child after the master forks.

A worker resets the master's signal handlers, closes every descriptor that is
not its own, names itself in ``ps`` (``preforkd: worker echo#2``), drops
privileges when configured, arranges to die with the master, runs the handler's
``worker_init``, tells the master it is ready, and then loops: wait in ``epoll``
(listeners registered with ``EPOLLEXCLUSIVE`` so one worker wakes per connection,
plus the master-alive pipe and its own signal wakeup pipe), accept, serve one
connection, repeat.

Signals (worker): TERM is a graceful stop (stop accepting — a busy worker closes
its copies of the listening sockets at once —, finish the connection in hand —
including one that ``epoll`` had already woken this worker for — and exit 0; a
timer of ``graceful_timeout`` seconds bounds it even if the master is gone: then
the worker dies of SIGALRM); INT and QUIT exit at once; a command program
serving the connection in hand is killed with its process group whenever the
worker exits early like that; USR1 reopens the log file; HUP, TTIN
and TTOU are ignored (they are the master's). End of file on the master-alive pipe
means the master died: the worker exits (no orphans); ``PR_SET_PDEATHSIG`` makes
a busy worker hear of it too (Linux, prctl(2)).

Exit statuses: 0 clean (stop, max_requests, master gone), 3 ``worker_init``
failed, 4 the worker could not set itself up.
"""

from __future__ import annotations

import ctypes
import errno
import os
import select
import signal
import socket
import sys
from dataclasses import dataclass
from typing import Any, List, NoReturn, Optional, Sequence

from . import log
from .config import ServiceConfig
from .pool import BUSY, IDLE, STOPPING
from .protocol import Connection, serve, set_timeouts
from . import services
from .services import run_command

EXIT_INIT_FAILED = 3
EXIT_SETUP_FAILED = 4

#: Signals the master handles; a worker resets them before doing anything else.
MASTER_SIGNALS = (
    signal.SIGHUP, signal.SIGTERM, signal.SIGINT, signal.SIGQUIT, signal.SIGCHLD,
    signal.SIGTTIN, signal.SIGTTOU, signal.SIGUSR1, signal.SIGUSR2, signal.SIGWINCH, signal.SIGALRM,
)


@dataclass
class WorkerSpec:
    """Everything a worker needs, decided by the master before ``fork``."""

    service: ServiceConfig
    listeners: Sequence[socket.socket]
    kind: str  # "line" | "class" | "connection" | "command"
    target: Any  # the handler object
    number: int
    generation: int
    slot: int
    cells: Any  # scoreboard memoryview
    alive_fd: int  # read end of the master-alive pipe
    ready_fd: int  # write end of the ready pipe
    keep_fds: Sequence[int]
    master_pid: int
    graceful_timeout: float
    uid: Optional[int] = None
    gid: Optional[int] = None
    user: str = ""


class _Flags:
    stopping = False
    busy = False
    reopen = False
    graceful_timeout = 30.0
    listeners: List[socket.socket] = []  # our copies of the listening sockets


def _on_term(signum: int, frame: Any) -> None:
    _Flags.stopping = True
    if _Flags.busy:
        _finish_in_hand()


def _finish_in_hand() -> None:
    """Told to stop with a connection in hand: close our copies of the listening
    sockets now and arm the ``graceful_timeout`` timer.

    Without the close, new clients would still be queued by the kernel on a socket
    that nobody accepts from any more (the master closed its copy), hang, and be
    reset when we exit; and after the master's death the port could not be bound
    again until we were gone. A busy worker is inside the handler until the client
    leaves, so this runs from the TERM handler (Python runs it between bytecodes,
    not in signal context) as well as from the loop; nothing else uses the
    listeners while a connection is in hand.
    """
    for sock in _Flags.listeners:
        try:
            sock.close()
        except OSError:
            pass
    _Flags.listeners = []
    signal.setitimer(signal.ITIMER_REAL, max(0.001, _Flags.graceful_timeout))


def _end_command() -> None:
    """Kill the process group of the command program serving the connection in
    hand, if any: it runs in its own session and would outlive us otherwise."""
    pgid = services.running_group
    if pgid:
        try:
            os.killpg(pgid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass


def _on_alarm(signum: int, frame: Any) -> None:
    # graceful_timeout ran out with a connection in hand: die of SIGALRM, as the
    # default action would, but not without the command program.
    _end_command()
    signal.signal(signal.SIGALRM, signal.SIG_DFL)
    os.kill(os.getpid(), signal.SIGALRM)


def _on_quit(signum: int, frame: Any) -> None:
    _end_command()
    os._exit(0)


def _on_usr1(signum: int, frame: Any) -> None:
    _Flags.reopen = True


def run(spec: WorkerSpec) -> NoReturn:
    """Run the worker until it should exit; never returns (``os._exit``)."""
    code = EXIT_SETUP_FAILED
    try:
        code = _run(spec)
    except SystemExit as exc:
        code = exc.code if isinstance(exc.code, int) else 1
    except BaseException as exc:  # noqa: BLE001 - report, then exit; never return into master code
        try:
            log.get().error("worker.crashed", error=f"{type(exc).__name__}: {exc}", exc_info=True)
        except BaseException:
            pass
        code = 1
    finally:
        os._exit(code)


def _reset_signals() -> List[int]:
    signal.set_wakeup_fd(-1)
    for sig in MASTER_SIGNALS:
        signal.signal(sig, signal.SIG_DFL)
    signal.pthread_sigmask(signal.SIG_SETMASK, [])
    return []


def _close_others(keep: Sequence[int]) -> None:
    """Close every descriptor except *keep* (and 0, 1, 2)."""
    lo = 3
    for fd in sorted(set(k for k in keep if k >= 3)):
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

try:  # imported here, in the master, so that workers share it instead of loading it
    import setproctitle as _setproctitle
except ImportError:  # pragma: no cover - a declared dependency
    _setproctitle = None


def _set_pdeathsig(sig: int) -> None:
    if _PRCTL is not None:
        _PRCTL(PR_SET_PDEATHSIG, int(sig), 0, 0, 0)


def _drop_privileges(spec: WorkerSpec) -> None:
    if os.geteuid() != 0:
        return
    if spec.gid is not None:
        os.setgid(spec.gid)
        if spec.user:
            os.initgroups(spec.user, spec.gid)
        else:
            os.setgroups([spec.gid])
    if spec.uid is not None:
        os.setuid(spec.uid)


def _run(spec: WorkerSpec) -> int:
    _reset_signals()
    _close_others(list(spec.keep_fds) + [s.fileno() for s in spec.listeners] + [spec.alive_fd, spec.ready_fd])
    svc = spec.service
    log.after_fork()
    log.clear()
    log.bind(service=svc.name, worker=spec.number, generation=spec.generation)
    logger = log.get()
    if _setproctitle is not None:
        _setproctitle.setproctitle(f"preforkd: worker {svc.name}#{spec.number}")
    _drop_privileges(spec)
    _set_pdeathsig(signal.SIGTERM)
    if os.getppid() != spec.master_pid:
        return 0  # the master died before we could ask to be told

    # Our own signal handling: handlers set flags; a wakeup pipe interrupts epoll.
    _Flags.graceful_timeout = spec.graceful_timeout
    wake_r, wake_w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
    signal.set_wakeup_fd(wake_w, warn_on_full_buffer=False)
    signal.signal(signal.SIGTERM, _on_term)
    signal.signal(signal.SIGINT, _on_quit)
    signal.signal(signal.SIGQUIT, _on_quit)
    signal.signal(signal.SIGUSR1, _on_usr1)
    signal.signal(signal.SIGALRM, _on_alarm)
    _Flags.listeners = list(spec.listeners)
    for sig in (signal.SIGHUP, signal.SIGTTIN, signal.SIGTTOU, signal.SIGWINCH, signal.SIGUSR2):
        signal.signal(sig, signal.SIG_IGN)

    if spec.kind == "class":
        try:
            spec.target.worker_init()
        except Exception as exc:  # noqa: BLE001 - reported to the master through our exit status
            logger.error("worker.init_failed", error=f"{type(exc).__name__}: {exc}", exc_info=True)
            return EXIT_INIT_FAILED

    ep = select.epoll()
    by_fd = {}
    exclusive = getattr(select, "EPOLLEXCLUSIVE", 0)
    for sock in spec.listeners:
        ep.register(sock.fileno(), select.EPOLLIN | exclusive)
        by_fd[sock.fileno()] = sock
    ep.register(spec.alive_fd, select.EPOLLIN)
    ep.register(wake_r, select.EPOLLIN)

    cells = spec.cells
    state_i, count_i = 2 * spec.slot, 2 * spec.slot + 1
    cells[state_i] = IDLE
    try:
        os.write(spec.ready_fd, f"{os.getpid()}\n".encode())
    except OSError:
        pass
    os.close(spec.ready_fd)

    served = 0
    max_requests = svc.max_requests
    idle_timeout = svc.idle_timeout
    limit = svc.max_line_length
    name = svc.name
    kind, target = spec.kind, spec.target
    command = svc.command
    alive_fd = spec.alive_fd
    poll = ep.poll
    while not _Flags.stopping:
        if _Flags.reopen:
            _Flags.reopen = False
            log.SINK.reopen()
            logger.debug("log.reopened", file=log.SINK.path or "stderr")
        try:
            events = poll()
        except InterruptedError:  # pragma: no cover - PEP 475 retries; kept for clarity
            continue
        for fd, _mask in events:
            sock = by_fd.get(fd)
            if sock is None:
                if fd == alive_fd:
                    logger.info("worker.orphaned", reason="master is gone")
                    return 0
                _drain(wake_r)
                continue
            unix = sock.family == socket.AF_UNIX  # once per wake-up, not per connection
            # Under load the accept queue is rarely empty: after a connection, accept
            # again before going back to epoll_wait (one system call fewer each).
            while True:
                # Even when told to stop meanwhile, take the connection we were woken for:
                # with EPOLLEXCLUSIVE no other worker was woken for it, and one left in the
                # queue would wait for the next client to arrive (a lone client would hang).
                try:
                    conn_sock, addr = sock.accept()
                except (BlockingIOError, InterruptedError):
                    break  # nothing (more) queued: another worker took it
                except OSError as exc:
                    if exc.errno in (errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM):
                        logger.error("worker.accept_failed", error=exc.strerror)
                    break
                _Flags.busy = True
                if _Flags.stopping:
                    _finish_in_hand()
                cells[state_i] = BUSY
                try:
                    if command:
                        run_command(conn_sock, addr, command, idle_timeout, logger)
                    else:
                        if unix:
                            # TCP connections inherit TCP_NODELAY and the idle timeouts from
                            # the listener (set by the master); Unix ones do not.
                            set_timeouts(conn_sock, idle_timeout)
                        serve(Connection(conn_sock, addr, name, limit, idle_timeout), kind, target, logger)
                finally:
                    conn_sock.close()
                    _Flags.busy = False
                    served += 1
                    cells[count_i] = served
                    cells[state_i] = IDLE
                if max_requests and served >= max_requests:
                    logger.info("worker.max_requests", served=served)
                    return 0
                if _Flags.stopping or _Flags.reopen:
                    break
    cells[state_i] = STOPPING
    return 0


def _drain(fd: int) -> None:
    try:
        while os.read(fd, 512):
            pass
    except (BlockingIOError, InterruptedError):
        pass

"""Built-in services: ``echo``, ``daytime`` (RFC 867) and the ``command`` (inetd) service."""

from __future__ import annotations

import os
import signal
import socket
import time
from typing import Any, Callable, List, Optional, Sequence, Tuple

from .config import SAFE_PATH
from .handler import Close, LineHandler, Reply
from .listeners import tcp_byte_counts
from .log import HotEvent, Logger
from .protocol import peer_text
from .scoreboard import ERROR_CELL


def echo(line: str) -> str:
    """``preforkd.services:echo`` — each line back, CRLF-terminated (RFC 862 in spirit, line-wise)."""
    return line


class Daytime(LineHandler):
    """``preforkd.services:daytime`` — RFC 867: on connect, one line with the
    current date and time (UTC, e.g. ``Saturday, November 21, 2026 18:09:00-UTC``),
    then close. Input is ignored."""

    def on_connect(self) -> Reply:
        return Close(time.strftime("%A, %B %d, %Y %H:%M:%S-UTC", time.gmtime()))

    def on_line(self, line: str) -> Reply:  # pragma: no cover - never reached
        return Close()


daytime = Daytime


def _split(address: Any) -> Tuple[str, str]:
    if isinstance(address, tuple) and len(address) >= 2:
        return str(address[0]), str(address[1])
    return "", ""


class CommandService:
    """A ``command`` service: serve each connection inetd-style by exec'ing *argv*
    with stdin and stdout on the client socket (stderr stays the worker's), no shell,
    ``PATH`` fixed to :data:`preforkd.config.SAFE_PATH`, the UCSPI-TCP environment
    (``PROTO``, ``TCPREMOTEIP``, ``TCPREMOTEPORT``, ``TCPLOCALIP``, ``TCPLOCALPORT``)
    for TCP clients, in a new session and process group.

    One instance per worker; it remembers the process group of the program serving the
    connection in hand (:attr:`group`), so that a worker that must exit early can end it
    first (:meth:`end_processes`).

    Every process the program starts ends with the connection, even one that left
    its process group or session (``setsid sleep 1001 &``), which would otherwise
    keep the client's socket open (the client never sees end of file) and outlive the
    supervisor. The worker is a child subreaper (prctl(2) ``PR_SET_CHILD_SUBREAPER``):
    whatever the program leaves behind is re-parented to the worker when its parent
    exits, and :meth:`end_processes` kills and reaps all of it.

    :param idle_timeout: seconds the program may run; then its whole process group
        gets SIGTERM, and SIGKILL one second later.
    :param cells: the worker's scoreboard slot, where a program that cannot start or
        outlives *idle_timeout* is counted (:data:`preforkd.scoreboard.ERROR_CELL`).
    """

    def __init__(self, argv: Sequence[str], idle_timeout: float, logger: Logger,
                 cells: Optional[memoryview] = None) -> None:
        self.argv = list(argv)
        self.idle_timeout = idle_timeout
        self.logger = logger
        self.cells = cells
        #: The process group (= pid) of the program serving the connection in hand; 0 = none.
        self.group = 0

    def __call__(self, sock: socket.socket, peer_addr: Any, local_addr: Any = None) -> str:
        """Serve one connection; returns when the program has exited, with how the
        connection ended: ``program_exited``, ``program_timeout`` (it outlived
        ``idle_timeout`` and was killed) or ``exec_failed``. The caller closes *sock*.
        Failures are logged, never raised.

        :param peer_addr: the client's address: ``accept()``'s, or a PROXY protocol
            header's (a ``(host, port)`` tuple is a TCP client, anything else a Unix one).
        :param local_addr: the address the client connected to, from a PROXY protocol
            header; ``None``: the socket's own (``getsockname``).
        """
        argv, logger = self.argv, self.logger
        env = {"PATH": SAFE_PATH, "LANG": os.environ.get("LANG", "C.UTF-8")}
        if isinstance(peer_addr, tuple):
            env["PROTO"] = "TCP"
            env["TCPREMOTEIP"], env["TCPREMOTEPORT"] = _split(peer_addr)
            try:
                local = local_addr if isinstance(local_addr, tuple) else sock.getsockname()
                env["TCPLOCALIP"], env["TCPLOCALPORT"] = _split(local)
            except OSError:
                pass
        else:
            env["PROTO"] = "UNIX"
        sock.settimeout(None)
        fd = sock.fileno()
        import subprocess  # here: only command services need it (a master starts faster without)

        try:
            proc = subprocess.Popen(argv, stdin=fd, stdout=fd, close_fds=True, env=env, cwd="/",
                                    start_new_session=True, restore_signals=True)
        except OSError as exc:
            logger.error("command.exec_failed", command=argv[0], error=exc.strerror or str(exc))
            return self._failed("exec_failed")
        self.group = proc.pid
        started = time.monotonic()
        reason = "program_exited"
        try:
            proc.wait(timeout=self.idle_timeout)
        except subprocess.TimeoutExpired:
            reason = self._failed("program_timeout")
            logger.warning("command.timeout", command=argv[0], child=proc.pid, timeout=self.idle_timeout)
            self.kill_group(signal.SIGTERM)
            try:
                proc.wait(timeout=1.0)
            except subprocess.TimeoutExpired:
                self.kill_group(signal.SIGKILL)
                proc.wait()
        # The program may have left processes behind holding the socket, in its group
        # or not: end them all.
        self.end_processes()
        self.group = 0
        rc = proc.returncode
        if rc != 0:
            logger.info("command.exited", command=argv[0], child=proc.pid, status=rc,
                        lifetime=round(time.monotonic() - started, 3))
        return reason

    def _failed(self, reason: str) -> str:
        if self.cells is not None:
            self.cells[ERROR_CELL[reason]] += 1
        return reason

    def kill_group(self, sig: int = signal.SIGKILL) -> None:
        """Signal the process group of the program serving the connection in hand, if any
        (safe to call from a signal handler: one ``killpg(2)``)."""
        if self.group:
            try:
                os.killpg(self.group, sig)
            except (ProcessLookupError, PermissionError):
                pass

    def end_processes(self) -> None:
        """Kill (SIGKILL) and reap every process the connection's program started: its
        process group, then every child this worker has, which as a child subreaper
        includes everything re-parented to it, round after round until none is left.
        Safe to call from a signal handler (Python runs those between bytecodes)."""
        self.kill_group(signal.SIGKILL)
        while True:
            try:
                pid, _ = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                return  # no children at all: the common case, no /proc scan
            if pid:
                continue
            children = child_pids()
            if not children:
                return  # no /proc to find them in; never wait on what we cannot kill
            for child in children:
                try:
                    os.kill(child, signal.SIGKILL)
                except ProcessLookupError:
                    pass
            try:
                # One of them dies; anything it had is ours by then (re-parented before
                # it can be reaped), and killed in the next round.
                os.waitpid(-1, 0)
            except ChildProcessError:
                return


def child_pids() -> List[int]:
    """The pids of this process's children, read from ``/proc/PID/stat`` (its fourth
    field is the parent's pid, proc(5)); ``/proc/self/task/*/children`` would be
    cheaper but needs ``CONFIG_PROC_CHILDREN``."""
    me = os.getpid()
    out: List[int] = []
    try:
        entries = os.listdir("/proc")
    except OSError:
        return out
    for name in entries:
        if not name.isdigit():
            continue
        try:
            with open(f"/proc/{name}/stat", "rb") as f:
                fields = f.read().rsplit(b")", 1)[1].split()
        except (OSError, IndexError):
            continue
        if len(fields) > 1 and fields[1] == str(me).encode():
            out.append(int(name))
    return out


def logged_command(command: CommandService, log_closed: HotEvent) -> Callable[..., str]:
    """*command* with one ``connection.closed`` event per connection (``[log] access``)
    through *log_closed*.
    The program owns the socket, so lines are not known (``null``) and the byte counts
    come from the kernel's ``TCP_INFO`` (:func:`preforkd.listeners.tcp_byte_counts`;
    ``null`` for a Unix-domain client). ``duration_ms``: monotonic clock."""
    def serve_logged(sock: socket.socket, peer_addr: Any, local_addr: Any = None) -> str:
        started = time.monotonic()
        reason = command(sock, peer_addr, local_addr)
        counts = tcp_byte_counts(sock)
        log_closed(peer=peer_text(peer_addr), duration_ms=round((time.monotonic() - started) * 1000, 3), lines=None,
                   bytes_in=counts[0] if counts else None, bytes_out=counts[1] if counts else None, reason=reason)
        return reason

    return serve_logged

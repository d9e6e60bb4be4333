"""Built-in services: ``echo``, ``daytime`` (RFC 867) and the ``command`` (inetd) service."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import time
from typing import Any, List, Sequence, Tuple

from .config import SAFE_PATH
from .handler import Close, LineHandler, Reply
from .log import Logger


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
    """

    def __init__(self, argv: Sequence[str], idle_timeout: float, logger: Logger) -> None:
        self.argv = list(argv)
        self.idle_timeout = idle_timeout
        self.logger = logger
        #: The process group (= pid) of the program serving the connection in hand; 0 = none.
        self.group = 0

    def __call__(self, sock: socket.socket, peer_addr: Any) -> None:
        """Serve one connection; returns when the program has exited. The caller closes
        *sock*. Failures are logged, never raised."""
        argv, logger = self.argv, self.logger
        env = {"PATH": SAFE_PATH, "LANG": os.environ.get("LANG", "C.UTF-8")}
        if sock.family in (socket.AF_INET, socket.AF_INET6):
            env["PROTO"] = "TCP"
            env["TCPREMOTEIP"], env["TCPREMOTEPORT"] = _split(peer_addr)
            try:
                env["TCPLOCALIP"], env["TCPLOCALPORT"] = _split(sock.getsockname())
            except OSError:
                pass
        else:
            env["PROTO"] = "UNIX"
        sock.settimeout(None)
        fd = sock.fileno()
        try:
            proc = subprocess.Popen(argv, stdin=fd, stdout=fd, close_fds=True, env=env, cwd="/",
                                    start_new_session=True, restore_signals=True)
        except OSError as exc:
            logger.error("command.exec_failed", command=argv[0], error=exc.strerror or str(exc))
            return
        self.group = proc.pid
        started = time.monotonic()
        try:
            proc.wait(timeout=self.idle_timeout)
        except subprocess.TimeoutExpired:
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

"""Built-in services: ``echo``, ``daytime`` (RFC 867) and the ``command`` (inetd) service."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import time
from typing import Any, Sequence

from .config import SAFE_PATH
from .handler import Close, LineHandler, Reply


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


#: The process group (= pid) of the command program serving the connection in hand
#: in this worker, 0 when none: a worker that has to exit before the program is done
#: kills this group first (see preforkd.worker).
running_group = 0


def _split(address: Any) -> "tuple[str, str]":
    if isinstance(address, tuple) and len(address) >= 2:
        return str(address[0]), str(address[1])
    return "", ""


def run_command(sock: socket.socket, peer_addr: Any, argv: Sequence[str], idle_timeout: float, logger: Any) -> None:
    """Serve one connection inetd-style: exec *argv* with stdin and stdout on the
    client socket (stderr stays the worker's), no shell, ``PATH`` fixed to
    :data:`preforkd.config.SAFE_PATH`, UCSPI-TCP environment variables
    (``PROTO``, ``TCPREMOTEIP``, ``TCPREMOTEPORT``, ``TCPLOCALIP``, ``TCPLOCALPORT``)
    for TCP clients, in a new session and process group.

    If the program outlives *idle_timeout* seconds its whole process group gets
    SIGTERM, then SIGKILL one second later. Returns when the program has exited;
    the caller closes *sock*. Failures are logged, never raised.
    """
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
        proc = subprocess.Popen(
            list(argv), stdin=fd, stdout=fd, close_fds=True, env=env, cwd="/",
            start_new_session=True, restore_signals=True,
        )
    except OSError as exc:
        logger.error("command.exec_failed", command=argv[0], error=exc.strerror or str(exc))
        return
    global running_group
    running_group = proc.pid
    started = time.monotonic()
    try:
        proc.wait(timeout=idle_timeout)
    except subprocess.TimeoutExpired:
        logger.warning("command.timeout", command=argv[0], child=proc.pid, timeout=idle_timeout)
        _kill_group(proc, signal.SIGTERM)
        try:
            proc.wait(timeout=1.0)
        except subprocess.TimeoutExpired:
            _kill_group(proc, signal.SIGKILL)
            proc.wait()
    # The program may have left children in its group holding the socket; end them.
    _kill_group(proc, signal.SIGKILL)
    running_group = 0
    rc = proc.returncode
    if rc != 0:
        logger.info("command.exited", command=argv[0], child=proc.pid, status=rc,
                    lifetime=round(time.monotonic() - started, 3))


def _kill_group(proc: "subprocess.Popen[bytes]", sig: int) -> None:
    try:
        os.killpg(proc.pid, sig)
    except (ProcessLookupError, PermissionError):
        pass

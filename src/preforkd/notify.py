"""The sd_notify protocol (sd_notify(3), systemd.service(5) ``Type=notify``).

When ``NOTIFY_SOCKET`` is set (a path, or ``@name`` for the abstract namespace),
the master sends newline-separated ``KEY=VALUE`` datagrams: ``READY=1``,
``RELOADING=1`` with ``MONOTONIC_USEC=`` (``Type=notify-reload`` wants both),
``STOPPING=1``, ``STATUS=`` text, ``MAINPID=``, and ``WATCHDOG=1`` every half of
``WATCHDOG_USEC`` when ``WATCHDOG_PID`` is unset or is this process. Sending never
raises: a missing or full socket must not hurt the supervisor.
"""

from __future__ import annotations

import os
import socket
import time
from typing import Mapping, Optional


class Notifier:
    """Talks to the service manager, or does nothing when not run by one."""

    def __init__(self, environ: Optional[Mapping[str, str]] = None) -> None:
        env = os.environ if environ is None else environ
        addr = env.get("NOTIFY_SOCKET", "")
        self.address: Optional[str] = addr or None
        self._sock: Optional[socket.socket] = None
        #: Seconds between ``WATCHDOG=1`` pings: half of ``WATCHDOG_USEC``; None when not asked.
        self.watchdog_interval: Optional[float] = None
        usec = env.get("WATCHDOG_USEC", "")
        wpid = env.get("WATCHDOG_PID", "")
        if usec.isdigit() and int(usec) > 0 and (not wpid or wpid == str(os.getpid())):
            self.watchdog_interval = int(usec) / 2_000_000

    @property
    def enabled(self) -> bool:
        return self.address is not None

    def fileno(self) -> Optional[int]:
        return self._sock.fileno() if self._sock else None

    def send(self, *lines: str) -> bool:
        """Send one datagram made of *lines* (``"READY=1"``, ``"STATUS=..."``).

        :returns: True if it was sent, False when disabled or on any error.
        """
        if not self.address:
            return False
        target = self.address
        if target.startswith("@"):
            target = "\0" + target[1:]
        try:
            if self._sock is None:
                self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)
            self._sock.sendto("\n".join(lines).encode("utf-8"), target)
            return True
        except OSError:
            return False

    def ready(self, status: str) -> None:
        self.send("READY=1", f"STATUS={status}", f"MAINPID={os.getpid()}")

    def reloading(self, status: str) -> None:
        usec = time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
        self.send("RELOADING=1", f"MONOTONIC_USEC={usec}", f"STATUS={status}")

    def stopping(self, status: str) -> None:
        self.send("STOPPING=1", f"STATUS={status}")

    def status(self, status: str) -> None:
        self.send(f"STATUS={status}")

    def watchdog(self) -> None:
        self.send("WATCHDOG=1")

    def close(self) -> None:
        if self._sock is not None:
            self._sock.close()
            self._sock = None

"""``preforkd start``: the setsid recipe via python-daemon, with a readiness pipe.

perlipc "Complete Dissociation of Child from Parent" and PEP 3143: fork, start a
new session, fork again, chdir to ``working_directory``, set the ``umask``, point
the standard streams at /dev/null and close every other descriptor; python-daemon's
``DaemonContext`` does those steps. The launching process forks first and waits
on a pipe: the daemon writes ``READY PID`` once its listeners are bound and its
workers accept, or ``ERROR reason`` if start-up fails, and only then does the
launcher exit (0 or 1). End of file without a message means the daemon died.
"""

from __future__ import annotations

import os
import select
import sys
import time
from typing import Dict, Optional

from .config import Config
from .handler import Handler


def start(config: Config, handlers: Dict[str, Handler], config_arg: Optional[str], timeout: float) -> int:
    """Daemonize and wait for readiness.

    :param handlers: the services' resolved handlers (imported before the fork, so the
        daemon's workers share them).

    :param timeout: seconds to wait for the daemon's word.
    :returns: the launcher's exit status: 0 ready, 1 failed or timed out.
    """
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:  # the future daemon
        os.close(r)
        code = _daemon_main(config, handlers, config_arg, w)
        os._exit(code)
    os.close(w)
    message = _wait_for_word(r, timeout)
    os.close(r)
    try:
        os.waitpid(pid, 0)  # python-daemon's first fork exits at once
    except ChildProcessError:
        pass
    if message is None:
        print(f"preforkd: not ready after {timeout:g} s; it may still be starting (see the log)",
              file=sys.stderr)
        return 1
    if message.startswith("READY"):
        print(f"preforkd: started, master pid {message.split()[1] if len(message.split()) > 1 else '?'}")
        return 0
    if message.startswith("ERROR "):
        print(f"preforkd: start failed: {message[len('ERROR '):]}", file=sys.stderr)
        return 1
    print("preforkd: start failed: the daemon exited during start-up (see the log)", file=sys.stderr)
    return 1


def _wait_for_word(fd: int, timeout: float) -> Optional[str]:
    """The first line from the daemon, "" on end of file, ``None`` on timeout."""
    deadline = time.monotonic() + timeout
    data = b""
    while b"\n" not in data:
        left = deadline - time.monotonic()
        if left <= 0:
            return None
        ready, _, _ = select.select([fd], [], [], left)
        if not ready:
            continue
        chunk = os.read(fd, 4096)
        if not chunk:
            break
        data += chunk
    return data.split(b"\n", 1)[0].decode("utf-8", "replace")


def _daemon_main(config: Config, handlers: Dict[str, Handler], config_arg: Optional[str], ready_w: int) -> int:
    import daemon  # python-daemon

    from .log import EventLog
    from .master import Master

    try:
        ctx = daemon.DaemonContext(
            working_directory=config.supervisor.working_directory,
            umask=config.supervisor.umask,
            detach_process=True,
            files_preserve=[ready_w],
            signal_map={},  # the master installs its own handlers
            prevent_core=False,
        )
        ctx.open()
    except Exception as exc:  # noqa: BLE001 - reported to the launcher, which prints it
        _say(ready_w, f"ERROR cannot daemonize: {exc}")
        return 1
    try:
        log = EventLog(config.log.level, config.log.format, config.log.file)
    except OSError as exc:
        _say(ready_w, f"ERROR cannot open log file {config.log.file}: {exc.strerror}")
        return 1
    try:
        return Master(config, handlers, log, config_arg, launcher=Launcher(ready_w)).run()
    except Exception as exc:  # noqa: BLE001
        log.logger().error("supervisor.crashed", error=f"{type(exc).__name__}: {exc}", exc_info=True)
        _say(ready_w, f"ERROR {type(exc).__name__}: {exc}")
        return 1


class Launcher:
    """The daemon's end of the readiness pipe: tells the waiting ``preforkd start``
    ``READY PID`` or ``ERROR reason``, once (later reports are dropped)."""

    def __init__(self, fd: int) -> None:
        self.fd: Optional[int] = fd

    def report(self, message: str) -> None:
        if self.fd is None:
            return
        _say(self.fd, message)
        try:
            os.close(self.fd)
        except OSError:
            pass
        self.fd = None


def _say(fd: int, message: str) -> None:
    try:
        os.write(fd, (message + "\n").encode("utf-8", "replace"))
    except OSError:
        pass

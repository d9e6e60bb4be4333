"""The master's signal table, and what the master does to its children with signals.

One table, :data:`MASTER_SIGNALS`, names every signal the master handles and the
method of :class:`preforkd.master.Master` that acts on it (``handle_<name>``); the
list blocked across the reload's ``execve`` and the list a worker resets after
``fork`` are derived from it, so a signal added here is handled, carried across exec
and reset in workers in one step. The table reads like ``docs/signals.md``.
"""

from __future__ import annotations

import os
import signal
from typing import Dict, Tuple, Union

#: signal -> the name of its master handler (``Master.handle_<name>``); see docs/signals.md.
MASTER_SIGNALS: Dict[signal.Signals, str] = {
    signal.SIGHUP: "hup",     # reload by re-exec
    signal.SIGTERM: "term",   # graceful stop
    signal.SIGINT: "int",     # quick stop
    signal.SIGQUIT: "quit",   # quick stop
    signal.SIGCHLD: "chld",   # reap (the loop reaps on every wake-up)
    signal.SIGTTIN: "ttin",   # one more worker per pool
    signal.SIGTTOU: "ttou",   # one fewer worker per pool
    signal.SIGUSR1: "usr1",   # reopen the log file
}

#: Blocked across the reload's ``execve`` (a blocked signal stays pending through exec,
#: signal(7)) and unblocked by the new image once its handlers are installed.
BLOCKED_ACROSS_EXEC: Tuple[signal.Signals, ...] = tuple(MASTER_SIGNALS)

#: What a worker sets back to the default action right after ``fork``: the master's
#: handlers, plus the signals a worker later handles itself or ignores.
WORKER_RESET: Tuple[signal.Signals, ...] = BLOCKED_ACROSS_EXEC + (
    signal.SIGUSR2, signal.SIGWINCH, signal.SIGALRM,
)


def signal_name(num: int) -> str:
    """``"SIGKILL"`` for 9; the number as text for a signal Python does not name."""
    try:
        return signal.Signals(num).name
    except ValueError:
        return str(num)


def kill_quietly(pid: int, sig: int) -> None:
    """``kill(2)`` *pid* with *sig*, ignoring a process that is already gone or not ours
    (``ESRCH``, ``EPERM``): the master signals children it may have just reaped."""
    try:
        os.kill(pid, sig)
    except (ProcessLookupError, PermissionError):
        pass


def describe_status(status: int) -> Dict[str, Union[int, str, bool]]:
    """Decode a ``waitpid(2)`` status as the ``worker.exited`` event logs it.

    :returns: ``{"exit_code": N}``, ``{"signal": "SIGKILL"}`` (plus
        ``"core_dumped": True`` when the kernel says so), or ``{"status": N}`` for a
        status that is neither (a stopped child is never reported: no ``WUNTRACED``).
    """
    if os.WIFSIGNALED(status):
        out: Dict[str, Union[int, str, bool]] = {"signal": signal_name(os.WTERMSIG(status))}
        if os.WCOREDUMP(status):
            out["core_dumped"] = True
        return out
    if os.WIFEXITED(status):
        return {"exit_code": os.WEXITSTATUS(status)}
    return {"status": status}

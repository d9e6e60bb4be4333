"""What crosses ``execve`` on a reload, and the signal mask around it.

The running master describes its state in one environment variable,
``PREFORKD_STATE``, a JSON object (documented in ``docs/reload.md``)::

    {"version": 1, "generation": 3, "master_pid": 1234, "started_wall": 1.7e9,
     "hup_monotonic": 12345.6, "reload_seq": 5, "pending_reload": false,
     "listeners": [{"fd": 5, "address": "tcp://127.0.0.1:0", "file_id": null,
                    "origin": "bound"}],
     "workers": [{"pid": 1240, "service": "echo", "number": 1, "generation": 3,
                  "slot": 0, ...}],
     "fds": {"pidfile": 3, "alive": 7, "scoreboard": 4, "control": 8},
     "control_file_id": [2049, 1234], "pidfile_path": "...", "control_path": "..."}

Every descriptor named there has ``FD_CLOEXEC`` cleared just before ``execve``
and set again by the new image as soon as it has adopted it. The signals the
master handles are blocked across ``execve`` (a blocked signal stays pending
through exec, see signal(7)) and unblocked once the new image has installed its
handlers, so a HUP that arrives while the new image starts is neither fatal nor
lost; perlipc's SA_NODEFER lesson is why the mask is set back explicitly.
"""

from __future__ import annotations

import json
import os
import signal
import sys
from typing import Any, Dict, Iterable, List, Optional

STATE_ENV = "PREFORKD_STATE"
STATE_VERSION = 1

#: Blocked across exec; unblocked by the new image after its handlers are in place.
BLOCKED_ACROSS_EXEC = (
    signal.SIGHUP, signal.SIGTERM, signal.SIGINT, signal.SIGQUIT, signal.SIGCHLD,
    signal.SIGTTIN, signal.SIGTTOU, signal.SIGUSR1,
)


def take_inherited_state(environ: Optional[Dict[str, str]] = None) -> Optional[Dict[str, Any]]:
    """Read and remove ``PREFORKD_STATE`` from the environment.

    :returns: the decoded state, or ``None`` for a fresh start.
    :raises ValueError: when the variable is present but not a valid state.
    """
    env = os.environ if environ is None else environ
    text = env.pop(STATE_ENV, None)
    if not text:
        return None
    state = json.loads(text)
    if not isinstance(state, dict) or state.get("version") != STATE_VERSION:
        raise ValueError(f"{STATE_ENV} has an unknown format")
    return state


def set_inheritable(fds: Iterable[int], inheritable: bool) -> None:
    for fd in fds:
        try:
            os.set_inheritable(fd, inheritable)
        except OSError:
            pass


def exec_argv(config_arg: Optional[str]) -> List[str]:
    """The command line of the new image: the same interpreter running
    ``-m preforkd run`` (the new image never daemonizes again: it already is)."""
    argv = [sys.executable, "-m", "preforkd", "run"]
    if config_arg:
        argv += ["-c", config_arg]
    return argv


def reexec(state: Dict[str, Any], fds: Iterable[int], config_arg: Optional[str]) -> BaseException:
    """Replace this process with a new image of preforkd, handing *state* over.

    Does not return on success. On failure everything is put back (descriptors
    close-on-exec again, signals unblocked) and the exception is returned for the
    caller to log.
    """
    fds = list(fds)
    env = dict(os.environ)
    env[STATE_ENV] = json.dumps(state, separators=(",", ":"))
    argv = exec_argv(config_arg)
    set_inheritable(fds, True)
    old_mask = signal.pthread_sigmask(signal.SIG_BLOCK, BLOCKED_ACROSS_EXEC)
    try:
        sys.stdout.flush()
        sys.stderr.flush()
        os.execve(argv[0], argv, env)
    except OSError as exc:
        signal.pthread_sigmask(signal.SIG_SETMASK, old_mask)
        set_inheritable(fds, False)
        return exc
    raise AssertionError("unreachable")  # pragma: no cover


def unblock_signals() -> None:
    """Unblock what :func:`reexec` blocked (call after installing handlers)."""
    signal.pthread_sigmask(signal.SIG_UNBLOCK, BLOCKED_ACROSS_EXEC)

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
#: The configuration file's text as the reloading master validated it, for its
#: ``check`` subprocess and its new image: both use these bytes, not the file, so an
#: edit landing between the check and the new image's start-up cannot make it fail.
CONFIG_ENV = "PREFORKD_CONFIG_TEXT"
#: Larger files are not passed (one environment string is limited to 128 KiB on
#: Linux); the new image then reads the file.
CONFIG_ENV_MAX = 65536


def config_env(text: Optional[bytes]) -> Dict[str, str]:
    """``{CONFIG_ENV: text}`` for a validated (so UTF-8) configuration text, or ``{}``."""
    if text is None or len(text) > CONFIG_ENV_MAX:
        return {}
    return {CONFIG_ENV: text.decode("utf-8")}

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


def reexec(state: Dict[str, Any], fds: Iterable[int], config_arg: Optional[str],
           config_text: Optional[bytes] = None) -> BaseException:
    """Replace this process with a new image of preforkd, handing *state* over
    (and *config_text*, the validated configuration, in :data:`CONFIG_ENV`).

    Does not return on success. On failure everything is put back (descriptors
    close-on-exec again, signals unblocked) and the exception is returned for the
    caller to log.
    """
    fds = list(fds)
    env = dict(os.environ)
    env[STATE_ENV] = json.dumps(state, separators=(",", ":"))
    env.update(config_env(config_text))
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

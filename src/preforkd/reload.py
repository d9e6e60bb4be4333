"""Reload by re-exec, the checking half (``docs/reload.md``, step 1).

A :class:`Reloader` belongs to the master and runs inside its loop without ever
blocking it. On a HUP it re-reads and validates the configuration in the master, then
runs ``python -m preforkd check`` in a fresh interpreter (so the *installed* code, an
upgraded package or an edited handler module, must import and validate) and waits
for it through the master's selector and reaper. When the check passes it hands the
new configuration to the master's *commit* callback, which binds what is new and
``execve``\\ s (:mod:`preforkd.reexec`); the new image reports the outcome back
through :meth:`Reloader.succeeded`.

Its interface to the master is narrow: :meth:`request` (HUP), :meth:`start_if_pending`
(the master is idle), :meth:`owns_child` / :meth:`child_exited` (the reaper),
:meth:`poll` and :meth:`deadline` (timers), :meth:`failed` and :meth:`succeeded`
(outcomes), :meth:`abort` (stopping) and :meth:`document` (status).
"""

from __future__ import annotations

import enum
import os
import selectors
import signal
import sys
import time
from typing import TYPE_CHECKING, Any, Callable, Dict, Optional

if TYPE_CHECKING:  # pragma: no cover
    import subprocess

from . import reexec
from .config import Config, ConfigError, load_config, read_config_file, resolve_config_path
from .counters import Counters
from .log import Logger
from .notify import Notifier
from .signals import kill_quietly

#: Seconds the configuration check in a fresh interpreter may take.
CHECK_TIMEOUT = 60.0
#: The last this many bytes of the check's output are kept (its last line is the reason).
CHECK_OUTPUT_MAX = 8192


class ReloadState(enum.Enum):
    """The last reload's outcome, as ``status`` shows it (``reload.state``)."""

    NONE = "none"
    IN_PROGRESS = "in_progress"
    OK = "ok"
    FAILED = "failed"


#: What the master does with a configuration that passed the check: bind what is new,
#: hand over and exec. It returns only if that failed, with the reason.
Commit = Callable[[Config, Optional[bytes]], str]


class Reloader:
    """The master's reload state and the check subprocess.

    :param config_arg: the ``-c`` argument (absolute) or ``None``.
    :param commit: see :data:`Commit`.
    :param previous: the hand-over when this image was itself started by a reload
        (that reload is then in progress until the master calls :meth:`succeeded`).
    :param counters: the master's totals, where each reload's outcome is counted.
    """

    def __init__(self, config_arg: Optional[str], selector: selectors.BaseSelector, logger: Logger,
                 notifier: Notifier, commit: Commit, previous: Optional[reexec.Handover],
                 counters: Optional[Counters] = None) -> None:
        self.config_arg = config_arg
        self.counters = counters if counters is not None else Counters()
        self.selector = selector
        self.logger = logger
        self.notifier = notifier
        self.commit = commit
        self.seq = previous.reload_seq if previous else 0
        self.state = ReloadState.IN_PROGRESS if previous else ReloadState.NONE
        self.error: Optional[str] = None
        #: When the reload under way began (monotonic seconds; CLOCK_MONOTONIC survives exec).
        self.began: Optional[float] = previous.hup_monotonic if previous else None
        #: A HUP arrived while a reload was under way: one more once it is done.
        self.pending = previous.pending_reload if previous else False
        self._proc: Optional[subprocess.Popen[bytes]] = None
        self._output = b""
        self._deadline = 0.0  # monotonic seconds
        self._config: Optional[Config] = None
        self._text: Optional[bytes] = None
        self._aborted = False

    # -- the master's calls --------------------------------------------------------

    def request(self) -> None:
        """A HUP: reload when the master is next idle (bursts coalesce into one)."""
        self.pending = True

    @property
    def busy(self) -> bool:
        """A check is running or a reload awaits its outcome."""
        return self._proc is not None or self.state is ReloadState.IN_PROGRESS

    def start_if_pending(self) -> None:
        """Begin a requested reload unless one is under way."""
        if self.pending and not self.busy:
            self._begin()

    def owns_child(self, pid: int) -> bool:
        return self._proc is not None and self._proc.pid == pid

    def child_exited(self, status: int) -> None:
        """The reaper collected the check subprocess with ``waitpid`` *status*."""
        proc = self._proc
        assert proc is not None
        proc.returncode = os.waitstatus_to_exitcode(status)  # reaped by us; keep Popen from trying
        self._read_output()  # what it printed last
        output = self._output.decode("utf-8", "replace").strip()
        self._close_check()
        if self._aborted:
            return
        if proc.returncode != 0:
            lines = [ln for ln in output.splitlines() if ln.strip()]
            reason = lines[-1] if lines else f"the check exited with {proc.returncode}"
            self.failed("new code or configuration does not start: " + reason.removeprefix("preforkd: "))
            return
        version = _reported_version(output)
        if version != reexec.Handover.VERSION:
            self.failed(f"the new code reads hand-over version {version}, this master writes "
                        f"{reexec.Handover.VERSION}: restart instead of reloading")
            return
        config, text = self._config, self._text
        assert config is not None
        self.failed(self.commit(config, text))  # returns only when the exec failed

    def poll(self, now: float) -> None:
        """Kill a check that overran :data:`CHECK_TIMEOUT` (reported when reaped)."""
        if self._proc is not None and now >= self._deadline:
            kill_quietly(self._proc.pid, signal.SIGKILL)
            self._deadline = now + 3600

    def deadline(self) -> Optional[float]:
        """When :meth:`poll` next has something to do (monotonic seconds), if ever."""
        return self._deadline if self._proc is not None else None

    def failed(self, reason: str) -> None:
        """End the reload under way as failed: log it, keep the old configuration."""
        self._config = self._text = None
        self.state = ReloadState.FAILED
        self.error = reason
        self.counters.reload_ended("failed")
        self.logger.error("config.reload_failed", error=reason, reload_seq=self.seq)
        self.notifier.ready(f"reload failed, still serving the running generation: {reason}"[:200])

    def succeeded(self, generation: int, before_ready: Callable[[], None]) -> None:
        """The new generation accepts: log ``config.reloaded`` (``duration_ms``: HUP to
        accepting), run *before_ready* (a re-exec'd master writes its buffered events
        there: see :class:`preforkd.log.EventLog`'s defer), then tell systemd."""
        duration = None if self.began is None else round((time.monotonic() - self.began) * 1000, 1)
        self.logger.info("config.reloaded", generation=generation, duration_ms=duration, reload_seq=self.seq)
        self.state = ReloadState.OK
        self.counters.reload_ended("ok")
        before_ready()
        self.notifier.ready(f"reloaded: generation {generation}")

    def abort(self) -> None:
        """The master is stopping: kill a running check (reaped as usual)."""
        self._aborted = True
        if self._proc is not None:
            kill_quietly(self._proc.pid, signal.SIGKILL)

    def document(self) -> Dict[str, Any]:
        """``{"seq": N, "state": "ok", "error": None}`` for ``status``."""
        return {"seq": self.seq, "state": self.state.value, "error": self.error}

    # -- the check ---------------------------------------------------------------------

    def _begin(self) -> None:
        """Validate the new configuration here, then start the check in a fresh interpreter."""
        self.pending = False
        self.seq += 1
        self.state = ReloadState.IN_PROGRESS
        self.error = None
        self.began = time.monotonic()
        self.notifier.reloading("reloading configuration")
        path = resolve_config_path(self.config_arg)
        # Read the file once (a regular file, without blocking, bounded): the check and
        # the new image get these very bytes.
        try:
            self._text = read_config_file(path) if path else None
            self._config = load_config(path, text=self._text)
        except ConfigError as exc:
            self.failed(str(exc))
            return
        argv = [sys.executable, "-m", "preforkd", "check"] + (["-c", path] if path else [])
        env = dict(os.environ, **reexec.config_env(self._text), **{reexec.VERSION_PROBE_ENV: "1"})
        import subprocess  # only when reloading: a re-exec'd master starts faster without it

        try:
            self._proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                                          stderr=subprocess.STDOUT, close_fds=True, env=env)
        except OSError as exc:
            self.failed(f"cannot run the configuration check: {exc.strerror}")
            return
        assert self._proc.stdout is not None
        os.set_blocking(self._proc.stdout.fileno(), False)
        self._output = b""
        self._deadline = time.monotonic() + CHECK_TIMEOUT
        self.selector.register(self._proc.stdout, selectors.EVENT_READ, self._on_output)

    def _on_output(self, _mask: int) -> None:
        self._read_output()

    def _read_output(self) -> None:
        """Keep the last :data:`CHECK_OUTPUT_MAX` bytes; stop watching the pipe at end of file."""
        proc = self._proc
        if proc is None or proc.stdout is None or proc.stdout.closed:
            return
        try:
            while True:
                data = os.read(proc.stdout.fileno(), 65536)
                if not data:
                    self.selector.unregister(proc.stdout)
                    proc.stdout.close()
                    return
                self._output = (self._output + data)[-CHECK_OUTPUT_MAX:]
        except (BlockingIOError, InterruptedError):
            pass

    def _close_check(self) -> None:
        proc, self._proc = self._proc, None
        if proc is not None and proc.stdout is not None:
            try:
                self.selector.unregister(proc.stdout)
            except (KeyError, ValueError):
                pass
            proc.stdout.close()


def _reported_version(output: str) -> Optional[int]:
    """The hand-over version a ``check`` run with :data:`~preforkd.reexec.VERSION_PROBE_ENV`
    printed (``handover-version N``), or ``None`` if it printed none (older code)."""
    for line in output.splitlines():
        word, _, number = line.strip().partition(" ")
        if word == "handover-version" and number.isdigit():
            return int(number)
    return None

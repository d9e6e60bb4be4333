"""Reload by re-exec, the master's side: check the new configuration and code, then
hand everything over to a new image of preforkd (``docs/reload.md``, steps 1-3).

:class:`ReloadMixin` is part of :class:`preforkd.master.Master`; it is kept here so
that the master loop reads on its own. What crosses ``execve`` is in
:mod:`preforkd.reexec`.
"""

from __future__ import annotations

import os
import selectors
import signal
import subprocess
import sys
import time
from typing import List

from . import reexec
from .config import ConfigError, listener_keys, load_config, resolve_config_path
from .listeners import Listener, ListenerError, bind
from .pool import kill_quietly

#: Seconds the configuration check in a fresh interpreter may take.
CHECK_TIMEOUT = 60.0


class ReloadMixin:
    """Steps 1-3 of a reload, run inside the master loop without blocking it.

    The state it uses (``config_arg``, ``listeners``, ``check_proc``...) belongs to
    the master and is set up in ``Master.__init__``.
    """

    def _begin_reload(self) -> None:
        """Step 1: validate the new configuration here, then in a fresh interpreter."""
        self.pending_reload = False
        self.reload_seq += 1
        self.reload_state = "in_progress"
        self.reload_error = None
        self.hup_at = time.monotonic()
        self.notifier.reloading("reloading configuration")
        path = resolve_config_path(self.config_arg)
        # Read the file once: the check and the new image get these very bytes.
        self.pending_text = None
        if path:
            try:
                with open(path, "rb") as f:
                    self.pending_text = f.read()
            except OSError:
                pass  # load_config says why
        try:
            self.pending_config = load_config(path, import_handlers=False, text=self.pending_text)
        except ConfigError as exc:
            self._reload_failed(str(exc))
            return
        argv = [sys.executable, "-m", "preforkd", "check"] + (["-c", path] if path else [])
        env = dict(os.environ, **reexec.config_env(self.pending_text))
        try:
            self.check_proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                                               stderr=subprocess.STDOUT, close_fds=True, env=env)
        except OSError as exc:
            self._reload_failed(f"cannot run the configuration check: {exc.strerror}")
            return
        assert self.check_proc.stdout is not None
        os.set_blocking(self.check_proc.stdout.fileno(), False)
        self.check_output = b""
        self.check_deadline = time.monotonic() + CHECK_TIMEOUT
        self.selector.register(self.check_proc.stdout, selectors.EVENT_READ, self._on_check_output)

    def _on_check_output(self, _mask: int) -> None:
        self._read_check_output()

    def _read_check_output(self) -> None:
        """Keep the last 8 KiB the check printed; stop watching its pipe at end of file."""
        proc = self.check_proc
        if proc is None or proc.stdout is None or proc.stdout.closed:
            return
        try:
            while True:
                data = os.read(proc.stdout.fileno(), 65536)
                if not data:
                    self.selector.unregister(proc.stdout)
                    proc.stdout.close()
                    return
                self.check_output = (self.check_output + data)[-8192:]
        except (BlockingIOError, InterruptedError):
            pass

    def _poll_check(self, now: float) -> None:
        if self.check_proc is not None and now >= self.check_deadline:
            kill_quietly(self.check_proc.pid, signal.SIGKILL)
            self.check_deadline = now + 3600  # reaped shortly; reported then

    def _close_check(self) -> None:
        proc = self.check_proc
        self.check_proc = None
        if proc is None:
            return
        if proc.stdout is not None:
            try:
                self.selector.unregister(proc.stdout)
            except (KeyError, ValueError):
                pass
            proc.stdout.close()

    def _check_finished(self, status: int) -> None:
        proc = self.check_proc
        assert proc is not None
        proc.returncode = os.waitstatus_to_exitcode(status)  # we reaped it; keep Popen from trying
        self._read_check_output()  # what it printed last
        output = self.check_output.decode("utf-8", "replace").strip()
        self._close_check()
        if self.phase == "stopping":
            return
        if proc.returncode != 0:
            lines = [ln for ln in output.splitlines() if ln.strip()]
            reason = lines[-1] if lines else f"the check exited with {proc.returncode}"
            if reason.startswith("preforkd: "):
                reason = reason[len("preforkd: "):]
            self._reload_failed(f"new code or configuration does not start: {reason}")
            return
        self._exec_new_image()

    def _exec_new_image(self) -> None:
        """Steps 2 and 4: bind what is new, hand everything over and ``execve``."""
        new = self.pending_config
        assert new is not None and self.scoreboard is not None
        prebound: List[Listener] = []
        try:
            for key, addr, svc in listener_keys(new):
                if key not in self.listeners:
                    prebound.append(bind(addr, svc.backlog, svc.socket_mode, svc.reuse_port, self.socket_owner))
                    prebound[-1].key = key
        except ListenerError as exc:
            for lst in prebound:
                lst.close()
            self._reload_failed(str(exc))
            return
        self.control.close_clients()
        listeners = list(self.listeners.values()) + prebound
        state = {
            "version": reexec.STATE_VERSION,
            "generation": self.generation,
            "master_pid": self.pid,
            "started_wall": self.started_wall,
            "hup_monotonic": self.hup_at,
            "reload_seq": self.reload_seq,
            "pending_reload": self.pending_reload,
            "listeners": [{"fd": lst.fileno(), "key": lst.key, "address": str(lst.address), "origin": lst.origin,
                           "file_id": list(lst.file_id) if lst.file_id else None} for lst in listeners],
            "workers": [w.to_state() for w in self._all_workers()],
            "fds": {
                "pidfile": self.pidfile.fd if self.pidfile else None,
                "scoreboard": self.scoreboard.fd,
                "alive_r": self.alive_r, "alive_w": self.alive_w,
                "control": self.control.fileno(),
            },
            "pidfile_path": self.pidfile.path if self.pidfile else "",
            "control_path": self.control.path,
            "control_file_id": list(self.control.file_id) if self.control.file_id else None,
        }
        fds = [lst.fileno() for lst in listeners] + [fd for fd in state["fds"].values() if fd is not None]
        for lst in listeners:
            lst.sock.setblocking(False)
        self.logger.info("config.reexec", generation=self.generation + 1, reload_seq=self.reload_seq)
        error = reexec.reexec(state, fds, self.config_arg, self.pending_text)
        for lst in prebound:
            lst.close()
        self._reload_failed(f"exec failed: {error}")

    def _reload_failed(self, reason: str) -> None:
        self.pending_config = None
        self.reload_state = "failed"
        self.reload_error = reason
        self.logger.error("config.reload_failed", error=reason, reload_seq=self.reload_seq)
        self.notifier.ready(f"reload failed, still serving generation {self.generation}: {reason}"[:200])

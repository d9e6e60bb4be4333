"""The master: one loop that turns signals into events, reaps, spawns, stops and reloads.

Signal handlers only append the signal number to a queue; ``signal.set_wakeup_fd``
writes a byte to a pipe that the loop's selector watches, so the loop wakes at
once (perlipc "Signals": do as little as possible in a handler). All work happens
in :meth:`Master._loop`:

1. wait in the selector (wakeup pipe, worker ready pipe, control socket, reload
   check output) until the next timer is due;
2. dispatch queued signals by name (``_sig_hup``, ``_sig_term``...);
3. reap every exited child with ``waitpid(-1, WNOHANG)`` until none is left
   (perlipc's REAPER), decoding exit codes and signals;
4. run timers: respawn with back-off, kill workers past their graceful timeout,
   readiness, reload completion, watchdog.

The signal table is in ``docs/signals.md``; the reload steps (check, hand over,
``execve``) are in :mod:`preforkd.reload` and ``docs/reload.md``; what the new
image adopts is set up by :meth:`Master._start`.
"""

from __future__ import annotations

import collections
import gc
import os
import selectors
import signal
import socket
import subprocess
import time
from typing import Any, Deque, Dict, List, Optional

from . import log, reexec
from .addresses import Address
from .config import MAX_WORKERS, Config, ServiceConfig, listener_keys, resolve_handler
from .handler import handler_kind
from .listeners import (Listener, ListenerError, address_matches, bind, format_sockname, socket_from_fd,
                        unlink_if_ours)
from .notify import Notifier
from .protocol import set_timeouts
from .pidfile import Pidfile, PidfileError
from .pool import MIN_UPTIME, Pool, Scoreboard, WorkerInfo, kill_quietly
from .control import ControlServer
from .reload import ReloadMixin
from . import worker as worker_mod

HANDLED_SIGNALS = {
    signal.SIGHUP: "hup", signal.SIGTERM: "term", signal.SIGINT: "int", signal.SIGQUIT: "quit",
    signal.SIGCHLD: "chld", signal.SIGTTIN: "ttin", signal.SIGTTOU: "ttou", signal.SIGUSR1: "usr1",
}
QUICK_STOP_GRACE = 2.0
#: A worker stopped gracefully ends itself when ``graceful_timeout`` runs out (its own
#: timer, which also ends a command program's process group); the master sends KILL
#: this many seconds later if it is still there.
STOP_BACKSTOP = 1.0
#: Quick worker failures in one pool that make a waiting `preforkd start` fail.
START_FAILURES = 3


class StartupError(Exception):
    """The supervisor cannot start; the message is one line."""


def signal_name(num: int) -> str:
    try:
        return signal.Signals(num).name
    except ValueError:
        return str(num)


def describe_status(status: int) -> Dict[str, Any]:
    """``{"exit_code": N}`` or ``{"signal": "SIGKILL"}`` for a ``waitpid`` status."""
    if os.WIFSIGNALED(status):
        out: Dict[str, Any] = {"signal": signal_name(os.WTERMSIG(status))}
        if os.WCOREDUMP(status):
            out["core_dumped"] = True
        return out
    if os.WIFEXITED(status):
        return {"exit_code": os.WEXITSTATUS(status)}
    return {"status": status}


def _user_ids(config: Config) -> "tuple[Optional[int], Optional[int], str]":
    import grp
    import pwd

    uid = gid = None
    user = config.supervisor.user
    if user:
        pw = pwd.getpwuid(int(user)) if user.isdigit() else pwd.getpwnam(user)
        uid, gid, user = pw.pw_uid, pw.pw_gid, pw.pw_name
    group = config.supervisor.group
    if group:
        gid = int(group) if group.isdigit() else grp.getgrnam(group).gr_gid
    return uid, gid, user


class Master(ReloadMixin):
    """The supervisor's master process.

    :param config: the validated configuration (handlers already importable).
    :param config_arg: the ``-c`` argument (absolute) or ``None``; what a re-exec passes on.
    :param ready_fd: write end of the ``preforkd start`` readiness pipe, or ``None``.
    :param inherited: the decoded ``PREFORKD_STATE`` after a re-exec, or ``None``.
    """

    def __init__(self, config: Config, config_arg: Optional[str], ready_fd: Optional[int] = None,
                 inherited: Optional[Dict[str, Any]] = None) -> None:
        self.config = config
        self.config_arg = config_arg
        self.ready_fd = ready_fd
        self.inherited = inherited
        self.pid = os.getpid()
        self.generation = int(inherited["generation"]) + 1 if inherited else 1
        self.started_wall = float(inherited["started_wall"]) if inherited else time.time()
        self.reload_seq = int(inherited.get("reload_seq", 0)) if inherited else 0
        self.reload_state = "in_progress" if inherited else "none"
        self.reload_error: Optional[str] = None
        self.hup_at: Optional[float] = float(inherited["hup_monotonic"]) if inherited else None
        self.phase = "starting"
        self.log_deadline = time.monotonic() + 1.0  # see _tick: a deferred log is written by then
        # A HUP taken while a reload is under way: one more reload once it is done. It
        # crosses the exec, or a HUP that came during the check would be lost.
        self.pending_reload = bool(inherited.get("pending_reload")) if inherited else False
        self.exit_code = 0
        self.sig_queue: Deque[int] = collections.deque()
        self.selector = selectors.DefaultSelector()
        self.notifier = Notifier()
        self.logger = log.get()
        self.pools: Dict[str, Pool] = {}
        self.listeners: Dict[str, Listener] = {}  # configured address text -> listener
        self.by_pid: Dict[int, WorkerInfo] = {}  # current generation
        self.old_workers: Dict[int, WorkerInfo] = {}  # earlier generations, being retired
        self.pidfile = Pidfile(config.supervisor.pidfile) if config.supervisor.pidfile else None
        self.scoreboard: Optional[Scoreboard] = None
        self.control = ControlServer(self.selector, self.status)
        self.alive_r = self.alive_w = self.ready_r = self.ready_w = self.wake_r = self.wake_w = -1
        self.check_proc: Optional[subprocess.Popen] = None
        self.check_output = b""
        self.check_deadline = 0.0
        self.pending_config: Optional[Config] = None
        self.pending_text: Optional[bytes] = None  # the configuration file as validated
        self.stop_deadline: Optional[float] = None
        self.next_watchdog: Optional[float] = None
        self.uid, self.gid, self.user = _user_ids(config)
        #: (uid, gid) for chown of Unix socket files; -1 leaves one unchanged.
        self.socket_owner = (-1 if self.uid is None else self.uid, -1 if self.gid is None else self.gid)

    # -- lifecycle -----------------------------------------------------------

    def run(self) -> int:
        """Start, serve until stopped, clean up. Returns the process exit status
        (0 after a clean stop, 1 when start-up failed)."""
        try:
            self._start()
        except (StartupError, ListenerError, PidfileError) as exc:
            log.activate()
            self.logger.error("supervisor.start_failed", error=str(exc))
            self._report_to_launcher(f"ERROR {exc}")
            self._cleanup(failed=True)
            return 1
        self._loop()
        return self.exit_code

    def _start(self) -> None:
        log.bind(generation=self.generation)
        self._set_title()
        self.wake_r, self.wake_w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        self.selector.register(self.wake_r, selectors.EVENT_READ, self._on_wakeup)
        signal.set_wakeup_fd(self.wake_w, warn_on_full_buffer=False)
        for sig in HANDLED_SIGNALS:
            signal.signal(sig, self._on_signal)
        reexec.unblock_signals()  # blocked across exec by the previous image, if any

        st = self.inherited or {}
        fds = st.get("fds", {})
        if self.pidfile:
            if fds.get("pidfile") is not None and st.get("pidfile_path") == self.pidfile.path:
                self.pidfile.adopt(int(fds["pidfile"]))
                os.set_inheritable(self.pidfile.fd, False)  # type: ignore[arg-type]
            else:
                self.pidfile.acquire(self.pid)
                if fds.get("pidfile") is not None:  # the pidfile moved: let go of the old one
                    old = Pidfile(st.get("pidfile_path", ""))
                    old.adopt(int(fds["pidfile"]))
                    old.remove()
        elif fds.get("pidfile") is not None:
            old = Pidfile(st.get("pidfile_path", ""))
            old.adopt(int(fds["pidfile"]))
            old.remove()

        if fds.get("scoreboard") is not None:
            self.scoreboard = Scoreboard(int(fds["scoreboard"]))
            os.set_inheritable(self.scoreboard.fd, False)  # type: ignore[arg-type]
        else:
            self.scoreboard = Scoreboard()
        if fds.get("alive_w") is not None:
            self.alive_r, self.alive_w = int(fds["alive_r"]), int(fds["alive_w"])
            os.set_inheritable(self.alive_r, False)
            os.set_inheritable(self.alive_w, False)
        else:
            self.alive_r, self.alive_w = os.pipe2(os.O_CLOEXEC)
        self.ready_r, self.ready_w = os.pipe2(os.O_CLOEXEC)
        os.set_blocking(self.ready_r, False)
        self.selector.register(self.ready_r, selectors.EVENT_READ, self._on_ready_pipe)

        self._setup_listeners(st.get("listeners", []))
        self._setup_control(st)
        self._setup_pools()
        for w in st.get("workers", []):
            info = WorkerInfo.from_state(w)
            self.scoreboard.claim(info.slot)
            self.old_workers[info.pid] = info
            if info.service not in self.pools and not info.stopping:
                self._stop_worker(info, graceful=True, reason="service removed")
        if self.notifier.watchdog_interval:
            self.next_watchdog = time.monotonic()
        self.phase = "reloading" if self.inherited else "starting"
        self.notifier.status("starting workers")

    def _set_title(self) -> None:
        try:
            import setproctitle

            where = self.config.path or "built-in default"
            setproctitle.setproctitle(f"preforkd: master [gen {self.generation}] {where}")
        except Exception:  # noqa: BLE001 - cosmetic
            pass

    def _setup_listeners(self, inherited: List[Dict[str, Any]]) -> None:
        """Adopt inherited and socket-activated sockets whose address is still
        configured, close the rest, bind what is missing."""
        wanted: Dict[str, ServiceConfig] = {}
        by_text: Dict[str, Address] = {}
        for key, addr, svc in listener_keys(self.config):
            wanted[key] = svc
            by_text[key] = addr
        for item in inherited:
            text = item["key"]
            fd = int(item["fd"])
            fid = tuple(item["file_id"]) if item.get("file_id") else None
            try:
                sock = socket_from_fd(fd)
            except OSError:
                continue
            os.set_inheritable(fd, False)
            if text in wanted and text not in self.listeners:
                lst = Listener(address=by_text[text], sock=sock,
                               bound=format_sockname(sock.family, sock.getsockname()),
                               file_id=fid, origin=item.get("origin", "inherited"), key=text)  # type: ignore[arg-type]
                if lst.origin == "bound":
                    lst.origin = "inherited"
                self.listeners[text] = lst
            else:
                self.logger.info("listener.closed", address=item["address"], reason="no longer configured")
                sock.close()
                if fid and item["address"].startswith("unix:"):
                    unlink_if_ours(item["address"][len("unix:"):], fid)  # type: ignore[arg-type]
        for fd, name in _activated_fds():
            try:
                sock = socket_from_fd(fd)
            except OSError:
                continue
            free = [t for t in wanted if t not in self.listeners and address_matches(by_text[t], sock)]
            # The entry with this very address first; a port-0 entry (any port) only
            # if there is none, or it would take a socket meant for another entry.
            match = next((t for t in free if by_text[t].kind == "unix" or by_text[t].port != 0),
                         free[0] if free else None)
            if match is None:
                self.logger.warning("listener.activation_unmatched", fd=fd, name=name,
                                    address=_safe_sockname(sock))
                sock.close()
                continue
            self.listeners[match] = Listener(address=by_text[match], sock=sock,
                                             bound=format_sockname(sock.family, sock.getsockname()),
                                             origin="activated", key=match)
        for text, svc in wanted.items():
            lst = self.listeners.get(text)
            if lst is None:
                lst = bind(by_text[text], svc.backlog, svc.socket_mode, svc.reuse_port, self.socket_owner)
                lst.key = text
                self.listeners[text] = lst
            self.logger.info("listener.bound", service=svc.name, address=lst.bound,
                             configured=str(lst.address), origin=lst.origin)

    def _setup_control(self, st: Dict[str, Any]) -> None:
        path = self.config.supervisor.control_socket
        fd = st.get("fds", {}).get("control")
        fid = tuple(st["control_file_id"]) if st.get("control_file_id") else None
        if fd is not None and path and st.get("control_path") == path:
            self.control.adopt(int(fd), path, fid)  # type: ignore[arg-type]
            return
        if fd is not None:  # the control socket moved or was switched off
            old = ControlServer(selectors.DefaultSelector(), self.status)
            old.adopt(int(fd), st.get("control_path", ""), fid)  # type: ignore[arg-type]
            old.close(unlink=True)
        if path:
            self.control.bind(path)

    def _setup_pools(self) -> None:
        for svc in self.config.services:
            if svc.is_command:
                kind, target = "command", None
            else:
                target = resolve_handler(svc.handler)
                kind = handler_kind(target) or "line"
            lsts = [self.listeners[key] for key, _, s in listener_keys(self.config) if s is svc]
            for lst in lsts:
                if lst.sock.family != socket.AF_UNIX:
                    # Accepted TCP sockets inherit these (Linux clones the listener's
                    # socket options): no per-connection setsockopt in the workers.
                    lst.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
                    set_timeouts(lst.sock, svc.idle_timeout)
            self.pools[svc.name] = Pool(config=svc, listeners=lsts, handler=target, kind=kind, target=svc.workers)

    # -- the loop ------------------------------------------------------------

    def _loop(self) -> None:
        while True:
            timeout = self._next_timeout()
            for key, mask in self.selector.select(timeout):
                key.data(mask)
            self._dispatch_signals()
            self._reap()
            self._tick()
            if self.phase == "stopped":
                return

    def _on_signal(self, signum: int, _frame: Any) -> None:
        self.sig_queue.append(signum)  # that is all: the loop does the work

    def _on_wakeup(self, _mask: int) -> None:
        try:
            while os.read(self.wake_r, 4096):
                pass
        except (BlockingIOError, InterruptedError):
            pass

    def _dispatch_signals(self) -> None:
        while self.sig_queue:
            signum = self.sig_queue.popleft()
            getattr(self, "_sig_" + HANDLED_SIGNALS[signum])()

    def _next_timeout(self) -> float:
        now = time.monotonic()
        deadlines = [now + 1.0]
        if self.sig_queue:
            return 0
        for pool in self.pools.values():
            if pool.missing_numbers() and self.phase in ("starting", "running", "reloading"):
                deadlines.append(pool.next_spawn_at)
            if pool.failures:
                deadlines.append(now + 0.25)
        for w in self._all_workers():
            if w.kill_at is not None:
                deadlines.append(w.kill_at)
        if self.next_watchdog is not None:
            deadlines.append(self.next_watchdog)
        if self.check_proc is not None:
            deadlines.append(self.check_deadline)
        return max(0.0, min(deadlines) - now)

    def _all_workers(self) -> List[WorkerInfo]:
        return list(self.by_pid.values()) + list(self.old_workers.values())

    # -- signals -------------------------------------------------------------

    def _sig_hup(self) -> None:
        self.logger.info("signal.received", signal="SIGHUP")
        if self.phase == "stopping":
            return
        self.pending_reload = True  # acted on by _tick when the master is idle

    def _sig_term(self) -> None:
        self._begin_stop(graceful=True, signame="SIGTERM")

    def _sig_int(self) -> None:
        self._begin_stop(graceful=False, signame="SIGINT")

    def _sig_quit(self) -> None:
        self._begin_stop(graceful=False, signame="SIGQUIT")

    def _sig_chld(self) -> None:
        pass  # _reap runs every iteration

    def _sig_ttin(self) -> None:
        self._resize(+1)

    def _sig_ttou(self) -> None:
        self._resize(-1)

    def _sig_usr1(self) -> None:
        log.SINK.reopen()
        self.logger.info("log.reopened", file=log.SINK.path or "stderr")
        for w in self._all_workers():
            kill_quietly(w.pid, signal.SIGUSR1)

    def _resize(self, delta: int) -> None:
        if self.phase == "stopping":
            return
        for pool in self.pools.values():
            old = pool.target
            pool.target = min(MAX_WORKERS, max(1, pool.target + delta))
            if pool.target != old:
                self.logger.info("pool.resized", service=pool.name, workers=pool.target, previous=old)

    # -- children ------------------------------------------------------------

    def _spawn(self, pool: Pool, number: int) -> None:
        assert self.scoreboard is not None
        try:
            slot = self.scoreboard.claim()
        except RuntimeError as exc:  # every slot in use: wait, never crash the master
            pool.next_spawn_at = time.monotonic() + 1.0
            self.logger.error("worker.spawn_failed", service=pool.name, error=str(exc))
            return
        spec = worker_mod.WorkerSpec(
            service=pool.config, listeners=[lst.sock for lst in pool.listeners], kind=pool.kind,
            target=pool.handler, number=number, generation=self.generation, slot=slot,
            cells=self.scoreboard.cells, alive_fd=self.alive_r, ready_fd=self.ready_w,
            keep_fds=[log.SINK.fd], master_pid=self.pid,
            graceful_timeout=self.config.supervisor.graceful_timeout,
            uid=self.uid, gid=self.gid, user=self.user,
        )
        gc.freeze()  # keep the master's heap out of the collector's way: pages stay shared
        try:
            pid = os.fork()
        except OSError as exc:
            self.scoreboard.release(slot)
            delay = pool.record_exit(0.0, False, f"fork failed: {exc.strerror}", time.monotonic())
            self.logger.error("worker.spawn_failed", service=pool.name, error=exc.strerror, delay=delay)
            return
        if pid == 0:
            worker_mod.run(spec)  # never returns
        info = WorkerInfo(pid=pid, service=pool.name, number=number, generation=self.generation, slot=slot)
        pool.workers[number] = info
        self.by_pid[pid] = info
        self.logger.info("worker.spawned", service=pool.name, worker=number, child=pid)

    def _stop_worker(self, w: WorkerInfo, graceful: bool, reason: str) -> None:
        if w.stopping and graceful:
            return
        w.stopping = True
        now = time.monotonic()
        if graceful:
            w.kill_at = now + self.config.supervisor.graceful_timeout + STOP_BACKSTOP
            kill_quietly(w.pid, signal.SIGTERM)
        else:
            w.kill_at = now + QUICK_STOP_GRACE
            kill_quietly(w.pid, signal.SIGQUIT)
        self.logger.debug("worker.stopping", service=w.service, worker=w.number, child=w.pid,
                          graceful=graceful, reason=reason)

    def _reap(self) -> None:
        """perlipc's REAPER: collect every exited child without blocking."""
        while True:
            try:
                pid, status = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                return
            except InterruptedError:  # pragma: no cover
                continue
            if pid == 0:
                return
            self._child_exited(pid, status)

    def _child_exited(self, pid: int, status: int) -> None:
        now = time.monotonic()
        if self.check_proc is not None and pid == self.check_proc.pid:
            self._check_finished(status)
            return
        info = self.by_pid.pop(pid, None)
        old = False
        if info is None:
            info = self.old_workers.pop(pid, None)
            old = True
        if info is None:
            self.logger.debug("child.reaped", child=pid, **describe_status(status))
            return
        assert self.scoreboard is not None
        self.scoreboard.release(info.slot)
        how = describe_status(status)
        lifetime = round(now - info.started, 3)
        expected = info.stopping or self.phase == "stopping"
        clean = how.get("exit_code") == 0
        level = "info" if clean or expected else "warning"
        getattr(self.logger, level)("worker.exited", service=info.service, worker=info.number, child=pid,
                                    worker_generation=info.generation, lifetime=lifetime, **how)
        pool = self.pools.get(info.service)
        if old or pool is None or pool.workers.get(info.number) is not info:
            return
        del pool.workers[info.number]
        if expected:
            return
        reason = ", ".join(f"{k} {v}" for k, v in how.items())
        if how.get("exit_code") == worker_mod.EXIT_INIT_FAILED:
            reason = "worker_init failed"
        delay = pool.record_exit(lifetime, clean, reason, now)
        if delay is not None:
            self.logger.warning("worker.backoff", service=pool.name, failures=pool.failures,
                                delay=round(delay, 3), reason=reason)
            if self.phase == "starting" and self.ready_fd is not None and pool.failures >= START_FAILURES:
                # `preforkd start` is waiting: a service whose workers cannot start is a
                # failed start, reported by the launcher, not a daemon left crash-looping.
                self._report_to_launcher(f"ERROR service {pool.name}: workers exit at start-up ({reason})")
                self.exit_code = 1
                self._begin_stop(graceful=True, signame="start-up failure")

    def _on_ready_pipe(self, _mask: int) -> None:
        try:
            data = os.read(self.ready_r, 65536)
        except (BlockingIOError, InterruptedError):
            return
        for token in data.split():
            try:
                pid = int(token)
            except ValueError:
                continue
            info = self.by_pid.get(pid)
            if info is not None:
                info.ready = True

    # -- timers ----------------------------------------------------------------

    def _tick(self) -> None:
        now = time.monotonic()
        for w in self._all_workers():
            if w.kill_at is not None and now >= w.kill_at:
                self.logger.warning("worker.killed", service=w.service, worker=w.number, child=w.pid,
                                    signal="SIGKILL", reason="did not exit within the stop timeout")
                kill_quietly(w.pid, signal.SIGKILL)
                w.kill_at = None
        self.control.expire(now)
        if self.next_watchdog is not None and now >= self.next_watchdog:
            self.notifier.watchdog()
            self.next_watchdog = now + (self.notifier.watchdog_interval or 1.0)
        if self.check_proc is not None:
            self._poll_check(now)
        if self.phase == "stopping":
            if not self.by_pid and not self.old_workers:
                self._finish_stop()
            return
        for pool in self.pools.values():
            self._manage(pool, now)
        if not log.is_active() and (self.phase != "reloading" or now >= self.log_deadline):
            log.activate()  # see below; a reload that takes long writes its events anyway
        if self.phase == "starting" and all(p.all_ready() for p in self.pools.values()):
            self.phase = "running"
            total = sum(p.target for p in self.pools.values())
            self.logger.info("supervisor.ready", services=len(self.pools), workers=total,
                             generation=self.generation)
            self.notifier.ready(f"serving {len(self.pools)} services with {total} workers")
            self._report_to_launcher(f"READY {self.pid}")
        elif self.phase == "reloading":
            for pool in self.pools.values():
                if pool.all_ready():
                    self._retire_old(pool.name)
            if all(p.all_ready() for p in self.pools.values()):
                self._retire_old(None)
                duration = None if self.hup_at is None else round((time.monotonic() - self.hup_at) * 1000, 1)
                self.logger.info("config.reloaded", generation=self.generation, duration_ms=duration,
                                 reload_seq=self.reload_seq)
                # The re-exec'd image imports structlog only now that its new generation
                # accepts (it is most of its start-up); its events so far were buffered
                # with their times and are written here, before anyone hears "done".
                log.activate()
                self.phase = "running"
                self.reload_state = "ok"
                self.notifier.ready(f"reloaded: generation {self.generation}")
        if self.phase == "running" and self.pending_reload and self.check_proc is None:
            self._begin_reload()

    def _manage(self, pool: Pool, now: float) -> None:
        for number, w in list(pool.workers.items()):
            if number > pool.target and not w.stopping:
                self._stop_worker(w, graceful=True, reason="pool shrunk")
        if pool.failures and any(w.ready and now - w.started >= MIN_UPTIME for w in pool.workers.values()):
            pool.failures = 0
        missing = pool.missing_numbers()
        if not missing or now < pool.next_spawn_at:
            return
        if pool.failures:
            self._spawn(pool, missing[0])  # in back-off: one at a time
            pool.next_spawn_at = now + min(0.1 * 2 ** (pool.failures - 1), 30.0)
        else:
            for number in missing:
                self._spawn(pool, number)

    def _retire_old(self, service: Optional[str]) -> None:
        for w in list(self.old_workers.values()):
            if (service is None or w.service == service) and not w.stopping:
                self._stop_worker(w, graceful=True, reason=f"replaced by generation {self.generation}")

    # -- stopping ----------------------------------------------------------------

    def _begin_stop(self, graceful: bool, signame: str) -> None:
        if self.phase == "stopping":
            if not graceful:  # a second, quick stop escalates
                for w in self._all_workers():
                    self._stop_worker(w, graceful=False, reason=signame)
            return
        self.phase = "stopping"
        self.logger.info("supervisor.stopping", signal=signame, graceful=graceful,
                         workers=len(self.by_pid) + len(self.old_workers))
        self.notifier.stopping("stopping" + (" gracefully" if graceful else ""))
        if self.check_proc is not None:
            kill_quietly(self.check_proc.pid, signal.SIGKILL)
        for w in self._all_workers():
            self._stop_worker(w, graceful=graceful, reason=signame)
        # Stop taking new clients: close our copies and remove the socket files now.
        for lst in self.listeners.values():
            lst.close()
        self._report_to_launcher("ERROR stopped before it was ready")

    def _finish_stop(self) -> None:
        self._cleanup(failed=False)
        self.logger.info("supervisor.stopped", generation=self.generation)
        self.phase = "stopped"

    def _cleanup(self, failed: bool) -> None:
        for lst in self.listeners.values():
            try:
                lst.close()
            except OSError:
                pass
        self.control.close(unlink=True)
        if self.pidfile:
            self.pidfile.remove()
        self.notifier.close()
        signal.set_wakeup_fd(-1)

    def _report_to_launcher(self, message: str) -> None:
        if self.ready_fd is None:
            return
        try:
            os.write(self.ready_fd, (message + "\n").encode("utf-8", "replace"))
        except OSError:
            pass
        try:
            os.close(self.ready_fd)
        except OSError:
            pass
        self.ready_fd = None

    # -- status ----------------------------------------------------------------

    def status(self) -> Dict[str, Any]:
        """The status document served on the control socket (``docs/status.md``)."""
        assert self.scoreboard is not None
        services = []
        for pool in self.pools.values():
            workers = [self._worker_status(w) for _, w in sorted(pool.workers.items())]
            workers += [self._worker_status(w) for w in self.old_workers.values() if w.service == pool.name]
            services.append({
                "name": pool.name,
                "handler": pool.config.handler or None,
                "command": list(pool.config.command) or None,
                "workers_target": pool.target,
                "listeners": [{"configured": str(lst.address), "address": lst.bound, "origin": lst.origin}
                              for lst in pool.listeners],
                "backoff": {"failures": pool.failures, "last_failure": pool.last_failure} if pool.failures else None,
                "workers": workers,
            })
        retired = [self._worker_status(w) for w in self.old_workers.values() if w.service not in self.pools]
        return {
            "pid": self.pid,
            "state": self.phase,
            "generation": self.generation,
            "uptime": round(time.time() - self.started_wall, 3),
            "started": self.started_wall,
            "config": self.config.source,
            "pidfile": self.pidfile.path if self.pidfile else None,
            "reload": {"seq": self.reload_seq, "state": self.reload_state, "error": self.reload_error},
            "services": services,
            "retiring_workers": retired,
        }

    def _worker_status(self, w: WorkerInfo) -> Dict[str, Any]:
        assert self.scoreboard is not None
        state = "stopping" if w.stopping else (self.scoreboard.state(w.slot) if w.ready else "starting")
        out: Dict[str, Any] = {"pid": w.pid, "number": w.number, "generation": w.generation, "state": state,
                               "connections": self.scoreboard.served(w.slot),
                               "uptime": round(time.monotonic() - w.started, 3)}
        import psutil  # only status needs it; keeps the re-exec'd image's start-up short

        try:
            proc = psutil.Process(w.pid)
            with proc.oneshot():
                out["rss"] = proc.memory_info().rss
                cpu = proc.cpu_times()
                out["cpu"] = round(cpu.user + cpu.system, 3)
        except (psutil.Error, OSError):
            out["rss"] = None
            out["cpu"] = None
        return out


def _safe_sockname(sock: Any) -> str:
    try:
        return format_sockname(sock.family, sock.getsockname())
    except OSError:
        return "?"


def _activated_fds() -> List["tuple[int, str]"]:
    """Sockets passed by systemd socket activation (sd_listen_fds(3)): fds 3.. with
    ``LISTEN_PID`` equal to our pid; the variables are removed afterwards."""
    env = os.environ
    pid, count = env.pop("LISTEN_PID", ""), env.pop("LISTEN_FDS", "")
    names = env.pop("LISTEN_FDNAMES", "")
    if not pid.isdigit() or int(pid) != os.getpid() or not count.isdigit():
        return []
    name_list = names.split(":") if names else []
    out = []
    for i in range(int(count)):
        fd = 3 + i
        os.set_inheritable(fd, False)
        out.append((fd, name_list[i] if i < len(name_list) else ""))
    return out


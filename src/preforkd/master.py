"""The master: one loop that turns signals into events, reaps, spawns, stops and reloads.

Signal handlers only append the signal number to a queue; ``signal.set_wakeup_fd``
writes a byte to a pipe that the loop's selector watches, so the loop wakes at
once (perlipc "Signals": do as little as possible in a handler). Each turn of
:meth:`Master.loop`:

1. wait in the selector (wakeup pipe, worker ready pipe, control socket, reload
   check output) until the next timer is due;
2. dispatch queued signals through :data:`preforkd.signals.MASTER_SIGNALS` to
   ``handle_<name>``, which read like docs/signals.md;
3. reap every exited child with ``waitpid(-1, WNOHANG)`` until none is left
   (perlipc's REAPER), decoding exit codes and signals;
4. run the timed steps of :meth:`Master.tick`.

Reload checking lives in :class:`preforkd.reload.Reloader`, what crosses ``execve``
in :mod:`preforkd.reexec`, listener adoption in :mod:`preforkd.listeners`, the
status document in :mod:`preforkd.status`.
"""

from __future__ import annotations

import collections
import enum
import os
import selectors
import signal
import sys
import time
from types import FrameType
from typing import Any, Callable, Deque, Dict, Optional

from . import agent, reexec, status
from .config import Config, credentials
from .control import ControlServer
from .counters import Counters
from .daemon import Launcher
from .endpoints import EndpointSet
from .handler import Handler
from .health import Watchdog
from .limits import raise_nofile_limit
from .listeners import Listener, ListenerError, listener_specs, open_listeners, prebind
from .log import EventLog
from .metrics import Renderer, metrics_endpoint
from .notify import Notifier
from .pidfile import Pidfile, PidfileError, take_pidfile
from .pool import Pool, Workers
from .reload import Reloader
from .scoreboard import Scoreboard
from .signals import MASTER_SIGNALS, kill_quietly
from .worker import set_title

#: Quick worker failures in one pool that make a waiting ``preforkd start`` fail.
START_FAILURES = 3
#: Seconds a re-exec'd master may defer importing structlog (see EventLog's defer).
LOG_DEFER_MAX = 1.0
#: Seconds a re-exec'd master waits for its new generation before the reload fails.
RELOAD_READY_TIMEOUT = 30.0


class Phase(enum.Enum):
    """The master's phase, as ``status`` shows it (``state``)."""

    STARTING = "starting"    # first generation's workers starting
    RUNNING = "running"
    RELOADING = "reloading"  # a re-exec'd image waiting for its new generation
    STOPPING = "stopping"    # waiting for every child to exit
    STOPPED = "stopped"      # the loop returns


class Master:
    """The supervisor's master process.

    :param config: the validated configuration.
    :param handlers: service name -> resolved handler (:func:`preforkd.handler.load_handlers`).
    :param log: this process's event log.
    :param config_arg: the ``-c`` argument (absolute) or ``None``; what a re-exec passes on.
    :param launcher: the waiting ``preforkd start`` (:class:`preforkd.daemon.Launcher`), or ``None``.
    :param handover: what the previous image handed over (a reload), or ``None``.
    """

    def __init__(self, config: Config, handlers: Dict[str, Handler], log: EventLog, config_arg: Optional[str],
                 launcher: Optional[Launcher] = None, handover: Optional[reexec.Handover] = None) -> None:
        """Nothing is opened here; :meth:`start` does that."""
        self.config, self.handlers, self.log = config, handlers, log
        self.config_arg, self.launcher, self.handover = config_arg, launcher, handover
        self.pid = os.getpid()
        self.generation = handover.generation + 1 if handover else 1
        self.started_wall = handover.started_wall if handover else time.time()  # wall clock, s
        self.phase = Phase.STARTING
        self.exit_code = 0
        self.logger = log.logger()
        self.creds = credentials(config)
        self.sig_queue: Deque[int] = collections.deque()
        self.selector = selectors.DefaultSelector()
        self.notifier = Notifier()
        self.counters = Counters(handover.counters if handover else ())
        self.reloader = Reloader(config_arg, self.selector, self.logger, self.notifier, self.commit_reload,
                                 handover, self.counters)
        self.drain = agent.Drain(handover.drained if handover else False, self.logger)
        self.control = ControlServer(self.selector, self.status, {"drain": lambda: self.drain.command(True),
                                                                   "undrain": lambda: self.drain.command(False)},
                                     self.logger)
        self.pools: Dict[str, Pool] = {}
        self.listeners: Dict[str, Listener] = {}  # listener key -> listener
        self.pidfile: Optional[Pidfile] = None
        self.scoreboard = Scoreboard(handover.scoreboard_fd if handover else None)
        self.workers = Workers(self.scoreboard, self.logger, config.supervisor.graceful_timeout, self.counters)
        self.endpoints = EndpointSet()  # listeners the master answers itself ([metrics], agent-check)
        self.renderer: Optional[Renderer] = None
        self.watchdog = Watchdog(self.workers, self.scoreboard, self.logger)
        self.wake_r = -1
        self.next_watchdog: Optional[float] = None  # monotonic seconds
        self.log_deadline = time.monotonic() + LOG_DEFER_MAX  # monotonic seconds
        self.reload_deadline = time.monotonic() + RELOAD_READY_TIMEOUT  # monotonic seconds, after a re-exec
        #: Told "serving echo on tcp://... (4 workers)" once at first readiness (the CLI
        #: sets it when a person watches the terminal).
        self.announce: Optional[Callable[[str], None]] = None

    # -- lifecycle -----------------------------------------------------------------

    def run(self) -> int:
        """Start, serve until stopped, clean up. Returns the process exit status
        (0 after a clean stop, 1 when start-up failed)."""
        try:
            self.start()
        except (ListenerError, PidfileError) as exc:
            self.log.activate()
            self.logger.error("supervisor.start_failed", error=str(exc))
            if self.launcher is None and self.log.sink.fd != 2:
                # `run` logging to a file: the reason is on stderr too, the line that
                # `start` prints, so that whoever ran it sees why it did not start.
                print(f"preforkd: start failed: {exc}", file=sys.stderr, flush=True)
            self._report(f"ERROR {exc}")
            self._cleanup()
            return 1
        self.loop()
        return self.exit_code

    def start(self) -> None:
        """Net::Server's steps: signals, pidfile, pipes, listeners (bind or adopt), control
        socket, pools, then the workers a reload handed over."""
        h = self.handover
        self.log.bind(generation=self.generation)
        set_title(f"preforkd: master [gen {self.generation}] {self.config.path or 'built-in default'}")
        self.wake_r, wake_w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        self.selector.register(self.wake_r, selectors.EVENT_READ, self._on_wakeup)
        signal.set_wakeup_fd(wake_w, warn_on_full_buffer=False)
        for sig in MASTER_SIGNALS:
            signal.signal(sig, self._on_signal)
        reexec.unblock_signals()  # blocked across exec by the previous image, or by the CLI
        raise_nofile_limit(self.config, self.logger)
        self.pidfile = take_pidfile(self.config.supervisor.pidfile, self.pid, h.pidfile_fd if h else None,
                                    h.pidfile_path if h else "")
        self.workers.open_pipes(self.selector, (h.alive_r, h.alive_w) if h else None, self.generation, self.log,
                                self.creds, self.config.supervisor.event_loop, self.config.log.access)
        self.listeners = open_listeners(self.config, h.listeners if h else (), self.creds.socket_owner,
                                        self.logger)
        self.control.take_over(self.config.supervisor.control_socket, h.control_fd if h else None,
                               h.control_path if h else "", h.control_file_id if h else None)
        self._open_endpoints()
        specs = listener_specs(self.config)
        for svc in self.config.services:
            lsts = [self.listeners[s.key] for s in specs if s.service is svc]
            self.pools[svc.name] = Pool.create(svc, lsts, self.handlers.get(svc.name), self.scoreboard)
        for inherited in h.workers if h else ():
            w = self.workers.inherit(inherited)
            if w.service not in self.pools:
                self.workers.stop(w, graceful=True, reason="service removed")
        if self.notifier.watchdog_interval:
            self.next_watchdog = time.monotonic()
        self.phase = Phase.RELOADING if h else Phase.STARTING
        self.notifier.status("starting workers")

    def loop(self) -> None:
        """Until stopped: wait, dispatch signals, reap, run the timed steps."""
        while self.phase is not Phase.STOPPED:
            for key, mask in self.selector.select(self._next_timeout()):
                key.data(mask)
            while self.sig_queue:
                getattr(self, "handle_" + MASTER_SIGNALS[signal.Signals(self.sig_queue.popleft())])()
            self.reap()
            self.tick()

    def tick(self) -> None:
        """The timed steps, in order; each does nothing until it is due."""
        now = time.monotonic()
        self.workers.kill_overdue(now)
        self.watchdog.check(self.pools, now)
        self.control.expire(now)
        self.endpoints.tick(now)
        self._feed_watchdog(now)
        self.reloader.poll(now)
        if self.drain.stop_at is not None and now >= self.drain.stop_at and self.phase is not Phase.STOPPING:
            self.begin_stop(graceful=True, signame="SIGTERM")
        if self.phase is Phase.STOPPING:
            if not self.workers:
                self._finish_stop()
            return
        for pool in self.pools.values():
            self.workers.maintain(pool, now)
        if not self.log.active and (self.phase is not Phase.RELOADING or now >= self.log_deadline):
            self.log.activate()  # a reload that takes long writes its events anyway
        if self.phase is Phase.STARTING:
            self._become_ready()
        elif self.phase is Phase.RELOADING or self.workers.old:
            self._retire_replaced(now)
        if self.phase is Phase.RUNNING and self.drain.stop_at is None:
            self.reloader.start_if_pending()
            if self.renderer is not None and not self.renderer.ready:
                self.renderer.prepare()  # prometheus-client's import, once serving (not in a reload's way)

    # -- signals (docs/signals.md) -----------------------------------------------------

    def _on_signal(self, signum: int, _frame: Optional[FrameType]) -> None:
        """The Python-level handler of every master signal: queue it, nothing more."""
        self.sig_queue.append(signum)  # that is all: the loop does the work

    def handle_hup(self) -> None:
        """Reload when idle; HUPs during a reload coalesce into one more."""
        self.logger.info("signal.received", signal="SIGHUP")
        if self.phase is not Phase.STOPPING:
            self.reloader.request()

    def handle_term(self) -> None:
        """Graceful stop; with ``drain_delay``, first that many seconds of draining, in
        which everything goes on serving and accepting but the agent says ``drain`` (a
        second TERM cuts it short)."""
        delay = self.config.supervisor.drain_delay
        if delay > 0 and self.drain.stop_at is None and self.phase in (Phase.RUNNING, Phase.RELOADING):
            self.drain.before_stop(delay, time.monotonic())
            self.reloader.abort()  # no re-exec while draining: the new image would not know
            self.notifier.status(f"draining for {delay:g} s, then stopping")
            return
        self.begin_stop(graceful=True, signame="SIGTERM")

    def handle_int(self) -> None:
        """Quick stop."""
        self.begin_stop(graceful=False, signame="SIGINT")

    def handle_quit(self) -> None:
        """Quick stop."""
        self.begin_stop(graceful=False, signame="SIGQUIT")

    def handle_chld(self) -> None:
        """Nothing more: the loop reaps after every wake-up."""

    def handle_ttin(self) -> None:
        """One more worker in every pool."""
        self._resize(+1)

    def handle_ttou(self) -> None:
        """One fewer worker in every pool (never below 1)."""
        self._resize(-1)

    def handle_usr1(self) -> None:
        """Reopen the log file and tell every worker to reopen theirs. Workers running as
        ``supervisor.user`` could not open a file only root may write, so the master
        (as root) makes the new file theirs first, as nginx does; if the master cannot
        reopen it, everyone keeps the file they have (``log.reopen_failed``)."""
        try:
            self.log.reopen(owner=self.creds.uid if os.geteuid() == 0 else None)
        except OSError as exc:
            self.logger.error("log.reopen_failed", file=self.log.sink.path, error=exc.strerror or str(exc))
            return
        self.logger.info("log.reopened", file=self.log.sink.path or "stderr")
        for w in self.workers.all():
            kill_quietly(w.pid, signal.SIGUSR1)

    def _resize(self, delta: int) -> None:
        """Move every pool's target by *delta* (TTIN, TTOU), unless stopping."""
        if self.phase is not Phase.STOPPING:
            for pool in self.pools.values():
                pool.resize(delta, self.logger)

    def agent_reply(self) -> str:
        """The agent-check's line now (:mod:`preforkd.agent`): ``down`` once stopping,
        ``drain`` while draining, else ``up ready N%`` with N the spare capacity."""
        return agent.reply(self.phase is Phase.STOPPING, self.drain.draining,
                           agent.spare_percent(self.pools.values(), self.scoreboard))

    # -- children ----------------------------------------------------------------------

    def reap(self) -> None:
        """perlipc's REAPER: collect every exited child without blocking."""
        while True:
            try:
                pid, wstatus = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                return
            if pid == 0:
                return
            if self.reloader.owns_child(pid):
                self.reloader.child_exited(wstatus)
            else:
                self._worker_exited(pid, wstatus)

    def _worker_exited(self, pid: int, wstatus: int) -> None:
        """Account for the exit (:meth:`Workers.exited`); a pool whose workers keep dying
        at start-up fails a waiting ``preforkd start`` instead of crash-looping."""
        pool = self.workers.exited(pid, wstatus, self.pools, everyone_stopping=self.phase is Phase.STOPPING)
        if pool is not None and self.phase is Phase.STARTING and self.launcher and pool.failures >= START_FAILURES:
            self._report(f"ERROR service {pool.name}: workers exit at start-up ({pool.last_failure})")
            self.exit_code = 1
            self.begin_stop(graceful=True, signame="start-up failure")

    # -- the timed steps ---------------------------------------------------------------

    def _feed_watchdog(self, now: float) -> None:
        """``WATCHDOG=1`` every half ``WATCHDOG_USEC`` (sd_watchdog_enabled(3))."""
        if self.next_watchdog is not None and now >= self.next_watchdog:
            self.notifier.watchdog()
            self.next_watchdog = now + (self.notifier.watchdog_interval or 1.0)

    def _become_ready(self) -> None:
        """First start: once every pool accepts, say so (log, systemd, launcher)."""
        if not all(p.all_ready() for p in self.pools.values()):
            return
        self.phase = Phase.RUNNING
        total = sum(p.target for p in self.pools.values())
        self.logger.info("supervisor.ready", services=len(self.pools), workers=total, generation=self.generation)
        plural = status.plural
        self.notifier.ready(f"serving {plural(len(self.pools), 'service')} with {plural(total, 'worker')}")
        self._report(f"READY {self.pid}")
        if self.announce is not None:
            self.announce(status.serving_line(self.pools.values()))

    def _retire_replaced(self, now: float) -> None:
        """After a re-exec: retire each service's old workers once its new ones accept;
        when all do, the reload is done. If a pool's new workers keep failing at start,
        or are not all up within :data:`RELOAD_READY_TIMEOUT`, the reload has failed: the
        old workers keep serving (they are retired only by new ones that accept), new
        ones keep being tried with back-off, and the next HUP reloads as usual."""
        ready = {p.name for p in self.pools.values() if p.all_ready()}
        for w in list(self.workers.old.values()):
            if w.service in ready:
                self.workers.stop(w, graceful=True, reason=f"replaced by generation {self.generation}")
        if self.phase is not Phase.RELOADING:
            return
        # The re-exec'd image imports structlog only once its new generation accepts
        # (it is most of its start-up); its events so far were buffered with their
        # times and are written here, before anyone hears the outcome.
        failing = [p for p in self.pools.values() if p.name not in ready and p.failures >= START_FAILURES]
        if len(ready) == len(self.pools):
            self.phase = Phase.RUNNING
            self.reloader.succeeded(self.generation, before_ready=self.log.activate)
        elif failing or now >= self.reload_deadline:
            why = (f"workers of {failing[0].name} exit at start-up ({failing[0].last_failure})" if failing
                   else f"new workers not all up within {RELOAD_READY_TIMEOUT:g} s")
            self.log.activate()
            self.phase = Phase.RUNNING
            self.reloader.failed(f"{why}; the previous generation keeps serving")

    def commit_reload(self, config: Config, text: Optional[bytes]) -> str:
        """Reload steps 2-3: bind what *config* adds, hand everything over, ``execve``.
        Returns only if that failed, with the reason (nothing has changed then)."""
        try:
            prebound = prebind(config, set(self.listeners), self.creds.socket_owner)
        except ListenerError as exc:
            return str(exc)
        self.control.close_clients()
        self.endpoints.close_clients()
        listeners = list(self.listeners.values()) + prebound
        for lst in listeners:
            lst.sock.setblocking(False)
        handover = reexec.Handover(
            generation=self.generation, started_wall=self.started_wall,
            hup_monotonic=self.reloader.began or time.monotonic(), reload_seq=self.reloader.seq,
            pending_reload=self.reloader.pending,
            listeners=tuple(lst.handover() for lst in listeners),
            workers=tuple(w.handover() for w in self.workers.all()),
            scoreboard_fd=self.scoreboard.fd, alive_r=self.workers.alive_r, alive_w=self.workers.alive_w,
            pidfile_fd=self.pidfile.fd if self.pidfile else None,
            pidfile_path=self.pidfile.path if self.pidfile else "",
            control_fd=self.control.fileno(), control_path=self.control.path,
            control_file_id=self.control.file_id, counters=self.counters.handover(), drained=self.drain.drained)
        self.logger.info("config.reexec", generation=self.generation + 1, reload_seq=self.reloader.seq)
        error = reexec.reexec(handover, self.config_arg, text)
        for lst in prebound:
            lst.close()
        return f"exec failed: {error}"

    # -- stopping ----------------------------------------------------------------------

    def begin_stop(self, graceful: bool, signame: str) -> None:
        """Stop every worker (TERM or QUIT), stop listening; a second, quick stop escalates."""
        if self.phase is Phase.STOPPING:
            if not graceful:
                for w in self.workers.all():
                    self.workers.stop(w, graceful=False, reason=signame)
            return
        self.phase = Phase.STOPPING
        self.logger.info("supervisor.stopping", signal=signame, graceful=graceful, workers=len(self.workers))
        self.notifier.stopping("stopping" + (" gracefully" if graceful else ""))
        self.reloader.abort()
        for w in self.workers.all():
            self.workers.stop(w, graceful=graceful, reason=signame)
        self.endpoints.close(keep_agent=True)  # the agent says "down" until the master exits
        agent_listener = self.endpoints.agent.listener if self.endpoints.agent else None
        for lst in self.listeners.values():  # no new clients: close our copies, remove socket files
            if lst is not agent_listener:
                lst.close()
        self._report("ERROR stopped before it was ready")

    def _finish_stop(self) -> None:
        """Every child is reaped: remove our files and leave the loop."""
        self._cleanup()
        self.logger.info("supervisor.stopped", generation=self.generation)
        self.phase = Phase.STOPPED

    def _cleanup(self) -> None:
        """Close listeners (unlinking our Unix socket files), the control socket, the pidfile."""
        self.endpoints.close()
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

    # -- helpers -------------------------------------------------------------------

    def _report(self, message: str) -> None:
        """Tell a waiting ``preforkd start`` (``READY PID`` / ``ERROR reason``), if any."""
        if self.launcher is not None:
            self.launcher.report(message)

    def _on_wakeup(self, _mask: int) -> None:
        """Empty the signal wakeup pipe (the signals themselves are in ``sig_queue``)."""
        try:
            while os.read(self.wake_r, 4096):
                pass
        except (BlockingIOError, InterruptedError):
            pass

    def _next_timeout(self) -> float:
        """Seconds until the earliest timed step is due (at most 1 s; 0 with signals queued)."""
        if self.sig_queue:
            return 0.0
        now = time.monotonic()
        deadlines = [now + 1.0]
        for pool in self.pools.values():
            if len(pool.active()) < pool.target and self.phase is not Phase.STOPPING:
                deadlines.append(pool.next_spawn_at)
            if pool.failures:
                deadlines.append(now + 0.25)
        deadlines += self.workers.deadlines()
        deadlines += self.endpoints.deadlines()
        stop_at = self.drain.stop_at if self.phase is not Phase.STOPPING else None  # once due, it is done
        deadlines += [t for t in (self.next_watchdog, self.reloader.deadline(), self.watchdog.deadline(), stop_at,
                                  self.control.deadline())
                      if t is not None]
        return max(0.0, min(deadlines) - now)

    def status(self) -> Dict[str, Any]:
        """The status document served on the control socket (:mod:`preforkd.status`)."""
        draining_to_stop = self.drain.stop_at is not None and self.phase is not Phase.STOPPING
        endpoint = self.endpoints.agent.listener if self.endpoints.agent is not None else None
        return status.document(
            pid=self.pid, state="draining" if draining_to_stop else self.phase.value, draining=self.drain.draining,
            generation=self.generation, started_wall=self.started_wall,
            config=self.config.source, pidfile=self.pidfile.path if self.pidfile else "",
            reload=self.reloader.document(), pools=self.pools, old_workers=self.workers.old.values(),
            scoreboard=self.scoreboard, counters=self.counters,
            endpoints=[lst for lst in self.listeners.values() if lst.role != "service"],
            agent_check={"address": endpoint.bound, "reply": self.agent_reply()} if endpoint is not None else None)

    # -- endpoints the master answers itself -------------------------------------------

    def _open_endpoints(self) -> None:
        """Serve ``[metrics]`` and the agent-check on their listeners (bound or adopted
        with the others)."""
        for spec in listener_specs(self.config):
            if spec.role == "metrics":
                self.renderer = Renderer(self)
                self.endpoints.add(metrics_endpoint(self.listeners[spec.key], self.selector, self.logger,
                                                    self.renderer))
            elif spec.role == "agent_check":
                self.endpoints.add(agent.endpoint(self.listeners[spec.key], self.selector, self.agent_reply,
                                                  self.logger), agent=True)


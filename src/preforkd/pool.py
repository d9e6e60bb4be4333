"""Pool bookkeeping in the master: one :class:`Pool` per service, one
:class:`WorkerInfo` per worker process, the :class:`Workers` registry, and the
crash-loop back-off.

A pool wants workers numbered 1..``target`` (``NAME#N`` in ``ps``); the master spawns
the missing numbers and retires numbers above the target. Workers of earlier
generations are not in a pool: the master keeps them apart until they are reaped.
"""

from __future__ import annotations

import gc
import os
import selectors
import signal
import time
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Tuple

from .config import MAX_WORKERS, Credentials, ServiceConfig
from .handler import Handler
from .listeners import Listener
from .log import EventLog, Logger
from .reexec import InheritedWorker, set_inheritable
from .scoreboard import Scoreboard, ScoreboardFull
from .signals import describe_status, kill_quietly
from .worker import EXIT_INIT_FAILED, WorkerEnv, WorkerSpec
from .worker import run as run_worker

#: A worker that dies within this many seconds of its start counts as a quick failure.
MIN_UPTIME = 1.0
BACKOFF_BASE = 0.1
BACKOFF_MAX = 30.0


def backoff_delay(failures: int) -> float:
    """Seconds to wait before the next spawn after *failures* quick failures in a row
    (>= 1): ``BACKOFF_BASE * 2**(failures - 1)``, at most ``BACKOFF_MAX`` (0.1, 0.2,
    0.4 ... 30 s)."""
    return min(BACKOFF_BASE * 2.0 ** min(failures - 1, 64), BACKOFF_MAX)


@dataclass
class WorkerInfo:
    """What the master knows of one worker process.

    ``started`` is on the monotonic clock (seconds), ``started_wall`` on the wall
    clock (seconds since the epoch); ``kill_at`` is the monotonic time at which a
    worker told to stop gets SIGKILL, ``None`` when not stopping.
    """

    pid: int
    service: str
    number: int
    generation: int
    slot: int
    started: float = field(default_factory=time.monotonic)
    started_wall: float = field(default_factory=time.time)
    ready: bool = False
    stopping: bool = False
    kill_at: Optional[float] = None

    def handover(self) -> InheritedWorker:
        """This worker as the next image of the master will take it over."""
        return InheritedWorker(pid=self.pid, service=self.service, number=self.number,
                               generation=self.generation, slot=self.slot, ready=self.ready,
                               stopping=self.stopping, started_wall=self.started_wall)

    @classmethod
    def inherit(cls, w: InheritedWorker) -> WorkerInfo:
        """A worker handed over across exec (its monotonic start rebuilt from its uptime)."""
        uptime = max(0.0, time.time() - w.started_wall)
        return cls(pid=w.pid, service=w.service, number=w.number, generation=w.generation, slot=w.slot,
                   ready=w.ready, stopping=w.stopping, started=time.monotonic() - uptime,
                   started_wall=w.started_wall)


@dataclass
class Pool:
    """One service's pool: its configuration, listeners, handler and current-generation
    workers. ``handler`` is ``None`` for a ``command`` service. ``next_spawn_at`` is
    monotonic seconds; ``failures`` counts quick failures in a row."""

    config: ServiceConfig
    listeners: List[Listener]
    handler: Optional[Handler]
    target: int
    workers: Dict[int, WorkerInfo] = field(default_factory=dict)  # number -> worker
    failures: int = 0
    next_spawn_at: float = 0.0
    last_failure: str = ""

    @property
    def name(self) -> str:
        return self.config.name

    def missing_numbers(self) -> List[int]:
        """Worker numbers 1..target with no live worker."""
        return [n for n in range(1, self.target + 1) if n not in self.workers]

    def surplus(self) -> List[WorkerInfo]:
        """Workers numbered above the target and not yet told to stop."""
        return [w for n, w in self.workers.items() if n > self.target and not w.stopping]

    def all_ready(self) -> bool:
        """Every wanted worker is up and accepting."""
        return not self.missing_numbers() and all(w.ready for n, w in self.workers.items() if n <= self.target)

    def record_exit(self, lifetime: float, clean: bool, reason: str, now: float) -> Optional[float]:
        """Update crash-loop accounting for a worker that exited after *lifetime* seconds.

        :param now: monotonic seconds.
        :returns: the back-off delay in seconds when this exit counts as a quick
            failure (not *clean* and within :data:`MIN_UPTIME`), else ``None``.
        """
        if clean or lifetime >= MIN_UPTIME:
            self.failures = 0
            return None
        self.failures += 1
        self.last_failure = reason
        delay = backoff_delay(self.failures)
        self.next_spawn_at = now + delay
        return delay

    def resize(self, delta: int, logger: Logger) -> None:
        """Move the target by *delta* within 1..:data:`~preforkd.config.MAX_WORKERS`
        (``pool.resized``); :meth:`Workers.maintain` then spawns or retires."""
        old = self.target
        self.target = min(MAX_WORKERS, max(1, self.target + delta))
        if self.target != old:
            logger.info("pool.resized", service=self.name, workers=self.target, previous=old)

    def settle(self, now: float) -> None:
        """Forget past quick failures once a worker has been up :data:`MIN_UPTIME`."""
        if self.failures and any(w.ready and now - w.started >= MIN_UPTIME for w in self.workers.values()):
            self.failures = 0


class Workers:
    """Every worker process the master has, by pid: the current generation (each also in
    its pool) and earlier generations being retired (:attr:`old`). Claims and releases
    scoreboard slots, stops workers, and kills those that overrun their stop timeout.

    :param graceful_timeout: seconds a worker told to stop gracefully may take.
    """

    #: Seconds a worker told to quit (INT, QUIT) has before SIGKILL.
    QUICK_STOP_GRACE = 2.0
    #: A worker stopped gracefully ends itself when ``graceful_timeout`` runs out (its own
    #: timer, which also ends a command program's process group); the master sends KILL
    #: this many seconds later if it is still there.
    STOP_BACKSTOP = 1.0

    def __init__(self, scoreboard: Scoreboard, logger: Logger, graceful_timeout: float) -> None:
        self.scoreboard = scoreboard
        self.logger = logger
        self.graceful_timeout = graceful_timeout
        self.current: Dict[int, WorkerInfo] = {}
        self.old: Dict[int, WorkerInfo] = {}
        self.env: Optional[WorkerEnv] = None  # set by the master once the pipes exist
        self.alive_r = self.alive_w = self.ready_r = self.ready_w = -1

    def open_pipes(self, selector: selectors.BaseSelector, alive: Optional[Tuple[int, int]], generation: int,
                   log: EventLog, credentials: Credentials) -> None:
        """The master's two pipes to its workers: the master-alive pipe (only the master
        holds the write end, so end of file tells a worker the master is gone; *alive* is
        the inherited pair after a re-exec), and the ready pipe on which each worker
        writes its pid once it accepts (watched through *selector*). Then what every
        worker of this image shares (:class:`WorkerEnv`) is known."""
        if alive is None:
            self.alive_r, self.alive_w = os.pipe2(os.O_CLOEXEC)
        else:
            self.alive_r, self.alive_w = alive
            set_inheritable(alive, False)
        self.ready_r, self.ready_w = os.pipe2(os.O_CLOEXEC)
        os.set_blocking(self.ready_r, False)
        selector.register(self.ready_r, selectors.EVENT_READ, self._on_ready)
        self.env = WorkerEnv(generation=generation, alive_fd=self.alive_r, ready_fd=self.ready_w, log=log,
                             master_pid=os.getpid(), graceful_timeout=self.graceful_timeout, credentials=credentials)

    def _on_ready(self, _mask: int) -> None:
        try:
            data = os.read(self.ready_r, 65536)
        except (BlockingIOError, InterruptedError):
            return
        for token in data.split():
            info = self.current.get(int(token)) if token.isdigit() else None
            if info is not None:
                info.ready = True

    def all(self) -> List[WorkerInfo]:
        return list(self.current.values()) + list(self.old.values())

    def __len__(self) -> int:
        return len(self.current) + len(self.old)

    def spawn(self, pool: Pool, number: int) -> None:
        """Fork worker *number* of *pool*; a full scoreboard or a failed fork delays it
        (``worker.spawn_failed``), never crashes the master."""
        assert self.env is not None
        try:
            slot = self.scoreboard.claim()
        except ScoreboardFull as exc:
            pool.next_spawn_at = time.monotonic() + 1.0
            self.logger.error("worker.spawn_failed", service=pool.name, error=str(exc))
            return
        spec = WorkerSpec(env=self.env, service=pool.config, listeners=[lst.sock for lst in pool.listeners],
                          handler=pool.handler, number=number, cells=self.scoreboard.cells(slot))
        gc.freeze()  # keep the master's heap out of the collector's way: pages stay shared
        try:
            pid = os.fork()
        except OSError as exc:
            self.scoreboard.release(slot)
            delay = pool.record_exit(0.0, False, f"fork failed: {exc.strerror}", time.monotonic())
            self.logger.error("worker.spawn_failed", service=pool.name, error=exc.strerror, delay=delay)
            return
        if pid == 0:
            run_worker(spec)  # never returns
        info = WorkerInfo(pid=pid, service=pool.name, number=number, generation=self.env.generation, slot=slot)
        pool.workers[number] = info
        self.current[pid] = info
        self.logger.info("worker.spawned", service=pool.name, worker=number, child=pid)

    def inherit(self, w: InheritedWorker) -> WorkerInfo:
        """A worker handed over across exec: kept apart as an earlier generation's."""
        info = WorkerInfo.inherit(w)
        self.scoreboard.claim(info.slot)
        self.old[info.pid] = info
        return info

    def pop(self, pid: int) -> Optional[WorkerInfo]:
        """Forget a reaped worker and free its slot; ``None`` if it was not ours."""
        info = self.current.pop(pid, None) or self.old.pop(pid, None)
        if info is not None:
            self.scoreboard.release(info.slot)
        return info

    def exited(self, pid: int, wstatus: int, pools: Dict[str, Pool], everyone_stopping: bool) -> Optional[Pool]:
        """A child was reaped with ``waitpid`` status *wstatus*: log ``worker.exited``, free
        its number and slot; a worker that was not told to stop counts for crash-loop
        back-off (``worker.backoff``), and the master respawns it when it next maintains
        the pool.

        :returns: the pool, when this exit was a quick failure that put it in back-off.
        """
        now = time.monotonic()
        info = self.pop(pid)
        how = describe_status(wstatus)
        if info is None:  # not ours: an orphan reparented to us (PID 1 in a container)
            self.logger.debug("child.reaped", child=pid, **how)
            return None
        lifetime = round(now - info.started, 3)
        expected = info.stopping or everyone_stopping
        clean = how.get("exit_code") == 0
        log = self.logger.info if clean or expected else self.logger.warning
        log("worker.exited", service=info.service, worker=info.number, child=pid,
            worker_generation=info.generation, lifetime=lifetime, **how)
        pool = pools.get(info.service)
        if pool is None or pool.workers.get(info.number) is not info:
            return None  # an earlier generation's
        del pool.workers[info.number]
        if expected:
            return None
        reason = ", ".join(f"{k} {v}" for k, v in how.items())
        if how.get("exit_code") == EXIT_INIT_FAILED:
            reason = "worker_init failed"
        delay = pool.record_exit(lifetime, clean, reason, now)
        if delay is None:
            return None
        self.logger.warning("worker.backoff", service=pool.name, failures=pool.failures,
                            delay=round(delay, 3), reason=reason)
        return pool

    def stop(self, w: WorkerInfo, graceful: bool, reason: str) -> None:
        """TERM (graceful: SIGKILL after ``graceful_timeout`` + :data:`STOP_BACKSTOP`) or
        QUIT (SIGKILL after :data:`QUICK_STOP_GRACE`); a graceful stop is sent once."""
        if w.stopping and graceful:
            return
        w.stopping = True
        grace = self.graceful_timeout + self.STOP_BACKSTOP if graceful else self.QUICK_STOP_GRACE
        w.kill_at = time.monotonic() + grace
        kill_quietly(w.pid, signal.SIGTERM if graceful else signal.SIGQUIT)
        self.logger.debug("worker.stopping", service=w.service, worker=w.number, child=w.pid,
                          graceful=graceful, reason=reason)

    def maintain(self, pool: Pool, now: float) -> None:
        """Retire *pool*'s workers above its target; spawn missing ones (one at a time,
        spaced by the back-off delay, while the pool is in a crash loop). *now*:
        monotonic seconds."""
        for w in pool.surplus():
            self.stop(w, graceful=True, reason="pool shrunk")
        pool.settle(now)
        missing = pool.missing_numbers()
        if not missing or now < pool.next_spawn_at:
            return
        if pool.failures:
            self.spawn(pool, missing[0])
            pool.next_spawn_at = now + backoff_delay(pool.failures)
        else:
            for number in missing:
                self.spawn(pool, number)

    def kill_overdue(self, now: float) -> None:
        """SIGKILL workers that overran their stop timeout (*now*: monotonic seconds)."""
        for w in self.all():
            if w.kill_at is not None and now >= w.kill_at:
                self.logger.warning("worker.killed", service=w.service, worker=w.number, child=w.pid,
                                    signal="SIGKILL", reason="did not exit within the stop timeout")
                kill_quietly(w.pid, signal.SIGKILL)
                w.kill_at = None

    def deadlines(self) -> List[float]:
        """The monotonic times at which :meth:`kill_overdue` has work."""
        return [w.kill_at for w in self.all() if w.kill_at is not None]

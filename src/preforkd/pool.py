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
from typing import Any, Dict, List, Optional, Tuple

from .config import MAX_WORKERS, Credentials, ServiceConfig
from .counters import Counters, exit_reason
from .handler import Handler
from .listeners import Listener, queue_length
from .log import EventLog, Logger
from .reexec import InheritedWorker, set_inheritable
from .scoreboard import ARMED, Scoreboard, ScoreboardFull, State
from .signals import describe_status, kill_quietly
from .worker import EXIT_INIT_FAILED, WorkerEnv, WorkerSpec
from .worker import run as run_worker

#: A worker that dies within this many seconds of its start counts as a quick failure.
MIN_UPTIME = 1.0
#: A dynamic pool spawns at most this many workers at once (no fork storm).
MAX_SPAWN_BATCH = 32
#: Seconds more than ``max_spare_workers`` must stay idle before a dynamic pool shrinks.
SPARE_GRACE = 10.0
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
    stack_fd: int = -1  # memfd the worker's faulthandler writes its stack to (SIGUSR2); -1 = none
    #: Why the master ended it, as preforkd_worker_exits_total counts it (stopped, max_rss,
    #: timeout); "" while it was not told to stop.
    ended_for: str = ""

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
class Census:
    """A pool's workers by state, from the scoreboard: *idle* can take a connection now
    (an event-driven worker below its ``worker_connections``), *busy* cannot, *starting*
    are forked but not accepting yet. Workers told to stop are not counted."""

    idle: int = 0
    busy: int = 0
    starting: int = 0

    @property
    def total(self) -> int:
        return self.idle + self.busy + self.starting


@dataclass
class Pool:
    """One service's pool: its configuration, listeners, handler and current-generation
    workers. ``handler`` is ``None`` for a ``command`` service.

    ``floor`` is ``workers`` (TTIN/TTOU move it), ``target`` the number of workers the
    pool wants now: the floor for a fixed pool, between the floor and ``max_workers`` for
    a dynamic one (:meth:`adjust`). ``next_spawn_at`` and ``surplus_since`` are monotonic
    seconds; ``failures`` counts quick failures in a row.

    A dynamic pool also has ``idle_sem``, a process-shared semaphore whose value is the
    number of idle workers (workers post it when they turn idle and take it when they
    turn busy, without a system call), and ``cells``, a scoreboard slot of its own whose
    :data:`~preforkd.scoreboard.ARMED` cell tells a worker that finds the pool short of
    spares to wake the master (once; the master re-arms it).
    """

    config: ServiceConfig
    listeners: List[Listener]
    handler: Optional[Handler]
    floor: int
    target: int
    workers: Dict[int, WorkerInfo] = field(default_factory=dict)  # number -> worker
    failures: int = 0
    next_spawn_at: float = 0.0
    last_failure: str = ""
    idle_sem: Any = None  # multiprocessing Semaphore, dynamic pools only
    cells: Optional[memoryview] = None  # the pool's scoreboard slot, dynamic pools only
    surplus_since: Optional[float] = None
    saturated: bool = False

    @classmethod
    def create(cls, config: ServiceConfig, listeners: List[Listener], handler: Optional[Handler],
               scoreboard: Scoreboard) -> Pool:
        """A new pool at its floor; a dynamic one gets its idle semaphore and scoreboard slot.

        :raises ScoreboardFull: when no slot is left for a dynamic pool.
        """
        pool = cls(config=config, listeners=listeners, handler=handler, floor=config.workers, target=config.workers)
        if config.dynamic:
            import multiprocessing  # only dynamic pools: a re-exec'd master starts faster without it

            pool.idle_sem = multiprocessing.get_context("fork").Semaphore(0)
            pool.cells = scoreboard.cells(scoreboard.claim())
        return pool

    @property
    def name(self) -> str:
        return self.config.name

    @property
    def ceiling(self) -> int:
        """``max_workers``, or the floor when TTIN raised it higher."""
        return max(self.config.max_workers, self.floor)

    def active(self) -> List[WorkerInfo]:
        """Workers not told to stop."""
        return [w for w in self.workers.values() if not w.stopping]

    def census(self, scoreboard: Scoreboard) -> Census:
        """Count the workers by state from the scoreboard (no system call)."""
        census = Census()
        for w in self.workers.values():
            if w.stopping:
                continue
            state = scoreboard.state_code(w.slot) if w.ready else State.STARTING
            if state == State.IDLE:
                census.idle += 1
            elif state == State.BUSY:
                census.busy += 1
            else:
                census.starting += 1
        return census

    def free_numbers(self, count: int) -> List[int]:
        """The *count* lowest worker numbers not in use (a stopping worker keeps its
        number until it is reaped)."""
        out: List[int] = []
        n = 0
        while len(out) < count:
            n += 1
            if n not in self.workers:
                out.append(n)
        return out

    def all_ready(self) -> bool:
        """At least the floor's worth of workers are up and accepting (a dynamic pool
        may still be growing)."""
        return sum(1 for w in self.active() if w.ready) >= min(self.floor, self.target)

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
        """TTIN/TTOU: move the floor by *delta* within 1..:data:`~preforkd.config.MAX_WORKERS`
        (``pool.resized``); a fixed pool's target follows, a dynamic pool's stays within
        the new bounds. :meth:`Workers.maintain` then spawns or retires."""
        old = self.target
        self.floor = min(MAX_WORKERS, max(1, self.floor + delta))
        self.target = self.floor if not self.config.dynamic else min(max(self.target, self.floor), self.ceiling)
        if self.target != old:
            logger.info("pool.resized", service=self.name, workers=self.target, previous=old,
                        reason="TTIN" if delta > 0 else "TTOU")

    def adjust(self, census: Census, queued: int, now: float, logger: Logger) -> None:
        """A dynamic pool's idle-server maintenance (Apache prefork's, done on demand):
        grow when fewer than ``min_spare_workers`` are idle or starting, or when more
        connections wait in the accept queue (*queued*) than idle and starting workers can take, by
        what is missing, at most :data:`MAX_SPAWN_BATCH` at once and never above the
        ceiling; shrink back towards the floor once more than ``max_spare_workers`` have
        been idle for :data:`SPARE_GRACE` seconds; log ``pool.saturated`` once per
        episode at the ceiling with no idle worker. *now*: monotonic seconds."""
        cfg = self.config
        coming = census.starting + max(0, self.target - census.total)  # forked or about to be
        # Waiting connections are taken by idle workers first, then by those coming.
        want = max(cfg.min_spare_workers - census.idle - coming, queued - census.idle - coming, 0)
        if want and self.target < self.ceiling:
            old = self.target
            self.target = min(self.ceiling, self.target + min(want, MAX_SPAWN_BATCH))
            logger.info("pool.resized", service=self.name, workers=self.target, previous=old,
                        reason=f"{census.idle} idle, {queued} waiting")
        if self.target >= self.ceiling and census.idle == 0 and census.total >= self.ceiling:
            if not self.saturated:
                self.saturated = True
                logger.warning("pool.saturated", service=self.name, workers=self.ceiling, waiting=queued,
                               max_workers=cfg.max_workers)
        elif census.idle:
            self.saturated = False
        if census.idle > cfg.max_spare_workers and self.target > self.floor:
            if self.surplus_since is None:
                self.surplus_since = now
            elif now - self.surplus_since >= SPARE_GRACE:
                old = self.target
                self.target = max(self.floor, self.target - (census.idle - cfg.max_spare_workers))
                self.surplus_since = None
                logger.info("pool.resized", service=self.name, workers=self.target, previous=old,
                            reason=f"{census.idle} idle for {SPARE_GRACE:g} s")
        else:
            self.surplus_since = None

    def settle(self, now: float) -> None:
        """Forget past quick failures once a worker has been up :data:`MIN_UPTIME`."""
        if self.failures and any(w.ready and now - w.started >= MIN_UPTIME for w in self.workers.values()):
            self.failures = 0


class Workers:
    """Every worker process the master has, by pid: the current generation (each also in
    its pool) and earlier generations being retired (:attr:`old`). Claims and releases
    scoreboard slots, stops workers, and kills those that overrun their stop timeout.

    :param graceful_timeout: seconds a worker told to stop gracefully may take.
    :param counters: the master's running totals: a reaped worker's scoreboard counters
        and its exit reason are added there.
    """

    #: Seconds a worker told to quit (INT, QUIT) has before SIGKILL.
    QUICK_STOP_GRACE = 2.0
    #: A worker stopped gracefully ends itself when ``graceful_timeout`` runs out (its own
    #: timer, which also ends a command program's process group); the master sends KILL
    #: this many seconds later if it is still there.
    STOP_BACKSTOP = 1.0

    def __init__(self, scoreboard: Scoreboard, logger: Logger, graceful_timeout: float,
                 counters: Optional[Counters] = None) -> None:
        self.scoreboard = scoreboard
        self.counters = counters if counters is not None else Counters()
        self.logger = logger
        self.graceful_timeout = graceful_timeout
        self.current: Dict[int, WorkerInfo] = {}
        self.old: Dict[int, WorkerInfo] = {}
        self.env: Optional[WorkerEnv] = None  # set by the master once the pipes exist
        self.alive_r = self.alive_w = self.ready_r = self.ready_w = -1

    def open_pipes(self, selector: selectors.BaseSelector, alive: Optional[Tuple[int, int]], generation: int,
                   log: EventLog, credentials: Credentials, event_loop: str, access_log: bool = False) -> None:
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
                             master_pid=os.getpid(), graceful_timeout=self.graceful_timeout, credentials=credentials,
                             event_loop=event_loop, access_log=access_log)

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
        stack_fd = os.memfd_create("preforkd-stack", os.MFD_CLOEXEC) if pool.config.timeout else -1
        spec = WorkerSpec(env=self.env, service=pool.config, listeners=[lst.sock for lst in pool.listeners],
                          handler=pool.handler, number=number, cells=self.scoreboard.cells(slot),
                          idle_sem=pool.idle_sem, pool_cells=pool.cells, stack_fd=stack_fd)
        gc.freeze()  # keep the master's heap out of the collector's way: pages stay shared
        try:
            pid = os.fork()
        except OSError as exc:
            self.scoreboard.release(slot)
            if stack_fd >= 0:
                os.close(stack_fd)
            delay = pool.record_exit(0.0, False, f"fork failed: {exc.strerror}", time.monotonic())
            self.logger.error("worker.spawn_failed", service=pool.name, error=exc.strerror, delay=delay)
            return
        if pid == 0:
            run_worker(spec)  # never returns
        info = WorkerInfo(pid=pid, service=pool.name, number=number, generation=self.env.generation, slot=slot,
                          stack_fd=stack_fd)
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
        """Forget a reaped worker and free its slot, keeping its counters in the
        master's totals first; ``None`` if it was not ours."""
        info = self.current.pop(pid, None) or self.old.pop(pid, None)
        if info is not None:
            self.counters.worker_gone(info.service, info.slot, self.scoreboard)
            self.scoreboard.release(info.slot)
            if info.stack_fd >= 0:
                os.close(info.stack_fd)
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
        self.counters.worker_exited(info.service, info.ended_for or exit_reason(how, expected, EXIT_INIT_FAILED))
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
        w.ended_for = w.ended_for or ("max_rss" if reason == "max_rss" else "stopped")
        grace = self.graceful_timeout + self.STOP_BACKSTOP if graceful else self.QUICK_STOP_GRACE
        w.kill_at = time.monotonic() + grace
        kill_quietly(w.pid, signal.SIGTERM if graceful else signal.SIGQUIT)
        self.logger.debug("worker.stopping", service=w.service, worker=w.number, child=w.pid,
                          graceful=graceful, reason=reason)

    def maintain(self, pool: Pool, now: float) -> None:
        """Size *pool*: a dynamic pool first adjusts its target to its spare workers and
        accept queue (:meth:`Pool.adjust`); then workers above the target are retired
        gracefully (idle ones first, highest-numbered first) and missing ones spawned
        (one at a time, spaced by the back-off delay, while the pool is in a crash loop).
        *now*: monotonic seconds."""
        if pool.config.dynamic and pool.cells is not None:
            census = pool.census(self.scoreboard)
            queued = sum(queue_length(lst.sock) or 0 for lst in pool.listeners)
            pool.adjust(census, queued, now, self.logger)
            _resync(pool.idle_sem, census.idle)
            pool.cells[ARMED] = int(pool.target < pool.ceiling)
        active = pool.active()
        if len(active) > pool.target:
            for w in self._retirees(active, len(active) - pool.target):
                self.stop(w, graceful=True, reason="pool shrunk")
            return
        pool.settle(now)
        missing = pool.target - len(active)
        if missing <= 0 or now < pool.next_spawn_at:
            return
        numbers = pool.free_numbers(missing)
        if pool.failures:
            self.spawn(pool, numbers[0])
            pool.next_spawn_at = now + backoff_delay(pool.failures)
        else:
            for number in numbers:
                self.spawn(pool, number)

    def _retirees(self, active: List[WorkerInfo], count: int) -> List[WorkerInfo]:
        """The *count* workers to retire: idle ones first, then starting, then busy; the
        highest-numbered first within each."""
        rank: Dict[int, int] = {State.IDLE: 0, State.STARTING: 1, State.BUSY: 2}

        def order(w: WorkerInfo) -> Tuple[int, int]:
            state = self.scoreboard.state_code(w.slot) if w.ready else State.STARTING
            return rank.get(state, 1), -w.number

        return sorted(active, key=order)[:count]

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


def _resync(sem: Any, idle: int) -> None:
    """Bring the idle semaphore back to the scoreboard's count (a worker killed while
    idle never took its count back). Racing workers may leave it off by one until the
    next call; it only decides when a worker wakes the master."""
    diff = idle - sem.get_value()
    for _ in range(diff):
        sem.release()
    for _ in range(-diff):
        sem.acquire(False)

"""Watching workers for hangs and leaks: ``timeout`` and ``max_rss`` (DESIGN.md, "Hangs,
leaks and limits").

``timeout`` (seconds; gunicorn and unicorn have the same knob, and the same default of
30). What it bounds depends on the worker:

* a one-connection worker: time in handler code, measured from the scoreboard's
  ``CALL_SINCE`` cell, which the worker sets when it starts calling the handler and
  clears while it waits on its client (``Connection.recv``/``write``). A worker waiting
  on a silent client is never killed for it: ``idle_timeout`` is for that;
* an event-driven worker: the loop itself, which beats (``HEARTBEAT``) every quarter of
  ``timeout``; a handler that blocks the loop stops the beat;
* any worker stopped by SIGSTOP (its heartbeat stale and the kernel saying ``T``).

A worker past its ``timeout`` is sent SIGUSR2, on which its faulthandler writes the
Python stack of every thread to a memfd the master made for it; a moment later
(:data:`DUMP_WAIT`) the master reads that, logs ``worker.timeout`` with the ``stack``,
and sends SIGKILL; the pool replaces it at once. A stopped worker cannot dump: it is
killed without a stack.

``max_rss`` (MiB): checked once a second from each worker's resident set (psutil); a
worker above it is stopped gracefully (finishes the connection in hand, or, event-
driven, what it holds) and replaced, logged as ``worker.recycled`` with
``reason = "max_rss"``.
"""

from __future__ import annotations

import os
import signal
import time
from typing import Dict, Mapping, Optional, Tuple

from .log import Logger
from .pool import Pool, WorkerInfo, Workers
from .scoreboard import Scoreboard
from .signals import kill_quietly

#: Seconds between SIGUSR2 (dump your stack) and SIGKILL.
DUMP_WAIT = 0.2
#: Seconds between two checks that read /proc (``max_rss``, a stopped worker).
SLOW_EVERY = 1.0
#: Bytes of a stack dump kept for the event.
STACK_MAX = 32768


class Watchdog:
    """The master's eye on its workers (see the module docstring)."""

    def __init__(self, workers: Workers, scoreboard: Scoreboard, logger: Logger) -> None:
        self.workers = workers
        self.scoreboard = scoreboard
        self.logger = logger
        self._dumping: Dict[int, Tuple[float, WorkerInfo, str, float]] = {}  # pid -> (due, worker, why, limit)
        self._next_slow = 0.0  # monotonic seconds

    def check(self, pools: Mapping[str, Pool], now: float) -> None:
        """Kill what overran its ``timeout`` (in two steps: dump, then kill) and recycle
        what outgrew ``max_rss``. *now*: monotonic seconds."""
        self._finish_dumps(now)
        now_ns = time.monotonic_ns()
        slow = now >= self._next_slow  # reading /proc (RSS, a stopped process) once a second at most
        if slow:
            self._next_slow = now + SLOW_EVERY
        for pool in pools.values():
            cfg = pool.config
            for w in list(pool.workers.values()):
                if w.stopping or not w.ready or w.pid in self._dumping:
                    continue
                if cfg.timeout:
                    why = self._overdue(w, cfg.timeout, cfg.event_driven, now_ns, slow)
                    if why:
                        self._begin_kill(w, why, cfg.timeout, now)
                        continue
                if cfg.max_rss and slow:
                    self._check_rss(w, cfg.max_rss)

    def deadline(self) -> Optional[float]:
        """When :meth:`check` next has a dump to finish (monotonic seconds), if ever."""
        return min((due for due, _, _, _ in self._dumping.values()), default=None)

    # -- timeout --------------------------------------------------------------------------------

    def _overdue(self, w: WorkerInfo, timeout: float, event_driven: bool, now_ns: int, slow: bool) -> str:
        """Why *w* is past its timeout, or "" if it is not (*slow*: may read /proc)."""
        limit = int(timeout * 1e9)
        since = self.scoreboard.call_since(w.slot)
        if since and now_ns - since > limit:
            return f"in handler code for {(now_ns - since) / 1e9:.1f} s"
        beat = self.scoreboard.heartbeat(w.slot)
        if beat and now_ns - beat > limit:
            if event_driven:
                return f"its event loop has not turned for {(now_ns - beat) / 1e9:.1f} s"
            if slow and _stopped(w.pid):  # idle or waiting on a client is fine; stopped is not
                return "stopped (SIGSTOP)"
        return ""

    def _begin_kill(self, w: WorkerInfo, why: str, timeout: float, now: float) -> None:
        """Step 1: mark it stopping (its exit is no crash; the pool replaces it now) and ask
        for its stack, unless it is stopped and cannot answer."""
        w.stopping = True
        w.ended_for = "timeout"  # preforkd_worker_exits_total{reason="timeout"}
        dump = w.stack_fd >= 0 and not why.startswith("stopped")
        if dump:
            try:
                os.lseek(w.stack_fd, 0, os.SEEK_SET)  # the offset is shared with the worker
                os.ftruncate(w.stack_fd, 0)
            except OSError:
                dump = False
        if dump:
            kill_quietly(w.pid, signal.SIGUSR2)
        self._dumping[w.pid] = (now + (DUMP_WAIT if dump else 0.0), w, why, timeout)

    def _finish_dumps(self, now: float) -> None:
        """Step 2: read the stack, log ``worker.timeout``, SIGKILL."""
        for pid, (due, w, why, timeout) in list(self._dumping.items()):
            if now < due:
                continue
            del self._dumping[pid]
            stack = _read_stack(w.stack_fd) if w.stack_fd >= 0 and not why.startswith("stopped") else None
            self.logger.error("worker.timeout", service=w.service, worker=w.number, child=pid, timeout=timeout,
                              reason=why, stack=stack)
            kill_quietly(pid, signal.SIGKILL)
            if pid in self.workers.current or pid in self.workers.old:
                w.kill_at = now + DUMP_WAIT * 10  # a kill that somehow did not take is logged as worker.killed

    # -- max_rss ----------------------------------------------------------------------------------

    def _check_rss(self, w: WorkerInfo, max_rss_mib: int) -> None:
        rss = _rss(w.pid)
        if rss is not None and rss > max_rss_mib * 1048576:
            self.logger.info("worker.recycled", service=w.service, worker=w.number, child=w.pid, reason="max_rss",
                             rss_mib=round(rss / 1048576, 1), max_rss=max_rss_mib)
            self.workers.stop(w, graceful=True, reason="max_rss")


def _stopped(pid: int) -> bool:
    """Is *pid* stopped by a signal (state ``T``) or a tracer (``t``), per proc(5)?"""
    import psutil

    try:
        return psutil.Process(pid).status() in (psutil.STATUS_STOPPED, psutil.STATUS_TRACING_STOP)
    except psutil.Error:
        return False


def _rss(pid: int) -> Optional[int]:
    """*pid*'s resident set in bytes, or ``None`` if it is gone."""
    import psutil

    try:
        return int(psutil.Process(pid).memory_info().rss)
    except psutil.Error:
        return None


def _read_stack(fd: int) -> Optional[str]:
    """What the worker's faulthandler wrote (at most :data:`STACK_MAX` bytes), or ``None``."""
    try:
        data = os.pread(fd, STACK_MAX, 0)
    except OSError:
        return None
    text = data.decode("utf-8", "replace").strip()
    return text or None


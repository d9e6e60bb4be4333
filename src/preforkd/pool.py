"""Pool bookkeeping in the master, and the scoreboard shared with workers.

The scoreboard is one shared memory page set (a ``memfd``, so it survives
re-exec) of slots, one per live worker: its state and the number of connections
it has served. A worker updates its own slot with plain memory writes on every
connection (no system call); the master reads it for ``status``.
"""

from __future__ import annotations

import mmap
import os
import time
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional

from .config import ServiceConfig
from .listeners import Listener

STARTING, IDLE, BUSY, STOPPING = 0, 1, 2, 3
STATE_NAMES = {STARTING: "starting", IDLE: "idle", BUSY: "busy", STOPPING: "stopping"}

#: Back-off after a worker dies within MIN_UPTIME seconds of its start: the next
#: spawn in that pool waits BACKOFF_BASE * 2**(failures-1) seconds, at most BACKOFF_MAX.
MIN_UPTIME = 1.0
BACKOFF_BASE = 0.1
BACKOFF_MAX = 30.0


def kill_quietly(pid: int, sig: int) -> None:
    """``kill(pid, sig)``, ignoring a child that is already gone (or not ours)."""
    try:
        os.kill(pid, sig)
    except (ProcessLookupError, PermissionError):
        pass


class Scoreboard:
    """Per-worker state and connection counters in shared memory.

    :param fd: an inherited scoreboard memfd (re-exec), or ``None`` to create one.
    """

    SLOTS = 4096

    def __init__(self, fd: Optional[int] = None) -> None:
        size = self.SLOTS * 16
        if fd is None:
            if hasattr(os, "memfd_create"):
                fd = os.memfd_create("preforkd-scoreboard", os.MFD_CLOEXEC)
                os.ftruncate(fd, size)
        self.fd = fd
        if fd is None:
            self._mm = mmap.mmap(-1, size)
        else:
            self._mm = mmap.mmap(fd, size)
        self.cells = memoryview(self._mm).cast("Q")
        self._free: List[int] = list(range(self.SLOTS - 1, -1, -1))

    def claim(self, slot: Optional[int] = None) -> int:
        """Reserve a slot and zero it, or (``slot`` given) keep an inherited
        worker's slot as it is.

        :raises RuntimeError: when all :attr:`SLOTS` are in use.
        """
        if slot is None:
            if not self._free:
                raise RuntimeError("scoreboard full")
            slot = self._free.pop()
            self.cells[2 * slot] = STARTING
            self.cells[2 * slot + 1] = 0
        elif slot in self._free:
            self._free.remove(slot)
        return slot

    def release(self, slot: int) -> None:
        if slot not in self._free:
            self._free.append(slot)

    def state(self, slot: int) -> str:
        return STATE_NAMES.get(self.cells[2 * slot], "unknown")

    def served(self, slot: int) -> int:
        return int(self.cells[2 * slot + 1])


@dataclass
class WorkerInfo:
    """What the master knows of one worker process."""

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

    def to_state(self) -> Dict[str, Any]:
        return {"pid": self.pid, "service": self.service, "number": self.number,
                "generation": self.generation, "slot": self.slot, "ready": self.ready,
                "stopping": self.stopping, "started_wall": self.started_wall}

    @classmethod
    def from_state(cls, d: Dict[str, Any]) -> "WorkerInfo":
        uptime = max(0.0, time.time() - float(d.get("started_wall", time.time())))
        return cls(pid=int(d["pid"]), service=str(d["service"]), number=int(d["number"]),
                   generation=int(d["generation"]), slot=int(d["slot"]), ready=bool(d.get("ready")),
                   stopping=bool(d.get("stopping")), started=time.monotonic() - uptime,
                   started_wall=float(d.get("started_wall", time.time())))


@dataclass
class Pool:
    """One service's pool: its configuration, listeners, handler and workers
    (current generation only; older generations are kept by the master)."""

    config: ServiceConfig
    listeners: List[Listener]
    handler: Any
    kind: str
    target: int
    workers: Dict[int, WorkerInfo] = field(default_factory=dict)  # number -> worker
    failures: int = 0
    next_spawn_at: float = 0.0
    last_failure: str = ""

    @property
    def name(self) -> str:
        return self.config.name

    def missing_numbers(self) -> List[int]:
        return [n for n in range(1, self.target + 1) if n not in self.workers]

    def all_ready(self) -> bool:
        return not self.missing_numbers() and all(
            w.ready for n, w in self.workers.items() if n <= self.target)

    def record_exit(self, lifetime: float, clean: bool, reason: str, now: float) -> Optional[float]:
        """Update crash-loop accounting for a worker that exited.

        :returns: the back-off delay in seconds when this exit counts as a crash
            within :data:`MIN_UPTIME`, else ``None``.
        """
        if clean or lifetime >= MIN_UPTIME:
            self.failures = 0
            return None
        self.failures += 1
        self.last_failure = reason
        delay = min(BACKOFF_BASE * (2 ** (self.failures - 1)), BACKOFF_MAX)
        self.next_spawn_at = now + delay
        return delay

"""The scoreboard: per-worker state and counters in memory shared by master and workers.

One ``memfd`` (so that it survives the reload's ``execve``) mapped by the master before
it forks; every worker owns one *slot* of :data:`CELLS` unsigned 64-bit cells and
updates it with plain memory writes on every connection (no system call), and the
master reads it for ``status`` and the metrics (a counter of a worker that has exited
is added to the master's running total before its slot is reused:
:class:`preforkd.counters.Counters`). Apache's scoreboard and Net::Server's
waiting/processing reports do this job with more machinery.

This module is the one owner of the layout: both sides index a slot's cells with the
constants below.
"""

from __future__ import annotations

import enum
import mmap
import os
from typing import List, Optional

#: Cells (unsigned 64-bit) per slot: 64 bytes, one cache line, so that two workers never
#: write to the same line. Unused cells are room for later counters.
CELLS = 8
#: Cell indexes within a worker's slot.
STATE = 0   # a :class:`State`
SERVED = 1  # connections served by this worker since it started
ACTIVE = 2  # connections it holds now (0 or 1, up to worker_connections when event-driven)
#: Connections this worker ended because of an error, by kind (written on the error
#: path only: a connection that goes well costs nothing more).
ERRORS_PROTOCOL = 3  # line too long, not UTF-8
ERRORS_TIMEOUT = 4   # idle_timeout, line_timeout, a command program outliving idle_timeout
ERRORS_RESET = 5     # the client reset the connection or vanished
ERRORS_HANDLER = 6   # the handler raised; a command program could not be started

#: How a connection ended (the ``reason`` of ``connection.closed``) -> the error cell it
#: counts in; reasons not listed are not errors.
ERROR_CELL = {
    "line_too_long": ERRORS_PROTOCOL, "bad_encoding": ERRORS_PROTOCOL, "protocol_error": ERRORS_PROTOCOL,
    "idle_timeout": ERRORS_TIMEOUT, "line_timeout": ERRORS_TIMEOUT, "program_timeout": ERRORS_TIMEOUT,
    "reset": ERRORS_RESET,
    "handler_error": ERRORS_HANDLER, "exec_failed": ERRORS_HANDLER,
}
#: The per-worker counters, by the name the master's totals and the metrics use
#: (``preforkd_connections_total``, ``preforkd_connection_errors_total{reason}``).
COUNTER_CELLS = {"connections": SERVED, "errors_protocol": ERRORS_PROTOCOL, "errors_timeout": ERRORS_TIMEOUT,
                 "errors_reset": ERRORS_RESET, "errors_handler": ERRORS_HANDLER}
#: Cell indexes within a dynamic pool's own slot.
ARMED = 0   # 1: a worker that finds the pool short of spare workers wakes the master (and clears it)

#: Slots in all, old generations included (a pool has at most
#: :data:`preforkd.config.MAX_WORKERS` workers).
SLOTS = 4096


class State(enum.IntEnum):
    """What a worker is doing, as it writes it to ``cells[STATE]``. An event-driven
    worker is IDLE while it can take another connection and BUSY at its
    ``worker_connections``."""

    STARTING = 0  # forked, not yet accepting (the master's zeroing of the slot)
    IDLE = 1      # can take a connection
    BUSY = 2      # cannot: serving one (or its maximum)
    STOPPING = 3  # leaving its loop


class ScoreboardFull(RuntimeError):
    """Every slot is in use (a spawn is delayed; the master never crashes on it)."""


class Scoreboard:
    """The master's view: slot allocation and reads.

    :param fd: an inherited scoreboard ``memfd`` (after a re-exec), or ``None`` to
        create one (memfd_create(2), Linux).
    """

    def __init__(self, fd: Optional[int] = None) -> None:
        size = SLOTS * CELLS * 8
        if fd is None:
            fd = os.memfd_create("preforkd-scoreboard", os.MFD_CLOEXEC)
            os.ftruncate(fd, size)
        else:
            os.set_inheritable(fd, False)  # inherited across exec
        self.fd: int = fd
        self._mm = mmap.mmap(fd, size)
        self._cells = memoryview(self._mm).cast("Q")
        self._free: List[int] = list(range(SLOTS - 1, -1, -1))

    def claim(self, slot: Optional[int] = None) -> int:
        """Reserve a fresh slot, zeroed (state :attr:`State.STARTING`); or, with *slot*,
        keep an inherited worker's slot as it stands.

        :raises ScoreboardFull: when all :data:`SLOTS` are in use.
        """
        if slot is None:
            if not self._free:
                raise ScoreboardFull("scoreboard full")
            slot = self._free.pop()
            base = slot * CELLS
            self._cells[base:base + CELLS] = memoryview(bytes(CELLS * 8)).cast("Q")
        elif slot in self._free:
            self._free.remove(slot)
        return slot

    def release(self, slot: int) -> None:
        """Give back the slot of a reaped worker."""
        if slot not in self._free:
            self._free.append(slot)

    def cells(self, slot: int) -> memoryview:
        """The slot's cells, for the worker that owns it (index with :data:`STATE`...)."""
        return self._cells[slot * CELLS:(slot + 1) * CELLS]

    def state(self, slot: int) -> str:
        """The slot's state as a name (``"idle"``), ``"unknown"`` for a bad value."""
        try:
            return State(self._cells[slot * CELLS + STATE]).name.lower()
        except ValueError:
            return "unknown"

    def state_code(self, slot: int) -> int:
        """The slot's raw state (compare with :class:`State`)."""
        return int(self._cells[slot * CELLS + STATE])

    def active(self, slot: int) -> int:
        """Connections the slot's worker holds now."""
        return int(self._cells[slot * CELLS + ACTIVE])

    def served(self, slot: int) -> int:
        """Connections served by the slot's worker."""
        return int(self._cells[slot * CELLS + SERVED])

    def read(self, slot: int, cell: int) -> int:
        """One cell of the slot (a counter of :data:`COUNTER_CELLS`, say)."""
        return int(self._cells[slot * CELLS + cell])

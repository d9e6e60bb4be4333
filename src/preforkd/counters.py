"""The master's running totals: what must never go backwards, whatever happens to the
processes that did the counting.

A worker counts its connections (and the ones it ended on an error) in its scoreboard
slot (:data:`preforkd.scoreboard.COUNTER_CELLS`); when it exits, the master adds its
last values to the service's *retired* total before the slot is reused, so a total is
"retired + what live workers have counted" and survives workers dying. Worker exits
(by reason) and reloads (by result) are counted by the master itself. All of it crosses
the reload's ``execve`` in :attr:`preforkd.reexec.Handover.counters`, so a re-exec'd
master goes on from where the old image was: Prometheus counters stay monotonic
(a reset would read as a restart, and ``rate()`` would be wrong around every reload).
"""

from __future__ import annotations

from collections import defaultdict
from typing import DefaultDict, Dict, Iterable, Mapping, Tuple, Union

from .reexec import Count
from .scoreboard import COUNTER_CELLS, Scoreboard

#: Why a worker exited, as ``preforkd_worker_exits_total{reason}`` says it:
#: ``stopped`` (the master told it to: stop, reload, pool shrink; also when it had to
#: kill it for overrunning the stop timeout), ``max_requests`` (it recycled itself: exit
#: status 0 without being told), ``init_failed`` (``worker_init`` raised: exit status 3),
#: ``crashed`` (any other non-zero exit status), ``killed`` (a signal the master did not
#: send as part of a stop: the OOM killer, an operator's ``kill -9``).
EXIT_REASONS = ("stopped", "max_requests", "init_failed", "crashed", "killed")
#: ``preforkd_reloads_total{result}``.
RELOAD_RESULTS = ("ok", "failed")


def exit_reason(how: Mapping[str, Union[int, str, bool]], told_to_stop: bool, init_failed_code: int) -> str:
    """The :data:`EXIT_REASONS` entry for a worker reaped with *how*
    (:func:`preforkd.signals.describe_status`'s decoding of its ``waitpid`` status)."""
    if told_to_stop:
        return "stopped"
    if "signal" in how:
        return "killed"
    code = how.get("exit_code")
    if code == 0:
        return "max_requests"
    if code == init_failed_code:
        return "init_failed"
    return "crashed"


class Counters:
    """The master's totals (see the module docstring).

    :param inherited: what the previous image handed over (``Handover.counters``).
    """

    def __init__(self, inherited: Iterable[Count] = ()) -> None:
        #: (service, counter name of COUNTER_CELLS) -> sum over the service's exited workers
        self.retired: DefaultDict[Tuple[str, str], int] = defaultdict(int)
        #: (service, reason of EXIT_REASONS) -> workers that exited so
        self.exits: DefaultDict[Tuple[str, str], int] = defaultdict(int)
        #: result of RELOAD_RESULTS -> reloads that ended so
        self.reloads: DefaultDict[str, int] = defaultdict(int)
        tables: Dict[str, DefaultDict[Tuple[str, str], int]] = {"retired": self.retired, "worker_exits": self.exits}
        for count in inherited:
            if count.name in tables and len(count.labels) == 2:
                tables[count.name][(count.labels[0], count.labels[1])] += count.value
            elif count.name == "reloads" and len(count.labels) == 1:
                self.reloads[count.labels[0]] += count.value

    def worker_gone(self, service: str, slot: int, scoreboard: Scoreboard) -> None:
        """A reaped worker's slot is about to be released: keep its counters."""
        for name, cell in COUNTER_CELLS.items():
            value = scoreboard.read(slot, cell)
            if value:
                self.retired[(service, name)] += value

    def worker_exited(self, service: str, reason: str) -> None:
        """Count one worker exit of *service* for *reason* (:data:`EXIT_REASONS`)."""
        self.exits[(service, reason)] += 1

    def reload_ended(self, result: str) -> None:
        """Count one reload that ended with *result* (:data:`RELOAD_RESULTS`)."""
        self.reloads[result] += 1

    def total(self, service: str, name: str, live_slots: Iterable[int], scoreboard: Scoreboard) -> int:
        """Counter *name* of :data:`~preforkd.scoreboard.COUNTER_CELLS` for *service*:
        its exited workers' sum plus what its live workers (slots *live_slots*, of any
        generation) have counted so far."""
        cell = COUNTER_CELLS[name]
        return self.retired.get((service, name), 0) + sum(scoreboard.read(slot, cell) for slot in live_slots)

    def handover(self) -> Tuple[Count, ...]:
        """Everything, for the next image of the master."""
        out = [Count(name="retired", labels=key, value=v) for key, v in sorted(self.retired.items()) if v]
        out += [Count(name="worker_exits", labels=key, value=v) for key, v in sorted(self.exits.items()) if v]
        out += [Count(name="reloads", labels=(key,), value=v) for key, v in sorted(self.reloads.items()) if v]
        return tuple(out)

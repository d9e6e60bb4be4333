"""HAProxy's agent-check, answered by the master itself (``[supervisor] agent_check``).

HAProxy's configuration manual, section 5.2, "agent-check": the balancer connects to
``agent-port``, reads one ASCII line (up to the first CR or LF), and applies the words
in it: a percentage sets the server's weight relative to its configured one,
``ready`` / ``drain`` / ``maint`` its administrative state, ``up`` / ``down`` its
operational state. "Only the agent may revert its own actions": a server the agent
put in DRAIN stays there until the agent says ``ready``.

preforkd answers, by its state:

* ``up ready N%`` while serving: N is the spare capacity (:func:`spare_percent`),
  at least 1, so that a saturated host gets little new work but the farm never
  empties itself when every host is saturated at once;
* ``drain`` while draining (``preforkd drain``, or the ``drain_delay`` after TERM):
  HAProxy sends no new clients, those it has keep being served;
* ``down #stopping`` once the graceful stop has begun.

The master serves the line with a :class:`preforkd.endpoints.Endpoint` (role
``agent_check``, :func:`endpoint`): from its own selector, without ever blocking its
loop; the reply goes out as soon as the connection is accepted (the agent asks
nothing), then a half-close and a lingering read of whatever ``agent-send`` sent,
until HAProxy closes.
"""

from __future__ import annotations

import json
import selectors
from typing import Callable, Iterable, Optional

from .endpoints import Endpoint
from .listeners import Listener
from .log import Logger
from .pool import Pool
from .scoreboard import Scoreboard

#: Seconds an agent connection may stay open in all (HAProxy reads its line and
#: closes at once; its ``timeout check`` is usually a second or two).
AGENT_TIMEOUT = 5.0
#: Agent connections held at once (one per HAProxy per check interval is the norm).
AGENT_CLIENTS = 16


def spare_percent(pools: Iterable[Pool], scoreboard: Scoreboard) -> int:
    """The share of this host's capacity that is free, in percent (0-100).

    Capacity is, summed over the services, ``max_workers`` (or the floor TTIN raised
    above it) times ``worker_connections``: every connection a pool could hold at its
    largest. Used is the connections its workers hold now (the scoreboard's
    ``ACTIVE`` cells; workers told to stop are not counted, their connections are
    ending). A one-connection worker that is idle, a worker still starting and a
    worker a dynamic pool has yet to spawn are all spare.
    """
    capacity = used = 0
    for pool in pools:
        per = pool.config.worker_connections
        capacity += pool.ceiling * per
        used += sum(min(per, scoreboard.active(w.slot)) for w in pool.workers.values() if not w.stopping)
    if capacity <= 0:
        return 100
    return max(0, min(100, (100 * (capacity - used)) // capacity))


def reply(stopping: bool, draining: bool, spare: int) -> str:
    """The agent's line, CR LF not included (see the module's text)."""
    if stopping:
        return "down #stopping"
    if draining:
        return "drain"
    return f"up ready {max(1, spare)}%"


def endpoint(listener: Listener, selector: selectors.BaseSelector, answer: Callable[[], str],
             logger: Logger) -> Endpoint:
    """The agent-check endpoint on *listener*: *answer()* (one line, no CR LF) is sent
    with LF as soon as a connection is accepted. Call :meth:`Endpoint.start`."""

    def respond(_request: bytes) -> bytes:
        return (answer() + "\n").encode("ascii")

    return Endpoint("agent_check", listener, selector, respond, logger, terminators=(),
                    timeout=AGENT_TIMEOUT, max_clients=AGENT_CLIENTS)


class Drain:
    """Whether this host is out of the load balancer's rotation, and why: drained by the
    operator (``preforkd drain``; crosses reloads in the hand-over), or in the
    ``drain_delay`` that a TERM begins with (then ``stop_at`` is when the graceful stop
    begins, monotonic seconds).

    :param drained: the operator's drain, as the previous image handed it over.
    """

    def __init__(self, drained: bool, logger: Logger) -> None:
        self.drained = drained
        self.stop_at: Optional[float] = None
        self.logger = logger

    @property
    def draining(self) -> bool:
        """Out of rotation: the agent says ``drain``."""
        return self.drained or self.stop_at is not None

    def command(self, drain: bool) -> str:
        """The control commands ``drain`` / ``undrain``: returns the reply line (JSON)."""
        if drain != self.drained:
            self.drained = drain
            self.logger.info("supervisor.draining" if drain else "supervisor.undrained", reason="control")
        return json.dumps({"draining": self.draining})

    def before_stop(self, delay: float, now: float) -> None:
        """TERM with ``drain_delay``: drain for *delay* seconds, then stop (*now*: monotonic)."""
        self.stop_at = now + delay
        self.logger.info("supervisor.draining", reason="SIGTERM", drain_delay=delay)

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

:class:`AgentEndpoint` serves the line from inside the master's loop without ever
blocking it: the listening socket is non-blocking and watched by the master's
selector; each connection gets its line with one ``send`` (a reply of a few dozen
bytes always fits a fresh socket's empty send buffer) and is closed at once, after
discarding anything the agent sent (``agent-send``), so that the close is a FIN, not
a reset.
"""

from __future__ import annotations

import errno
import selectors
from typing import Callable, Iterable, Optional

from .listeners import Listener
from .pool import Pool
from .scoreboard import Scoreboard

#: Connections answered per wake-up at most (the master has other work too).
ACCEPT_BATCH = 64


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


class AgentEndpoint:
    """The agent-check listener, served in the master's loop.

    :param answer: what to say now (called once per connection; must not block).
    """

    def __init__(self, selector: selectors.BaseSelector, answer: Callable[[], str]) -> None:
        self.selector = selector
        self.answer = answer
        self.listener: Optional[Listener] = None

    def serve(self, listener: Listener) -> None:
        """Answer on *listener* (bound or adopted, non-blocking) from now on."""
        self.listener = listener
        listener.sock.setblocking(False)
        self.selector.register(listener.sock, selectors.EVENT_READ, self._on_accept)

    def _on_accept(self, _mask: int) -> None:
        assert self.listener is not None
        lsock = self.listener.sock
        for _ in range(ACCEPT_BATCH):
            try:
                conn, _addr = lsock.accept()
            except (BlockingIOError, InterruptedError):
                return
            except OSError as exc:
                if exc.errno in (errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM, errno.ECONNABORTED):
                    return  # HAProxy asks again at its next agent-inter
                raise
            with conn:
                conn.setblocking(False)
                try:
                    conn.send((self.answer() + "\n").encode("ascii"))
                    while conn.recv(4096):  # whatever agent-send sent: read, so the close is a FIN
                        pass
                except OSError:
                    pass  # gone already, or nothing (more) to read

    def close(self) -> None:
        """Stop answering and close the listener."""
        if self.listener is None:
            return
        try:
            self.selector.unregister(self.listener.sock)
        except (KeyError, ValueError):
            pass
        self.listener.close()
        self.listener = None

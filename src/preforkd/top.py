"""``preforkd top``: the status document's per-service totals, refreshed in the
terminal every second until Ctrl-C (the spirit of top(1), Apache's mod_status page
and unicorn's raindrops watcher, for an operator on the box).

Each refresh asks the master over the control socket, as ``status`` does (it costs the
workers nothing: the figures come from the shared-memory scoreboard), and shows per
service the connections per second since the previous refresh, the connections served,
the connections open, the busy, idle, starting and maximum workers and the listen queue.
On a terminal the screen is redrawn in place; otherwise each refresh is printed after
the previous one (``--iterations`` bounds the run, for scripts and tests).
"""

from __future__ import annotations

import sys
import time
from typing import IO, Any, Dict, List, Mapping, Optional

from .status import _duration

CLEAR = "\x1b[H\x1b[2J"  # cursor home, erase the screen (ECMA-48 CUP, ED)
HIDE_CURSOR, SHOW_CURSOR = "\x1b[?25l", "\x1b[?25h"
COLUMNS = ("SERVICE", "CONN/S", "SERVED", "OPEN", "BUSY", "IDLE", "START", "MAX", "QUEUE")


def frame(st: Mapping[str, Any], previous: Optional[Mapping[str, Any]], elapsed: float) -> List[str]:
    """The lines of one refresh of status document *st*; *previous* is the document of
    the refresh before, *elapsed* the seconds between the two (monotonic clock), from
    which connections per second are computed (``-`` on the first refresh)."""
    rel = st.get("reload") or {}
    head = (f"preforkd top: master pid {st['pid']}, {st['state']}, generation {st['generation']}, "
            f"up {_duration(st['uptime'])}")
    lines = [head, f"  last reload: {rel.get('state', 'none')}"
                   + (f" ({rel.get('error')})" if rel.get("state") == "failed" else ""), ""]
    before: Dict[str, int] = {}
    if previous is not None:
        before = {s["name"]: int(s.get("connections_total", 0)) for s in previous.get("services", [])}
    rows = [list(COLUMNS)]
    for svc in st.get("services", []):
        p = svc.get("pool") or {}
        total = int(svc.get("connections_total", 0))
        rate = "-"
        if svc["name"] in before and elapsed > 0:
            rate = f"{max(0, total - before[svc['name']]) / elapsed:.1f}"
        rows.append([svc["name"], rate, str(total), str(p.get("connections", 0)), str(p.get("busy", 0)),
                     str(p.get("idle", 0)), str(p.get("starting", 0)), str(p.get("max", 0)),
                     str(svc.get("listen_queue", 0))])
    widths = [max(len(r[i]) for r in rows) for i in range(len(COLUMNS))]
    for r in rows:
        lines.append("  ".join(r[0].ljust(widths[0]) if i == 0 else r[i].rjust(widths[i])
                               for i in range(len(COLUMNS))).rstrip())
    return lines


def run(control_socket: str, interval: float = 1.0, iterations: int = 0, out: Optional[IO[str]] = None) -> int:
    """Refresh every *interval* seconds until Ctrl-C or *iterations* refreshes (0 = no
    bound). Returns the exit status: 0, or 3 when the master does not answer at first
    (LSB "not running"); later, while it does not answer (a reload's re-exec), the
    screen says so and the refreshes go on."""
    from .control import query_status

    stream = out or sys.stdout
    tty = stream.isatty()
    previous: Optional[Dict[str, Any]] = None
    prev_at = 0.0
    count = 0
    try:
        if tty:
            stream.write(HIDE_CURSOR)
        while True:
            now = time.monotonic()
            try:
                st = query_status(control_socket, timeout=max(interval, 1.0))
            except (OSError, ValueError) as exc:
                if previous is None and count == 0:
                    print(f"preforkd: not running (control socket {control_socket}: {exc})", file=sys.stderr)
                    return 3
                lines = [f"preforkd top: the master does not answer on {control_socket} ({exc}); retrying"]
            else:
                lines = frame(st, previous, now - prev_at)
                previous, prev_at = st, now
            stream.write((CLEAR if tty else ("\n" if count else "")) + "\n".join(lines) + "\n")
            stream.flush()
            count += 1
            if iterations and count >= iterations:
                return 0
            time.sleep(max(0.0, interval - (time.monotonic() - now)))
    except KeyboardInterrupt:
        return 0
    finally:
        if tty:
            stream.write(SHOW_CURSOR)
            stream.flush()

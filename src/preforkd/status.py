"""The status document: what ``preforkd status`` shows, built by the master from what it
already knows (its pools, the scoreboard, the reload state) and rendered as text by
the CLI. Its fields are listed in ``docs/operations.md`` (Status); ``--json`` prints
it as it is.
"""

from __future__ import annotations

import time
from typing import TYPE_CHECKING, Any, Dict, Iterable, List, Mapping, Optional

from .counters import Counters
from .listeners import Listener, queue_stats
from .scoreboard import Scoreboard

if TYPE_CHECKING:  # pragma: no cover - the CLI imports this module for plural() alone
    from .pool import Pool, WorkerInfo


def document(*, pid: int, state: str, generation: int, started_wall: float, config: str, pidfile: str,
             reload: Dict[str, Any], pools: Mapping[str, Pool], old_workers: Iterable[WorkerInfo],
             scoreboard: Scoreboard, counters: Counters, endpoints: Iterable[Listener] = (),
             draining: bool = False, agent_check: Optional[Dict[str, Any]] = None) -> Dict[str, Any]:
    """The status document (a JSON-able dict).

    :param started_wall: the first start, wall clock (seconds since the epoch).
    :param old_workers: workers of earlier generations, still being retired.
    :param counters: the master's running totals (connections served by exited workers).
    :param endpoints: the listeners the master answers itself (``[metrics]``, the agent-check).
    :param draining: out of rotation (``preforkd drain``, or a TERM's ``drain_delay``).
    :param agent_check: ``{"address": bound, "reply": the line now}``, or ``None``.
    """
    old = list(old_workers)
    services = []
    for pool in pools.values():
        workers = [_worker(w, scoreboard) for _, w in sorted(pool.workers.items())]
        workers += [_worker(w, scoreboard) for w in old if w.service == pool.name]
        census = pool.census(scoreboard)
        slots = [w.slot for w in pool.workers.values()] + [w.slot for w in old if w.service == pool.name]
        listeners = [_listener(lst) for lst in pool.listeners]
        services.append({
            "name": pool.name,
            "handler": pool.config.handler or None,
            "command": list(pool.config.command) or None,
            "workers_target": pool.target,
            "pool": {"busy": census.busy, "idle": census.idle, "starting": census.starting,
                     "current": census.total, "target": pool.target, "min": pool.floor, "max": pool.ceiling,
                     "dynamic": pool.config.dynamic, "saturated": pool.saturated,
                     "worker_connections": pool.config.worker_connections,
                     "connections": sum(scoreboard.active(w.slot) for w in pool.workers.values())},
            "connections_total": counters.total(pool.name, "connections", slots, scoreboard),
            "listen_queue": sum(lst["queue"] or 0 for lst in listeners),
            "listeners": listeners,
            "backoff": {"failures": pool.failures, "last_failure": pool.last_failure} if pool.failures else None,
            "workers": workers,
        })
    return {
        "pid": pid,
        "state": state,
        "draining": draining,
        "agent_check": agent_check,
        "generation": generation,
        "uptime": round(time.time() - started_wall, 3),
        "started": started_wall,
        "config": config,
        "pidfile": pidfile or None,
        "reload": reload,
        "services": services,
        "endpoints": [{"role": lst.role, "configured": str(lst.address), "address": lst.bound, "origin": lst.origin}
                      for lst in endpoints],
        "retiring_workers": [_worker(w, scoreboard) for w in old if w.service not in pools],
    }


def _listener(lst: Listener) -> Dict[str, Any]:
    stats = queue_stats(lst.sock)
    return {"configured": str(lst.address), "address": lst.bound, "origin": lst.origin,
            "queue": stats[0] if stats else None, "queue_limit": stats[1] if stats else None}


def _worker(w: WorkerInfo, scoreboard: Scoreboard) -> Dict[str, Any]:
    state = "stopping" if w.stopping else (scoreboard.state(w.slot) if w.ready else "starting")
    call = scoreboard.call_since(w.slot)
    out: Dict[str, Any] = {"pid": w.pid, "number": w.number, "generation": w.generation, "state": state,
                           "connections": scoreboard.served(w.slot), "active": scoreboard.active(w.slot),
                           "in_call": round((time.monotonic_ns() - call) / 1e9, 3) if call else None,
                           "uptime": round(time.monotonic() - w.started, 3)}
    import psutil  # only status needs it; keeps the re-exec'd image's start-up short

    try:
        proc = psutil.Process(w.pid)
        with proc.oneshot():
            out["rss"] = proc.memory_info().rss
            cpu = proc.cpu_times()
            out["cpu"] = round(cpu.user + cpu.system, 3)
    except (psutil.Error, OSError):
        out["rss"] = None
        out["cpu"] = None
    return out


def _duration(seconds: float) -> str:
    s = int(seconds)
    d, s = divmod(s, 86400)
    h, s = divmod(s, 3600)
    m, s = divmod(s, 60)
    parts = [f"{d}d"] if d else []
    if d or h:
        parts.append(f"{h}h")
    if d or h or m:
        parts.append(f"{m}m")
    parts.append(f"{s}s")
    return " ".join(parts)


def render(st: Mapping[str, Any]) -> str:
    """The status document as the lines ``preforkd status`` prints."""
    drained = ", drained" if st.get("draining") and st["state"] != "draining" else ""
    lines: List[str] = [f"preforkd master pid {st['pid']}, {st['state']}{drained}, generation {st['generation']}, "
                        f"up {_duration(st['uptime'])}", f"  config {st['config']}"]
    agent = st.get("agent_check")
    if agent:
        lines.append(f"  agent-check {agent['address']}: {agent['reply']}")
    rel = st.get("reload") or {}
    if rel.get("state") == "failed":
        lines.append(f"  last reload failed: {rel.get('error')}")
    for svc in st["services"]:
        what = svc["handler"] or " ".join(svc["command"] or [])
        p = svc.get("pool") or {}
        size = plural(p.get("current", 0), "worker") + (f" of {p['min']}..{p['max']}" if p.get("dynamic") else "")
        per = f", up to {p['worker_connections']} connections each" if p.get("worker_connections", 1) > 1 else ""
        lines.append(f"  service {svc['name']} ({what}): {size} ({p.get('busy', 0)} busy, "
                     f"{p.get('idle', 0)} idle{', saturated' if p.get('saturated') else ''}){per}, "
                     f"{plural(p.get('connections', 0), 'connection')} open")
        lines.append(f"    totals: {svc.get('connections_total', 0)} connections served, {p.get('busy', 0)} busy / "
                     f"{p.get('idle', 0)} idle / {p.get('max', 0)} max workers, listen queue "
                     f"{svc.get('listen_queue', 0)}")
        for lst in svc["listeners"]:
            queue = f" (queue {lst['queue']} of {lst['queue_limit']})" if lst.get("queue") is not None else ""
            lines.append(f"    listen {lst['address']}{queue}")
        if svc.get("backoff"):
            lines.append(f"    back-off after {svc['backoff']['failures']} quick failures: "
                         f"{svc['backoff']['last_failure']}")
        for w in svc["workers"]:
            rss = f"{w['rss'] / 1048576:.1f} MiB" if w.get("rss") else "?"
            cpu = f"{w['cpu']:.2f} s" if w.get("cpu") is not None else "?"
            call = f", in handler for {w['in_call']:.1f} s" if w.get("in_call") else ""
            lines.append(f"    worker #{w['number']:<3} pid {w['pid']:<7} gen {w['generation']:<3} "
                         f"{w['state']:<9} open {w.get('active', 0):<5} served {w['connections']:<7} "
                         f"rss {rss:<10} cpu {cpu}{call}")
    for w in st.get("retiring_workers", []):
        lines.append(f"  retiring worker pid {w['pid']} gen {w['generation']} {w['state']}")
    for ep in st.get("endpoints", []):
        lines.append(f"  {ep['role']} endpoint {ep['address']}")
    return "\n".join(lines)


def plural(count: int, noun: str) -> str:
    """``"1 worker"``, ``"4 workers"``: *count* and the English noun (regular plurals)."""
    return f"{count} {noun}" if count == 1 else f"{count} {noun}s"


def serving_line(pools: Iterable[Pool]) -> str:
    """What a person at the terminal is told once every pool accepts, e.g.
    ``serving echo on tcp://127.0.0.1:7000 (4 workers)``: per service its bound
    addresses (real ports, for port-0 listeners) and its worker count."""
    parts = [f"{pool.name} on {', '.join(lst.bound for lst in pool.listeners)} ({plural(pool.target, 'worker')})"
             for pool in pools]
    return "serving " + "; ".join(parts)

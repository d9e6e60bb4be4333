"""What ``/metrics`` says: a prometheus-client custom collector that reads the master's
state at scrape time (no metric objects updated on the hot path, no threads).

Sources: the pools and the shared-memory scoreboard (workers by state, connections
open, per-worker counters), the master's running totals
(:class:`preforkd.counters.Counters`: exited workers' counters, exits by reason,
reloads by result), the reload state, and each listener's accept queue
(:func:`preforkd.listeners.queue_stats`, one ``getsockopt`` per TCP listener). The
names are the contract of ``docs/operations.md`` (Metrics), which lists them all;
``preforkd_workers``, ``preforkd_max_workers``, ``preforkd_connections_total``,
``preforkd_worker_exits_total``, ``preforkd_reloads_total``, ``preforkd_generation``
and ``preforkd_listen_queue`` are fixed by DESIGN.md. The format itself is
prometheus-client's (the Prometheus text exposition format 0.0.4, or OpenMetrics).

Imported by the master only (:class:`preforkd.metrics.Renderer`).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Iterator, List

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.process_collector import ProcessCollector
from prometheus_client.registry import CollectorRegistry

from .counters import EXIT_REASONS, RELOAD_RESULTS
from .listeners import queue_stats
from .reload import ReloadState

if TYPE_CHECKING:  # pragma: no cover
    from .master import Master

#: ``preforkd_connection_errors_total{reason}`` -> the counter of
#: :data:`preforkd.scoreboard.COUNTER_CELLS` it sums.
ERROR_REASONS = ("protocol", "timeout", "reset", "handler")


class MasterCollector:
    """Renders *master*'s state as metric families (prometheus-client's ``Collector``
    protocol: :meth:`collect`)."""

    def __init__(self, master: Master) -> None:
        self.master = master

    def collect(self) -> Iterator[Metric]:
        m = self.master
        board, counters = m.scoreboard, m.counters
        yield GaugeMetricFamily("preforkd_generation", "Generation of the running master image: 1 at start, "
                                "+1 per successful reload.", value=m.generation)
        yield GaugeMetricFamily("preforkd_start_time_seconds", "When the supervisor first started, Unix time "
                                "in seconds (unchanged by reloads).", value=m.started_wall)
        workers = GaugeMetricFamily(
            "preforkd_workers", "Worker processes by service and state: idle (can take a connection), busy "
            "(cannot: serving one, or worker_connections of them), starting (forked, not accepting yet), "
            "stopping (told to stop, or of an earlier generation being retired).", labels=["service", "state"])
        max_workers = GaugeMetricFamily("preforkd_max_workers", "Most workers the pool may have (max_workers, or "
                                        "the floor when TTIN raised it higher).", labels=["service"])
        min_workers = GaugeMetricFamily("preforkd_min_workers", "Workers the pool keeps at least (workers, moved "
                                        "by TTIN/TTOU).", labels=["service"])
        saturated = GaugeMetricFamily("preforkd_pool_saturated", "1 while the pool is at max_workers with no idle "
                                      "worker (pool.saturated), else 0.", labels=["service"])
        failures = GaugeMetricFamily("preforkd_pool_quick_failures", "Workers in a row that died within a second "
                                     "of starting: above 0 the pool is in crash-loop back-off.", labels=["service"])
        active = GaugeMetricFamily("preforkd_connections_active", "Connections open now, all generations.",
                                   labels=["service"])
        connections = CounterMetricFamily("preforkd_connections", "Connections served to the end (closed), all "
                                          "workers and generations since the first start.", labels=["service"])
        errors = CounterMetricFamily(
            "preforkd_connection_errors", "Connections ended by an error: protocol (line too long, not UTF-8), "
            "timeout (idle_timeout, line_timeout, a command outliving idle_timeout), reset (by the client), "
            "handler (it raised; a command could not start).", labels=["service", "reason"])
        exits = CounterMetricFamily(
            "preforkd_worker_exits", "Worker exits by reason: stopped (told to: stop, reload, shrink), "
            "max_requests (recycled itself), init_failed (worker_init raised), crashed (other non-zero exit), "
            "killed (a signal the master did not send).", labels=["service", "reason"])
        queue = GaugeMetricFamily("preforkd_listen_queue", "Connections waiting in the listener's accept queue "
                                  "(TCP listeners; Linux TCP_INFO): above 0 for long, the pool is too small.",
                                  labels=["listener", "service"])
        queue_limit = GaugeMetricFamily("preforkd_listen_queue_limit", "Size of the listener's accept queue (the "
                                        "backlog as capped by net.core.somaxconn); past it, connections are "
                                        "dropped.", labels=["listener", "service"])
        for pool in m.pools.values():
            name = pool.name
            old = [w for w in m.workers.old.values() if w.service == name]
            census = pool.census(board)
            stopping = sum(1 for w in pool.workers.values() if w.stopping) + len(old)
            for state, count in (("idle", census.idle), ("busy", census.busy), ("starting", census.starting),
                                 ("stopping", stopping)):
                workers.add_metric([name, state], count)
            max_workers.add_metric([name], pool.ceiling)
            min_workers.add_metric([name], pool.floor)
            saturated.add_metric([name], int(pool.saturated))
            failures.add_metric([name], pool.failures)
            slots: List[int] = [w.slot for w in pool.workers.values()] + [w.slot for w in old]
            active.add_metric([name], sum(board.active(slot) for slot in slots))
            connections.add_metric([name], counters.total(name, "connections", slots, board))
            for reason in ERROR_REASONS:
                errors.add_metric([name, reason], counters.total(name, "errors_" + reason, slots, board))
            for reason in EXIT_REASONS:
                exits.add_metric([name, reason], counters.exits.get((name, reason), 0))
            for lst in pool.listeners:
                stats = queue_stats(lst.sock)
                if stats is not None:
                    queue.add_metric([lst.bound, name], stats[0])
                    queue_limit.add_metric([lst.bound, name], stats[1])
        yield from (workers, max_workers, min_workers, saturated, failures, active, connections, errors, exits,
                    queue, queue_limit)
        reloads = CounterMetricFamily("preforkd_reloads", "Reloads (SIGHUP, preforkd reload) by result: ok (the "
                                      "new generation serves) or failed (the old one serves on).", labels=["result"])
        for result in RELOAD_RESULTS:
            reloads.add_metric([result], counters.reloads.get(result, 0))
        yield reloads
        yield GaugeMetricFamily("preforkd_config_last_reload_successful", "0 when the last reload failed (the "
                                "running configuration is not the file's), else 1.",
                                value=0 if m.reloader.state is ReloadState.FAILED else 1)


def registry(master: Master) -> CollectorRegistry:
    """A registry of *master*'s metrics and prometheus-client's ``process_*`` metrics of
    the master process (CPU seconds, memory, open descriptors and their limit)."""
    reg = CollectorRegistry(auto_describe=False)
    reg.register(MasterCollector(master))
    ProcessCollector(registry=reg)
    return reg

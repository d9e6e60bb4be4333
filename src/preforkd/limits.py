"""Process limits the master sets before it forks, inherited by every worker."""

from __future__ import annotations

import resource

from .config import Config
from .log import Logger


def raise_nofile_limit(config: Config, logger: Logger) -> None:
    """Raise the soft ``RLIMIT_NOFILE`` to the hard limit (nginx's
    ``worker_rlimit_nofile``; getrlimit(2)), inherited by every worker, so that an
    event-driven worker can hold thousands of connections; log the figure
    (``supervisor.limits``), with a warning when a service's ``worker_connections``
    cannot fit under it. Event-driven workers import their loop here, before ``fork``,
    so that they share its pages."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    wanted = hard if hard != resource.RLIM_INFINITY else max(soft, 1 << 20)
    if soft < wanted:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (wanted, hard))
        except (ValueError, OSError):
            wanted = soft
    logger.info("supervisor.limits", nofile=wanted, previous=soft, hard=hard)
    for svc in config.services:
        if svc.worker_connections + 64 > wanted:
            logger.warning("supervisor.limits_low", service=svc.name, worker_connections=svc.worker_connections,
                           nofile=wanted, error="worker_connections cannot all be open under the descriptor limit")
    if any(svc.event_driven for svc in config.services):
        # imported before forking, so that the workers share it
        from . import aioworker, eventloop  # noqa: F401

        eventloop.preload(config.supervisor.event_loop)

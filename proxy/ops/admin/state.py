"""What the admin layer says about each endpoint, computed the same way for /pool and /metrics.

An endpoint is in exactly one state, the first that applies: ``ejected`` (the outlier detector
took it out until some time), ``unhealthy`` (active health checks say NOT_SERVING), ``backoff``
(its last connect failed and the pool waits before the next), else ``healthy``.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Final

from proxy.core.endpoints import TargetPool

if TYPE_CHECKING:
    from proxy.runtime.server import ProxyServer

STATES: Final = ("healthy", "ejected", "unhealthy", "backoff")
ALL_SERVICES: Final = "*"  # the default pool serves every service no route names


def endpoint_state(server: ProxyServer, address: str, now: float) -> str:
    """``now`` is ``loop.time()``, the clock of ejections and connect backoff."""
    until = server.dispatcher.outliers.ejected_until(address)
    if until is not None and until > now:
        return "ejected"
    if health_of(server, address) == "not_serving":
        return "unhealthy"
    if not server.dispatcher.pool.usable(address, now):
        return "backoff"
    return "healthy"


def health_of(server: ProxyServer, address: str) -> str:
    """``serving``, ``not_serving``, ``unknown``, or ``off`` when health checks are off."""
    health = server.dispatcher.health
    return "off" if health is None else health.status(address)


def targets(server: ProxyServer) -> list[tuple[TargetPool, list[str]]]:
    """Each target pool with the services routed to it (``*`` for the default pool)."""
    router = server.dispatcher.router
    services: dict[str, list[str]] = {}
    for service, pool in router.routes.items():
        services.setdefault(pool.target, []).append(service)
    if router.default is not None:
        services.setdefault(router.default.target, []).insert(0, ALL_SERVICES)
    return [(pool, services.get(pool.target, [])) for pool in router.pools()]


def calls_by_backend(server: ProxyServer) -> dict[str, int]:
    """Finished calls per backend address, summed over paths and statuses."""
    totals: dict[str, int] = {}
    for (_path, backend, _status), row in server.dispatcher.stats.finished.items():
        totals[backend] = totals.get(backend, 0) + row[0]
    return totals

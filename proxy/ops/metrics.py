"""Prometheus metrics, built at scrape time from the server's own counters.

Nothing on the call path touches prometheus_client: calls bump plain ints in
``proxy.core.stats.CallStats`` and the pool, outlier, health and discovery objects keep their
own state. A scrape copies all of that in the event loop (a few milliseconds even with every
path slot taken), then builds the families and renders the text in a thread: that part costs
about 1 ms per hundred series, and in the loop a big scrape would stall every call for its
whole length. Each server gets its own ``CollectorRegistry`` (never the global one), so several
servers in one process (tests) do not clash, plus the standard ``process_*`` metrics.
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Final

from prometheus_client import CollectorRegistry, ProcessCollector, generate_latest
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)

from proxy import __version__
from proxy.build_info import build_info
from proxy.core.grpc_status import Status
from proxy.core.stats import DURATION_BUCKETS, NO_BACKEND, add_counts, split_path
from proxy.ops.admin.state import STATES, endpoint_state, targets

if TYPE_CHECKING:
    from proxy.runtime.server import ProxyServer

CONTENT_TYPE: Final = "text/plain; version=0.0.4; charset=utf-8"
NO_BACKEND_LABEL: Final = "none"
# Bucket bounds as prometheus_client prints them ("1.0", not "1").
_LE: Final = (*(repr(float(b)) for b in DURATION_BUCKETS), "+Inf")
# What the data path is; read once, at import (finding it imports the data path, done by then).
_BUILD: Final = build_info().kind


def status_label(code: int) -> str:
    """``UNAVAILABLE`` for 14; a code outside the spec stays a number."""
    try:
        return Status(code).name
    except ValueError:
        return str(code)


def _backend(address: str) -> str:
    return NO_BACKEND_LABEL if address == NO_BACKEND else address


@dataclass(frozen=True, slots=True)
class Snapshot:
    """Everything a scrape exports, copied out of the live objects (which only the event
    loop may read: they change under a reader in another thread)."""

    started: list[tuple[tuple[bytes, str], int]]
    finished: list[tuple[tuple[bytes, str, int], tuple[int, ...]]]
    durations: list[tuple[bytes, tuple[float, ...]]]
    in_flight: list[tuple[str, int]]
    pool_endpoints: list[tuple[str, dict[str, int]]]  # target -> endpoints per state
    ejections: list[tuple[str, int]]
    retries: list[tuple[str, int]]
    budget_refusals: int
    health_checks: list[tuple[tuple[str, str], int]]
    watches: list[tuple[str, bool, int, int]]  # target, watching, revision, relists
    invalid_values: list[tuple[tuple[str, str], int]]
    client_connections: int
    backend_connections: list[tuple[str, dict[str, int]]]  # address -> connections per state
    limits_tripped: list[tuple[str, int]]
    tls_handshake_failures: list[tuple[str, int]]
    overload: list[tuple[str, int]]
    buffered_bytes: list[tuple[str, int]]
    draining: bool
    started_at: float


def snapshot(server: ProxyServer) -> Snapshot:
    """Copy what a scrape needs; call it in the server's event loop."""
    stats = server.dispatcher.stats
    now = server.loop.time()
    pool_endpoints = []
    # Every backend of the pools, at 0 when idle: a series that vanishes at 0 reads as a gap.
    in_flight: dict[str, int] = {}
    for pool, _services in targets(server):
        counts = dict.fromkeys(STATES, 0)
        for endpoint in pool.snapshot.endpoints:
            counts[endpoint_state(server, endpoint.address, now)] += 1
            in_flight[endpoint.address] = 0
        pool_endpoints.append((pool.target, counts))
    in_flight.update(server.dispatcher.inflight)
    by_address: dict[str, dict[str, int]] = {}
    for ep in server.dispatcher.pool.endpoints.values():
        states = by_address.setdefault(ep.address, {})
        for conn in ep.conns:
            name = conn.state.name.lower()
            states[name] = states.get(name, 0) + 1
    backend_connections = list(by_address.items())
    discovery = server.discovery
    watches = discovery.watches if discovery is not None else {}
    invalid_values = []
    if watches:
        # Imported only here: a proxy without etcd does not load the etcd client.
        from proxy.discovery.values import invalid_values_total

        invalid_values = [(k, n) for k, n in invalid_values_total.items() if k[0] in watches]
    health = server.dispatcher.health
    return Snapshot(
        started=list(stats.started.items()),
        finished=[(key, tuple(row)) for key, row in stats.finished.items()],
        durations=[(path, tuple(hist)) for path, hist in stats.durations.items()],
        in_flight=list(in_flight.items()),
        pool_endpoints=pool_endpoints,
        ejections=list(server.dispatcher.outliers.ejections_total.items()),
        retries=list(stats.retries.items()),
        budget_refusals=stats.budget_refusals,
        health_checks=list(health.checks_total.items()) if health is not None else [],
        watches=[
            (target, w.state.value == "watching", w.last_revision, w.relists)
            for target, w in watches.items()
        ],
        invalid_values=invalid_values,
        client_connections=len(server.listeners.connections),
        backend_connections=backend_connections,
        limits_tripped=list(server.listeners.connection_errors.items()),
        tls_handshake_failures=list(server.listeners.tls_failures.items()),
        overload=list(server.listeners.overload.items()),
        buffered_bytes=[
            ("queued", server.listeners.meter.queued),
            ("granted", server.listeners.meter.granted),
        ],
        draining=server.draining,
        started_at=server.started_at,
    )


class ServerCollector:
    """A prometheus_client collector over one :class:`ProxyServer`.

    ``collect()`` reads the server, so it belongs in the event loop; :class:`ServerMetrics`
    takes the snapshot there and builds ``families(snapshot)`` in a thread.
    """

    def __init__(self, server: ProxyServer) -> None:
        self.server = server
        # Path -> (service, method), bounded like the paths themselves (CallStats.max_paths).
        self._split: dict[bytes, tuple[str, str]] = {}

    def collect(self) -> Iterator[Metric]:
        return iter(self.families(snapshot(self.server)))

    def families(self, snap: Snapshot) -> list[Metric]:
        return [
            *self._calls(snap),
            self._durations(snap),
            *_pools(snap),
            *_resilience(snap),
            *_discovery(snap),
            *_connections(snap),
            *_process(snap),
        ]

    def _labels(self, path: bytes) -> tuple[str, str]:
        split = self._split.get(path)
        if split is None:
            split = self._split[path] = split_path(path)
        return split

    def _calls(self, snap: Snapshot) -> Iterator[Metric]:
        started: dict[tuple[str, ...], float] = {}
        for (path, backend), n in snap.started:
            key = (*self._labels(path), _backend(backend))
            started[key] = started.get(key, 0) + n
        calls: dict[tuple[str, ...], float] = {}
        request_bytes: dict[tuple[str, ...], float] = {}
        response_bytes: dict[tuple[str, ...], float] = {}
        for (path, backend, status), (n, req, resp) in snap.finished:
            key = (*self._labels(path), _backend(backend))
            status_key = (*key, status_label(status))
            calls[status_key] = calls.get(status_key, 0) + n
            request_bytes[key] = request_bytes.get(key, 0) + req
            response_bytes[key] = response_bytes.get(key, 0) + resp
        by_call = ["service", "method", "backend"]
        yield _counter(
            "grpc_proxy_calls_started_total",
            "Calls started, by the backend first picked for them ('none': refused before any).",
            by_call,
            started.items(),
        )
        yield _counter(
            "grpc_proxy_calls_finished_total",
            "Calls finished, by the backend that last served them and their grpc-status.",
            [*by_call, "grpc_status"],
            calls.items(),
        )
        yield _counter(
            "grpc_proxy_request_bytes_total",
            "Request message bytes (gRPC frames) relayed from clients to backends.",
            by_call,
            request_bytes.items(),
        )
        yield _counter(
            "grpc_proxy_response_bytes_total",
            "Response message bytes (gRPC frames) relayed from backends to clients.",
            by_call,
            response_bytes.items(),
        )

    def _durations(self, snap: Snapshot) -> Metric:
        merged: dict[tuple[str, str], list[float]] = {}
        for path, hist in snap.durations:
            add_counts(merged, self._labels(path), hist)
        family = HistogramMetricFamily(
            "grpc_proxy_call_duration_seconds",
            "Call duration from the request headers to the end of the response.",
            labels=["service", "method"],
        )
        for key, counts in merged.items():
            # CallStats keeps per-bucket counts; Prometheus buckets are cumulative.
            buckets = []
            total = 0.0
            for le, count in zip(_LE, counts[:-1], strict=True):
                total += count
                buckets.append((le, total))
            family.add_metric(key, buckets, counts[-1])
        return family


def _pools(snap: Snapshot) -> Iterator[Metric]:
    yield _gauge(
        "grpc_proxy_calls_in_flight",
        "Calls in flight, by backend.",
        ["backend"],
        (((address,), n) for address, n in snap.in_flight),
    )
    yield _gauge(
        "grpc_proxy_pool_endpoints",
        "Endpoints in each target's pool, by state (healthy, ejected, unhealthy, backoff).",
        ["target", "state"],
        (
            ((target, state), n)
            for target, counts in snap.pool_endpoints
            for state, n in counts.items()
        ),
    )


def _resilience(snap: Snapshot) -> Iterator[Metric]:
    yield _counter(
        "grpc_proxy_ejections_total",
        "Times the outlier detector took a backend out of rotation.",
        ["backend"],
        (((address,), n) for address, n in snap.ejections),
    )
    yield _counter(
        "grpc_proxy_retries_total",
        "Calls replayed on another backend, by why the previous attempt failed.",
        ["reason"],
        (((reason,), n) for reason, n in snap.retries),
    )
    yield CounterMetricFamily(
        "grpc_proxy_retry_budget_refusals_total",
        "Retries not made because the retry budget was spent.",
        value=snap.budget_refusals,
    )
    yield _counter(
        "grpc_proxy_health_checks_total",
        "Active health checks, by backend and result.",
        ["backend", "result"],
        snap.health_checks,
    )


def _discovery(snap: Snapshot) -> Iterator[Metric]:
    yield _gauge(
        "grpc_proxy_etcd_watch_up",
        "1 while the target's etcd watch is open and applied, else 0.",
        ["target"],
        (((target,), 1 if up else 0) for target, up, _rev, _relists in snap.watches),
    )
    yield _gauge(
        "grpc_proxy_etcd_revision",
        "The etcd revision the target's pool reflects.",
        ["target"],
        (((target,), revision) for target, _up, revision, _relists in snap.watches),
    )
    yield _counter(
        "grpc_proxy_etcd_relists_total",
        "Full listings after the first (the watch was compacted or cancelled).",
        ["target"],
        (((target,), relists) for target, _up, _rev, relists in snap.watches),
    )
    yield _counter(
        "grpc_proxy_etcd_invalid_values_total",
        "etcd values skipped because they are not an endpoint, by target and kind.",
        ["target", "kind"],
        snap.invalid_values,
    )


def _connections(snap: Snapshot) -> Iterator[Metric]:
    yield GaugeMetricFamily(
        "grpc_proxy_client_connections",
        "Open client (downstream) HTTP/2 connections.",
        value=snap.client_connections,
    )
    yield _gauge(
        "grpc_proxy_backend_connections",
        "Open HTTP/2 connections to backends, by state.",
        ["backend", "state"],
        (
            ((address, state), n)
            for address, states in snap.backend_connections
            for state, n in states.items()
        ),
    )
    yield _counter(
        "grpc_proxy_limits_tripped_total",
        "Client connections closed for abuse (a flood limit) or an HTTP/2 protocol error.",
        ["limit"],
        (((limit,), n) for limit, n in snap.limits_tripped),
    )
    yield _counter(
        "grpc_proxy_tls_handshake_failures_total",
        "Client connections to a TLS listener closed before HTTP/2 began, by kind: timeout, "
        "not_tls, no_h2, no_client_certificate, bad_client_certificate, pending_limit, "
        "tls_error, closed.",
        ["kind"],
        (((kind,), n) for kind, n in snap.tls_handshake_failures),
    )
    yield _counter(
        "grpc_proxy_overload_total",
        "What the buffer budget made the proxy shed, by action: refused_stream (a new stream "
        "refused near the budget), stalled_stream (a stream reset after its client gave no "
        "window for --stalled-stream-timeout), goaway (a connection closed over the budget), "
        "idle_closed and connection_refused (at --max-connections), idle_timeout, "
        "preface_timeout.",
        ["action"],
        (((action,), n) for action, n in snap.overload),
    )
    yield _gauge(
        "grpc_proxy_buffered_bytes",
        "Response bytes held for clients against --buffer-budget: queued (waiting for a "
        "client's window) and granted (backend stream windows beyond the base).",
        ["kind"],
        (((kind,), n) for kind, n in snap.buffered_bytes),
    )


def _process(snap: Snapshot) -> Iterator[Metric]:
    yield GaugeMetricFamily(
        "grpc_proxy_draining",
        "1 once the proxy is draining (stopped accepting, finishing calls), else 0.",
        value=1 if snap.draining else 0,
    )
    yield GaugeMetricFamily(
        "grpc_proxy_start_time_seconds",
        "When the proxy started, in seconds since the Unix epoch.",
        value=snap.started_at,
    )
    yield _gauge(
        "grpc_proxy_build_info",
        "Always 1; the version and the build of the data path (compiled, pure) in labels.",
        ["version", "build"],
        [((__version__, _BUILD), 1)],
    )


def _counter(
    name: str,
    documentation: str,
    labels: list[str],
    rows: Iterable[tuple[tuple[str, ...], float]],
) -> Metric:
    family = CounterMetricFamily(name, documentation, labels=labels)
    for key, value in rows:
        family.add_metric(key, value)
    return family


def _gauge(
    name: str,
    documentation: str,
    labels: list[str],
    rows: Iterable[tuple[tuple[str, ...], float]],
) -> Metric:
    family = GaugeMetricFamily(name, documentation, labels=labels)
    for key, value in rows:
        family.add_metric(key, value)
    return family


class _Families:
    def __init__(self, families: list[Metric]) -> None:
        self.families = families

    def collect(self) -> list[Metric]:
        return self.families


class ServerMetrics:
    """The /metrics of one server: its families and this process's ``process_*`` metrics.

    ``registry`` (its own, not the global one) renders in the caller's thread, which must be
    the event loop's; :meth:`render` does the heavy part in a thread.
    """

    def __init__(self, server: ProxyServer) -> None:
        self.collector = ServerCollector(server)
        self.process = ProcessCollector(registry=None)
        self.registry = CollectorRegistry()
        self.registry.register(self.collector)
        self.registry.register(self.process)

    async def render(self) -> bytes:
        snap = snapshot(self.collector.server)
        return await asyncio.to_thread(self._render, snap)

    def _render(self, snap: Snapshot) -> bytes:
        registry = CollectorRegistry()
        registry.register(_Families(self.collector.families(snap)))
        registry.register(self.process)
        return generate_latest(registry)

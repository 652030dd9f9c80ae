"""The Prometheus collector: families and labels after real traffic through an in-process
proxy (real grpcio backends and client), and exact figures from counters set by
hand."""

from __future__ import annotations

import asyncio

import grpc
import pytest
from admin_support import AdminProxy, admin_proxy
from backends import EchoBackendsFactory
from prometheus_client.parser import text_string_to_metric_families
from prometheus_client.samples import Sample

from proxy.core.endpoints import TargetPool, static_pool
from proxy.core.routing import Router
from proxy.core.stats import DURATION_BUCKETS, OTHER_PATH
from proxy_examples.echo import echo_pb2, echo_pb2_grpc

UNARY = {"service": "echo.Echo", "method": "UnaryEcho"}


async def scrape(proxy: AdminProxy) -> dict[str, list[Sample]]:
    """Every sample of a /metrics scrape, by family name, through the HTTP endpoint."""
    reply = await proxy.get("/metrics")
    assert reply.status == 200
    families: dict[str, list[Sample]] = {}
    for family in text_string_to_metric_families(reply.body.decode()):
        families.setdefault(family.name, []).extend(family.samples)
    return families


def value(samples: list[Sample], name: str, **labels: str) -> float:
    """The one sample called ``name`` whose labels include ``labels``."""
    found = [s for s in samples if s.name == name and labels.items() <= s.labels.items()]
    assert len(found) == 1, f"{name}{labels}: {found}"
    return found[0].value


def total(samples: list[Sample], name: str, **labels: str) -> float:
    return sum(s.value for s in samples if s.name == name and labels.items() <= s.labels.items())


async def test_families_and_labels_after_traffic(echo_backends: EchoBackendsFactory) -> None:
    b0, b1 = echo_backends(2)
    nowhere = TargetPool("nowhere", "no endpoints registered under 'nowhere/' in etcd")
    router = Router(
        default=static_pool("static", [b0.address, b1.address]), routes={"pkg.Gone": nowhere}
    )
    async with admin_proxy(router) as proxy:
        channel = proxy.channel()
        stub = echo_pb2_grpc.EchoStub(channel)
        for _ in range(6):
            await stub.UnaryEcho(echo_pb2.EchoRequest(message="hello"), timeout=5)
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await stub.UnaryEcho(
                echo_pb2.EchoRequest(), metadata=(("x-echo-status", "5"),), timeout=5
            )
        assert err.value.code() == grpc.StatusCode.NOT_FOUND
        # A service routed to an empty pool: refused before any backend was picked.
        gone = channel.unary_unary("/pkg.Gone/Do")
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await gone(b"", timeout=5)
        assert err.value.code() == grpc.StatusCode.UNAVAILABLE
        # A call held by a backend while we scrape.
        slow = stub.UnaryEcho(
            echo_pb2.EchoRequest(), metadata=(("x-echo-delay-ms", "10000"),), timeout=20
        )
        for _ in range(200):
            if proxy.server.dispatcher.inflight:
                break
            await asyncio.sleep(0.02)
        (busy,) = proxy.server.dispatcher.inflight

        m = await scrape(proxy)

        started = m["grpc_proxy_calls_started"]
        assert {s.labels["backend"] for s in started} == {b0.address, b1.address, "none"}
        assert total(started, "grpc_proxy_calls_started_total", **UNARY) == 8
        assert value(started, "grpc_proxy_calls_started_total", backend="none") == 1
        assert {(s.labels["service"], s.labels["method"]) for s in started} == {
            ("echo.Echo", "UnaryEcho"),
            ("pkg.Gone", "Do"),
        }

        finished = m["grpc_proxy_calls_finished"]
        name = "grpc_proxy_calls_finished_total"
        assert total(finished, name, grpc_status="OK", **UNARY) == 6
        assert total(finished, name, grpc_status="NOT_FOUND", **UNARY) == 1
        assert value(finished, name, backend="none", grpc_status="UNAVAILABLE") == 1
        # Round robin: both backends served some.
        assert total(finished, name, backend=b0.address) > 0
        assert total(finished, name, backend=b1.address) > 0

        for family in ("grpc_proxy_request_bytes", "grpc_proxy_response_bytes"):
            assert total(m[family], family + "_total", **UNARY) >= 6 * len("hello")

        hist = m["grpc_proxy_call_duration_seconds"]
        buckets = [
            s
            for s in hist
            if s.name.endswith("_bucket") and s.labels == {**UNARY, "le": s.labels["le"]}
        ]
        assert [s.labels["le"] for s in buckets] == [
            *(repr(float(b)) for b in DURATION_BUCKETS),
            "+Inf",
        ]
        counts = [s.value for s in buckets]
        assert counts == sorted(counts), "buckets must be cumulative"
        assert counts[-1] == value(hist, "grpc_proxy_call_duration_seconds_count", **UNARY) == 7
        assert value(hist, "grpc_proxy_call_duration_seconds_sum", **UNARY) > 0

        in_flight = {s.labels["backend"]: s.value for s in m["grpc_proxy_calls_in_flight"]}
        idle = ({b0.address, b1.address} - {busy}).pop()
        assert in_flight == {busy: 1, idle: 0}  # an idle backend is there, at 0

        endpoints = m["grpc_proxy_pool_endpoints"]
        pool = {(s.labels["target"], s.labels["state"]): s.value for s in endpoints}
        assert pool == {
            ("static", "healthy"): 2,
            ("static", "ejected"): 0,
            ("static", "unhealthy"): 0,
            ("static", "backoff"): 0,
            ("nowhere", "healthy"): 0,
            ("nowhere", "ejected"): 0,
            ("nowhere", "unhealthy"): 0,
            ("nowhere", "backoff"): 0,
        }

        assert value(m["grpc_proxy_client_connections"], "grpc_proxy_client_connections") == 1
        conns = m["grpc_proxy_backend_connections"]
        assert total(conns, "grpc_proxy_backend_connections", state="ready") >= 2
        assert {s.labels["backend"] for s in conns} == {b0.address, b1.address}
        assert value(m["grpc_proxy_draining"], "grpc_proxy_draining") == 0
        start = value(m["grpc_proxy_start_time_seconds"], "grpc_proxy_start_time_seconds")
        assert start == proxy.server.started_at
        assert "process_resident_memory_bytes" in m
        # Present with no samples yet, so dashboards see the family.
        for family in (
            "grpc_proxy_ejections",
            "grpc_proxy_retries",
            "grpc_proxy_retry_budget_refusals",
            "grpc_proxy_health_checks",
            "grpc_proxy_etcd_watch_up",
            "grpc_proxy_etcd_revision",
            "grpc_proxy_limits_tripped",
        ):
            assert family in m, family

        slow.cancel()


async def test_retries_and_connect_failures_are_counted(
    echo_backends: EchoBackendsFactory,
) -> None:
    (backend,) = echo_backends(1)
    dead = "127.0.0.1:1"
    async with admin_proxy(Router(default=static_pool("static", [dead, backend.address]))) as p:
        stub = echo_pb2_grpc.EchoStub(p.channel())
        for _ in range(4):
            await stub.UnaryEcho(echo_pb2.EchoRequest(), timeout=5)
        m = await scrape(p)
    # Every call that first picked the dead backend was replayed on the live one.
    started = value(m["grpc_proxy_calls_started"], "grpc_proxy_calls_started_total", backend=dead)
    assert started >= 1
    assert total(m["grpc_proxy_retries"], "grpc_proxy_retries_total") >= started
    finished = m["grpc_proxy_calls_finished"]
    assert total(finished, "grpc_proxy_calls_finished_total", backend=backend.address) == 4
    assert total(finished, "grpc_proxy_calls_finished_total", backend=dead) == 0


async def test_exact_figures_from_the_counters(echo_backends: EchoBackendsFactory) -> None:
    """Counters set directly (no traffic): the conversion itself, figure by figure."""
    (backend,) = echo_backends(1)
    async with admin_proxy(Router(default=static_pool("static", [backend.address]))) as proxy:
        stats = proxy.server.dispatcher.stats
        a = backend.address
        stats.call_started(b"/pkg.Svc/Get", a)
        stats.call_started(b"/pkg.Svc/Get", a)
        stats.call_finished(b"/pkg.Svc/Get", a, 0, 0.0004, 10, 20)  # first bucket
        stats.call_finished(b"/pkg.Svc/Get", a, 0, 0.001, 1, 2)  # le="0.001" (inclusive)
        stats.call_finished(b"/pkg.Svc/Get", a, 14, 100.0, 0, 0)  # over the last bucket
        stats.call_finished(b"/pkg.Svc/Get", a, 99, 0.2, 0, 0)  # a code outside the spec
        stats.call_finished(b"not-grpc", "", 12, 0.0, 0, 0)
        stats.retried("refused_stream")
        stats.retried("refused_stream")
        stats.budget_refused()
        proxy.server.listeners.connection_errors["max_rst_rate"] += 3
        m = await scrape(proxy)

    get = {"service": "pkg.Svc", "method": "Get"}
    assert value(m["grpc_proxy_calls_started"], "grpc_proxy_calls_started_total", **get) == 2
    finished = m["grpc_proxy_calls_finished"]
    name = "grpc_proxy_calls_finished_total"
    assert value(finished, name, grpc_status="OK", **get) == 2
    assert value(finished, name, grpc_status="UNAVAILABLE", **get) == 1
    assert value(finished, name, grpc_status="99", **get) == 1
    not_grpc = {"service": "", "method": "not-grpc", "backend": "none"}
    assert value(finished, name, grpc_status="UNIMPLEMENTED", **not_grpc) == 1
    req = m["grpc_proxy_request_bytes"]
    assert value(req, "grpc_proxy_request_bytes_total", **get) == 11
    assert value(m["grpc_proxy_response_bytes"], "grpc_proxy_response_bytes_total", **get) == 22

    hist = m["grpc_proxy_call_duration_seconds"]
    buckets = {
        s.labels["le"]: s.value
        for s in hist
        if s.name.endswith("_bucket") and s.labels["service"] == "pkg.Svc"
    }
    assert buckets["0.0005"] == 1
    assert buckets["0.001"] == 2
    assert buckets["0.1"] == 2
    assert buckets["0.25"] == 3
    assert buckets["60.0"] == 3
    assert buckets["+Inf"] == 4
    assert value(hist, "grpc_proxy_call_duration_seconds_sum", **get) == pytest.approx(100.2014)

    assert value(m["grpc_proxy_retries"], "grpc_proxy_retries_total", reason="refused_stream") == 2
    refusals = m["grpc_proxy_retry_budget_refusals"]
    assert value(refusals, "grpc_proxy_retry_budget_refusals_total") == 1
    tripped = m["grpc_proxy_limits_tripped"]
    assert value(tripped, "grpc_proxy_limits_tripped_total", limit="max_rst_rate") == 3


async def test_paths_past_the_cap_and_colliding_labels(echo_backends: EchoBackendsFactory) -> None:
    (backend,) = echo_backends(1)
    async with admin_proxy(Router(default=static_pool("static", [backend.address]))) as proxy:
        stats = proxy.server.dispatcher.stats
        stats.max_paths = 1
        stats.call_finished(b"/a.S/M", "", 0, 0.01, 0, 0)
        stats.call_finished(b"/b.S/M", "", 0, 0.01, 0, 0)  # past the cap: counted as other
        stats.call_finished(OTHER_PATH, "", 0, 0.01, 0, 0)  # a real call to /other/other
        m = await scrape(proxy)
    finished = m["grpc_proxy_calls_finished"]
    other = {"service": "other", "method": "other"}
    # Both land on the same labels and are added up, not exported twice.
    assert value(finished, "grpc_proxy_calls_finished_total", **other) == 2
    hist = m["grpc_proxy_call_duration_seconds"]
    assert value(hist, "grpc_proxy_call_duration_seconds_count", **other) == 2

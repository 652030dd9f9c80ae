"""The admin page really renders: headless Chromium loads ``/``, its script fetches ``/pool``
and fills a row per endpoint, with the state each is in. The proxy runs in process so that
backends can be put in each state (connect backoff, ejected, unhealthy) for long enough to be
seen; test_admin_process.py renders the page of a proxy process."""

from __future__ import annotations

import re
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import grpc
from admin_support import AdminProxy, admin_proxy, eventually, start_sick_backend
from backends import EchoBackendsFactory
from page_support import chromium, dump_dom, parse_page, screenshot
from prometheus_client.parser import text_string_to_metric_families

from proxy.core.backoff import Backoff
from proxy.core.endpoints import static_pool
from proxy.core.options import HealthCheckOptions, ServerOptions
from proxy.core.routing import Router
from proxy.runtime.health_checks import ActiveHealth
from proxy_examples.echo import echo_pb2, echo_pb2_grpc

DEAD = "127.0.0.1:1"  # nothing listens on port 1: connects are refused


async def test_page_shows_each_endpoint_and_its_state(
    echo_backends: EchoBackendsFactory, tmp_path: Path
) -> None:
    chromium()  # skip (or fail under CI) before starting anything
    b0, b1 = echo_backends(2)
    router = Router(default=static_pool("static", [DEAD, b0.address, b1.address]))
    async with admin_proxy(router) as proxy:
        # One refused connect puts the dead backend in backoff for the whole test.
        proxy.server.dispatcher.pool.backoff = Backoff(initial_s=600.0, max_s=600.0)
        stub = echo_pb2_grpc.EchoStub(proxy.channel())
        for _ in range(6):
            await stub.UnaryEcho(echo_pb2.EchoRequest(message="x"), timeout=5)
        pool = (await proxy.get("/pool")).json()
        states = {e["address"]: e["state"] for e in pool["workers"][0]["targets"][0]["endpoints"]}
        assert states == {DEAD: "backoff", b0.address: "healthy", b1.address: "healthy"}

        url = f"http://127.0.0.1:{proxy.admin_port}/"
        html = await dump_dom(url, tmp_path / "profile")
        await screenshot(url, tmp_path / "profile", tmp_path / "admin-page.png")

        # Nothing ran since: the counts the page shows are /pool's.
        calls = {
            e["address"]: e["calls_total"] for e in pool["workers"][0]["targets"][0]["endpoints"]
        }
        assert calls == {
            e["address"]: e["calls_total"]
            for e in (await proxy.get("/pool")).json()["workers"][0]["targets"][0]["endpoints"]
        }

    dom = parse_page(html)
    assert dom.texts["error"] == ""
    assert dom.texts["workers"] == "1"
    assert dom.texts["ready"] == "yes"
    assert dom.texts["updated"] != "never"
    assert dom.targets == ["static"]
    rows = {row.attrs["data-address"]: row for row in dom.rows}
    assert set(rows) == {DEAD, b0.address, b1.address}
    for address, row in rows.items():
        endpoint, state, in_flight, rate, total, ejected_until, health = row.cells
        assert endpoint == address
        assert state == row.attrs["data-state"] == states[address]
        assert row.classes == [f"state state-{states[address]}"]  # what colours it
        assert in_flight == "0"
        # A figure, not the placeholder: the page polled at least twice.
        assert re.fullmatch(r"\d+\.\d", rate), rate
        assert int(total) == calls[address]
        assert ejected_until == ""
        assert health == "off"
    assert calls[b0.address] + calls[b1.address] == 6
    assert (tmp_path / "admin-page.png").stat().st_size > 0


async def test_page_and_pool_show_ejected_and_unhealthy(
    echo_backends: EchoBackendsFactory, tmp_path: Path
) -> None:
    """A backend that answers UNAVAILABLE is ejected, one whose health check says NOT_SERVING
    is unhealthy: /pool, /metrics and the page agree."""
    chromium()
    good, bad = echo_backends(2)
    bad.set_health(False)
    sick_server, sick = start_sick_backend()
    options = ServerOptions(
        outlier_consecutive_failures=2,
        outlier_base_ejection=600.0,
        outlier_max_ejection=600.0,
        outlier_max_ejection_percent=100.0,
    )
    router = Router(default=static_pool("static", [sick, good.address, bad.address]))
    try:
        async with admin_proxy(router, options=options) as proxy:
            checks = ActiveHealth(
                lambda: proxy.server.dispatcher.router.pools(), HealthCheckOptions(interval=0.2)
            )
            proxy.server.dispatcher.health = checks
            checks.start()
            try:
                await eventually(lambda: _endpoints(proxy, lambda e: e["health"] != "unknown"))
                stub = echo_pb2_grpc.EchoStub(proxy.channel())
                failed = 0
                for _ in range(20):
                    try:
                        await stub.UnaryEcho(echo_pb2.EchoRequest(message="x"), timeout=5)
                    except grpc.aio.AioRpcError as exc:
                        assert exc.code() == grpc.StatusCode.UNAVAILABLE
                        failed += 1
                    if failed == 2:
                        break
                before = time.time()
                endpoints = await _endpoints(proxy, lambda e: True)
                assert endpoints is not None
                by_address = {e["address"]: e for e in endpoints}
                assert {a: (e["state"], e["health"]) for a, e in by_address.items()} == {
                    sick: ("ejected", "serving"),
                    good.address: ("healthy", "serving"),
                    bad.address: ("unhealthy", "not_serving"),
                }
                ejected = by_address[sick]
                assert ejected["times_ejected"] == 1
                # Reported as Unix time: now plus the 600 s base ejection.
                assert before + 590 < ejected["ejected_until"] < before + 610
                assert ejected["calls_total"] == 2
                assert by_address[bad.address]["calls_total"] == 0

                metrics = (await proxy.get("/metrics")).body.decode()
                families = {f.name: f for f in text_string_to_metric_families(metrics)}
                ejections = families["grpc_proxy_ejections"].samples
                assert [(s.labels, s.value) for s in ejections] == [({"backend": sick}, 1.0)]
                pool = {
                    s.labels["state"]: s.value
                    for s in families["grpc_proxy_pool_endpoints"].samples
                }
                assert pool == {"healthy": 1, "ejected": 1, "unhealthy": 1, "backoff": 0}
                not_serving = [
                    s.value
                    for s in families["grpc_proxy_health_checks"].samples
                    if s.labels == {"backend": bad.address, "result": "not_serving"}
                ]
                assert not_serving and not_serving[0] >= 1

                html = await dump_dom(f"http://127.0.0.1:{proxy.admin_port}/", tmp_path / "p")
            finally:
                await checks.close()
    finally:
        sick_server.stop(None).wait()

    rows = {row.attrs["data-address"]: row for row in parse_page(html).rows}
    assert {a: (r.attrs["data-state"], r.cells[6]) for a, r in rows.items()} == {
        sick: ("ejected", "serving"),
        good.address: ("healthy", "serving"),
        bad.address: ("unhealthy", "not_serving"),
    }
    assert rows[sick].classes == ["state state-ejected"]
    assert rows[sick].cells[5].endswith("(1\u00d7)")  # ejected until HH:MM:SS (1x)
    assert rows[good.address].cells[5] == ""


async def _endpoints(
    proxy: AdminProxy, want: Callable[[dict[str, Any]], bool]
) -> list[dict[str, Any]] | None:
    """/pool's endpoints of the one target, when ``want`` holds for each."""
    (target,) = (await proxy.get("/pool")).json()["workers"][0]["targets"]
    endpoints: list[dict[str, Any]] = target["endpoints"]
    return endpoints if all(want(e) for e in endpoints) else None

"""The admin endpoint of a real proxy process (``serve --admin``) in front of a real etcd and a
real backend: /pool and /metrics follow an etcd change and the traffic, with active health
checks on, and the page renders the pool in headless Chromium."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import grpc
from admin_support import Reply, eventually, http_request
from backends import EchoBackendsFactory, free_port
from etcd_support import EtcdServer
from page_support import chromium, dump_dom, parse_page
from prometheus_client.parser import text_string_to_metric_families
from proxy_process import start_proxy

from proxy.discovery.registration import endpoint_value
from proxy_examples.echo import echo_pb2, echo_pb2_grpc


async def get(port: int, path: str) -> Reply:
    return await http_request(port, f"GET {path} HTTP/1.1\r\nHost: x\r\n\r\n")


def samples(text: bytes, name: str) -> list[tuple[dict[str, str], float]]:
    return [
        (s.labels, s.value)
        for family in text_string_to_metric_families(text.decode())
        for s in family.samples
        if s.name == name
    ]


async def test_admin_of_a_proxy_process(
    etcd: EtcdServer, echo_backends: EchoBackendsFactory, tmp_path: Path
) -> None:
    chromium()  # skip (or fail under CI) before starting anything
    (backend,) = echo_backends(1)
    key = f"echo/{backend.address}"
    admin = free_port()
    args = ["serve", "--etcd", etcd.endpoint, "--target", "echo", "--admin", f"127.0.0.1:{admin}"]
    args += ["--health-check", "--health-check-interval", "0.2"]
    with start_proxy(args) as (_proc, port):

        async def target(want: Any = None) -> dict[str, Any] | None:
            reply = await get(admin, "/pool")
            assert reply.status == 200, reply
            (worker,) = reply.json()["workers"]
            (found,) = worker["targets"]
            return dict(found) if want is None or want(found) else None

        empty = await eventually(lambda: target(lambda t: t["watch"]["state"] == "watching"))
        assert empty["endpoints"] == []
        assert (await get(admin, "/readyz")).status == 200  # listed, if empty
        assert (await get(admin, "/healthz")).status == 200

        etcd.etcdctl("put", key, endpoint_value(backend.address, {"id": "b0"}))
        found = await eventually(
            lambda: target(lambda t: t["endpoints"] and t["endpoints"][0]["health"] == "serving")
        )
        (endpoint,) = found["endpoints"]
        assert (endpoint["address"], endpoint["key"], endpoint["state"]) == (
            backend.address,
            key,
            "healthy",
        )
        assert endpoint["metadata"] == {"id": "b0"}
        revision = found["watch"]["revision"]
        assert revision > 0
        assert (await get(admin, "/readyz")).status == 200

        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
            stub = echo_pb2_grpc.EchoStub(channel)
            for _ in range(3):
                await stub.UnaryEcho(echo_pb2.EchoRequest(message="hi"), timeout=5)
        found = await target()
        assert found is not None
        assert found["endpoints"][0]["calls_total"] == 3

        metrics = await get(admin, "/metrics")
        assert metrics.status == 200
        finished = samples(metrics.body, "grpc_proxy_calls_finished_total")
        assert finished == [
            (
                {
                    "service": "echo.Echo",
                    "method": "UnaryEcho",
                    "backend": backend.address,
                    "grpc_status": "OK",
                },
                3.0,
            )
        ]
        assert samples(metrics.body, "grpc_proxy_etcd_watch_up") == [({"target": "echo"}, 1.0)]
        assert samples(metrics.body, "grpc_proxy_etcd_revision") == [
            ({"target": "echo"}, float(revision))
        ]
        checks = {
            labels["result"]: n
            for labels, n in samples(metrics.body, "grpc_proxy_health_checks_total")
            if labels["backend"] == backend.address
        }
        assert checks["serving"] >= 1
        pool = {
            labels["state"]: n
            for labels, n in samples(metrics.body, "grpc_proxy_pool_endpoints")
            if labels["target"] == "echo"
        }
        assert pool == {"healthy": 1, "ejected": 0, "unhealthy": 0, "backoff": 0}

        dom = parse_page(await dump_dom(f"http://127.0.0.1:{admin}/", tmp_path / "profile"))
        assert dom.texts["error"] == ""
        assert (dom.texts["ready"], dom.texts["reason"]) == ("yes", "")
        (row,) = dom.rows
        assert row.attrs["data-address"] == backend.address
        assert row.attrs["data-state"] == "healthy"
        assert row.cells[0] == backend.address
        assert row.cells[4] == "3"  # calls total
        assert row.cells[6] == "serving"  # health

        etcd.etcdctl("del", key)
        gone = await eventually(lambda: target(lambda t: not t["endpoints"]))
        assert gone["watch"]["revision"] > revision
        assert (await get(admin, "/readyz")).status == 200
        dom = parse_page(await dump_dom(f"http://127.0.0.1:{admin}/", tmp_path / "profile"))
        assert dom.rows == []
        assert dom.targets == ["echo"]
        assert dom.texts["ready"] == "yes"  # listed, if empty
        assert json.loads((await get(admin, "/pool")).body)["workers"][0]["ready"] is True


async def test_page_of_two_workers(echo_backends: EchoBackendsFactory, tmp_path: Path) -> None:
    """With --workers 2 the supervisor's /pool carries both workers; the page merges their
    rows for one backend (counts add up)."""
    chromium()
    (backend,) = echo_backends(1)
    admin = free_port()
    args = [
        "serve",
        "--backend",
        backend.address,
        "--workers",
        "2",
        "--admin",
        f"127.0.0.1:{admin}",
    ]
    with start_proxy(args) as (_proc, port):

        async def both_ready() -> list[dict[str, Any]] | None:
            reply = await get(admin, "/pool")
            workers: list[dict[str, Any]] = reply.json()["workers"]
            return workers if len(workers) == 2 and all(w["ready"] for w in workers) else None

        await eventually(both_ready)
        # Each call on a connection of its own, so that both workers get some (the kernel
        # spreads connections over the SO_REUSEPORT sockets).
        for _ in range(20):
            async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
                await echo_pb2_grpc.EchoStub(channel).UnaryEcho(echo_pb2.EchoRequest(), timeout=5)
        workers = await both_ready()
        assert workers is not None
        per_worker = [w["targets"][0]["endpoints"][0]["calls_total"] for w in workers]
        assert sum(per_worker) == 20

        dom = parse_page(await dump_dom(f"http://127.0.0.1:{admin}/", tmp_path / "profile"))
    assert dom.texts["workers"] == "2"
    assert dom.texts["ready"] == "yes"
    (row,) = dom.rows
    assert row.attrs["data-address"] == backend.address
    assert row.cells[4] == "20"
    # Both workers see it healthy: no "(1/2)" qualifier.
    assert row.cells[1] == "healthy"

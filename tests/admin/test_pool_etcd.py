"""/pool follows etcd: a backend registered under the target shows up with its key, metadata
and traffic; deleting its key takes it out. A real etcd, a real echo backend, the proxy and its
admin endpoint in process (the subprocess variant is in test_admin_process.py)."""

from __future__ import annotations

from typing import Any

from admin_support import AdminProxy, admin_proxy, eventually
from backends import EchoBackendsFactory
from etcd_support import FAST, EtcdServer
from prometheus_client.parser import text_string_to_metric_families

from proxy.core.routing import Router
from proxy.discovery.etcd import EtcdClient
from proxy.discovery.etcd_model import EtcdConfig
from proxy.discovery.registration import endpoint_value
from proxy.discovery.watcher import EtcdDiscovery
from proxy_examples.echo import echo_pb2, echo_pb2_grpc


async def test_pool_follows_etcd(etcd: EtcdServer, echo_backends: EchoBackendsFactory) -> None:
    (backend,) = echo_backends(1)
    key = f"echo/{backend.address}"
    async with (
        EtcdClient(EtcdConfig((etcd.endpoint,))) as client,
        EtcdDiscovery(etcd.endpoint, ["echo"], backoff=FAST) as discovery,
    ):
        await discovery.wait_ready(10)
        router = Router(default=discovery.pool("echo"))
        async with admin_proxy(router, discovery) as proxy:

            async def target() -> dict[str, Any]:
                reply = await proxy.get("/pool")
                assert reply.status == 200
                (worker,) = reply.json()["workers"]
                (found,) = worker["targets"]
                assert found["target"] == "echo"
                assert found["services"] == ["*"]
                return dict(found)

            async def watching() -> dict[str, Any] | None:
                found = await target()
                return found if found["watch"]["state"] == "watching" else None

            empty = await eventually(watching)
            assert empty["endpoints"] == []
            # Listed and empty: ready (its calls get UNAVAILABLE saying the pool is empty).
            readyz = await proxy.get("/readyz")
            assert (readyz.status, readyz.body) == (200, b"ready\n")

            revision = await client.put(key, endpoint_value(backend.address, {"id": "one"}))

            async def registered() -> dict[str, Any] | None:
                found = await target()
                return found if found["endpoints"] else None

            found = await eventually(registered)
            assert found["watch"] == {"state": "watching", "revision": revision}
            (endpoint,) = found["endpoints"]
            assert endpoint == {
                "address": backend.address,
                "key": key,
                "metadata": {"id": "one"},
                "state": "healthy",
                "in_flight": 0,
                "calls_total": 0,
                "ejected_until": None,
                "times_ejected": 0,
                "health": "off",
                "connections": 0,
            }
            assert (await proxy.get("/readyz")).status == 200

            stub = echo_pb2_grpc.EchoStub(proxy.channel())
            for _ in range(3):
                await stub.UnaryEcho(echo_pb2.EchoRequest(message="hi"), timeout=5)
            (endpoint,) = (await target())["endpoints"]
            assert endpoint["calls_total"] == 3
            assert endpoint["connections"] == 1

            # A value that is no endpoint: skipped, and counted.
            bad_json = {"target": "echo", "kind": "bad_json"}
            before = await metric(proxy, "grpc_proxy_etcd_invalid_values_total", bad_json)
            await client.put("echo/broken", "{not json")

            async def counted() -> float | None:
                n = await metric(proxy, "grpc_proxy_etcd_invalid_values_total", bad_json)
                return n if n == before + 1 else None

            await eventually(counted)
            assert [e["key"] for e in (await target())["endpoints"]] == [key]
            up = await metric(proxy, "grpc_proxy_etcd_watch_up", {"target": "echo"})
            assert up == 1

            await client.delete(key)

            async def gone() -> dict[str, Any] | None:
                found = await target()
                return None if found["endpoints"] else found

            found = await eventually(gone)
            assert found["watch"]["revision"] > revision
            assert (await proxy.get("/readyz")).status == 200


async def metric(proxy: AdminProxy, name: str, labels: dict[str, str]) -> float:
    """The sample ``name{labels}`` of a scrape (0 when absent, as Prometheus reads it)."""
    text = (await proxy.get("/metrics")).body.decode()
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == name and sample.labels == labels:
                return sample.value
    return 0.0

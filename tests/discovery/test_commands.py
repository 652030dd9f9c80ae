"""The discovery commands (``endpoints``, ``register``) as the CLI calls them, and uvloop."""

from __future__ import annotations

import asyncio
import io
import signal

import pytest
import uvloop
from backends import free_port
from etcd_support import EtcdServer, eventually

from proxy.discovery.commands import parse_metadata, run_endpoints, run_register
from proxy.discovery.etcd import EtcdClient
from proxy.discovery.etcd_model import EtcdConfig
from proxy.discovery.registration import Registration
from proxy.discovery.watcher import EtcdDiscovery

pytestmark = pytest.mark.needs_tool("etcd", "etcdctl")


def test_parse_metadata() -> None:
    assert parse_metadata('{"id": 1}') == {"id": 1}
    assert parse_metadata('"x"') == "x"
    assert parse_metadata("null") is None
    with pytest.raises(ValueError, match="--metadata must be JSON"):
        parse_metadata("x")


async def test_endpoints_prints_the_pool_and_flags_invalid_values(
    etcd: EtcdServer, etcd_client: EtcdClient
) -> None:
    await etcd_client.put("svc/a", '{"Op":0,"Addr":"10.0.0.1:1","Metadata":{"id":1}}')
    await etcd_client.put("svc/b", "10.0.0.2:2")
    await etcd_client.put("svc/c", '{"Op":1,"Addr":"10.0.0.3:3"}')
    out = io.StringIO()
    assert await run_endpoints(etcd.endpoint, "svc", out=out) == 0
    lines = out.getvalue().splitlines()
    assert lines[0].startswith("svc: 2 endpoints (etcd revision ")
    assert lines[1:] == [
        '  10.0.0.1:1  key=svc/a  metadata={"id":1}',
        "  10.0.0.2:2  key=svc/b",
        "  INVALID svc/c: Op 1 is not add (0)",
    ]


async def test_endpoints_fails_with_the_reason_when_etcd_is_unreachable() -> None:
    out, err = io.StringIO(), io.StringIO()
    port = free_port()
    assert await run_endpoints(f"127.0.0.1:{port}", "svc", out=out, err=err) == 1
    assert out.getvalue() == ""
    assert "cannot list 'svc/': etcd unreachable (" in err.getvalue()
    assert str(port) in err.getvalue()


async def test_endpoints_watch_prints_every_change_until_sigint(
    etcd: EtcdServer, etcd_client: EtcdClient
) -> None:
    out = io.StringIO()
    task = asyncio.create_task(run_endpoints(etcd.endpoint, "svc", watch=True, out=out))
    await eventually(lambda: "no endpoints registered" in out.getvalue(), "the first print")
    await etcd_client.put("svc/a", "10.0.0.1:1")
    await eventually(lambda: "svc: 1 endpoint (" in out.getvalue(), "the change")
    signal.raise_signal(signal.SIGINT)
    assert await asyncio.wait_for(task, 5) == 0


async def test_register_until_sigint(etcd: EtcdServer, etcd_client: EtcdClient) -> None:
    out = io.StringIO()
    task = asyncio.create_task(
        run_register(etcd.endpoint, "svc", "127.0.0.1:7001", ttl=5, metadata={"id": 2}, out=out)
    )
    await eventually(lambda: "registered svc/127.0.0.1:7001" in out.getvalue(), "registration")
    _, kvs = await etcd_client.get_prefix("svc/")
    assert [kv.value for kv in kvs] == [b'{"Op":0,"Addr":"127.0.0.1:7001","Metadata":{"id":2}}']
    signal.raise_signal(signal.SIGTERM)
    assert await asyncio.wait_for(task, 5) == 0
    assert "deregistered svc/127.0.0.1:7001" in out.getvalue()
    assert (await etcd_client.get_prefix("svc/"))[1] == []


def test_discovery_and_registration_under_uvloop(etcd: EtcdServer) -> None:
    """The proxy runs on uvloop; grpc.aio and our tasks must work there too."""

    async def scenario() -> None:
        async with (
            EtcdClient(EtcdConfig((etcd.endpoint,))) as client,
            EtcdDiscovery(etcd.endpoint, ["svc"]) as discovery,
        ):
            pool = discovery.pool("svc")
            assert await discovery.wait_ready(5)
            async with Registration(client.config, "svc", "127.0.0.1:7002", ttl=2):
                await eventually(lambda: pool.snapshot.addresses == {"127.0.0.1:7002"}, "add")
            await eventually(lambda: not pool.snapshot.addresses, "the deregistration")
            await client.put("svc/x", "10.0.0.9:9")
            await eventually(lambda: pool.snapshot.addresses == {"10.0.0.9:9"}, "a put")

    uvloop.run(scenario())

"""Registration against a real etcd: the Go value format, keep-alive, re-registration, exit."""

from __future__ import annotations

import asyncio
import json

import pytest
from etcd_support import FAST, EtcdServer, eventually

from proxy.discovery.etcd import EtcdClient
from proxy.discovery.etcd_model import EtcdUnavailable
from proxy.discovery.registration import Registration, endpoint_value
from proxy.discovery.watcher import EtcdDiscovery

pytestmark = pytest.mark.needs_tool("etcd", "etcdctl")


def test_the_value_is_what_go_endpoints_manager_writes() -> None:
    assert endpoint_value("10.0.0.7:50051") == '{"Op":0,"Addr":"10.0.0.7:50051","Metadata":null}'
    assert json.loads(endpoint_value("h:1", {"id": 1})) == {
        "Op": 0,
        "Addr": "h:1",
        "Metadata": {"id": 1},
    }


def test_bad_arguments_are_refused() -> None:
    with pytest.raises(ValueError, match="no port"):
        Registration("127.0.0.1:1", "svc", "10.0.0.7")
    with pytest.raises(ValueError, match="ttl"):
        Registration("127.0.0.1:1", "svc", "10.0.0.7:1", ttl=0)


async def test_registers_keeps_alive_and_deregisters(
    etcd: EtcdServer, etcd_client: EtcdClient
) -> None:
    async with Registration(etcd.endpoint, "svc", "127.0.0.1:5001", ttl=2, metadata="m1") as reg:
        _, kvs = await etcd_client.get_prefix("svc/")
        assert [(kv.key, kv.value) for kv in kvs] == [
            ("svc/127.0.0.1:5001", b'{"Op":0,"Addr":"127.0.0.1:5001","Metadata":"m1"}')
        ]
        assert reg.lease is not None and kvs[0].lease == reg.lease.id
        await asyncio.sleep(3)  # longer than the TTL: only the keep-alive holds the key
        _, kvs = await etcd_client.get_prefix("svc/")
        assert [kv.key for kv in kvs] == ["svc/127.0.0.1:5001"]
        assert reg.registrations == 1
        lease_id = reg.lease.id
    assert await etcd_client.get_prefix("svc/") == (pytest.approx(0, abs=10**9), [])
    assert not await etcd_client.revoke_lease(lease_id)  # already revoked on exit


async def test_registers_again_after_the_lease_is_revoked(
    etcd: EtcdServer, etcd_client: EtcdClient
) -> None:
    async with (
        EtcdDiscovery(etcd.endpoint, ["svc"], backoff=FAST) as discovery,
        Registration(etcd.endpoint, "svc", "127.0.0.1:5002", ttl=3, backoff=FAST) as reg,
    ):
        pool = discovery.pool("svc")
        await eventually(lambda: pool.snapshot.addresses == {"127.0.0.1:5002"}, "registration")
        assert reg.lease is not None
        first = reg.lease.id
        # Revoked from outside, as `etcdctl lease revoke` would: the key goes with it. The
        # pool may not be seen empty: the delete and the new put can share a watch batch.
        etcd.etcdctl("lease", "revoke", f"{first:x}")
        await eventually(lambda: reg.registrations == 2, "re-registration", timeout=4)
        assert reg.lease is not None and reg.lease.id != first
        await eventually(lambda: pool.snapshot.addresses == {"127.0.0.1:5002"}, "the pool")
        _, kvs = await etcd_client.get_prefix("svc/")
        assert [kv.lease for kv in kvs] == [reg.lease.id]


async def test_entering_fails_when_etcd_is_unreachable(etcd_servers: object) -> None:
    from backends import free_port

    with pytest.raises(EtcdUnavailable):
        async with Registration(f"127.0.0.1:{free_port()}", "svc", "127.0.0.1:1"):
            pass

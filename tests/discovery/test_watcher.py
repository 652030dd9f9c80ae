"""EtcdDiscovery against a real etcd: formats, prefixes, changes, leases, outages, compaction."""

from __future__ import annotations

import asyncio
import json

import pytest
from etcd_support import FAST, EtcdFactory, EtcdServer, Forwarder, eventually

from proxy.core.endpoints import TargetPool
from proxy.discovery.etcd import EtcdClient
from proxy.discovery.values import invalid_values_total
from proxy.discovery.watcher import EtcdDiscovery, TargetWatch, WatchState

pytestmark = pytest.mark.needs_tool("etcd", "etcdctl")


def go_value(addr: str, metadata: object = None, op: int = 0) -> str:
    """What Go's endpoints.Manager writes."""
    return json.dumps({"Op": op, "Addr": addr, "Metadata": metadata}, separators=(",", ":"))


def addresses(pool: TargetPool) -> set[str]:
    return set(pool.snapshot.addresses)


async def test_every_value_format_including_etcdctl_puts(
    etcd: EtcdServer, etcd_client: EtcdClient
) -> None:
    await etcd_client.put("svc/10.0.0.7:50051", go_value("10.0.0.7:50051", {"id": 3}))
    # Seed 004's commands, with a port (the docs' "1.2.3.4" alone is flagged, below).
    etcd.etcdctl("put", "svc/1.2.3.4:80", '{"Addr":"1.2.3.4:80","Metadata":"..."}')
    etcd.etcdctl("put", "svc/1.2.3.4", '{"Addr":"1.2.3.4","Metadata":"..."}')
    etcd.etcdctl("put", "svc/bare", "10.0.0.9:9000")
    etcd.etcdctl("put", "svc/v6", "[2001:db8::7]:50051")

    async with EtcdDiscovery(etcd.endpoint, ["svc"], backoff=FAST) as discovery:
        assert await discovery.wait_ready(5)
        pool = discovery.pool("svc")
        watch = discovery.watches["svc"]
        assert addresses(pool) == {
            "10.0.0.7:50051",
            "1.2.3.4:80",
            "10.0.0.9:9000",
            "[2001:db8::7]:50051",
        }
        by_key = {ep.key: ep for ep in pool.snapshot.endpoints}
        assert by_key["svc/10.0.0.7:50051"].metadata == {"id": 3}
        assert by_key["svc/1.2.3.4:80"].metadata == "..."
        assert by_key["svc/bare"].metadata is None
        assert set(watch.invalid) == {"svc/1.2.3.4"}
        assert "no port" in watch.invalid["svc/1.2.3.4"].reason
        await eventually(lambda: watch.state is WatchState.WATCHING, "the watch")
        assert watch.last_revision >= 5


async def test_only_keys_under_name_slash_belong_to_the_target(
    etcd: EtcdServer, etcd_client: EtcdClient
) -> None:
    await etcd_client.put("svc/a", "10.0.0.1:1")
    await etcd_client.put("svc-v2/a", "10.0.0.2:2")
    await etcd_client.put("svc", "10.0.0.3:3")
    await etcd_client.put("svcx/a", "10.0.0.4:4")
    async with EtcdDiscovery(etcd.endpoint, ["svc", "svc-v2"], backoff=FAST) as discovery:
        assert await discovery.wait_ready(5)
        assert addresses(discovery.pool("svc")) == {"10.0.0.1:1"}
        assert addresses(discovery.pool("svc-v2")) == {"10.0.0.2:2"}
        # Watched changes follow the same rule.
        await etcd_client.put("svc-v2/b", "10.0.0.5:5")
        await etcd_client.put("svc/b", "10.0.0.6:6")
        svc = discovery.pool("svc")
        v2 = discovery.pool("svc-v2")
        # Two targets, two watches: each change arrives on its own watch, in any order.
        await eventually(lambda: "10.0.0.6:6" in addresses(svc), "svc/b")
        await eventually(lambda: "10.0.0.5:5" in addresses(v2), "svc-v2/b")
        assert addresses(svc) == {"10.0.0.1:1", "10.0.0.6:6"}
        assert addresses(v2) == {"10.0.0.2:2", "10.0.0.5:5"}


async def test_a_key_added_changed_and_deleted_reaches_the_pool_by_watch_events(
    etcd: EtcdServer, etcd_client: EtcdClient
) -> None:
    async with EtcdDiscovery(etcd.endpoint, ["svc"], backoff=FAST) as discovery:
        assert await discovery.wait_ready(5)
        pool = discovery.pool("svc")
        assert pool.snapshot.endpoints == ()
        assert "no endpoints registered under 'svc/'" in pool.snapshot.reason
        watch = discovery.watches["svc"]
        await eventually(lambda: watch.state is WatchState.WATCHING, "the watch")

        relists = watch.relists
        await etcd_client.put("svc/a", go_value("10.0.0.1:1"))
        await eventually(lambda: addresses(pool) == {"10.0.0.1:1"}, "the add")
        revision = await etcd_client.put("svc/a", go_value("10.0.0.2:2"))
        await eventually(lambda: addresses(pool) == {"10.0.0.2:2"}, "the change")
        assert watch.last_revision == revision
        await etcd_client.delete("svc/a")
        await eventually(lambda: addresses(pool) == set(), "the delete")
        assert "no endpoints registered" in pool.snapshot.reason
        # Each change came as a watch event (how fast is loadtest.etcd_latency's to measure),
        # not from listing the prefix again.
        assert (watch.relists, watch.state) == (relists, WatchState.WATCHING)


async def test_a_lease_left_to_expire_removes_the_endpoint(
    etcd: EtcdServer, etcd_client: EtcdClient
) -> None:
    async with EtcdDiscovery(etcd.endpoint, ["svc"], backoff=FAST) as discovery:
        assert await discovery.wait_ready(5)
        pool = discovery.pool("svc")
        # As in seed 004: etcdctl lease grant, then put --lease, and no keep-alive.
        lease = etcd.etcdctl("lease", "grant", "2").split()[1]
        etcd.etcdctl("put", f"--lease={lease}", "svc/1.2.3.4:80", '{"Addr":"1.2.3.4:80"}')
        await eventually(lambda: addresses(pool) == {"1.2.3.4:80"}, "the leased key")
        await eventually(lambda: addresses(pool) == set(), "the lease expiry", timeout=6)


async def test_etcd_stopped_keeps_the_pool_and_restarted_resumes(
    etcd: EtcdServer, etcd_client: EtcdClient
) -> None:
    await etcd_client.put("svc/a", "10.0.0.1:1")
    async with EtcdDiscovery(etcd.endpoint, ["svc"], backoff=FAST) as discovery:
        assert await discovery.wait_ready(5)
        pool = discovery.pool("svc")
        watch = discovery.watches["svc"]
        await eventually(lambda: watch.state is WatchState.WATCHING, "the watch")
        version = pool.snapshot.version

        etcd.stop()
        await eventually(lambda: watch.state is WatchState.RETRYING, "the lost stream")
        await asyncio.sleep(0.5)  # several failed retries
        assert addresses(pool) == {"10.0.0.1:1"}
        assert pool.snapshot.version == version
        assert watch.last_error

        etcd.start()
        await eventually(lambda: watch.state is WatchState.WATCHING, "the resumed watch")
        assert watch.last_error == ""
        await etcd_client.put("svc/b", "10.0.0.2:2")
        await eventually(lambda: addresses(pool) == {"10.0.0.1:1", "10.0.0.2:2"}, "the put")
        assert watch.relists == 0  # resumed from the last revision, no listing needed


async def test_compaction_while_cut_off_relists_and_drops_deleted_keys(
    etcd: EtcdServer, etcd_client: EtcdClient
) -> None:
    await etcd_client.put("svc/a", "10.0.0.1:1")
    await etcd_client.put("svc/b", "10.0.0.2:2")
    forwarder = Forwarder(etcd.client_port)
    await forwarder.start()
    try:
        async with EtcdDiscovery(forwarder.endpoint, ["svc"], backoff=FAST) as discovery:
            assert await discovery.wait_ready(5)
            pool = discovery.pool("svc")
            watch = discovery.watches["svc"]
            await eventually(lambda: watch.state is WatchState.WATCHING, "the watch")
            seen = watch.last_revision

            await forwarder.cut()
            await eventually(lambda: watch.state is WatchState.RETRYING, "the cut")
            # While the watcher cannot see etcd: a delete, an add, then compaction of it all.
            await etcd_client.delete("svc/a")
            await etcd_client.put("svc/c", "10.0.0.3:3")
            revision = await etcd_client.put("other/x", "1")
            await etcd_client.compact(revision)
            assert addresses(pool) == {"10.0.0.1:1", "10.0.0.2:2"}  # kept while cut off

            await forwarder.restore()
            await eventually(
                lambda: addresses(pool) == {"10.0.0.2:2", "10.0.0.3:3"}, "the re-listing"
            )
            assert watch.relists == 1
            assert watch.last_revision >= revision > seen
            await eventually(lambda: watch.state is WatchState.WATCHING, "the new watch")
            await etcd_client.put("svc/d", "10.0.0.4:4")
            await eventually(lambda: "10.0.0.4:4" in addresses(pool), "a put after re-listing")
    finally:
        await forwarder.close()


async def test_unreachable_at_start_then_filled_when_etcd_comes_up(
    etcd_servers: EtcdFactory,
) -> None:
    etcd = etcd_servers(start=False)
    async with EtcdDiscovery(etcd.endpoint, ["svc"], backoff=FAST) as discovery:
        assert await discovery.wait_ready(5)
        pool = discovery.pool("svc")
        assert pool.snapshot.endpoints == ()
        assert pool.snapshot.reason.startswith("etcd unreachable (")
        assert str(etcd.client_port) in pool.snapshot.reason
        assert discovery.watches["svc"].state is WatchState.RETRYING

        etcd.start()
        etcd.etcdctl("put", "svc/a", "10.0.0.1:1")
        await eventually(lambda: addresses(pool) == {"10.0.0.1:1"}, "the first listing")
        assert pool.snapshot.reason == ""


async def test_invalid_values_are_skipped_counted_and_leave_the_pool_alone(
    etcd: EtcdServer, etcd_client: EtcdClient
) -> None:
    await etcd_client.put("bad/a", go_value("10.0.0.1:1"))
    async with EtcdDiscovery(etcd.endpoint, ["bad"], backoff=FAST) as discovery:
        assert await discovery.wait_ready(5)
        pool = discovery.pool("bad")
        watch: TargetWatch = discovery.watches["bad"]
        counted = invalid_values_total[("bad", "bad_op")]
        version = pool.snapshot.version

        await etcd_client.put("bad/a", go_value("10.0.0.1:1", op=1))
        await eventually(lambda: "bad/a" in watch.invalid, "the invalid value")
        assert "Op 1 is not add" in watch.invalid["bad/a"].reason
        assert addresses(pool) == {"10.0.0.1:1"}  # the last valid endpoint stays
        assert pool.snapshot.version == version
        assert invalid_values_total[("bad", "bad_op")] == counted + 1

        await etcd_client.put("bad/b", "not an address")
        await eventually(lambda: "bad/b" in watch.invalid, "a second invalid value")
        assert invalid_values_total[("bad", "bad_address")] >= 1
        await etcd_client.put("bad/a", go_value("10.0.0.1:1", op=1))  # the same bad value
        await etcd_client.put("bad/c", "10.0.0.3:3")
        await eventually(lambda: "10.0.0.3:3" in addresses(pool), "a valid put after")
        assert invalid_values_total[("bad", "bad_op")] == counted + 1  # counted once

        await etcd_client.put("bad/a", "10.0.0.9:9")
        await eventually(lambda: "10.0.0.9:9" in addresses(pool), "the fixed value")
        assert set(watch.invalid) == {"bad/b"}


async def test_only_invalid_values_say_so_in_the_pool_reason(
    etcd: EtcdServer, etcd_client: EtcdClient
) -> None:
    await etcd_client.put("svc/a", '{"Op":1,"Addr":"10.0.0.1:1"}')
    async with EtcdDiscovery(etcd.endpoint, ["svc"], backoff=FAST) as discovery:
        assert await discovery.wait_ready(5)
        reason = discovery.pool("svc").snapshot.reason
        assert "no valid endpoint under 'svc/'" in reason
        assert "svc/a: Op 1 is not add" in reason


async def test_failover_to_the_next_endpoint(etcd: EtcdServer, etcd_client: EtcdClient) -> None:
    await etcd_client.put("svc/a", "10.0.0.1:1")
    forwarder = Forwarder(etcd.client_port)
    await forwarder.start()
    try:
        endpoints = [forwarder.endpoint, etcd.endpoint]
        async with EtcdDiscovery(endpoints, ["svc"], backoff=FAST) as discovery:
            assert await discovery.wait_ready(5)
            pool = discovery.pool("svc")
            watch = discovery.watches["svc"]
            await eventually(lambda: watch.state is WatchState.WATCHING, "the watch")
            assert discovery.client.current_endpoint == f"127.0.0.1:{forwarder.port}"
            await forwarder.cut()  # the first endpoint is gone for good
            await eventually(
                lambda: discovery.client.current_endpoint == f"127.0.0.1:{etcd.client_port}",
                "the failover",
            )
            await etcd_client.put("svc/b", "10.0.0.2:2")
            await eventually(lambda: "10.0.0.2:2" in addresses(pool), "a put via the second")
    finally:
        await forwarder.close()


async def test_close_cancels_the_named_tasks(etcd: EtcdServer) -> None:
    discovery = EtcdDiscovery(etcd.endpoint, ["svc", "other"], backoff=FAST)
    await discovery.start()
    names = {task.get_name() for task in asyncio.all_tasks()}
    assert {"etcd-discovery:svc", "etcd-discovery:other"} <= names
    discovery.pool("late")  # added while running: starts at once
    assert await discovery.wait_ready(5)
    await discovery.close()
    names = {task.get_name() for task in asyncio.all_tasks()}
    assert not any(name.startswith("etcd-discovery:") for name in names)
    assert all(w.state is WatchState.CLOSED for w in discovery.watches.values())


async def test_retain_stops_the_watches_of_dropped_targets_and_a_target_can_come_back(
    etcd: EtcdServer, etcd_client: EtcdClient
) -> None:
    async with EtcdDiscovery(etcd.endpoint, ["svc", "other"], backoff=FAST) as discovery:
        assert await discovery.wait_ready(5)
        other = discovery.pool("other")
        old_watch = discovery.watches["other"]

        assert await discovery.retain(["svc/"]) == ["other"]
        assert list(discovery.watches) == ["svc"]
        assert old_watch.state is WatchState.CLOSED
        names = {task.get_name() for task in asyncio.all_tasks()}
        assert "etcd-discovery:other" not in names
        assert "etcd-discovery:svc" in names
        # The dropped pool no longer follows etcd.
        await etcd_client.put("other/a", go_value("10.0.0.1:1"))
        await etcd_client.put("svc/a", go_value("10.0.0.2:2"))
        svc = discovery.pool("svc")
        await eventually(lambda: addresses(svc) == {"10.0.0.2:2"}, "svc's put")
        assert addresses(other) == set()

        # Asked for again: a new watch, listed from scratch.
        again = discovery.pool("other")
        assert again is not other
        await eventually(lambda: addresses(again) == {"10.0.0.1:1"}, "other's new listing")
        assert await discovery.retain(["svc", "other"]) == []

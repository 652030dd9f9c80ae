"""Sticky routing and pinning through real proxy processes: `serve --sticky-header` and
`--pin-header`, fed by static `--backend` lists or by a real etcd, with real grpcio backends
and clients. Each test states the property it checks and fails if the proxy does otherwise."""

from __future__ import annotations

from collections import Counter

import grpc
import pytest
from backends import EchoBackendsFactory, open_channel
from balancing_e2e_support import backend_of, count_backends, map_keys, register
from etcd_support import EtcdServer
from proxy_process import run_cli, start_proxy, wait_for

STICKY = "x-session"
PIN = "x-instance"
KEYS = [f"session-{i}" for i in range(1000)]


def test_two_proxies_route_every_sticky_key_to_the_same_backend(
    echo_backends: EchoBackendsFactory,
) -> None:
    """Two replicas given the same 5 backends in different orders agree on every one of
    1,000 keys: the ring depends on the backends' addresses, not on the command line."""
    servers = echo_backends(5)
    addresses = [s.address for s in servers]
    names = {s.name for s in servers}
    reordered = [addresses[i] for i in (3, 0, 4, 2, 1)]

    def serve(order: list[str]) -> list[str]:
        return ["serve", "--sticky-header", STICKY, *(a for b in order for a in ("--backend", b))]

    with (
        start_proxy(serve(addresses)) as (_, port_a),
        start_proxy(serve(reordered)) as (_, port_b),
        open_channel(f"127.0.0.1:{port_a}") as via_a,
        open_channel(f"127.0.0.1:{port_b}") as via_b,
    ):
        # The keys go through the replicas in opposite orders, so a proxy that ignored the
        # header (a rotation) could not agree with the other on most keys.
        on_a = map_keys(via_a, STICKY, KEYS)
        on_b = map_keys(via_b, STICKY, reversed(KEYS))

    differing = sorted(k for k in KEYS if on_a[k] != on_b[k])
    assert not differing, f"{len(differing)} keys differ, e.g. {differing[:5]}"
    shares = Counter(on_a.values())
    # 160 virtual nodes each keep every share near 20%; each backend gets some keys.
    assert set(shares) == names, shares
    assert min(shares.values()) >= 100, shares


def test_only_the_keys_of_a_departed_backend_move(
    etcd: EtcdServer, echo_backends: EchoBackendsFactory
) -> None:
    """With 5 backends registered in etcd, removing one moves exactly the keys that were on
    it: every key that changed backend was on the removed one, and all of its keys moved."""
    servers = echo_backends(5)
    for server in servers:
        register(etcd, f"svc/{server.name}", server.address)
    args = ["serve", "--etcd", etcd.endpoint, "--target", "svc", "--sticky-header", STICKY]
    with start_proxy(args) as (_, port), open_channel(f"127.0.0.1:{port}") as channel:
        names = {s.name for s in servers}
        wait_for(
            lambda: set(count_backends(channel, 10)) == names, "the pool to hold all 5 backends"
        )
        before = map_keys(channel, STICKY, KEYS)
        assert set(before.values()) == names

        removed = servers[2].name
        etcd.etcdctl("del", f"svc/{removed}")
        # The backend is still up: only the pool change can keep calls off it.
        wait_for(
            lambda: set(count_backends(channel, 12)) == names - {removed},
            f"{removed} to leave the pool",
        )
        after = map_keys(channel, STICKY, KEYS)

    moved = {k for k in KEYS if before[k] != after[k]}
    was_on_removed = {k for k in KEYS if before[k] == removed}
    assert was_on_removed, "the removed backend held no key: the test proves nothing"
    assert moved - was_on_removed == set(), "keys of staying backends moved"
    assert was_on_removed - moved == set(), "keys of the removed backend stayed on it"
    assert removed not in after.values()


def test_pin_reaches_an_instance_by_id_scalar_key_segment_or_address(
    etcd: EtcdServer, echo_backends: EchoBackendsFactory
) -> None:
    """`--pin-header` names one instance by its metadata id (dict `id`, or scalar metadata),
    the last segment of its etcd key, or its address; a name nobody has is refused with
    UNAVAILABLE "no instance ..." instead of going elsewhere."""
    b0, b1, b2, b3, b4 = echo_backends(5)
    register(etcd, "svc/node-1", b0.address, {"id": "alpha", "weight": 1})
    register(etcd, "svc/node-2", b1.address, "beta")
    etcd.etcdctl("put", "svc/gamma", b2.address)  # bare address: only the key names it
    register(etcd, "svc/node-4", b3.address, None)  # no id: only its address names it
    # A key ending in "alpha": an id claims a name before any key segment does.
    register(etcd, "svc/alpha", b4.address, None)
    args = ["serve", "--etcd", etcd.endpoint, "--target", "svc", "--pin-header", PIN]
    with start_proxy(args) as (_, port), open_channel(f"127.0.0.1:{port}") as channel:
        everyone = {b0.name, b1.name, b2.name, b3.name, b4.name}
        wait_for(
            lambda: set(count_backends(channel, 15)) == everyone, "the pool to hold 5 backends"
        )
        expected = {"alpha": b0.name, "beta": b1.name, "gamma": b2.name, b3.address: b3.name}
        for name, backend in expected.items():
            seen = count_backends(channel, 6, [(PIN, name)])
            assert seen == Counter({backend: 6}), f"pin {name!r} went to {dict(seen)}"

        with pytest.raises(grpc.RpcError) as refused:
            backend_of(channel, [(PIN, "omega")])
        assert refused.value.code() == grpc.StatusCode.UNAVAILABLE
        details = refused.value.details() or ""
        assert "no instance" in details and "omega" in details, details


def test_pin_beats_sticky_beats_round_robin(echo_backends: EchoBackendsFactory) -> None:
    """With both headers configured: a call with both goes to the pinned instance, a call
    with only the sticky key follows the ring, a call with neither takes its turn in the
    rotation (sequential calls: exactly even over all backends)."""
    servers = echo_backends(4)
    by_name = {s.name: s for s in servers}
    args = ["serve", "--pin-header", PIN, "--sticky-header", STICKY]
    for server in servers:
        args += ["--backend", server.address]
    with start_proxy(args) as (_, port), open_channel(f"127.0.0.1:{port}") as channel:
        owners = map_keys(channel, STICKY, KEYS[:40])
        pinned = servers[0]
        # A key whose sticky owner is some other backend, so the two rules disagree.
        key = next(k for k, owner in owners.items() if owner != pinned.name)
        owner = by_name[owners[key]]

        both = count_backends(channel, 8, [(STICKY, key), (PIN, pinned.address)])
        assert both == Counter({pinned.name: 8}), f"pin + sticky went to {dict(both)}"

        sticky_only = count_backends(channel, 8, [(STICKY, key)])
        assert sticky_only == Counter({owner.name: 8}), f"sticky went to {dict(sticky_only)}"

        neither = count_backends(channel, 40)
        assert neither == Counter({s.name: 10 for s in servers}), f"rotation: {dict(neither)}"


@pytest.mark.parametrize(
    ("flags", "named"),
    [
        (["--bounded-load", "1.2"], "--bounded-load"),  # bounded load needs a sticky header
        (["--policy", "nope"], "--policy"),
        (["--sticky-header", "k", "--bounded-load", "1"], "--bounded-load"),  # must be > 1
        (["--sticky-header", "x-k", "--pin-header", "x-k"], "--pin-header"),
    ],
    ids=["bounded-load-without-sticky", "unknown-policy", "bounded-load-1", "same-header"],
)
def test_bad_balancing_flags_exit_2_naming_the_flag(flags: list[str], named: str) -> None:
    done = run_cli("serve", "--backend", "x:1", *flags)
    assert done.returncode == 2, (done.returncode, done.stderr)
    assert named in done.stderr, done.stderr

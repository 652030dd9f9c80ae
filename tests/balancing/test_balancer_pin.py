"""Pin: a header names one instance; the call goes there or is refused. And the precedence
pin > sticky > policy; and the Balancer's option checks."""

from __future__ import annotations

import random
from collections.abc import Callable, Container

import pytest
from balancing_support import address, endpoint, picked, pool, snapshot

from proxy.core.balancing import Balancer, NoPick, NoPickKind
from proxy.core.endpoints import Endpoint

PIN = b"x-instance"
SESSION = b"x-session"


def instances() -> list[Endpoint]:
    return [
        endpoint(0, "game-1"),  # scalar string metadata
        endpoint(1, 2),  # scalar number metadata (Go's `Metadata: 2`)
        endpoint(2, {"id": "game-3", "weight": 2}),  # dict with an id
        endpoint(3, {"weight": 1}, key="discovery/dev/game/node-4"),  # no id: the key
        endpoint(4),  # nothing but its address
    ]


def pin(
    balancer: Balancer,
    value: bytes,
    exclude: Container[str] = (),
    usable: Callable[[str], bool] | None = None,
) -> Endpoint | NoPick:
    return balancer.pick(snapshot(instances()), [(PIN, value)], exclude, usable)


@pytest.mark.parametrize(
    ("name", "index"),
    [
        (b"game-1", 0),  # scalar metadata
        (b"2", 1),  # scalar number metadata, spelled as JSON spells it
        (b"game-3", 2),  # dict metadata's id
        (b"node-4", 3),  # last segment of the etcd key
        (address(4).encode(), 4),  # address
        (address(0).encode(), 0),  # an instance with an id still answers to its address
    ],
)
def test_pin_by_each_kind_of_name(name: bytes, index: int) -> None:
    balancer = Balancer(pin_header=PIN, rng=random.Random(1))
    for _ in range(10):  # every call, not just most
        assert picked(pin(balancer, name)).address == address(index)


def test_pin_to_a_missing_instance_is_refused() -> None:
    result = pin(Balancer(pin_header=PIN), b"game-9")
    assert result == NoPick("no instance 'game-9' in pool 'svc'", NoPickKind.NO_INSTANCE)


def test_pin_in_an_empty_pool_says_why_the_pool_is_empty() -> None:
    snap = snapshot([], reason="etcd unreachable at start")
    result = Balancer(pin_header=PIN).pick(snap, [(PIN, b"game-1")])
    assert isinstance(result, NoPick) and result.kind is NoPickKind.NO_INSTANCE
    assert result.message == "no instance 'game-1' in pool 'svc' (etcd unreachable at start)"


def test_static_backends_do_not_answer_to_static() -> None:
    # The static list's key is the sentinel "static", not an etcd key with a last segment.
    snap = snapshot([Endpoint(address(0), "static"), Endpoint(address(1), "static")])
    balancer = Balancer(pin_header=PIN)
    assert isinstance(balancer.pick(snap, [(PIN, b"static")]), NoPick)
    assert picked(balancer.pick(snap, [(PIN, address(1).encode())])).address == address(1)


def test_an_id_beats_another_instance_s_key_segment() -> None:
    eps = [endpoint(0, key="svc/7"), endpoint(1, {"id": "7"})]
    balancer = Balancer(pin_header=PIN)
    for order in (eps, eps[::-1]):
        assert picked(balancer.pick(snapshot(order), [(PIN, b"7")])).address == address(1)


def test_unusable_pinned_instance_is_still_the_answer() -> None:
    # In backoff: the session has nowhere else to go, so it gets the probe.
    got = pin(Balancer(pin_header=PIN), b"game-3", usable=lambda a: False)
    assert picked(got).address == address(2)


def test_excluded_pinned_instance_is_refused_as_unreachable() -> None:
    result = pin(Balancer(pin_header=PIN), b"game-3", exclude={address(2)})
    assert isinstance(result, NoPick)
    assert result.kind is NoPickKind.INSTANCE_TRIED
    assert result.message.startswith("instance 'game-3' in pool 'svc' unreachable")
    assert address(2) in result.message


def test_an_id_claimed_twice_goes_to_the_first_usable() -> None:
    # A re-registered instance can show up under two keys for a moment.
    eps = [endpoint(0, "worker"), endpoint(1, {"id": "worker"})]
    balancer = Balancer(pin_header=PIN)
    snap = snapshot(eps[::-1])
    assert picked(balancer.pick(snap, [(PIN, b"worker")])).address == address(0)
    got = balancer.pick(snap, [(PIN, b"worker")], (), lambda a: a != address(0))
    assert picked(got).address == address(1)
    got = balancer.pick(snap, [(PIN, b"worker")], {address(0)})
    assert picked(got).address == address(1)


def test_non_utf8_pin_value_is_refused_not_raised() -> None:
    result = pin(Balancer(pin_header=PIN), b"\xff\xfe")
    assert isinstance(result, NoPick) and result.kind is NoPickKind.NO_INSTANCE


# ---------------------------------------------------------------- precedence


def test_pin_beats_sticky_beats_policy() -> None:
    snap = pool(5)
    balancer = Balancer(
        "least_request", sticky_header=SESSION, pin_header=PIN, rng=random.Random(2)
    )
    sticky_owner = picked(balancer.pick(snap, [(SESSION, b"s-1")])).address
    pinned = next(address(i) for i in range(5) if address(i) != sticky_owner)

    both = [(SESSION, b"s-1"), (PIN, pinned.encode())]
    assert {picked(balancer.pick(snap, both)).address for _ in range(50)} == {pinned}
    # Pin to a missing instance: refused, not moved to the sticky owner.
    missing = [(SESSION, b"s-1"), (PIN, b"gone")]
    assert isinstance(balancer.pick(snap, missing), NoPick)
    # Sticky beats the policy: least_request would avoid a busy owner, sticky does not.
    inflight = {sticky_owner: 100}
    got = {picked(balancer.pick(snap, [(SESSION, b"s-1")], (), None, inflight)) for _ in range(50)}
    assert {e.address for e in got} == {sticky_owner}
    # Neither header: the policy, which avoids the busy one.
    got = {picked(balancer.pick(snap, [], (), None, inflight)) for _ in range(200)}
    assert sticky_owner not in {e.address for e in got}
    # An empty pin value is no pin.
    assert picked(balancer.pick(snap, [(PIN, b""), (SESSION, b"s-1")])).address == sticky_owner


# ---------------------------------------------------------------- options


@pytest.mark.parametrize(
    ("kwargs", "option"),
    [
        ({"policy": "least_connections"}, "policy"),
        ({"sticky_header": b""}, "sticky_header"),
        ({"sticky_header": b"x session"}, "sticky_header"),
        ({"sticky_header": ":authority"}, "sticky_header"),
        ({"pin_header": b"x-pin\n"}, "pin_header"),
        ({"pin_header": b"x-instance-bin"}, "pin_header"),
        ({"sticky_header": b"x-a", "pin_header": b"X-A"}, "sticky_header"),
        ({"sticky_header": b"x-a", "bounded_load": 1.0}, "bounded_load"),
        ({"sticky_header": b"x-a", "bounded_load": 0.5}, "bounded_load"),
        ({"sticky_header": b"x-a", "bounded_load": float("inf")}, "bounded_load"),
        ({"sticky_header": b"x-a", "bounded_load": True}, "bounded_load"),
        ({"bounded_load": 1.25}, "bounded_load"),
    ],
)
def test_invalid_options_are_refused_by_name(kwargs: dict[str, object], option: str) -> None:
    with pytest.raises(ValueError, match=option):
        Balancer(**kwargs)  # type: ignore[arg-type]


def test_valid_options() -> None:
    balancer = Balancer("random", sticky_header="X-Session-Bin", pin_header=PIN, bounded_load=2)
    assert balancer.policy == "random"
    assert balancer.sticky_header == b"x-session-bin"
    assert balancer.pin_header == PIN
    assert balancer.bounded_load == 2.0

"""The load policies behind Balancer: round_robin, least_request, random; weights; exclude
and usable; and that what a policy precomputes is built once per snapshot."""

from __future__ import annotations

import random
from collections import Counter
from collections.abc import Callable, Container, Mapping

import pytest
from balancing_support import address, endpoint, picked, pool, simulate, snapshot

from proxy.core.balancing import Balancer, NoPick, NoPickKind
from proxy.core.balancing.balancer import NO_CALLS
from proxy.core.balancing.table import PoolTable
from proxy.core.endpoints import PoolSnapshot

POLICIES = ["round_robin", "least_request", "random"]
WEIGHTS_123 = [1, 2, 3]


def counts(
    balancer: Balancer,
    snap: PoolSnapshot,
    calls: int,
    exclude: Container[str] = (),
    usable: Callable[[str], bool] | None = None,
    inflight: Mapping[str, int] = NO_CALLS,
) -> Counter[str]:
    return Counter(
        picked(balancer.pick(snap, [], exclude, usable, inflight)).address for _ in range(calls)
    )


# ---------------------------------------------------------------- round_robin


def test_round_robin_rotates_evenly() -> None:
    snap = pool(5)
    balancer = Balancer(rng=random.Random(1))
    order = [picked(balancer.pick(snap, [])).address for _ in range(10)]
    assert sorted(order[:5]) == sorted(e.address for e in snap.endpoints)
    assert order[5:] == order[:5]  # the same cycle again


def test_round_robin_is_nginx_smooth_weighted() -> None:
    # nginx's own example (ngx_http_upstream_round_robin.c): weights 5, 1, 1 give
    # a a b a c a a, interleaved rather than five a's in a row.
    snap = snapshot(endpoint(i, {"weight": w}) for i, w in enumerate([5, 1, 1]))
    balancer = Balancer("round_robin")
    names = {address(0): "a", address(1): "b", address(2): "c"}
    order = "".join(names[picked(balancer.pick(snap, [])).address] for _ in range(14))
    assert order == "aabacaa" * 2


def test_round_robin_weights_1_2_3_exact_per_cycle() -> None:
    # Smooth weighted round robin is exact over every cycle of sum(weights) picks.
    served = counts(Balancer("round_robin"), pool(3, WEIGHTS_123), 600)
    assert [served[address(i)] for i in range(3)] == [100, 200, 300]


def test_round_robin_float_weights() -> None:
    served = counts(Balancer("round_robin"), pool(2, [0.5, 1.5]), 400)
    assert [served[address(i)] for i in range(2)] == [100, 300]


# ---------------------------------------------------------------- random


def test_random_uniform() -> None:
    # 50,000 picks over 5: each share is 20% with a standard deviation of 0.18 points;
    # +-1.5 points is more than 8 of them.
    served = counts(Balancer("random", rng=random.Random(3)), pool(5), 50_000)
    for i in range(5):
        assert abs(served[address(i)] / 50_000 - 0.2) < 0.015


def test_random_weights_1_2_3() -> None:
    # 60,000 picks: the standard deviation of each share is under 0.21 points; the
    # tolerance is +-1.5 points.
    served = counts(Balancer("random", rng=random.Random(4)), pool(3, WEIGHTS_123), 60_000)
    for i, weight in enumerate(WEIGHTS_123):
        assert abs(served[address(i)] / 60_000 - weight / 6) < 0.015


# ---------------------------------------------------------------- least_request


def test_least_request_avoids_an_endpoint_with_many_calls_in_flight() -> None:
    snap = pool(5)
    inflight = {address(0): 50, address(1): 1}
    balancer = Balancer("least_request", rng=random.Random(5))
    served = counts(balancer, snap, 10_000, inflight=inflight)
    # Two distinct candidates: the busy one can only lose its duel.
    assert served[address(0)] == 0
    # address(1) loses to every idle one but wins against address(0): about 1/10.
    assert served[address(1)] / 10_000 < 0.13
    for i in range(2, 5):
        assert served[address(i)] / 10_000 > 0.2


def test_least_request_sends_less_to_a_slow_endpoint() -> None:
    # One backend answers 5 times slower, so its calls pile up in flight: least_request
    # sends it clearly less than its 1/4, where round_robin would send exactly 1/4.
    snap = pool(4)
    slow = address(0)
    served = simulate(
        Balancer("least_request", rng=random.Random(6)),
        snap,
        calls=20_000,
        concurrency=16,
        duration_of=lambda a: 5.0 if a == slow else 1.0,
    )
    assert served[slow] / 20_000 < 0.12
    rr = simulate(Balancer("round_robin"), snap, calls=20_000, concurrency=16)
    assert rr[slow] == 5_000


@pytest.mark.parametrize(
    ("concurrency", "seed"),
    [
        # 30 calls in flight at a time, every backend as fast: in-flight per unit of weight
        # is what least_request equalises, so shares follow the weights.
        (30, 8),
        # One call at a time: every count is 0 and only the weighted sampling of the two
        # candidates can follow the weights.
        (1, 9),
    ],
    ids=["under-load", "when-idle"],
)
def test_least_request_weights_1_2_3(concurrency: int, seed: int) -> None:
    # Tolerance +-3 points (the simulation settles within about 1).
    served = simulate(
        Balancer("least_request", rng=random.Random(seed)),
        pool(3, WEIGHTS_123),
        calls=30_000,
        concurrency=concurrency,
    )
    for i, weight in enumerate(WEIGHTS_123):
        assert abs(served[address(i)] / 30_000 - weight / 6) < 0.03


# ---------------------------------------------------------------- weights from metadata


@pytest.mark.parametrize(
    "metadata",
    [None, "id-1", 7, {"weight": 0}, {"weight": -2}, {"weight": "3"}, {"weight": True},
     {"weight": float("nan")}, {"weight": float("inf")}, {"id": "x"}, [3]],
)  # fmt: skip
def test_invalid_or_missing_weight_counts_as_1(metadata: object) -> None:
    snap = snapshot([endpoint(0, metadata), endpoint(1, {"weight": 1})])
    assert PoolTable.of(snap).weights == (1.0, 1.0)
    served = counts(Balancer("round_robin"), snap, 100)
    assert served[address(0)] == served[address(1)] == 50


# ---------------------------------------------------------------- exclude and usable


@pytest.mark.parametrize("policy", POLICIES)
@pytest.mark.parametrize("weights", [None, [*WEIGHTS_123, 1, 1]], ids=["equal", "weighted"])
def test_exclude_and_usable(policy: str, weights: list[int] | None) -> None:
    snap = pool(5, weights)
    balancer = Balancer(policy, rng=random.Random(10))
    excluded = {address(0), address(1)}
    backing_off = {address(2)}

    def usable(a: str) -> bool:
        return a not in backing_off

    served = counts(balancer, snap, 2_000, exclude=excluded, usable=usable)
    # Never an excluded address; a usable one while any is left.
    assert set(served) == {address(3), address(4)}

    # Nothing usable left: a probe to a non-excluded address in backoff.
    backing_off.update({address(3), address(4)})
    served = counts(balancer, snap, 300, exclude=excluded, usable=usable)
    assert set(served) <= {address(2), address(3), address(4)}

    # Everything tried: no pick, and a message that says so.
    everything = {address(i) for i in range(5)}
    result = balancer.pick(snap, [], everything, usable)
    assert isinstance(result, NoPick)
    assert result.kind is NoPickKind.EXHAUSTED
    assert "'svc'" in result.message


def test_round_robin_skip_hands_the_turn_to_the_next() -> None:
    # As round robin always did: a backend in backoff loses its turn to the next one, and
    # the rotation carries on from there (no backend gets two turns in a row).
    snap = pool(4)
    balancer = Balancer(rng=random.Random(11))
    first = picked(balancer.pick(snap, [])).address
    i = [e.address for e in snap.endpoints].index(first)
    nxt, after = address((i + 1) % 4), address((i + 2) % 4)
    assert picked(balancer.pick(snap, [], (), lambda a: a != nxt)).address == after
    assert picked(balancer.pick(snap, [])).address == address((i + 3) % 4)


def test_smooth_weighted_skips_as_nginx_does() -> None:
    # nginx skips a down peer entirely: it gains no weight meanwhile, so when it comes back
    # it does not get a burst of picks to catch up.
    snap = pool(3, [5, 1, 1])
    balancer = Balancer("round_robin")
    down = address(0)
    while_down = counts(balancer, snap, 20, usable=lambda a: a != down)
    assert while_down == {address(1): 10, address(2): 10}
    back = [picked(balancer.pick(snap, [])).address for _ in range(7)]
    assert Counter(back) == {address(0): 5, address(1): 1, address(2): 1}


def test_empty_pool_says_why() -> None:
    snap = snapshot([], reason="etcd unreachable at start")
    result = Balancer().pick(snap, [])
    assert result == NoPick(
        "no backend for target 'svc': etcd unreachable at start", NoPickKind.EMPTY_POOL
    )


# ---------------------------------------------------------------- once per snapshot


def test_precomputation_happens_once_per_snapshot() -> None:
    # Counted by the identity of what the balancer keeps per target (a table and a ring per
    # snapshot), not by patching their constructors: compiled, the balancer calls them
    # directly and a patch would not be seen.
    tables: set[int] = set()
    rings: set[int] = set()
    kept: list[object] = []  # holds them, so that no id is reused

    def note(target: str = "svc") -> None:
        state = balancer._targets[target]
        kept.extend((state.table, state.ring))
        tables.add(id(state.table))
        rings.add(id(state.ring))

    balancer = Balancer("least_request", sticky_header=b"x-session", pin_header=b"x-pin")
    first, second = pool(5), pool(6)
    for snap in (first, second):
        for i in range(500):
            balancer.pick(snap, [(b"x-session", str(i).encode())], inflight={})
            note()
            balancer.pick(snap, [])
            balancer.pick(snap, [(b"x-pin", address(1).encode())])
            note()
    assert (len(tables), len(rings)) == (2, 2)
    # Two targets keep their own state: alternating between them rebuilds nothing.
    other = snapshot([endpoint(9)], target="other")
    for _ in range(10):
        balancer.pick(other, [])
        kept.append(balancer._targets["other"].table)
        tables.add(id(balancer._targets["other"].table))
        balancer.pick(second, [])
        note()
    assert (len(tables), len(rings)) == (3, 2)

"""Smooth weighted round robin against nginx's algorithm, run literally.

The policy keeps nginx's state in another form (a debt per peer, heaps per distinct weight)
to pick in O(distinct weights + log N); this checks that it makes nginx's decisions,
including steps that skip peers that are down, across renormalisation, and in both of its
ways of finding the maximum."""

from __future__ import annotations

import random

import pytest
from balancing_support import pool
from hypothesis import given, settings
from hypothesis import strategies as st

from proxy.core.balancing.policies import SmoothWeightedRoundRobin
from proxy.core.balancing.table import PoolTable


class NginxReference:
    """ngx_http_upstream_get_peer, with `down` peers skipped."""

    def __init__(self, weights: list[float]) -> None:
        self.weights = weights
        self.current: list[float] = [0] * len(weights)

    def pick(self, down: set[int]) -> int:
        best = -1
        total: float = 0
        for i, weight in enumerate(self.weights):
            if i in down:
                continue
            self.current[i] += weight
            total += weight
            if best == -1 or self.current[i] > self.current[best]:
                best = i
        self.current[best] -= total
        return best


# Integers and dyadic fractions: exact in floating point whatever the order of operations,
# so the two must agree on every tie too.
WEIGHTS = st.one_of(
    st.lists(st.integers(1, 6), min_size=2, max_size=24),
    st.lists(st.sampled_from([0.25, 0.5, 1.5, 2.75, 4.0]), min_size=2, max_size=24),
    st.lists(st.integers(1, 1000), min_size=2, max_size=40),  # many distinct weights
)


@pytest.mark.parametrize("max_classes", [16, 0], ids=["heaps", "scan"])
@pytest.mark.parametrize("renormalise_after", [1 << 16, 7], ids=["long", "often"])
@settings(max_examples=150, deadline=None)
@given(weights=WEIGHTS, seed=st.integers(0, 2**32 - 1))
def test_same_picks_as_nginx(
    max_classes: int, renormalise_after: int, weights: list[float], seed: int
) -> None:
    table = PoolTable.of(pool(len(weights), weights))
    policy = SmoothWeightedRoundRobin(
        table, random.random, max_classes=max_classes, renormalise_after=renormalise_after
    )
    reference = NginxReference([float(w) for w in weights])
    rng = random.Random(seed)
    n = len(weights)
    for _ in range(200):
        # Mostly full steps (the fast path); sometimes some peers down (the slow one).
        down = set(rng.sample(range(n), rng.randint(1, n - 1))) if rng.random() < 0.3 else set()
        expected = reference.pick(down)
        if down:
            got = policy.choose([i for i in range(n) if i not in down], {})
        else:
            got = policy.propose({})
            policy.commit(got)
        assert got == expected

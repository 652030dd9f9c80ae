"""The three load policies: round_robin, least_request, random.

Theory of operation: a policy is built once per pool snapshot (from its PoolTable) and then
answers each call in two steps, so that the common case costs one cheap proposal (O(1) or
O(log N); see loadtest/pick_bench.py) and one check of one endpoint:

- `propose(inflight)` names the endpoint the policy wants if every endpoint were allowed, and
  decides nothing yet; the balancer then checks that one endpoint (not excluded, usable).
- `commit(index)` records the proposal as taken (advances a rotation, ...).
- Only when the proposal is not allowed does the balancer list the allowed endpoints and call
  `choose(candidates, inflight)`, which picks among them and records the pick itself. That
  path is O(N), and runs for retries and while some backend is in connect backoff.

Indexes are positions in the table's endpoint tuple; candidate lists are in ascending order.
"""

from __future__ import annotations

from bisect import bisect_left, bisect_right
from collections.abc import Callable, Mapping, Sequence
from heapq import heapreplace
from itertools import accumulate, repeat
from operator import mul, sub
from typing import Protocol

from proxy.core.balancing.table import PoolTable

Random = Callable[[], float]  # random.Random().random: a float in [0, 1)


class Picker(Protocol):
    def propose(self, inflight: Mapping[str, int]) -> int: ...

    def commit(self, index: int) -> None: ...

    def choose(self, candidates: Sequence[int], inflight: Mapping[str, int]) -> int: ...


class Rotation:
    """Plain round robin: each endpoint in turn. The start is random so that proxy replicas,
    which all rebuild on the same etcd change, do not all send their next call to the same
    backend."""

    __slots__ = ("_n", "_next")

    def __init__(self, table: PoolTable, random: Random) -> None:
        self._n = table.size
        self._next = int(random() * self._n)

    def propose(self, inflight: Mapping[str, int]) -> int:
        return self._next

    def commit(self, index: int) -> None:
        index += 1
        self._next = 0 if index == self._n else index

    def choose(self, candidates: Sequence[int], inflight: Mapping[str, int]) -> int:
        # The first allowed endpoint at or after the rotation point, so skipping a backend in
        # backoff hands its turn to the next one instead of restarting the rotation.
        at = bisect_left(candidates, self._next)
        index = candidates[at] if at < len(candidates) else candidates[0]
        self.commit(index)
        return index


class SmoothWeightedRoundRobin:
    """nginx's smooth weighted round robin (ngx_http_upstream_get_peer): each pick adds every
    peer's weight to its current value, takes the largest (the first on a tie) and subtracts
    the total weight from it. Weights 5:1:1 give a a b a c a a, not a a a a a b c.

    The same decisions, without touching every peer on every pick: after `step` picks, a
    peer's current value is step * weight - debt, where debt only grows when the peer is
    picked (by the total weight). So the next pick is the largest (step + 1) * weight - debt,
    and among peers of one weight that is simply the smallest debt: a min-heap per distinct
    weight makes a pick O(distinct weights + log N) instead of nginx's O(N). Pools with many
    distinct weights use one scan in C (map/max) over all peers instead."""

    __slots__ = (
        "_classes",
        "_debt",
        "_pending",
        "_renormalise_after",
        "_step",
        "_total",
        "_weights",
    )

    def __init__(
        self,
        table: PoolTable,
        random: Random,
        *,
        # Beyond this many distinct weights a Python loop over the classes costs more than
        # a C-level scan of every peer.
        max_classes: int = 16,
        # step * weight and debt both grow without bound; float weights would lose precision
        # in their difference, so both are brought back to nginx's current values now and then.
        renormalise_after: int = 1 << 16,
    ) -> None:
        self._renormalise_after = renormalise_after
        weights = table.weights
        # Integral weights (the usual case) stay ints: exact, like nginx's.
        if all(w.is_integer() for w in weights):
            self._weights: list[float] = [int(w) for w in weights]
        else:
            self._weights = list(weights)
        self._total = sum(self._weights)
        self._step = 0
        self._debt: list[float] = [0] * len(weights)
        by_weight: dict[float, list[int]] = {}
        for i, w in enumerate(self._weights):
            by_weight.setdefault(w, []).append(i)
        # (weight, heap of (debt, index)); equal debts and ascending indexes are a heap.
        self._classes: list[tuple[float, list[tuple[float, int]]]] | None = None
        if len(by_weight) <= max_classes:
            self._classes = [(w, [(0, i) for i in peers]) for w, peers in by_weight.items()]
        self._pending: list[tuple[float, int]] | None = None  # the proposal's heap

    def propose(self, inflight: Mapping[str, int]) -> int:
        step = self._step + 1
        classes = self._classes
        if classes is None:
            values = list(map(sub, map(mul, repeat(step), self._weights), self._debt))
            return values.index(max(values))
        best = -1
        best_value: float = 0.0
        best_heap: list[tuple[float, int]] | None = None
        for weight, heap in classes:
            debt, i = heap[0]
            value = step * weight - debt
            if best_heap is None or value > best_value or (value == best_value and i < best):
                best, best_value, best_heap = i, value, heap
        self._pending = best_heap
        return best

    def commit(self, index: int) -> None:
        debt = self._debt[index] + self._total
        self._debt[index] = debt
        heap = self._pending
        if heap is not None:
            heapreplace(heap, (debt, index))
            self._pending = None
        self._advance()

    def choose(self, candidates: Sequence[int], inflight: Mapping[str, int]) -> int:
        # nginx's loop over the peers that are up, as nginx runs it: O(N), only for retries
        # and backoff.
        self._pending = None
        step = self._step + 1
        weights = self._weights
        debts = self._debt
        best = candidates[0]
        best_value = step * weights[best] - debts[best]
        total: float = 0.0
        for i in candidates:
            total += weights[i]
            value = step * weights[i] - debts[i]
            if value > best_value:
                best, best_value = i, value
        # nginx skips a peer that is down: it gains no weight this step, which here means
        # its debt grows by its weight. The balancer only comes here when the proposal was
        # not allowed, so a peer in backoff still gains on steps whose pick was allowed,
        # until it is the one proposed; from then on every step skips it. It comes back
        # with about one extra turn of credit, not a burst for every turn it missed.
        allowed = set(candidates)
        for i, weight in enumerate(weights):
            if i not in allowed:
                debts[i] += weight
        debts[best] += total
        self._rebuild_heaps()
        self._advance()
        return best

    def _advance(self) -> None:
        self._step += 1
        if self._step >= self._renormalise_after:
            step = self._step
            # debt - step * weight is minus nginx's current value: bounded by the total.
            self._debt = [d - step * w for d, w in zip(self._debt, self._weights, strict=True)]
            self._step = 0
            self._rebuild_heaps()

    def _rebuild_heaps(self) -> None:
        if self._classes is None:
            return
        debts = self._debt
        for _, heap in self._classes:
            heap[:] = sorted((debts[i], i) for _, i in heap)  # a sorted list is a heap


class UniformRandom:
    __slots__ = ("_n", "_random")

    def __init__(self, table: PoolTable, random: Random) -> None:
        self._n = table.size
        self._random = random

    def propose(self, inflight: Mapping[str, int]) -> int:
        return int(self._random() * self._n)

    def commit(self, index: int) -> None:
        pass  # stateless

    def choose(self, candidates: Sequence[int], inflight: Mapping[str, int]) -> int:
        return candidates[int(self._random() * len(candidates))]


class WeightedRandom:
    __slots__ = ("_cumulative", "_last", "_random", "_total", "_weights")

    def __init__(self, table: PoolTable, random: Random) -> None:
        self._weights = table.weights
        self._cumulative = list(accumulate(table.weights))
        self._total = self._cumulative[-1]
        self._last = table.size - 1
        self._random = random

    def propose(self, inflight: Mapping[str, int]) -> int:
        # min(): float rounding can put random() * total at or past the last bound.
        return min(bisect_right(self._cumulative, self._random() * self._total), self._last)

    def commit(self, index: int) -> None:
        pass  # stateless

    def choose(self, candidates: Sequence[int], inflight: Mapping[str, int]) -> int:
        weights = self._weights
        cumulative = list(accumulate(weights[i] for i in candidates))
        at = bisect_right(cumulative, self._random() * cumulative[-1])
        return candidates[min(at, len(candidates) - 1)]


class LeastRequest:
    """Power of two choices over in-flight calls: sample two distinct endpoints, take the one
    with fewer calls in flight per unit of weight (Envoy's comparison); a tie keeps the first.

    When weights differ, the two are sampled in proportion to weight: comparing by
    inflight/weight alone equalises load only once there is load, and at low concurrency
    (every count 0 or 1) uniform sampling would ignore the weights. Sampled by weight, an idle
    pool gets weighted random and a busy one gets inflight proportional to weight (checked
    by a simulation in tests/balancing)."""

    __slots__ = ("_addresses", "_cumulative", "_inverse", "_random", "_total", "_weights")

    # Tries for a second candidate distinct from the first when one weight dominates; after
    # that the dominant endpoint is simply compared with itself, which is the weighted answer.
    _DISTINCT_TRIES = 4

    def __init__(self, table: PoolTable, random: Random) -> None:
        self._addresses = table.addresses
        self._weights = table.weights
        self._random = random
        self._inverse = tuple(1.0 / w for w in table.weights) if table.weighted else None
        self._cumulative = list(accumulate(table.weights)) if table.weighted else None
        self._total = table.total_weight

    def propose(self, inflight: Mapping[str, int]) -> int:
        return self._duel(range(len(self._addresses)), self._cumulative, self._total, inflight)

    def commit(self, index: int) -> None:
        pass  # the in-flight counts are the state, and the caller keeps them

    def choose(self, candidates: Sequence[int], inflight: Mapping[str, int]) -> int:
        if self._inverse is None:
            return self._duel(candidates, None, 0.0, inflight)
        weights = self._weights
        cumulative = list(accumulate(weights[i] for i in candidates))
        return self._duel(candidates, cumulative, cumulative[-1], inflight)

    def _duel(
        self,
        candidates: Sequence[int],
        cumulative: list[float] | None,
        total: float,
        inflight: Mapping[str, int],
    ) -> int:
        n = len(candidates)
        if n == 1:
            return candidates[0]
        random = self._random
        if cumulative is None:
            a = int(random() * n)
            b = int(random() * (n - 1))
            if b >= a:
                b += 1  # uniform over the other n - 1
        else:
            last = n - 1
            a = min(bisect_right(cumulative, random() * total), last)
            b = a
            for _ in range(self._DISTINCT_TRIES):
                b = min(bisect_right(cumulative, random() * total), last)
                if b != a:
                    break
        first, second = candidates[a], candidates[b]
        addresses = self._addresses
        load_first = inflight.get(addresses[first], 0)
        load_second = inflight.get(addresses[second], 0)
        inverse = self._inverse
        if inverse is not None:
            return second if load_second * inverse[second] < load_first * inverse[first] else first
        return second if load_second < load_first else first


PickerFactory = Callable[[PoolTable, Random], Picker]


def round_robin(table: PoolTable, random: Random) -> Picker:
    if table.weighted:
        return SmoothWeightedRoundRobin(table, random)
    return Rotation(table, random)


def least_request(table: PoolTable, random: Random) -> Picker:
    return LeastRequest(table, random)


def random_choice(table: PoolTable, random: Random) -> Picker:
    if table.weighted:
        return WeightedRandom(table, random)
    return UniformRandom(table, random)


POLICIES: Mapping[str, PickerFactory] = {
    "round_robin": round_robin,
    "least_request": least_request,
    "random": random_choice,
}

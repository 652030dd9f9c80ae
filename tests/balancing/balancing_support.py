"""Pools, headers and a small load simulation for the balancing tests (no sockets)."""

from __future__ import annotations

import heapq
import random
from collections import Counter
from collections.abc import Callable, Iterable, Sequence
from typing import Any

from proxy.core.balancing import Balancer, NoPick
from proxy.core.endpoints import Endpoint, PoolSnapshot

TARGET = "svc"


def address(i: int) -> str:
    return f"10.0.{i // 250}.{i % 250 + 1}:50051"


def endpoint(i: int, metadata: Any = None, key: str | None = None) -> Endpoint:
    addr = address(i)
    return Endpoint(addr, f"{TARGET}/{addr}" if key is None else key, metadata)


def snapshot(
    endpoints: Iterable[Endpoint], target: str = TARGET, version: int = 1, reason: str = ""
) -> PoolSnapshot:
    """A snapshot with the endpoints in the order given (TargetPool would sort them; tests
    that check order independence pass them shuffled)."""
    eps = tuple(endpoints)
    return PoolSnapshot(target, eps, version, reason, frozenset(e.address for e in eps))


def pool(n: int, weights: Sequence[float] | None = None) -> PoolSnapshot:
    if weights is None:
        return snapshot(endpoint(i) for i in range(n))
    return snapshot(endpoint(i, {"weight": w}) for i, w in enumerate(weights))


def picked(result: Endpoint | NoPick) -> Endpoint:
    assert isinstance(result, Endpoint), result
    return result


def shares(counts: Counter[str], total: int) -> dict[str, float]:
    return {a: n / total for a, n in counts.items()}


def simulate(
    balancer: Balancer,
    snap: PoolSnapshot,
    calls: int,
    concurrency: int,
    duration_of: Callable[[str], float] = lambda address: 1.0,
    headers: Callable[[int], list[tuple[bytes, bytes]]] = lambda i: [],
    seed: int = 7,
) -> Counter[str]:
    """A closed loop: `concurrency` callers, each starting its next call when its last ends;
    a call to an address lasts an exponential time of mean duration_of(address). Picks see
    the live in-flight counts, as the server's would. Returns calls per address."""
    rng = random.Random(seed)
    inflight: Counter[str] = Counter()
    ends: list[tuple[float, str]] = []
    now = 0.0
    served: Counter[str] = Counter()
    for i in range(calls):
        while len(ends) >= concurrency:
            now, done = heapq.heappop(ends)
            inflight[done] -= 1
        address = picked(balancer.pick(snap, headers(i), (), None, inflight)).address
        inflight[address] += 1
        served[address] += 1
        heapq.heappush(ends, (now + rng.expovariate(1.0 / duration_of(address)), address))
    return served

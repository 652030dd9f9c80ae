"""The pool model that discovery writes and balancing reads.

A target's pool is an immutable snapshot swapped whole on every change, so a balancer reads it
without locks and precomputes what it needs (a ring, weights) once per snapshot, not per call.
Sources (the static `--backend` list, the etcd watch) only ever call `TargetPool.update`.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any


@dataclass(frozen=True, slots=True)
class Endpoint:
    address: str  # host:port
    key: str = ""  # where it came from: the etcd key, or "static"
    metadata: Any = None


@dataclass(frozen=True, slots=True)
class PoolSnapshot:
    target: str
    endpoints: tuple[Endpoint, ...]
    version: int = 0
    # Why the pool is empty when it is (e.g. etcd unreachable at start): said to the client.
    reason: str = ""
    addresses: frozenset[str] = field(default=frozenset())


class TargetPool:
    """The current snapshot of one target, and who wants to know when it changes."""

    def __init__(self, target: str, reason: str = "no endpoints registered") -> None:
        self.target = target
        self.snapshot = PoolSnapshot(target, (), 0, reason)
        self._listeners: list[Callable[[PoolSnapshot], None]] = []

    def update(self, endpoints: Iterable[Endpoint], reason: str = "") -> PoolSnapshot:
        eps = tuple(sorted(endpoints, key=lambda e: (e.address, e.key)))
        snap = PoolSnapshot(
            self.target,
            eps,
            self.snapshot.version + 1,
            reason or ("" if eps else "no endpoints registered"),
            frozenset(e.address for e in eps),
        )
        self.snapshot = snap
        for listener in self._listeners:
            listener(snap)
        return snap

    def subscribe(self, listener: Callable[[PoolSnapshot], None]) -> None:
        self._listeners.append(listener)


def static_pool(target: str, addresses: Iterable[str]) -> TargetPool:
    pool = TargetPool(target)
    pool.update(Endpoint(a, "static") for a in addresses)
    return pool

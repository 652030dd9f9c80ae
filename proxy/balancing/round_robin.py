"""Round-robin per call: two calls on one client connection go to two backends."""

from __future__ import annotations

from collections.abc import Callable, Container

from proxy.h2.events import HeaderList
from proxy.pool.endpoints import Endpoint, PoolSnapshot


class RoundRobin:
    def __init__(self) -> None:
        self._next = 0

    def pick(
        self,
        snapshot: PoolSnapshot,
        headers: HeaderList,
        exclude: Container[str] = (),
        usable: Callable[[str], bool] | None = None,
    ) -> Endpoint | None:
        """The next endpoint not excluded (already tried for this call) and usable (not in
        connect backoff). Falls back to an excluded-free but unusable one, so a pool whose
        every backend is backing off still gets a probe instead of failing forever."""
        eps = snapshot.endpoints
        n = len(eps)
        if not n:
            return None
        start = self._next
        self._next = start + 1
        fallback: Endpoint | None = None
        for i in range(n):
            ep = eps[(start + i) % n]
            if ep.address in exclude:
                continue
            if usable is None or usable(ep.address):
                if i:
                    self._next = start + i + 1
                return ep
            if fallback is None:
                fallback = ep
        return fallback

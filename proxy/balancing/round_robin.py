"""Round-robin per call: two calls on one client connection go to two backends.

Kept for the server until it calls Balancer directly: the same pick signature as before,
answered by Balancer("round_robin") (which also honours weights from registration metadata).
"""

from __future__ import annotations

from collections.abc import Callable, Container

from proxy.balancing.balancer import Balancer, NoPick
from proxy.h2.events import HeaderList
from proxy.pool.endpoints import Endpoint, PoolSnapshot


class RoundRobin:
    def __init__(self) -> None:
        self._balancer = Balancer("round_robin")

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
        picked = self._balancer.pick(snapshot, headers, exclude, usable)
        return None if isinstance(picked, NoPick) else picked

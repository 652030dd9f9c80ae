"""What every policy needs from a pool snapshot, computed once when the snapshot is new.

A snapshot is immutable and replaced whole on every pool change, so anything derived from it
(addresses, weights, their sum) is computed here once and shared by all the calls that see
that snapshot; the per-call path only indexes into these tuples.
"""

from __future__ import annotations

from dataclasses import dataclass

from proxy.core.balancing.metadata import weight_of
from proxy.core.endpoints import Endpoint, PoolSnapshot


@dataclass(frozen=True, slots=True)
class PoolTable:
    snapshot: PoolSnapshot
    endpoints: tuple[Endpoint, ...]
    addresses: tuple[str, ...]
    weights: tuple[float, ...]
    total_weight: float
    # False when every weight is the same: the policies then take their cheaper unweighted
    # form (plain rotation, uniform sampling), which picks exactly as the weighted one would.
    weighted: bool

    @classmethod
    def of(cls, snapshot: PoolSnapshot) -> PoolTable:
        endpoints = snapshot.endpoints
        weights = tuple(weight_of(ep) for ep in endpoints)
        return cls(
            snapshot,
            endpoints,
            tuple(ep.address for ep in endpoints),
            weights,
            sum(weights),
            len(set(weights)) > 1,
        )

    @property
    def size(self) -> int:
        return len(self.endpoints)

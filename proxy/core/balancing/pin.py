"""Pinning: the names a client may use for one instance, indexed once per pool snapshot.

A stateful session (the seed's "reconnect to the instance that holds my state") names its
instance in a header. An instance answers to, in this order of precedence:

1. its id from registration metadata (a scalar metadata value, or a dict's `id`),
2. the last segment of its etcd key,
3. its address.

Precedence is per name, not per endpoint: if some instance registered id "7", then "7" means
that instance even if another one's key happens to end in "/7". Two instances claiming the
same name are both kept, in (address, key) order, so that a re-registered instance (two keys
for a moment) is still reachable; the balancer takes the first one it may use.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

from proxy.core.balancing.metadata import instance_id_of, key_segment_of
from proxy.core.endpoints import Endpoint

_NAMINGS: tuple[Callable[[Endpoint], str | None], ...] = (
    instance_id_of,
    key_segment_of,
    lambda ep: ep.address,
)


class PinIndex:
    __slots__ = ("_by_name",)

    def __init__(self, endpoints: Sequence[Endpoint]) -> None:
        ordered = sorted(endpoints, key=lambda ep: (ep.address, ep.key))
        self._by_name: dict[str, tuple[Endpoint, ...]] = {}
        for naming in _NAMINGS:
            claimed: dict[str, list[Endpoint]] = {}
            for ep in ordered:
                name = naming(ep)
                if name is not None:
                    claimed.setdefault(name, []).append(ep)
            for name, eps in claimed.items():
                # A name a stronger kind already claimed keeps its meaning.
                self._by_name.setdefault(name, tuple(eps))

    def lookup(self, name: str) -> tuple[Endpoint, ...]:
        return self._by_name.get(name, ())

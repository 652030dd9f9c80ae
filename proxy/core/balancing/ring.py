"""Consistent hashing: a ring of virtual nodes, keyed by endpoint address.

Theory of operation: every endpoint owns points on a 64-bit ring; a call's key hashes to a
position and belongs to the first point at or after it (wrapping). The points of an endpoint
depend only on its address, never on the pool's order or on which other endpoints exist, so:

- every proxy replica that sees the same pool maps every key the same way, whatever order
  it learned the pool in;
- when an endpoint leaves, only the keys on its points move (to the next points), and when
  one joins, only the keys that land on its new points move: ~1/N of them.

Each endpoint gets VNODES points per unit of the pool's mean weight (at least one). With equal
weights that is exactly VNODES each whatever the pool holds, so the two properties above are
exact; with unequal weights, a join or leave that changes the mean weight also rescales every
endpoint's share of points. An endpoint's points are the first k of its own endless sequence
(SHAKE-128 output, an extendable hash), so a rescale adds or drops points only at the tail:
keys move in proportion to the change, not wholesale.

A ring is rebuilt once per pool snapshot, from the previous snapshot's ring when it can be:
if every endpoint that stays keeps its number of points, only the points of the endpoints that
left or joined change, which costs O(points changed + ring size in C) instead of hashing and
sorting the whole ring again (see loadtest/pick_bench.py for both costs).

Hashes are fixed functions (SHAKE-128 for points, BLAKE2b for keys), the same in every process
and version, unlike Python's hash(), which is salted per process and would give each replica
its own ring.
"""

from __future__ import annotations

import struct
from bisect import bisect_left
from collections.abc import Iterator, Sequence
from functools import cache
from hashlib import blake2b, shake_128

from proxy.core.balancing.metadata import weight_of
from proxy.core.endpoints import Endpoint

# 160 points per endpoint keep each of 5 endpoints' share of keys within about +-3 points of
# 20% (the spread shrinks as 1/sqrt(points)); more buy little and cost memory and rebuild time.
VNODES = 160


def key_hash(key: bytes) -> int:
    """A key's position on the ring: the first 64 bits of its BLAKE2b digest."""
    return int.from_bytes(blake2b(key, digest_size=8).digest(), "big")


@cache
def _unpacker(count: int) -> struct.Struct:
    return struct.Struct(f"<{count}Q")


def endpoint_points(address: str, count: int) -> tuple[int, ...]:
    """The first `count` points of the endpoint at `address` (a prefix of a fixed sequence)."""
    digest = shake_128(address.encode("utf-8", "surrogateescape")).digest(8 * count)
    return _unpacker(count).unpack(digest)


class HashRing:
    """The ring of one pool snapshot: sorted points, and which address owns each point."""

    __slots__ = (
        "_counts",
        "_owner_of",
        "addresses",
        "endpoints",
        "exact",
        "points",
        "total_weight",
        "weights",
    )

    def __init__(self, endpoints: Sequence[Endpoint], previous: HashRing | None = None) -> None:
        # One ring node per address: the same backend registered under two keys is still one
        # backend, and must not get twice the keys. Of the duplicates, the smallest key
        # speaks for it, so the choice does not depend on the pool's order.
        by_address: dict[str, Endpoint] = {}
        for ep in endpoints:
            held = by_address.get(ep.address)
            if held is None or ep.key < held.key:
                by_address[ep.address] = ep
        self.addresses: tuple[str, ...] = tuple(sorted(by_address))
        self.endpoints = by_address
        self.weights = {a: weight_of(ep) for a, ep in by_address.items()}
        self.total_weight = sum(self.weights.values())
        self._counts: dict[str, int] = {}
        if by_address:
            mean_weight = self.total_weight / len(by_address)
            self._counts = {
                a: max(1, round(VNODES * w / mean_weight)) for a, w in self.weights.items()
            }
        # False once two points collided (odds ~1e-9 for a 1,000-endpoint ring): the loser's
        # point is then missing, and only a full build knows to bring it back.
        self.exact = True
        self.points: list[int] = []
        self._owner_of: dict[int, str] = {}
        if previous is None or not self._follow(previous):
            self._build()

    def _build(self) -> None:
        owner_of: dict[int, str] = {}
        # Going through the addresses from the largest down, the smallest address wins a
        # collision on every replica (the later update overwrites).
        for address in reversed(self.addresses):
            points = endpoint_points(address, self._counts[address])
            before = len(owner_of)
            owner_of.update(dict.fromkeys(points, address))
            if len(owner_of) - before != len(points):
                self.exact = False
        self._owner_of = owner_of
        self.points = sorted(owner_of)

    def _follow(self, previous: HashRing) -> bool:
        """Derive this ring from the previous one if only joins and leaves differ; False
        when a full build is needed (a survivor's point count changed, or a collision)."""
        if not previous.exact:
            return False
        old_counts = previous._counts
        new_counts = self._counts
        for address, count in new_counts.items():
            if old_counts.get(address, count) != count:
                return False
        gone = [a for a in old_counts if a not in new_counts]
        added = [a for a in new_counts if a not in old_counts]
        if not gone and not added:
            # Same addresses, same counts (only metadata or keys changed): the same points.
            # A ring is never changed once built, so the two can share them.
            self._owner_of = previous._owner_of
            self.points = previous.points
            return True
        owner_of = previous._owner_of.copy()
        points = previous.points
        if gone:
            removed: list[int] = []
            for address in gone:
                for point in endpoint_points(address, old_counts[address]):
                    del owner_of[point]
                    removed.append(point)
            removed.sort()
            # Cut the removed points out of the sorted list by slices: a C copy of the ring
            # and one bisect per removed point, instead of a Python pass over every point.
            kept: list[int] = []
            start = 0
            for point in removed:
                at = bisect_left(points, point, start)
                kept += points[start:at]
                start = at + 1
            kept += points[start:]
            points = kept
        else:
            points = list(points)
        new_points: list[int] = []
        for address in added:
            for point in endpoint_points(address, new_counts[address]):
                if point in owner_of:
                    return False  # a collision: let the full build settle who wins
                owner_of[point] = address
                new_points.append(point)
        new_points.sort()
        # Two sorted runs: timsort merges them in linear time.
        points += new_points
        points.sort()
        self._owner_of = owner_of
        self.points = points
        return True

    def __len__(self) -> int:
        return len(self.addresses)

    def position(self, key: bytes) -> int:
        """Where the key lands: the index of the first point at or after its hash."""
        at = bisect_left(self.points, key_hash(key))
        return 0 if at == len(self.points) else at

    def owner_at(self, position: int) -> str:
        return self._owner_of[self.points[position]]

    def owner(self, key: bytes) -> Endpoint:
        return self.endpoints[self.owner_at(self.position(key))]

    def walk(self, position: int) -> Iterator[str]:
        """The distinct owners met going round from `position`: the key's owner first, then
        where its keys would go if that one were gone, and so on."""
        points = self.points
        owner_of = self._owner_of
        total = len(points)
        seen: set[str] = set()
        want = len(self.addresses)
        for step in range(total):
            owner = owner_of[points[(position + step) % total]]
            if owner in seen:
                continue
            seen.add(owner)
            yield owner
            if len(seen) == want:
                return

"""The one balancer the server asks "which endpoint for this call?".

Theory of operation: a pick is a pure decision over (pool snapshot, call headers, per-endpoint
in-flight counts, addresses already tried, which addresses are usable), in this precedence:

1. pin: a pin header names one instance (see pin.py). The call goes there or nowhere: if the
   instance is gone, the call is refused rather than moved, because a stateful session must
   learn that its state is gone, not silently start over elsewhere.
2. sticky: a sticky header's value is hashed onto a consistent-hash ring (see ring.py), so the
   same value reaches the same backend on every replica and across most pool changes;
   optionally with bounded loads (Mirrokni, Thorup, Zadimoghaddam 2017): a key whose owner
   holds more than its share of in-flight calls goes on round the ring.
3. the policy (round_robin, least_request, random; see policies.py), for every other call.

Everything derived from a snapshot (weights, the ring, the pin index, the policy's own
state) is built when a target's snapshot object changes, once, and kept until the next one;
the ring and the pin index only when a call first needs them.

Every way of picking honours the same two filters. An address in `exclude` (tried already by
this call) is never returned. An endpoint for which `usable(address)` is false (in connect
backoff) is passed over while any usable one is left; if none is, a non-excluded unusable one
is returned anyway, as a probe, so a pool whose backends are all backing off still gets tried
instead of failing every call until a timer expires.
"""

from __future__ import annotations

import math
import random
import re
from collections.abc import Callable, Container, Mapping
from dataclasses import dataclass
from enum import Enum
from itertools import repeat
from types import MappingProxyType

from proxy.core.balancing.pin import PinIndex
from proxy.core.balancing.policies import POLICIES, Picker
from proxy.core.balancing.ring import HashRing
from proxy.core.balancing.table import PoolTable
from proxy.core.endpoints import Endpoint, PoolSnapshot
from proxy.core.h2.events import HeaderList

NO_CALLS: Mapping[str, int] = MappingProxyType({})

# gRPC metadata keys: lower-case letters, digits, '-', '_' and '.' (no pseudo-headers).
_HEADER_NAME = re.compile(rb"[0-9a-z_.\-]+")


class NoPickKind(Enum):
    EMPTY_POOL = "empty_pool"  # the pool has no endpoint at all (the snapshot says why)
    EXHAUSTED = "exhausted"  # every endpoint was already tried for this call
    NO_INSTANCE = "no_instance"  # the pinned instance is not in the pool
    INSTANCE_TRIED = "instance_tried"  # the pinned instance was already tried for this call


@dataclass(frozen=True, slots=True)
class NoPick:
    """Why a call gets no endpoint; the server answers it with UNAVAILABLE and `message`."""

    message: str
    kind: NoPickKind


class _TargetState:
    """What the balancer derived from one target's current snapshot."""

    __slots__ = ("_pins", "_previous_ring", "_ring", "picker", "snapshot", "table")

    def __init__(
        self,
        snapshot: PoolSnapshot,
        picker: Picker | None,
        table: PoolTable,
        previous: _TargetState | None,
    ) -> None:
        self.snapshot = snapshot
        self.table = table
        self.picker = picker  # None for an empty pool
        self._ring: HashRing | None = None
        self._pins: PinIndex | None = None
        # The last ring built for this target, which the next one is derived from cheaply
        # when only some endpoints joined or left.
        self._previous_ring = None if previous is None else previous.last_ring

    @property
    def last_ring(self) -> HashRing | None:
        return self._ring if self._ring is not None else self._previous_ring

    @property
    def ring(self) -> HashRing:
        if self._ring is None:
            self._ring = HashRing(self.table.endpoints, self._previous_ring)
            self._previous_ring = None
        return self._ring

    @property
    def pins(self) -> PinIndex:
        if self._pins is None:
            self._pins = PinIndex(self.table.endpoints)
        return self._pins


class Balancer:
    """Picks the endpoint for each call; one instance serves every target.

    `policy` is "round_robin" (smooth weighted round robin when weights differ, plain
    rotation otherwise), "least_request" (power of two choices on in-flight calls per unit
    of weight) or "random" (weighted when weights differ). Weights come from a dict
    metadata's `weight` (a positive number; anything else counts as 1).

    `sticky_header` hashes that header's value onto a consistent-hash ring keyed by endpoint
    address; `bounded_load` (a factor c > 1, e.g. 1.25; off when None) caps each endpoint at
    ceil(c * (in-flight calls of the pool + 1) * weight / total weight) calls, keys over the
    cap going on round the ring. `pin_header` names one instance (metadata id, etcd key's
    last segment, or address); a pin that matches nothing is refused, never moved. Header
    names are gRPC metadata keys (matched lower-case). Pin beats sticky beats policy; a call
    without the header (or with an empty value) falls through to the next.

    Raises ValueError naming the option when an option is invalid. `rng` makes the random
    choices reproducible (tests, benchmarks).
    """

    def __init__(
        self,
        policy: str = "round_robin",
        sticky_header: bytes | str | None = None,
        pin_header: bytes | str | None = None,
        bounded_load: float | None = None,
        *,
        rng: random.Random | None = None,
    ) -> None:
        factory = POLICIES.get(policy)
        if factory is None:
            known = ", ".join(sorted(POLICIES))
            raise ValueError(f"policy must be one of {known}, got {policy!r}")
        self.policy = policy
        self.sticky_header = _header_name("sticky_header", sticky_header)
        self.pin_header = _header_name("pin_header", pin_header)
        if self.pin_header is not None and self.pin_header.endswith(b"-bin"):
            # Instance ids are text; a -bin value is base64 of bytes that could never be
            # compared with an id without guessing at an encoding.
            raise ValueError(f"pin_header must not be a -bin header, got {self.pin_header!r}")
        if self.sticky_header is not None and self.sticky_header == self.pin_header:
            raise ValueError("sticky_header and pin_header must be different headers")
        if bounded_load is not None:
            if (
                isinstance(bounded_load, bool)
                or not isinstance(bounded_load, int | float)
                or not math.isfinite(bounded_load)
                or bounded_load <= 1
            ):
                raise ValueError(
                    "bounded_load must be a number greater than 1 (e.g. 1.25), "
                    f"got {bounded_load!r}"
                )
            if self.sticky_header is None:
                raise ValueError("bounded_load needs sticky_header: it bounds sticky keys only")
        self.bounded_load = None if bounded_load is None else float(bounded_load)
        self._factory = factory
        self._random = (rng or random.Random()).random
        self._targets: dict[str, _TargetState] = {}

    def pick(
        self,
        snapshot: PoolSnapshot,
        headers: HeaderList,
        exclude: Container[str] = (),
        usable: Callable[[str], bool] | None = None,
        inflight: Mapping[str, int] = NO_CALLS,
    ) -> Endpoint | NoPick:
        """The endpoint for a call with `headers` in `snapshot`'s pool, or why there is none.

        `exclude`: addresses this call already tried. `usable(address)`: false while the
        address is in connect backoff (None: all usable). `inflight`: calls in flight per
        address (missing: 0); only the pool's own addresses are read."""
        state = self._targets.get(snapshot.target)
        if state is None or state.snapshot is not snapshot:
            state = self._rebuild(snapshot)
        pin_value, sticky_value = self._header_values(headers)
        if pin_value is not None:
            return _pick_pinned(state, pin_value, exclude, usable)
        table = state.table
        picker = state.picker
        if picker is None:
            return NoPick(
                f"no backend for target {snapshot.target!r}: {snapshot.reason}",
                NoPickKind.EMPTY_POOL,
            )
        if sticky_value is not None:
            return self._pick_sticky(state, sticky_value, exclude, usable, inflight)
        index = picker.propose(inflight)
        address = table.addresses[index]
        if address not in exclude and (usable is None or usable(address)):
            picker.commit(index)
            return table.endpoints[index]
        allowed: list[int] = []
        probes: list[int] = []
        for i, address in enumerate(table.addresses):
            if address in exclude:
                continue
            if usable is None or usable(address):
                allowed.append(i)
            else:
                probes.append(i)
        if allowed:
            return table.endpoints[picker.choose(allowed, inflight)]
        if probes:
            return table.endpoints[picker.choose(probes, inflight)]
        return _exhausted(snapshot)

    def _rebuild(self, snapshot: PoolSnapshot) -> _TargetState:
        table = PoolTable.of(snapshot)
        picker = self._factory(table, self._random) if table.size else None
        state = _TargetState(snapshot, picker, table, self._targets.get(snapshot.target))
        self._targets[snapshot.target] = state
        return state

    def _header_values(self, headers: HeaderList) -> tuple[bytes | None, bytes | None]:
        """The first value of the pin and the sticky header; an empty value counts as absent
        (a client with no session yet, not a session named "")."""
        pin_name = self.pin_header
        sticky_name = self.sticky_header
        if pin_name is None and sticky_name is None:
            return None, None
        pin_value: bytes | None = None
        sticky_value: bytes | None = None
        pin_seen = pin_name is None
        sticky_seen = sticky_name is None
        for name, value in headers:
            if not pin_seen and name == pin_name:
                pin_seen = True
                pin_value = value or None
            elif not sticky_seen and name == sticky_name:
                sticky_seen = True
                sticky_value = value or None
            else:
                continue
            if pin_seen and sticky_seen:
                break
        if sticky_value is not None and sticky_name is not None and sticky_name.endswith(b"-bin"):
            # A -bin value is base64 text as received; padded and unpadded forms of the same
            # bytes are both valid gRPC, and must be the same key.
            sticky_value = sticky_value.rstrip(b"=") or None
        return pin_value, sticky_value

    def _pick_sticky(
        self,
        state: _TargetState,
        key: bytes,
        exclude: Container[str],
        usable: Callable[[str], bool] | None,
        inflight: Mapping[str, int],
    ) -> Endpoint | NoPick:
        ring = state.ring
        position = ring.position(key)
        address = ring.owner_at(position)
        factor = self.bounded_load
        # An owner with nothing in flight is always under its cap (a cap is at least 1), so
        # the fast path sums the pool's in-flight calls only when the owner is busy.
        if (
            address not in exclude
            and (usable is None or usable(address))
            and (factor is None or not inflight.get(address, 0))
        ):
            return ring.endpoints[address]
        has_room = _room_check(ring, inflight, factor)
        busy: str | None = None  # usable but at its cap
        probe: str | None = None  # not excluded, but in backoff
        for address in ring.walk(position):
            if address in exclude:
                continue
            if usable is not None and not usable(address):
                if probe is None:
                    probe = address
                continue
            if has_room(address):
                return ring.endpoints[address]
            if busy is None:
                busy = address
        # Over the cap beats unusable: the cap is about balance, backoff about reachability.
        if busy is not None:
            return ring.endpoints[busy]
        if probe is not None:
            return ring.endpoints[probe]
        return _exhausted(state.snapshot)


def _room_check(
    ring: HashRing, inflight: Mapping[str, int], factor: float | None
) -> Callable[[str], bool]:
    """Whether an owner may take one more call under bounded loads. The cap counts the call
    being placed, as the paper does: with c > 1 the caps add up to more than the calls, so
    some endpoint always has room."""
    if factor is None:
        return lambda address: True
    weights = ring.weights
    # O(N), but in C: the pool's own addresses only, as `inflight` may count other pools'.
    total = sum(map(inflight.get, ring.addresses, repeat(0)))
    share = factor * (total + 1) / ring.total_weight

    def has_room(address: str) -> bool:
        return inflight.get(address, 0) + 1 <= math.ceil(share * weights[address])

    return has_room


def _pick_pinned(
    state: _TargetState,
    value: bytes,
    exclude: Container[str],
    usable: Callable[[str], bool] | None,
) -> Endpoint | NoPick:
    # surrogateescape: a value that is not UTF-8 matches no id, and is shown, not raised on.
    name = value.decode("utf-8", "surrogateescape")
    snapshot = state.snapshot
    matches = state.pins.lookup(name)
    if not matches:
        message = f"no instance {name!r} in pool {snapshot.target!r}"
        if not snapshot.endpoints and snapshot.reason:
            message += f" ({snapshot.reason})"
        return NoPick(message, NoPickKind.NO_INSTANCE)
    probe: Endpoint | None = None
    for ep in matches:
        if ep.address in exclude:
            continue
        if usable is None or usable(ep.address):
            return ep
        # In backoff is still the answer: the session has nowhere else to go, and a probe
        # tells it whether the instance is back.
        if probe is None:
            probe = ep
    if probe is not None:
        return probe
    tried = ", ".join(sorted({ep.address for ep in matches}))
    return NoPick(
        f"instance {name!r} in pool {snapshot.target!r} unreachable: {tried} already tried "
        "for this call",
        NoPickKind.INSTANCE_TRIED,
    )


def _exhausted(snapshot: PoolSnapshot) -> NoPick:
    return NoPick(
        f"no backend left to try in pool {snapshot.target!r}: every one was tried for this call",
        NoPickKind.EXHAUSTED,
    )


def _header_name(option: str, name: bytes | str | None) -> bytes | None:
    if name is None:
        return None
    raw = name.encode("ascii", "replace") if isinstance(name, str) else bytes(name)
    lowered = raw.lower()
    if not _HEADER_NAME.fullmatch(lowered):
        raise ValueError(
            f"{option} must be a gRPC metadata key (letters, digits, '-', '_', '.'), got {name!r}"
        )
    return lowered

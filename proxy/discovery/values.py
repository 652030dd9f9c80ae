"""What an etcd key/value means for a target's pool: parsing and applying changes (pure).

Theory of operation: the pool of a target is a map ``{etcd key: Endpoint}``. A listing or a
batch of watch events turns into a new map through :func:`apply_events`, a pure function of
(old state, events) -> new state, so every rule below is unit-tested without etcd.

Values come in three shapes, all written by real registries (see the etcd naming docs):

* Go's ``endpoints.Manager``: ``{"Op":0,"Addr":"10.0.0.7:50051","Metadata":...}``;
* the etcd docs' etcdctl example (and the v3.3/3.4 ``naming.Update``): no ``Op``;
* a bare ``host:port`` (or ``[v6]:port``) written by hand-made registries.

A value that does not parse is *skipped*, exactly as Go's resolver does (it logs and
``continue``s): the write is treated as if it had not happened, so the key's previous valid
endpoint, if it had one, stays in the pool. Removing it instead would let one bad write (a
typo in ``etcdctl put``, a registry upgrade with a new format) empty a pool that was serving;
the price is that a stale address stays until the key is fixed or deleted, which is what the
``endpoints`` command and the invalid-value log line and counter are there to show. A delete
always removes the key, whatever its value was.
"""

from __future__ import annotations

import ipaddress
import json
import re
from collections import Counter
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

import structlog

from proxy.core.endpoints import Endpoint

log = structlog.get_logger("proxy.discovery")

# Go's endpoints.Manager writes Op 0 for "add"; 1 ("delete") is never stored as a value.
OP_ADD = 0
# RFC 1123 labels, plus "_": Docker Compose service names have it and resolve fine.
_HOSTNAME_LABEL = re.compile(r"^(?!-)[A-Za-z0-9_-]{1,63}(?<!-)$")
_MAX_VALUE_IN_REASON = 80

# invalid_values_total[(target, kind)]: etcd values skipped because they do not parse, counted
# once per distinct bad value of a key (a re-list does not count it again). The admin layer
# will export it; until then it is read directly.
invalid_values_total: Counter[tuple[str, str]] = Counter()


@dataclass(frozen=True, slots=True)
class Invalid:
    """Why the value of ``key`` is not an endpoint; ``kind`` is a short label for metrics."""

    key: str
    reason: str
    kind: str = "invalid"
    value: bytes = b""


@dataclass(frozen=True, slots=True)
class Put:
    """An etcd put (or a key found by a listing)."""

    key: str
    value: bytes


@dataclass(frozen=True, slots=True)
class Delete:
    """An etcd delete (including a lease expiry or revoke)."""

    key: str


Event = Put | Delete


@dataclass(frozen=True, slots=True)
class PoolState:
    """A target's pool as etcd describes it: endpoints by key, and keys whose value is bad.

    A key can be in both maps: its last valid endpoint is kept while its current value is
    invalid (see the module docstring).
    """

    endpoints: Mapping[str, Endpoint] = field(default_factory=dict)
    invalid: Mapping[str, Invalid] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class Applied:
    """The result of applying events: the new state and what changed on the way."""

    state: PoolState
    endpoints_changed: bool
    newly_invalid: tuple[Invalid, ...] = ()


# ------------------------------------------------------------------------------- parsing


def address_problem(address: str) -> str | None:
    """Why ``address`` is not a dialable ``host:port`` / ``[v6]:port``, or None if it is."""
    host, sep, port = address.rpartition(":")
    shown = _shorten(address)
    if not sep:
        # The etcd docs' own example stores "1.2.3.4" with no port; gRPC would assume 443,
        # which is almost never what the writer meant, so it is refused with a hint.
        return f"address {shown} has no port (write host:port)"
    if not port.isascii() or not port.isdigit() or not 1 <= int(port) <= 65535:
        return f"address {shown} has no valid port (1-65535)"
    if host.startswith("[") and host.endswith("]"):
        try:
            ipaddress.IPv6Address(host[1:-1])
        except ValueError:
            return f"address {shown} has an invalid IPv6 host"
        return None
    if ":" in host:
        return f"address {shown}: an IPv6 host must be in brackets, [v6]:port"
    if not host:
        return f"address {shown} has no host"
    if _looks_like_ipv4(host):
        try:
            ipaddress.IPv4Address(host)
        except ValueError:
            return f"address {shown} has an invalid IPv4 host"
        return None
    labels = host.removesuffix(".").split(".")
    if len(host) > 253 or not all(_HOSTNAME_LABEL.match(label) for label in labels):
        return f"address {shown} has an invalid host name"
    return None


def _looks_like_ipv4(host: str) -> bool:
    return all(part.isdigit() for part in host.split("."))


def parse_value(key: str, value: bytes) -> Endpoint | Invalid:
    """The endpoint that the etcd ``key`` with ``value`` describes, or why it describes none."""
    try:
        text = value.decode("utf-8").strip()
    except UnicodeDecodeError:
        return Invalid(key, "value is not UTF-8", "not_utf8", value)
    if not text:
        return Invalid(key, "value is empty", "empty", value)
    if text.startswith("{"):
        return _parse_json(key, value, text)
    problem = address_problem(text)
    if problem is not None:
        return Invalid(key, f"neither a JSON object nor host:port: {problem}", "bad_address", value)
    return Endpoint(text, key)


def _parse_json(key: str, value: bytes, text: str) -> Endpoint | Invalid:
    try:
        decoded = json.loads(text)
    except ValueError as exc:
        return Invalid(key, f"value is not valid JSON ({exc})", "bad_json", value)
    if not isinstance(decoded, dict):
        return Invalid(key, "JSON value is not an object", "bad_json", value)
    op = _go_field(decoded, "Op")
    # JSON booleans are ints in Python; Go would refuse to put one into an int field.
    if op is not None and (not isinstance(op, int) or isinstance(op, bool)):
        return Invalid(key, f"Op {json.dumps(op)} is not a number", "bad_op", value)
    if op is not None and op != OP_ADD:
        return Invalid(key, f"Op {op} is not add (0)", "bad_op", value)
    addr = _go_field(decoded, "Addr")
    if addr is None:
        return Invalid(key, "JSON value has no Addr", "no_addr", value)
    if not isinstance(addr, str):
        return Invalid(key, f"Addr {json.dumps(addr)} is not a string", "bad_address", value)
    problem = address_problem(addr.strip())
    if problem is not None:
        return Invalid(key, problem, "bad_address", value)
    return Endpoint(addr.strip(), key, _go_field(decoded, "Metadata"))


def _go_field(obj: dict[str, Any], name: str) -> Any:
    """``obj[name]`` as Go's encoding/json finds it: exact name first, then any case."""
    if name in obj:
        return obj[name]
    lowered = name.lower()
    for candidate, item in obj.items():
        if candidate.lower() == lowered:
            return item
    return None


def _shorten(text: str) -> str:
    if len(text) <= _MAX_VALUE_IN_REASON:
        return repr(text)
    return repr(text[:_MAX_VALUE_IN_REASON] + "...")


# ------------------------------------------------------------------------------- applying


def apply_events(state: PoolState, events: Iterable[Event]) -> Applied:
    """The state after ``events`` (in etcd order), and which keys just became invalid."""
    endpoints = dict(state.endpoints)
    invalid = dict(state.invalid)
    newly_invalid: dict[str, Invalid] = {}
    for event in events:
        if isinstance(event, Delete):
            endpoints.pop(event.key, None)
            invalid.pop(event.key, None)
            newly_invalid.pop(event.key, None)
            continue
        parsed = parse_value(event.key, event.value)
        if isinstance(parsed, Endpoint):
            endpoints[event.key] = parsed
            invalid.pop(event.key, None)
            newly_invalid.pop(event.key, None)
            continue
        # Skipped: the previous endpoint of this key (if any) stays, see the module docstring.
        known = invalid.get(event.key)
        if known is None or known.value != parsed.value:
            newly_invalid[event.key] = parsed
        invalid[event.key] = parsed
    changed = endpoints != state.endpoints
    return Applied(PoolState(endpoints, invalid), changed, tuple(newly_invalid.values()))


def apply_listing(state: PoolState, listing: Iterable[Put]) -> Applied:
    """The state after a fresh listing of the prefix replaces what ``state`` knew.

    Keys missing from the listing were deleted while we were not watching (for instance
    across a compaction), so they leave; the listed keys are applied as puts, which keeps the
    skip-bad-values rule identical to the watch path.
    """
    listed = list(listing)
    present = {put.key for put in listed}
    gone = [Delete(key) for key in {*state.endpoints, *state.invalid} if key not in present]
    return apply_events(state, [*gone, *listed])


def record_invalid(target: str, invalids: Iterable[Invalid]) -> None:
    """Log each newly invalid value once, with its reason, and count it."""
    for bad in invalids:
        invalid_values_total[(target, bad.kind)] += 1
        log.warning(
            "discovery.invalid_value", target=target, key=bad.key, reason=bad.reason, kind=bad.kind
        )

"""Parsing etcd values and applying etcd events to a pool: pure, no etcd, no sockets."""

from __future__ import annotations

import pytest

from proxy.core.endpoints import Endpoint
from proxy.discovery.values import (
    Delete,
    Invalid,
    PoolState,
    Put,
    address_problem,
    apply_events,
    apply_listing,
    invalid_values_total,
    parse_value,
    record_invalid,
)

KEY = "svc/x"


# ------------------------------------------------------------------------ value formats


@pytest.mark.parametrize(
    ("value", "address", "metadata"),
    [
        # Go's endpoints.Manager (json.Marshal of {Op, Addr, Metadata}, no tags).
        (b'{"Op":0,"Addr":"10.0.0.7:50051","Metadata":null}', "10.0.0.7:50051", None),
        (b'{"Op":0,"Addr":"10.0.0.7:50051","Metadata":{"id":"3"}}', "10.0.0.7:50051", {"id": "3"}),
        # The etcd docs' etcdctl example (and the 3.3/3.4 naming.Update): no Op.
        (b'{"Addr":"1.2.3.4:80","Metadata":"..."}', "1.2.3.4:80", "..."),
        (b'{"Addr":"backend.svc.cluster.local:443"}', "backend.svc.cluster.local:443", None),
        # Bare values of hand-written registries.
        (b"10.0.0.7:50051", "10.0.0.7:50051", None),
        (b"  10.0.0.7:50051\n", "10.0.0.7:50051", None),
        (b"[2001:db8::1]:50051", "[2001:db8::1]:50051", None),
        (b"localhost:50051", "localhost:50051", None),
        (b"my_service:50051", "my_service:50051", None),
        (b'{"Op":0,"Addr":"[::1]:9000","Metadata":[1,2]}', "[::1]:9000", [1, 2]),
        # Go's encoding/json matches field names case-insensitively.
        (b'{"op":0,"addr":"10.0.0.7:1","metadata":7}', "10.0.0.7:1", 7),
    ],
)
def test_valid_values(value: bytes, address: str, metadata: object) -> None:
    assert parse_value(KEY, value) == Endpoint(address, KEY, metadata)


@pytest.mark.parametrize(
    ("value", "reason", "kind"),
    [
        (b'{"Op":1,"Addr":"10.0.0.7:50051"}', "Op 1 is not add", "bad_op"),
        (b'{"Op":"0","Addr":"10.0.0.7:50051"}', 'Op "0" is not a number', "bad_op"),
        (b'{"Op":true,"Addr":"10.0.0.7:50051"}', "Op true is not a number", "bad_op"),
        (b'{"Op":0}', "no Addr", "no_addr"),
        (b'{"Addr":7}', "Addr 7 is not a string", "bad_address"),
        (b'{"Addr":"1.2.3.4","Metadata":"..."}', "has no port", "bad_address"),
        (b'{"Addr":"1.2.3.4:0"}', "no valid port", "bad_address"),
        (b'{"Addr":"1.2.3.4:65536"}', "no valid port", "bad_address"),
        (b'{"Addr":"1.2.3.4:http"}', "no valid port", "bad_address"),
        (b'{"Addr":"::1:80"}', "IPv6 host must be in brackets", "bad_address"),
        (b'{"Addr":"[zz::1]:80"}', "invalid IPv6 host", "bad_address"),
        (b'{"Addr":"300.1.1.1:80"}', "invalid IPv4 host", "bad_address"),
        (b'{"Addr":"bad host:80"}', "invalid host name", "bad_address"),
        (b'{"Addr":":80"}', "has no host", "bad_address"),
        (b'{"Addr":"10.0.0.7:50051"', "not valid JSON", "bad_json"),
        (b"[1,2]", "has no port", "bad_address"),
        (b"10.0.0.7", "has no port", "bad_address"),
        (b"", "empty", "empty"),
        (b"   ", "empty", "empty"),
        (b"\xff\xfe", "not UTF-8", "not_utf8"),
    ],
)
def test_invalid_values(value: bytes, reason: str, kind: str) -> None:
    result = parse_value(KEY, value)
    assert isinstance(result, Invalid), result
    assert reason in result.reason
    assert (result.key, result.kind, result.value) == (KEY, kind, value)


def test_json_that_is_not_an_object_is_invalid() -> None:
    result = parse_value(KEY, b'{"a":1}x')
    assert isinstance(result, Invalid)
    result = parse_value(KEY, b"{}")
    assert isinstance(result, Invalid) and "no Addr" in result.reason


def test_long_bare_values_are_shortened_in_the_reason() -> None:
    result = parse_value(KEY, b"x" * 500)
    assert isinstance(result, Invalid)
    assert len(result.reason) < 200


@pytest.mark.parametrize("address", ["a:1", "a.b.c:65535", "[::]:1", "127.0.0.1:80", "x-y.z.:9"])
def test_address_problem_accepts(address: str) -> None:
    assert address_problem(address) is None


# ------------------------------------------------------------------------ applying


def go(addr: str, op: int = 0) -> bytes:
    return f'{{"Op":{op},"Addr":"{addr}","Metadata":null}}'.encode()


def addresses(state: PoolState) -> dict[str, str]:
    return {key: ep.address for key, ep in state.endpoints.items()}


def test_puts_and_deletes_build_the_map() -> None:
    applied = apply_events(
        PoolState(),
        [Put("svc/a", go("10.0.0.1:1")), Put("svc/b", b"10.0.0.2:2"), Delete("svc/a")],
    )
    assert addresses(applied.state) == {"svc/b": "10.0.0.2:2"}
    assert applied.endpoints_changed
    assert applied.newly_invalid == ()


def test_changing_a_key_replaces_its_endpoint() -> None:
    first = apply_events(PoolState(), [Put("svc/a", go("10.0.0.1:1"))]).state
    applied = apply_events(first, [Put("svc/a", go("10.0.0.9:9"))])
    assert addresses(applied.state) == {"svc/a": "10.0.0.9:9"}
    assert applied.endpoints_changed


def test_an_identical_put_changes_nothing() -> None:
    first = apply_events(PoolState(), [Put("svc/a", go("10.0.0.1:1"))]).state
    applied = apply_events(first, [Put("svc/a", go("10.0.0.1:1"))])
    assert not applied.endpoints_changed


def test_a_bad_value_keeps_the_keys_previous_endpoint() -> None:
    first = apply_events(PoolState(), [Put("svc/a", go("10.0.0.1:1"))]).state
    applied = apply_events(first, [Put("svc/a", go("10.0.0.1:1", op=1))])
    # Skipped, as Go's resolver does: one bad write must not empty a serving pool.
    assert addresses(applied.state) == {"svc/a": "10.0.0.1:1"}
    assert not applied.endpoints_changed
    assert [bad.key for bad in applied.newly_invalid] == ["svc/a"]
    assert "Op 1 is not add" in applied.state.invalid["svc/a"].reason


def test_a_bad_value_for_a_new_key_adds_nothing() -> None:
    applied = apply_events(PoolState(), [Put("svc/a", b"nonsense")])
    assert applied.state.endpoints == {}
    assert set(applied.state.invalid) == {"svc/a"}
    assert not applied.endpoints_changed


def test_the_same_bad_value_again_is_not_new() -> None:
    first = apply_events(PoolState(), [Put("svc/a", b"nonsense")]).state
    assert apply_events(first, [Put("svc/a", b"nonsense")]).newly_invalid == ()
    other = apply_events(first, [Put("svc/a", b"other nonsense")])
    assert [bad.value for bad in other.newly_invalid] == [b"other nonsense"]


def test_a_valid_value_clears_the_invalid_mark() -> None:
    first = apply_events(PoolState(), [Put("svc/a", b"nonsense")]).state
    applied = apply_events(first, [Put("svc/a", b"10.0.0.1:1")])
    assert applied.state.invalid == {}
    assert addresses(applied.state) == {"svc/a": "10.0.0.1:1"}


def test_a_delete_removes_the_endpoint_and_the_invalid_mark() -> None:
    first = apply_events(
        PoolState(), [Put("svc/a", go("10.0.0.1:1")), Put("svc/a", b"nonsense")]
    ).state
    applied = apply_events(first, [Delete("svc/a")])
    assert applied.state == PoolState({}, {})
    assert applied.endpoints_changed


def test_bad_then_deleted_in_one_batch_is_not_reported() -> None:
    applied = apply_events(PoolState(), [Put("svc/a", b"nonsense"), Delete("svc/a")])
    assert applied.newly_invalid == ()


def test_deleting_an_unknown_key_changes_nothing() -> None:
    assert not apply_events(PoolState(), [Delete("svc/zz")]).endpoints_changed


def test_the_input_state_is_not_modified() -> None:
    first = apply_events(PoolState(), [Put("svc/a", b"10.0.0.1:1")]).state
    apply_events(first, [Delete("svc/a"), Put("svc/b", b"junk")])
    assert addresses(first) == {"svc/a": "10.0.0.1:1"}
    assert first.invalid == {}


def test_a_listing_replaces_the_state_and_removes_what_is_gone() -> None:
    first = apply_events(
        PoolState(),
        [Put("svc/a", b"10.0.0.1:1"), Put("svc/b", b"10.0.0.2:2"), Put("svc/c", b"junk")],
    ).state
    applied = apply_listing(first, [Put("svc/b", b"10.0.0.2:2"), Put("svc/d", b"10.0.0.4:4")])
    assert addresses(applied.state) == {"svc/b": "10.0.0.2:2", "svc/d": "10.0.0.4:4"}
    assert applied.state.invalid == {}
    assert applied.endpoints_changed


def test_a_listing_keeps_a_stale_endpoint_of_a_key_still_invalid() -> None:
    first = apply_events(PoolState(), [Put("svc/a", b"10.0.0.1:1"), Put("svc/a", b"junk")]).state
    applied = apply_listing(first, [Put("svc/a", b"junk")])
    assert addresses(applied.state) == {"svc/a": "10.0.0.1:1"}
    assert applied.newly_invalid == ()  # already reported
    assert not applied.endpoints_changed


def test_record_invalid_counts_per_target_and_kind() -> None:
    before = invalid_values_total[("t-unit", "bad_op")]
    record_invalid("t-unit", [Invalid("t-unit/a", "Op 1 is not add (0)", "bad_op")])
    assert invalid_values_total[("t-unit", "bad_op")] == before + 1

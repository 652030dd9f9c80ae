"""HPACK caches keyed on the dynamic table's generation (proxy/core/h2/hpack_cache.py).

The danger of caching HPACK is a stale answer: the same bytes mean something else once the
dynamic table changed. The nasty case is a change that leaves the table's *length* as it was
(one insertion evicting one entry), which a length-keyed cache would miss. Every test here
checks the caches against python-hyper's uncached hpack Encoder/Decoder as the reference.
"""

from __future__ import annotations

import pytest
from h2harness import RESPONSE, Peer
from hpack import Decoder, Encoder, NeverIndexedHeaderTuple
from hpack.table import table_entry_size
from hypothesis import given, settings
from hypothesis import strategies as st

from proxy.core.h2 import frames as fr
from proxy.core.h2.events import HeadersReceived
from proxy.core.h2.hpack_cache import CachingDecoder, CachingEncoder
from proxy.core.h2.validation import validate_request

REQUEST_HEADERS = [(b":method", b"POST"), (b":scheme", b"http"), (b":path", b"/")]
INDEX_62 = b"\xbe"  # indexed field: the newest dynamic-table entry


def literal_indexed(name: bytes, value: bytes) -> bytes:
    """Literal with incremental indexing, new name, no Huffman (RFC 7541 6.2.1)."""
    assert len(name) < 127 and len(value) < 127
    return b"\x40" + bytes([len(name)]) + name + bytes([len(value)]) + value


def size_update(size: int) -> bytes:
    """Dynamic table size update (RFC 7541 6.3), for sizes below 31 + 128."""
    assert 31 <= size < 31 + 128
    return bytes([0x3F, size - 31])


def as_pairs(headers: object) -> list[tuple[bytes, bytes]]:
    return [(bytes(n), bytes(v)) for n, v in headers]  # type: ignore[attr-defined]


def outcome(decode: object, block: bytes) -> tuple[str, object]:
    """("ok", fields with their indexability) or ("error", the exception's type)."""
    try:
        headers = decode(block)  # type: ignore[operator]
    except Exception as exc:
        return "error", type(exc)
    # Never-indexed fields must come back marked as such (the encoder keeps them so).
    return "ok", [(bytes(h[0]), bytes(h[1]), getattr(h, "indexable", True)) for h in headers]


class Reference:
    """CachingDecoder and an uncached Decoder, the same limits, fed the same blocks: same
    fields (or the same error), and the same table after every block."""

    def __init__(self, max_list: int = 1 << 20) -> None:
        self.cached = CachingDecoder(max_header_list_size=max_list)
        self.plain = Decoder(max_header_list_size=max_list)

    def check(self, block: bytes) -> tuple[str, object]:
        want = outcome(lambda b: self.plain.decode(b, raw=True), block)
        got = outcome(self.cached.decode, block)
        assert got == want, (block.hex(), got, want)
        assert list(self.cached._table.dynamic_entries) == list(
            self.plain.header_table.dynamic_entries
        )
        return want

    def decode(self, block: bytes) -> list[tuple[bytes, bytes]]:
        kind, fields = self.check(block)
        assert kind == "ok", (block.hex(), fields)
        return [(name, value) for name, value, _ in fields]  # type: ignore[attr-defined]


# ---------------------------------------------------------------------------- decoder


def test_decoder_one_entry_table_same_length_new_contents() -> None:
    # A 40-byte table holds exactly one entry of 3 + 1 + 32 = 36 bytes.
    ref = Reference()
    assert ref.decode(size_update(40) + literal_indexed(b"x-a", b"1")) == [(b"x-a", b"1")]
    assert ref.decode(INDEX_62) == [(b"x-a", b"1")]
    assert ref.decode(INDEX_62) == [(b"x-a", b"1")]  # now served from the cache
    # One insertion, one eviction: still one entry, different contents.
    assert ref.decode(literal_indexed(b"x-a", b"2")) == [(b"x-a", b"2")]
    assert len(ref.cached._table.dynamic_entries) == 1
    assert ref.decode(INDEX_62) == [(b"x-a", b"2")]  # a length-keyed cache says "1"
    assert ref.decode(literal_indexed(b"x-b", b"3")) == [(b"x-b", b"3")]
    assert ref.decode(INDEX_62) == [(b"x-b", b"3")]


def test_decoder_full_default_table_rotating_entries() -> None:
    # 64 entries of 64 bytes fill the default 4096-byte table exactly; from then on every
    # insertion evicts the oldest entry and the length stays 64.
    ref = Reference()
    value = b"v" * 27
    for i in range(64):
        ref.decode(literal_indexed(b"x-%03d" % i, value))
    assert table_entry_size(b"x-000", value) == 64
    assert len(ref.cached._table.dynamic_entries) == 64
    probe = INDEX_62 + bytes([0x80 | (62 + 63)])  # newest and oldest entries
    for i in range(64, 200):
        before = ref.decode(probe)
        assert before == [(b"x-%03d" % (i - 1), value), (b"x-%03d" % (i - 64), value)]
        ref.decode(literal_indexed(b"x-%03d" % i, value))
        assert len(ref.cached._table.dynamic_entries) == 64
        assert ref.decode(probe) != before


def test_decoder_replays_table_changes_of_a_repeated_block() -> None:
    # A block that inserts must insert again every time it arrives: it can not be cached.
    ref = Reference()
    block = literal_indexed(b"x-r", b"1")
    for _ in range(5):
        ref.decode(block)
    assert len(ref.cached._table.dynamic_entries) == 5


def test_decoder_size_update_then_same_block() -> None:
    ref = Reference()
    ref.decode(literal_indexed(b"x-a", b"1"))
    assert ref.decode(INDEX_62) == [(b"x-a", b"1")]
    ref.decode(size_update(31))  # too small for any entry: the table empties
    ref.decode(size_update(100))
    ref.decode(literal_indexed(b"x-b", b"2"))
    assert ref.decode(INDEX_62) == [(b"x-b", b"2")]


def test_decoder_last_two_blocks_are_answered_at_their_generation_only() -> None:
    """The two blocks decoded last are answered before the cache (a backend alternates its
    response headers and trailers); the same bytes after a table change are decoded anew."""
    ref = Reference()
    ref.decode(literal_indexed(b"x-a", b"1"))  # table: x-a
    ref.decode(literal_indexed(b"x-b", b"2"))  # table: x-b, x-a
    newest, older = INDEX_62, b"\xbf"
    first, second = ref.cached.decode(newest), ref.cached.decode(older)
    assert as_pairs(first) == [(b"x-b", b"2")] and as_pairs(second) == [(b"x-a", b"1")]
    ref.plain.decode(newest, raw=True), ref.plain.decode(older, raw=True)
    ref.cached._cache.clear()  # what answers now is the last-two check alone
    for _ in range(3):
        assert ref.cached.decode(newest) is first
        assert ref.cached.decode(older) is second
    # After a table change the same bytes mean other fields, whichever entry they match.
    ref.decode(literal_indexed(b"x-c", b"3"))  # table: x-c, x-b, x-a
    assert ref.decode(newest) == [(b"x-c", b"3")]  # matches the older entry's bytes
    assert ref.decode(older) == [(b"x-b", b"2")]
    ref.decode(literal_indexed(b"x-d", b"4"))  # table: x-d, x-c, x-b, x-a
    assert ref.decode(older) == [(b"x-c", b"3")]  # matches the newer entry's bytes


def test_decoder_cache_through_the_connection() -> None:
    """The same byte-identical HEADERS block on two streams must decode differently when the
    table changed in between without changing length."""
    peer = Peer()
    static = b"\x83\x86\x84"  # :method POST, :scheme http, :path /
    base = [(b":method", b"POST"), (b":scheme", b"http"), (b":path", b"/")]
    sid = 1
    events = peer.feed(fr.headers(sid, size_update(40) + static + literal_indexed(b"x-a", b"1")))
    assert events == [HeadersReceived(sid, [*base, (b"x-a", b"1")], False, False)]
    for value in (b"1", b"2", b"3", b"3", b"2"):
        if value != b"1":
            sid += 2
            peer.feed(fr.headers(sid, static + literal_indexed(b"x-a", value)))
        sid += 2
        events = peer.feed(fr.headers(sid, static + INDEX_62))
        assert events == [HeadersReceived(sid, [*base, (b"x-a", value)], False, False)]


# ---------------------------------------------------------------------------- encoder


class EncoderReference:
    """CachingEncoder and an uncached Encoder given the same header lists; a Decoder on the
    far side checks that the cached encoder's blocks mean what was encoded."""

    def __init__(self) -> None:
        self.cached = CachingEncoder()
        self.plain = Encoder()
        self.far = Decoder(max_header_list_size=1 << 20)

    def set_max_table_size(self, size: int) -> None:
        self.cached.set_max_table_size(size)
        size = min(size, 4096)
        if size != self.plain.header_table_size:
            self.plain.header_table_size = size

    def encode(self, headers: list, *, exact: bool = True) -> bytes:
        block = self.cached.encode(headers)
        want = self.plain.encode(headers, huffman=True)
        if exact:
            assert block == want, (headers, block, want)
        assert as_pairs(self.far.decode(block, raw=True)) == as_pairs(headers)
        return block


def test_encoder_one_entry_table_same_length_new_contents() -> None:
    ref = EncoderReference()
    ref.set_max_table_size(40)
    a1, a2 = [(b"x-a", b"1")], [(b"x-a", b"2")]
    ref.encode(a1)
    assert ref.encode(a1) == INDEX_62
    assert ref.encode(a1) == INDEX_62  # cached
    ref.encode(a2)  # evicts x-a: 1, table length still one
    assert len(ref.cached._table.dynamic_entries) == 1
    assert ref.encode(a1) != INDEX_62  # a length-keyed cache would replay INDEX_62
    assert ref.encode(a1) == INDEX_62


def test_encoder_full_default_table_rotating_entries() -> None:
    ref = EncoderReference()
    value = b"v" * 27
    for i in range(64):
        ref.encode([(b"x-%03d" % i, value)])
    assert ref.encode([(b"x-000", value)]) == bytes([0x80 | (62 + 63)])  # the oldest
    for i in range(64, 200):
        field = [(b"x-%03d" % i, value)]
        ref.encode(field)  # inserted, evicting the oldest: still 64 entries
        assert ref.encode(field) == INDEX_62
        ref.encode([(b"y-%03d" % i, value)])  # one more in, one more out
        assert len(ref.cached._table.dynamic_entries) == 64
        assert ref.encode(field) == b"\xbf"  # second newest; a length-keyed cache says 62


def test_encoder_last_two_lists_are_answered_at_their_generation_only() -> None:
    """The two lists encoded last (the very same objects) are answered first, and not once
    the table changed under them."""
    ref = EncoderReference()
    a, b = [(b"x-a", b"1")], [(b"x-b", b"2")]
    ref.encode(a), ref.encode(b)  # inserted: table x-b, x-a
    block_a, block_b = ref.encode(a), ref.encode(b)
    assert (block_a, block_b) == (b"\xbf", INDEX_62)
    ref.cached._by_identity.clear()  # what answers now is the last-two check alone
    for _ in range(3):
        assert ref.encode(a) == block_a and ref.encode(b) == block_b
    # After a table change the same list is encoded anew, whichever entry holds it.
    ref.encode([(b"x-c", b"3")])  # table: x-c, x-b, x-a
    assert ref.encode(a) == bytes([0x80 | 64])  # held by the older entry
    assert ref.encode(b) == b"\xbf"
    ref.encode([(b"x-d", b"4")])  # table: x-d, x-c, x-b, x-a
    assert ref.encode(b) == bytes([0x80 | 64])  # held by the newer entry


def test_encoder_table_size_changes_are_signalled() -> None:
    ref = EncoderReference()
    headers = [(b"x-a", b"1"), (b"x-b", b"2")]
    ref.encode(headers)
    ref.encode(headers)
    ref.set_max_table_size(0)
    block = ref.encode(headers)
    assert block[:1] == b"\x20"  # size update to 0 first
    ref.encode(headers)
    ref.set_max_table_size(1 << 16)  # capped at 4096
    block = ref.encode(headers)
    assert block[:3] == b"\x3f\xe1\x1f"  # size update to 4096
    ref.encode(headers)


def test_encoder_never_indexed_fields_stay_never_indexed() -> None:
    ref = EncoderReference()
    secret = [NeverIndexedHeaderTuple(b"authorization", b"Bearer t")]
    for _ in range(3):
        block = ref.encode(secret)
        assert block[0] & 0xF0 == 0x10  # literal never indexed
    assert ref.cached._table.dynamic_entries == ref.plain.header_table.dynamic_entries


def test_peer_header_table_size_reaches_the_encoder_through_settings() -> None:
    peer = Peer(settings={fr.SETTINGS_HEADER_TABLE_SIZE: 0})
    for sid in (1, 3, 5):
        peer.headers(sid, REQUEST_HEADERS, end_stream=True)
        peer.conn.send_headers(sid, [*RESPONSE, (b"x-id", b"same")], False)
        (frame,) = peer.out()
        if sid == 1:
            assert frame.payload[:1] == b"\x20"
        assert peer.decode(frame) == [*RESPONSE, (b"x-id", b"same")]
    assert len(peer.decoder.header_table.dynamic_entries) == 0


# ---------------------------------------------------------------------------- properties

NAMES = [b"x-a", b"x-b", b"x-c", b"content-type", b"grpc-status"]
VALUES = [b"", b"0", b"1", b"application/grpc", b"v" * 40, b"w" * 300]
FIELD = st.tuples(st.sampled_from(NAMES), st.sampled_from(VALUES))
OP = st.one_of(
    st.lists(FIELD, min_size=1, max_size=4).map(lambda h: ("encode", h)),
    st.sampled_from([0, 40, 64, 100, 200, 500, 4096, 10_000]).map(lambda s: ("size", s)),
)


@settings(max_examples=300, deadline=None)
@given(st.lists(OP, min_size=1, max_size=40))
def test_caches_agree_with_uncached_hpack(ops: list[tuple[str, object]]) -> None:
    """Random header lists (repeats are likely, so the caches hit) and table resizes: the
    caching encoder emits byte-for-byte what hpack emits, and the caching decoder reads those
    blocks exactly as an uncached decoder does."""
    enc = EncoderReference()
    dec = Reference()
    for kind, arg in ops:
        if kind == "size":
            assert isinstance(arg, int)
            enc.set_max_table_size(arg)
        else:
            assert isinstance(arg, list)
            block = enc.encode(arg)
            assert dec.decode(block) == arg


@settings(max_examples=300, deadline=None)
@given(st.lists(st.sampled_from([1, 2, 3, 4, 5, 6]), min_size=1, max_size=60))
def test_decoder_cache_with_small_rotating_table(choices: list[int]) -> None:
    """Blocks drawn from a handful of byte strings, some inserting into a 2-entry table, some
    reading its entries: the same bytes keep meaning different things."""
    blocks = {
        1: literal_indexed(b"x-a", b"1"),
        2: literal_indexed(b"x-a", b"2"),
        3: literal_indexed(b"x-b", b"1"),
        4: INDEX_62,
        5: b"\xbf",  # index 63: the older entry
        6: INDEX_62 + b"\xbf",
    }
    ref = Reference()
    ref.decode(size_update(80))  # two 36-byte entries fit
    ref.decode(blocks[1] + blocks[2])
    for choice in choices:
        ref.decode(blocks[choice])


def test_encoder_cache_keeps_never_indexed_and_indexable_twins_apart() -> None:
    ref = EncoderReference()
    ref.encode([NeverIndexedHeaderTuple(b"x-token", b"1")])  # literal never indexed, cached
    ref.encode([(b"x-token", b"1")])  # hpack: literal with incremental indexing, inserted
    ref.encode([(b"x-token", b"1")])  # hpack: indexed


# ---------------------------------------------------------------------------- volatile fields

GRPC_REQUEST = [
    (b":method", b"POST"),
    (b":scheme", b"http"),
    (b":path", b"/echo.Echo/UnaryEcho"),
    (b"content-type", b"application/grpc"),
    (b"user-agent", b"grpc-go/1.34.0"),
    (b"te", b"trailers"),
]


def volatile_last(headers: list[tuple[bytes, bytes]], volatile: set[bytes]) -> list:
    """What the far side decodes: the same fields, the volatile ones moved to the end."""
    return [h for h in headers if h[0] not in volatile] + [h for h in headers if h[0] in volatile]


def test_grpc_timeout_is_a_literal_that_leaves_the_table_and_the_cache_alone() -> None:
    """grpc-go sends a new grpc-timeout value on most calls: each must not change the table
    (which would invalidate every cached block) nor miss the cache for the rest."""
    enc = CachingEncoder()
    far = Decoder(max_header_list_size=1 << 20)
    generations = set()
    for i in range(50):
        headers = [*GRPC_REQUEST[:4], (b"grpc-timeout", b"%dm" % (19999 - i)), *GRPC_REQUEST[4:]]
        block = enc.encode(headers)
        assert as_pairs(far.decode(block, raw=True)) == volatile_last(headers, {b"grpc-timeout"})
        # Literal without indexing, literal name, plain value: the block's last bytes.
        value = b"%dm" % (19999 - i)
        assert block.endswith(b"\x00\x0cgrpc-timeout" + bytes([len(value)]) + value)
        if i:
            generations.add(enc._table.generation)
    assert len(generations) == 1  # only the first call indexed anything
    assert all(name != b"grpc-timeout" for name, _ in far.header_table.dynamic_entries)


def test_requests_with_a_deadline_reuse_the_block_of_their_other_fields_while_it_holds() -> None:
    """The fields other than the volatile ones, the same objects at the same generation, get
    the block encoded last; other objects, other contents or a changed table do not."""
    enc = CachingEncoder()
    far = Decoder(max_header_list_size=1 << 20)

    def check(headers: list) -> bytes:
        block = enc.encode(headers)
        assert as_pairs(far.decode(block, raw=True)) == volatile_last(headers, {b"grpc-timeout"})
        return block

    def request(i: int, *fields: tuple[bytes, bytes]) -> list:
        return [*GRPC_REQUEST[:4], (b"grpc-timeout", b"%dm" % i), *fields, *GRPC_REQUEST[4:]]

    check(request(1))  # inserts the fields
    first = check(request(2))
    assert check(request(3))[:-3] == first[:-3]  # the same head, a new deadline at the end
    twin = (b"user-agent", b"grpc-go/" + b"1.34.0")  # equal, not the same object
    check([*GRPC_REQUEST[:4], (b"grpc-timeout", b"4m"), twin, GRPC_REQUEST[5]])
    check([*GRPC_REQUEST[:4], (b"grpc-timeout", b"5m"), (b"user-agent", b"other/1")])
    check(request(6))
    check(request(7, (b"x-new", b"1")))  # inserted: the table changed under the last block
    check(request(8))
    check(request(9))


def test_twins_stay_apart_behind_a_volatile_field() -> None:
    """A list with a never-indexed field bypasses the caches, wherever the field stands: the
    cache once stopped looking at the first volatile field, and kept the sensitive list's
    block under the key of its indexable twin, which then went out never-indexed."""
    enc = CachingEncoder()
    far = Decoder(max_header_list_size=1 << 20)
    token = (b"x-token", b"secret")
    for headers in (GRPC_REQUEST, GRPC_REQUEST):  # its fields in the table, then cached
        far.decode(enc.encode(list(headers)), raw=True)
    sensitive = [*GRPC_REQUEST, (b"grpc-timeout", b"1m"), NeverIndexedHeaderTuple(*token)]
    far.decode(enc.encode(sensitive), raw=True)
    plain = [*GRPC_REQUEST, (b"grpc-timeout", b"2m"), token]
    decoded = {bytes(h[0]): h for h in far.decode(enc.encode(plain), raw=True)}
    assert bytes(decoded[b"x-token"][1]) == b"secret"
    assert decoded[b"x-token"].indexable  # hpack's own choice: indexed from now on


def test_a_name_with_many_values_becomes_volatile_and_a_few_alternating_ones_do_not() -> None:
    enc = CachingEncoder()
    far = Decoder(max_header_list_size=1 << 20)
    for i in range(40):
        agent = b"client-a" if i % 2 else b"client-b"  # a shared backend connection
        headers = [*REQUEST_HEADERS, (b"x-span", b"span-%04d" % i), (b"user-agent", agent)]
        expected = volatile_last(headers, enc.volatile & {b"x-span"})
        assert as_pairs(far.decode(enc.encode(headers), raw=True)) == expected
    assert b"x-span" in enc.volatile
    assert b"user-agent" not in enc.volatile
    spans = [v for n, v in far.header_table.dynamic_entries if n == b"x-span"]
    assert 0 < len(spans) <= 9  # indexed until it showed itself volatile, then never again


def test_long_volatile_names_and_values_use_multi_byte_lengths() -> None:
    enc = CachingEncoder()
    far = Decoder(max_header_list_size=1 << 20)
    enc.volatile.add(b"x-" + b"n" * 200)
    for size in (0, 126, 127, 128, 255, 16_384):
        headers = [*REQUEST_HEADERS, (b"x-" + b"n" * 200, b"v" * size), (b"traceparent", b"t")]
        assert as_pairs(far.decode(enc.encode(headers), raw=True)) == headers


VOLATILE_OP = st.lists(
    st.tuples(
        st.sampled_from([b"x-a", b"grpc-timeout", b"x-b", b"traceparent"]),
        st.binary(max_size=20).map(lambda b: b.hex().encode()),
    ),
    max_size=5,
)


@settings(max_examples=300, deadline=None)
@given(st.lists(VOLATILE_OP, min_size=1, max_size=40))
def test_blocks_with_volatile_fields_decode_to_the_same_fields(lists: list[list]) -> None:
    """Random lists mixing known-volatile, learned-volatile and stable fields: every block
    decodes (by a plain hpack Decoder, which keeps its table in step) to the list's fields,
    in order except that volatile names come last."""
    enc = CachingEncoder()
    far = Decoder(max_header_list_size=1 << 20)
    for fields in lists:
        headers = [*REQUEST_HEADERS, *fields]
        volatile = set(enc.volatile)
        block = enc.encode(headers)
        # A name may turn volatile during this very encode: then it is still in this block's
        # indexed part (learning happens as the block is built).
        assert as_pairs(far.decode(block, raw=True)) == volatile_last(headers, volatile)


def test_requests_alternating_between_a_few_cached_blocks_are_validated_once_each(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A grpc-go client's streams alternate between a few grpc-timeout values: each decoded
    (cached) list is checked once, not once per switch."""
    import proxy.core.h2.connection as connection

    checked = []

    def counting(headers: list) -> int | None:
        checked.append(headers)
        return validate_request(headers)

    monkeypatch.setattr(connection, "validate_request", counting)
    peer = Peer()
    lists = [[*GRPC_REQUEST, (b"grpc-timeout", b"%dm" % v)] for v in (19999, 19998, 19997)]
    sid = 1
    for _ in range(20):
        for headers in lists:
            (event,) = peer.headers(sid, headers)
            assert isinstance(event, HeadersReceived) and event.headers == headers
            peer.feed(fr.rst_stream(sid, 8))
            sid += 2
    # Blocks settle once the peer's encoder has indexed all three values: the first round's
    # blocks (literals) and the second's (indexed) are new; from then on, the same three.
    assert len(checked) <= 6, len(checked)
    assert len({id(h) for h in checked}) == len(checked)


# ---------------------------------------------------------------------------- lean decode path


ENCODE_OP = st.one_of(
    st.lists(
        st.tuples(
            st.sampled_from(
                [b"x-a", b"grpc-timeout", b":path", b"content-type", b"x-" + b"n" * 130]
            ),
            st.one_of(st.sampled_from([b"", b"1", b"application/grpc"]), st.binary(max_size=300)),
            st.booleans(),  # never indexed
        ),
        min_size=1,
        max_size=6,
    ).map(lambda h: ("encode", h)),
    st.sampled_from([0, 64, 200, 4096]).map(lambda s: ("size", s)),
    st.booleans().map(lambda h: ("huffman", h)),
)


@settings(max_examples=400, deadline=None)
@given(st.lists(ENCODE_OP, min_size=1, max_size=30), st.sampled_from([300, 1 << 16]))
def test_the_lean_decode_path_agrees_with_hpack(ops: list, max_list: int) -> None:
    """Blocks from hpack's encoder (indexed, literals with and without indexing, never
    indexed, size updates, Huffman or not, long strings, evictions), decoded with a list-size
    limit that some exceed: same fields, same errors, same table after every block."""
    encoder = Encoder()
    pair = Reference(max_list)
    huffman = True
    for kind, arg in ops:
        if kind == "size":
            encoder.header_table_size = arg
        elif kind == "huffman":
            huffman = arg
        else:
            fields = [NeverIndexedHeaderTuple(n, v) if never else (n, v) for n, v, never in arg]
            if pair.check(encoder.encode(fields, huffman=huffman))[0] == "error":
                return  # the connection would be closed: nothing after it counts


@settings(max_examples=600, deadline=None)
@given(
    st.lists(st.tuples(st.sampled_from([b"x-a", b"x-b"]), st.binary(max_size=40)), max_size=6),
    st.lists(st.tuples(st.integers(0, 60), st.integers(0, 255)), max_size=4),
    st.integers(0, 60),
)
def test_damaged_blocks_fail_as_hpack_fails(
    fields: list, damage: list[tuple[int, int]], cut: int
) -> None:
    """A valid block with bytes overwritten, or cut short: the caching decoder raises what
    hpack raises, or decodes what hpack decodes, and leaves the table as hpack leaves it."""
    encoder = Encoder()
    pair = Reference(1 << 16)
    pair.check(encoder.encode([(b"x-a", b"seed"), (b"x-b", b"seed")]))  # a table to index into
    block = bytearray(encoder.encode(fields or [(b"x-a", b"v")]))
    for position, byte in damage:
        if block:
            block[position % len(block)] = byte
    pair.check(bytes(block[: max(0, len(block) - cut)] if cut < len(block) else block))


def test_the_lean_path_handles_what_grpc_go_sends() -> None:
    """Indexed fields, then a new grpc-timeout as a literal with incremental indexing, indexed
    name and Huffman value: the block of most grpc-go calls once the table is warm."""
    encoder = Encoder()
    pair = Reference(1 << 16)
    request = [*GRPC_REQUEST, (b"grpc-timeout", b"19999m")]
    pair.check(encoder.encode(request))
    calls: list[bytes] = []
    original = pair.cached._decoder.decode

    def spy(data: bytes, raw: bool = False) -> object:
        calls.append(data)
        return original(data, raw=raw)

    pair.cached._decoder.decode = spy  # type: ignore[method-assign]
    for value in (b"19998m", b"19997m", b"19996m"):
        block = encoder.encode([*GRPC_REQUEST, (b"grpc-timeout", value)])
        assert block[-7] & 0xC0 == 0x40  # literal with incremental indexing, indexed name
        assert pair.check(block)[0] == "ok"
    assert calls == []  # decoded by the lean path, not by hpack


def test_giving_up_after_a_table_change_undoes_it() -> None:
    """The lean path adds an entry, then meets what it leaves to hpack: the table must be as
    before when hpack decodes the block from the start (else the entry would go in twice)."""
    pair = Reference(1 << 16)
    not_indexed = b"\x00" + bytes([3]) + b"x-n" + bytes([1]) + b"1"  # literal without indexing
    never = b"\x10" + bytes([3]) + b"x-s" + bytes([1]) + b"2"  # literal never indexed
    assert pair.check(literal_indexed(b"x-a", b"1") + not_indexed)[0] == "ok"
    assert pair.check(literal_indexed(b"x-b", b"2") + never + INDEX_62)[0] == "ok"
    assert [n for n, _ in pair.cached._table.dynamic_entries] == [b"x-b", b"x-a"]
    # An error after the change: hpack raises, from the state it would have had.
    assert pair.check(literal_indexed(b"x-c", b"3") + b"\xff\xff\xff\xff\xff\xff\x7f")[0] == "error"

"""HPACK through the `hpack` package, with caches keyed on the dynamic table's generation.

Decoding or encoding a header block with `hpack` costs tens of microseconds; a gRPC connection
sends the same few blocks over and over. A block is a pure function of its bytes and the
dynamic table's state, so a (generation, bytes) key is exact as long as the generation changes
on every change of the table: each insertion, eviction and size update bumps it. Only blocks
whose processing left the table untouched are cached, since replaying a cached result must not
skip a table change. The table's *length* would not do as a key: one insertion plus one
eviction leaves the length as it was and the contents different.

Fields whose value changes from call to call (``grpc-timeout``, which grpc-go clients send with
every deadline, and trace ids) would defeat the encoder's cache: each new value is a new key,
and indexing it changes the table, which invalidates every other key. The encoder sends such
*volatile* fields as literals without indexing (RFC 7541 6.2.2), after the cached block of
the rest: the table stays as it was, and the rest stays cached. A field name is volatile when
it is one of the known ones, or once it has shown more than ``_DISTINCT_MAX`` values on one
connection (a backend connection carries many clients; a few alternating user agents stay
indexed). The decoder cannot do the same: how the client encodes is the client's choice.

So a block the decoder has not seen at this generation is decoded by a lean loop first
(:func:`_decode_common`), which knows only what gRPC peers send once their table is set up:
indexed fields and literals with incremental indexing. Anything else, or anything wrong, and
it gives up; the table is put back as it was and ``hpack`` decodes the block (and raises what
it raises), so errors and rare representations keep hpack's exact behaviour.
"""

from __future__ import annotations

from collections import deque
from typing import Any, Final

from hpack import Decoder, Encoder, HPACKError
from hpack.hpack import encode_integer
from hpack.huffman_table import decode_huffman
from hpack.table import HeaderTable

from proxy.core.h2.events import HeaderList
from proxy.core.h2.hpack_table import GenerationTable

_CACHE_MAX: Final = 256
_BLOCK_MAX: Final = 4096  # bigger blocks are rare and not worth keeping
# Names known to carry a new value on (nearly) every call.
KNOWN_VOLATILE: Final = frozenset(
    (
        b"grpc-timeout",
        b"grpc-trace-bin",
        b"traceparent",
        b"x-request-id",
        b"x-b3-traceid",
        b"x-b3-spanid",
        b"x-b3-parentspanid",
        b"b3",
        b"uber-trace-id",
        b"x-amzn-trace-id",
        b"x-cloud-trace-context",
    )
)
_DISTINCT_MAX: Final = 8  # values of one name, past which it is volatile
_TRACKED_NAMES_MAX: Final = 64  # names whose values are counted, per connection


def _string(data: bytes) -> bytes:
    """An HPACK string literal without Huffman coding (RFC 7541 5.2): 7-bit prefix length."""
    n = len(data)
    if n < 127:  # a grpc-timeout or a trace id: one byte, without hpack's general loop
        return bytes((n,)) + data
    return bytes(encode_integer(n, 7)) + data


def literal_without_indexing(name: bytes, value: bytes) -> bytes:
    """A field the decoder must not add to its table, with a literal name (RFC 7541 6.2.2)."""
    return b"\x00" + _string(name) + _string(value)


# Index 1 is _STATIC[0]. Declared a tuple of any length: typed as hpack's literal of 61
# fields, compiled, each lookup by a computed index was a generic Python one.
_STATIC: Final[tuple[tuple[bytes, bytes], ...]] = HeaderTable.STATIC_TABLE
_STATIC_LEN: Final = len(_STATIC)
_INT_BYTES_MAX: Final = 4  # continuation bytes of an integer we decode (2^28): more, hpack's


_Saved = tuple["deque[tuple[bytes, bytes]]", int]  # a table's entries and size


class _GiveUp(Exception):
    """Not a block _decode_common knows, or not a valid one: hpack decides."""


def _read_integer(block: bytes, pos: int, value: int, end: int) -> tuple[int, int]:
    """The continuation bytes of an integer whose prefix was all ones (RFC 7541 5.1)."""
    shift = 0
    for _ in range(_INT_BYTES_MAX):
        if pos >= end:
            raise _GiveUp
        byte = block[pos]
        pos += 1
        value += (byte & 0x7F) << shift
        if byte < 0x80:
            return value, pos
        shift += 7
    raise _GiveUp


def _read_string(block: bytes, pos: int, end: int) -> tuple[bytes, int]:
    if pos >= end:
        raise _GiveUp
    first = block[pos]
    length = first & 0x7F
    pos += 1
    if length == 0x7F:
        length, pos = _read_integer(block, pos, length, end)
    stop = pos + length
    if stop > end:
        raise _GiveUp
    data = block[pos:stop]
    if first & 0x80:
        try:
            data = decode_huffman(data)
        except HPACKError:
            raise _GiveUp from None
    return data, stop


def _decode_common(
    block: bytes, table: GenerationTable, max_list_size: int, undo: list[_Saved]
) -> list[tuple[bytes, bytes]]:
    """Indexed fields and literals with incremental indexing (RFC 7541 6.1, 6.2.1); raises
    _GiveUp on anything else. Before its first change to ``table`` it puts what it needs to
    undo it in ``undo``."""
    headers: list[tuple[bytes, bytes]] = []
    entries = table.dynamic_entries
    list_size = 0
    pos = 0
    end = len(block)
    while pos < end:
        first = block[pos]
        pos += 1
        if first & 0x80:
            index = first & 0x7F
            if index == 0x7F:
                index, pos = _read_integer(block, pos, index, end)
            if 0 < index <= _STATIC_LEN:
                field = _STATIC[index - 1]
            elif _STATIC_LEN < index <= _STATIC_LEN + len(entries):
                field = entries[index - _STATIC_LEN - 1]
            else:
                raise _GiveUp
        elif first & 0x40:
            index = first & 0x3F
            if index == 0x3F:
                index, pos = _read_integer(block, pos, index, end)
            if index == 0:
                name, pos = _read_string(block, pos, end)
            elif index <= _STATIC_LEN:
                name = _STATIC[index - 1][0]
            elif index <= _STATIC_LEN + len(entries):
                name = entries[index - _STATIC_LEN - 1][0]
            else:
                raise _GiveUp
            value, pos = _read_string(block, pos, end)
            field = (name, value)
            if not undo:
                undo.append((entries.copy(), table._current_size))
            table.add(name, value)
        else:
            raise _GiveUp  # a size update, a literal not indexed: hpack's
        list_size += len(field[0]) + len(field[1]) + 32
        if list_size > max_list_size:
            raise _GiveUp  # hpack raises OversizedHeaderListError
        headers.append(field)
    return headers


class CachingDecoder:
    def __init__(self, max_header_list_size: int, max_table_size: int = 4096) -> None:
        self._decoder = Decoder(max_header_list_size=max_header_list_size)
        self._table = GenerationTable()
        self._decoder.header_table = self._table
        self._decoder.max_allowed_table_size = max_table_size
        self._cache: dict[tuple[int, bytes], HeaderList] = {}
        # The last two entries of the cache used, checked first: a connection mostly
        # alternates between two blocks (a backend's response headers and trailers; a
        # client's requests). Comparing the bytes skips the key tuple and the hash of a new
        # bytes object that a dict lookup costs (about 650 instructions a block).
        self._gen_a = self._gen_b = -1
        self._block_a = self._block_b = b""
        self._headers_a: HeaderList = []
        self._headers_b: HeaderList = []

    def decode(self, block: bytes) -> HeaderList:
        """Raises hpack.HPACKError subclasses on a malformed block or an oversized list."""
        gen: int = self._table.generation
        if gen == self._gen_a and block == self._block_a:
            return self._headers_a
        if gen == self._gen_b and block == self._block_b:
            return self._headers_b
        key = (gen, block)
        hit = self._cache.get(key)
        if hit is None:
            headers = self._decode(block)
            if self._table.generation != gen or len(block) > _BLOCK_MAX:
                return headers  # the block changed the table: not to be reused
            if len(self._cache) >= _CACHE_MAX:
                self._cache.clear()
            self._cache[key] = headers
            hit = headers
        self._gen_b, self._block_b, self._headers_b = self._gen_a, self._block_a, self._headers_a
        self._gen_a, self._block_a, self._headers_a = gen, block, hit
        return hit

    def _decode(self, block: bytes) -> HeaderList:
        table = self._table
        decoder = self._decoder
        undo: list[_Saved] = []
        try:
            headers = _decode_common(block, table, decoder.max_header_list_size, undo)
            # hpack's own last check (it matters once our limit shrank below the peer's size).
            if table.maxsize <= decoder.max_allowed_table_size:
                return headers
        except _GiveUp:
            pass
        if undo:
            table.dynamic_entries, table._current_size = undo[0]
            table.generation += 1  # back as it was; a new generation all the same, to be safe
        decoded: HeaderList = decoder.decode(block, raw=True)
        return decoded


class CachingEncoder:
    def __init__(self) -> None:
        self._encoder = Encoder()
        self._table = GenerationTable()
        self._encoder.header_table = self._table
        self._cache: dict[tuple[int, tuple[tuple[bytes, bytes], ...]], bytes] = {}
        # A relay mostly re-encodes lists that a decoder cache handed out before, the very
        # same list objects: (generation, block) by identity skips building the tuple key.
        # The entry holds the list, so its id cannot be reused while the entry lives.
        self._by_identity: dict[int, tuple[HeaderList, int, bytes]] = {}
        self._list_a: HeaderList | None = None  # the last two entries used (see encode)
        self._list_b: HeaderList | None = None
        self._gen_a = self._gen_b = -1
        self._block_a = self._block_b = b""
        # The last list with volatile fields: its other fields, and their block (see _encode).
        self._rest_fields: list[Any] = []
        self._rest_gen = -1
        self._rest_block = b""
        self.volatile: set[bytes] = set(KNOWN_VOLATILE)
        self._values: dict[bytes, set[bytes]] = {}  # name -> values seen, until volatile

    def set_max_table_size(self, size: int) -> None:
        # The peer's SETTINGS_HEADER_TABLE_SIZE bounds our table; we never grow past 4096 so
        # that a peer cannot make us hold more state than a default connection.
        size = min(size, 4096)
        if size != self._table.maxsize:
            self._encoder.header_table_size = size

    def encode(self, headers: HeaderList) -> bytes:
        gen: int = self._table.generation
        # The last two lists answered from the cache, checked first, by identity (as the
        # decoder's last two blocks): no id() boxed, no dict lookup.
        if headers is self._list_a and gen == self._gen_a:
            return self._block_a
        if headers is self._list_b and gen == self._gen_b:
            return self._block_b
        seen = self._by_identity.get(id(headers))
        if seen is not None and seen[0] is headers and seen[1] == gen:
            block = seen[2]
        else:
            block, replayable = self._encode(headers, gen)
            if not replayable:
                return block
            if len(self._by_identity) >= _CACHE_MAX:
                self._by_identity.clear()
            self._by_identity[id(headers)] = (headers, gen, block)  # the table is as it was
        self._list_b, self._gen_b, self._block_b = self._list_a, self._gen_a, self._block_a
        self._list_a, self._gen_a, self._block_a = headers, gen, block
        return block

    def _encode(self, headers: HeaderList, gen: int) -> tuple[bytes, bool]:
        """The block, and whether encoding left the table as it was at generation `gen`
        (only then may the same headers at that generation be answered with this block
        again)."""
        # Tuple equality ignores the NeverIndexedHeaderTuple subclass, so a list with a
        # never-indexed field would share a key with its indexable twin: such lists (rare:
        # sensitive values) bypass the caches both ways.
        volatile = self.volatile
        tail = b""
        # Looked at as objects: compiled, a `tuple[bytes, bytes]` variable is a C struct, and
        # binding an element to one would unbox it and forget its class (the flag with it).
        fields: list[Any] = headers
        rest: list[Any] | None = None  # the fields but the volatile ones, once one is seen
        for i, header in enumerate(fields):
            # A plain tuple (what the lean decoder and the relay build) has no flag: getattr's
            # default would cost a raised and caught AttributeError, some 4,000 instructions
            # a field under callgrind, on every cache miss. Every field is looked at, those
            # after a volatile one too: a sensitive field must stay never-indexed.
            if type(header) is not tuple and not getattr(header, "indexable", True):
                return bytes(self._encoder.encode(headers, huffman=True)), False
            if header[0] in volatile:
                if rest is None:
                    rest = fields[:i]
                tail += literal_without_indexing(header[0], header[1])
            elif rest is not None:
                rest.append(header)
        if rest is not None:
            # The same other fields as the last list with a volatile one, the very same
            # objects (the decoder hands out its table's own tuples): the same block, with no
            # key tuple to build and hash (the usual request of a gRPC client that sends a
            # deadline: only grpc-timeout changes).
            last = self._rest_fields
            if gen == self._rest_gen and len(rest) == len(last):
                same = True
                for j in range(len(rest)):
                    if rest[j] is not last[j]:
                        same = False
                        break
                if same:
                    return self._rest_block + tail, True
            headers = rest
        key = (gen, tuple(headers))
        block: bytes
        hit = self._cache.get(key)
        if hit is not None:
            block = hit
        else:
            self._learn(headers)
            resized = self._table.resized
            block = self._encoder.encode(headers, huffman=True)
            if self._table.generation != gen or resized or len(block) > _BLOCK_MAX:
                return block + tail if tail else block, False
            if len(self._cache) >= _CACHE_MAX:
                self._cache.clear()
            self._cache[key] = block
        if rest is not None:
            self._rest_fields, self._rest_gen, self._rest_block = rest, gen, block
        return block + tail if tail else block, True

    def _learn(self, headers: HeaderList) -> None:
        """Count the values of each regular field name (on cache misses only: a name that
        keeps missing the cache is what this looks for); past _DISTINCT_MAX, volatile."""
        values = self._values
        for name, value in headers:
            if name.startswith(b":"):
                continue  # pseudo-headers go first, in the cached part, always
            seen = values.get(name)
            if seen is None:
                if len(values) >= _TRACKED_NAMES_MAX:
                    continue
                seen = values[name] = set()
            seen.add(value)
            if len(seen) > _DISTINCT_MAX:
                self.volatile.add(name)
                seen.clear()

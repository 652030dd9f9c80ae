"""Frame types, flags and serializers (RFC 9113 section 4 and 6).

Serializers return ready-to-write bytes. They are plain functions over ints and bytes so that
the hot path pays for one struct.pack and one concatenation per frame, and so that tests can
build any frame, valid or not, from the same factory.
"""

from __future__ import annotations

import struct
from typing import Final

# Frame types.
DATA: Final = 0x0
HEADERS: Final = 0x1
PRIORITY: Final = 0x2
RST_STREAM: Final = 0x3
SETTINGS: Final = 0x4
PUSH_PROMISE: Final = 0x5
PING: Final = 0x6
GOAWAY: Final = 0x7
WINDOW_UPDATE: Final = 0x8
CONTINUATION: Final = 0x9

# Flags.
FLAG_END_STREAM: Final = 0x1
FLAG_ACK: Final = 0x1
FLAG_END_HEADERS: Final = 0x4
FLAG_PADDED: Final = 0x8
FLAG_PRIORITY: Final = 0x20

# Settings identifiers.
SETTINGS_HEADER_TABLE_SIZE: Final = 0x1
SETTINGS_ENABLE_PUSH: Final = 0x2
SETTINGS_MAX_CONCURRENT_STREAMS: Final = 0x3
SETTINGS_INITIAL_WINDOW_SIZE: Final = 0x4
SETTINGS_MAX_FRAME_SIZE: Final = 0x5
SETTINGS_MAX_HEADER_LIST_SIZE: Final = 0x6

PREFACE: Final = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"
FRAME_HEADER_SIZE: Final = 9
DEFAULT_MAX_FRAME_SIZE: Final = 16_384
MAX_MAX_FRAME_SIZE: Final = (1 << 24) - 1
DEFAULT_WINDOW: Final = 65_535
MAX_WINDOW: Final = (1 << 31) - 1
STREAM_ID_MASK: Final = 0x7FFF_FFFF

# length(24) is packed as a 32-bit word with the type in its low byte.
_HEADER = struct.Struct(">IBI")
_U32 = struct.Struct(">I")
_U32X2 = struct.Struct(">II")
_SETTING = struct.Struct(">HI")
# The bound method, looked up once: compiled, `_HEADER.pack(...)` looks the method up on every
# call (a few hundred instructions, five frames per serial call).
pack_header: Final = _HEADER.pack


def frame(kind: int, flags: int, stream_id: int, payload: bytes = b"") -> bytes:
    return pack_header((len(payload) << 8) | kind, flags, stream_id) + payload


def frame_header(kind: int, flags: int, stream_id: int, length: int) -> bytes:
    return pack_header((length << 8) | kind, flags, stream_id)


def data(stream_id: int, payload: bytes, end_stream: bool = False) -> bytes:
    return frame(DATA, FLAG_END_STREAM if end_stream else 0, stream_id, payload)


def headers(
    stream_id: int, block: bytes, end_stream: bool = False, max_frame_size: int = 16_384
) -> bytes:
    """HEADERS plus as many CONTINUATION frames as the peer's frame size requires."""
    es = FLAG_END_STREAM if end_stream else 0
    if len(block) <= max_frame_size:
        return frame(HEADERS, es | FLAG_END_HEADERS, stream_id, block)
    parts = [frame(HEADERS, es, stream_id, block[:max_frame_size])]
    for start in range(max_frame_size, len(block), max_frame_size):
        chunk = block[start : start + max_frame_size]
        last = start + max_frame_size >= len(block)
        parts.append(frame(CONTINUATION, FLAG_END_HEADERS if last else 0, stream_id, chunk))
    return b"".join(parts)


def rst_stream(stream_id: int, code: int) -> bytes:
    return frame(RST_STREAM, 0, stream_id, _U32.pack(code))


def settings(values: dict[int, int]) -> bytes:
    return frame(SETTINGS, 0, 0, b"".join(_SETTING.pack(k, v) for k, v in values.items()))


SETTINGS_ACK: Final = frame(SETTINGS, FLAG_ACK, 0)


def ping(opaque: bytes, ack: bool = False) -> bytes:
    return frame(PING, FLAG_ACK if ack else 0, 0, opaque)


def goaway(last_stream_id: int, code: int, debug: bytes = b"") -> bytes:
    return frame(GOAWAY, 0, 0, _U32X2.pack(last_stream_id, code) + debug)


def window_update(stream_id: int, increment: int) -> bytes:
    return frame(WINDOW_UPDATE, 0, stream_id, _U32.pack(increment))


def priority(stream_id: int, depends_on: int, weight: int = 15, exclusive: bool = False) -> bytes:
    dep = depends_on | (0x8000_0000 if exclusive else 0)
    return frame(PRIORITY, 0, stream_id, _U32.pack(dep) + bytes([weight]))


def parse_header(buf: bytes | bytearray | memoryview, offset: int = 0) -> tuple[int, int, int, int]:
    """(length, type, flags, stream_id) of the frame header at offset."""
    word, flags, stream_id = _HEADER.unpack_from(buf, offset)
    return word >> 8, word & 0xFF, flags, stream_id & STREAM_ID_MASK

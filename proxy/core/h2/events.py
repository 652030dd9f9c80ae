"""Events that a connection hands to its user after reading bytes. Small and cheap: one per frame
that matters, none for frames the codec answers by itself (SETTINGS, PING, WINDOW_UPDATE)."""

from __future__ import annotations

from dataclasses import dataclass

Header = tuple[bytes, bytes]
HeaderList = list[Header]


@dataclass(slots=True)
class HeadersReceived:
    """A complete header block. `is_trailers` is true for the second block of a stream."""

    stream_id: int
    headers: HeaderList
    end_stream: bool
    is_trailers: bool


@dataclass(slots=True)
class DataReceived:
    """A DATA payload. `flow_len` counts padding too; the user acknowledges `len(data)` with
    Connection.ack_data once it has forwarded the bytes, and the codec credits padding itself."""

    stream_id: int
    data: bytes
    end_stream: bool


@dataclass(slots=True)
class StreamReset:
    """The peer reset a stream (RST_STREAM), or the codec reset it for a stream-level error."""

    stream_id: int
    error_code: int
    remote: bool


@dataclass(slots=True)
class DataFlushed:
    """Bytes that were queued with send_data for this stream have now been written out."""

    stream_id: int
    length: int


@dataclass(slots=True)
class SettingsChanged:
    """The peer's SETTINGS were applied (only MAX_CONCURRENT_STREAMS matters to users)."""

    max_concurrent_streams: int


@dataclass(slots=True)
class GoAwayReceived:
    last_stream_id: int
    error_code: int
    debug: bytes


@dataclass(slots=True)
class PingAcked:
    opaque: bytes


Event = (
    HeadersReceived
    | DataReceived
    | StreamReset
    | DataFlushed
    | SettingsChanged
    | GoAwayReceived
    | PingAcked
)

"""Events that a connection hands to its user after reading bytes. Small and cheap: one per frame
that matters, none for frames the codec answers by itself (SETTINGS, PING, WINDOW_UPDATE).

Plain classes with an `__init__` written out, not dataclasses: compiled by mypyc, a dataclass's
`__init__` is the one the dataclasses module generates, Python bytecode run by the interpreter
on every event; a written one is compiled. `_Fields` gives them the dataclass's `==` and repr,
which tests and logs use.
"""

from __future__ import annotations

from typing import ClassVar

Header = tuple[bytes, bytes]
HeaderList = list[Header]


class _Fields:
    __slots__ = ()
    FIELDS: ClassVar[tuple[str, ...]] = ()

    def __eq__(self, other: object) -> bool:
        if type(other) is not type(self):
            return NotImplemented
        return all(getattr(self, f) == getattr(other, f) for f in self.FIELDS)

    def __hash__(self) -> int:
        raise TypeError(f"unhashable type: {type(self).__name__!r}")

    def __repr__(self) -> str:
        fields = ", ".join(f"{f}={getattr(self, f)!r}" for f in self.FIELDS)
        return f"{type(self).__name__}({fields})"


class HeadersReceived(_Fields):
    """A complete header block. `is_trailers` is true for the second block of a stream."""

    FIELDS = ("stream_id", "headers", "end_stream", "is_trailers")
    __slots__ = FIELDS

    def __init__(
        self, stream_id: int, headers: HeaderList, end_stream: bool, is_trailers: bool
    ) -> None:
        self.stream_id = stream_id
        self.headers = headers
        self.end_stream = end_stream
        self.is_trailers = is_trailers


class DataReceived(_Fields):
    """A DATA payload. `flow_len` counts padding too; the user acknowledges `len(data)` with
    Connection.ack_data once it has forwarded the bytes, and the codec credits padding itself."""

    FIELDS = ("stream_id", "data", "end_stream")
    __slots__ = FIELDS

    def __init__(self, stream_id: int, data: bytes, end_stream: bool) -> None:
        self.stream_id = stream_id
        self.data = data
        self.end_stream = end_stream


class StreamReset(_Fields):
    """The peer reset a stream (RST_STREAM), or the codec reset it for a stream-level error."""

    FIELDS = ("stream_id", "error_code", "remote")
    __slots__ = FIELDS

    def __init__(self, stream_id: int, error_code: int, remote: bool) -> None:
        self.stream_id = stream_id
        self.error_code = error_code
        self.remote = remote


class DataFlushed(_Fields):
    """Bytes that were queued with send_data for this stream have now been written out."""

    FIELDS = ("stream_id", "length")
    __slots__ = FIELDS

    def __init__(self, stream_id: int, length: int) -> None:
        self.stream_id = stream_id
        self.length = length


class SettingsChanged(_Fields):
    """The peer's SETTINGS were applied (only MAX_CONCURRENT_STREAMS matters to users)."""

    FIELDS = ("max_concurrent_streams",)
    __slots__ = FIELDS

    def __init__(self, max_concurrent_streams: int) -> None:
        self.max_concurrent_streams = max_concurrent_streams


class GoAwayReceived(_Fields):
    FIELDS = ("last_stream_id", "error_code", "debug")
    __slots__ = FIELDS

    def __init__(self, last_stream_id: int, error_code: int, debug: bytes) -> None:
        self.last_stream_id = last_stream_id
        self.error_code = error_code
        self.debug = debug


class PingAcked(_Fields):
    FIELDS = ("opaque",)
    __slots__ = FIELDS

    def __init__(self, opaque: bytes) -> None:
        self.opaque = opaque


Event = (
    HeadersReceived
    | DataReceived
    | StreamReset
    | DataFlushed
    | SettingsChanged
    | GoAwayReceived
    | PingAcked
)

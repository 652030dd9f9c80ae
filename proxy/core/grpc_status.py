"""gRPC status, read and written: the status a client reads from a response, the responses the
proxy makes itself, and how HTTP/2 resets map to gRPC codes.

See grpc/doc/PROTOCOL-HTTP2.md ("Errors") and http-grpc-status-mapping.md.
"""

from __future__ import annotations

from enum import IntEnum
from typing import Final

from proxy.core.h2.errors import ErrorCode
from proxy.core.h2.events import HeaderList


class Status(IntEnum):
    OK = 0
    CANCELLED = 1
    UNKNOWN = 2
    INVALID_ARGUMENT = 3
    DEADLINE_EXCEEDED = 4
    NOT_FOUND = 5
    ALREADY_EXISTS = 6
    PERMISSION_DENIED = 7
    RESOURCE_EXHAUSTED = 8
    FAILED_PRECONDITION = 9
    ABORTED = 10
    OUT_OF_RANGE = 11
    UNIMPLEMENTED = 12
    INTERNAL = 13
    UNAVAILABLE = 14
    DATA_LOSS = 15
    UNAUTHENTICATED = 16


# The codes the hot path compares with, as plain ints, once: naming an IntEnum member costs a
# metaclass attribute lookup each time, and these are on the path of every call.
OK: Final = 0
CANCELLED: Final = int(Status.CANCELLED)
UNKNOWN: Final = int(Status.UNKNOWN)
INTERNAL: Final = int(Status.INTERNAL)
UNAVAILABLE: Final = int(Status.UNAVAILABLE)

# grpc-status values as they come on the wire; anything else is UNKNOWN, as gRPC clients read it.
_STATUS_VALUES: Final[dict[bytes, int]] = {b"%d" % code: int(code) for code in Status}
# What a gRPC client makes of a response without grpc-status (http-grpc-status-mapping.md).
_HTTP_TO_STATUS: Final[dict[bytes, int]] = {
    b"400": Status.INTERNAL,
    b"401": Status.UNAUTHENTICATED,
    b"403": Status.PERMISSION_DENIED,
    b"404": Status.UNIMPLEMENTED,
    b"429": Status.UNAVAILABLE,
    b"502": Status.UNAVAILABLE,
    b"503": Status.UNAVAILABLE,
    b"504": Status.UNAVAILABLE,
}


def grpc_status_of(headers: HeaderList) -> int:
    """The status a client reads from a response's trailers (or trailers-only headers)."""
    for name, value in headers:
        if name == b"grpc-status":
            return _STATUS_VALUES.get(value, UNKNOWN)
    for name, value in headers:
        if name == b":status":
            return int(_HTTP_TO_STATUS.get(value, UNKNOWN))
    return UNKNOWN


_RESET_TO_STATUS: Final[dict[int, Status]] = {
    ErrorCode.CANCEL: Status.CANCELLED,
    ErrorCode.REFUSED_STREAM: Status.UNAVAILABLE,
    ErrorCode.ENHANCE_YOUR_CALM: Status.RESOURCE_EXHAUSTED,
    ErrorCode.INADEQUATE_SECURITY: Status.PERMISSION_DENIED,
}


def status_for_reset(code: int) -> Status:
    return _RESET_TO_STATUS.get(code, Status.INTERNAL)


def percent_encode(message: str) -> bytes:
    """grpc-message encoding: printable ASCII except '%' as is, the rest as %XX of UTF-8."""
    out = bytearray()
    for byte in message.encode("utf-8"):
        if 0x20 <= byte <= 0x7E and byte != 0x25:
            out.append(byte)
        else:
            out += b"%%%02X" % byte
    return bytes(out)


def trailers(status: Status, message: str) -> HeaderList:
    return [(b"grpc-status", b"%d" % status), (b"grpc-message", percent_encode(message))]


def trailers_only(status: Status, message: str) -> HeaderList:
    """A whole response in one HEADERS frame with END_STREAM: what a gRPC server sends when it
    fails a call before any message."""
    return [
        (b":status", b"200"),
        (b"content-type", b"application/grpc"),
        *trailers(status, message),
    ]

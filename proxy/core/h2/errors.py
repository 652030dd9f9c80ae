"""HTTP/2 error codes and the exceptions that carry them out of the codec."""

from __future__ import annotations

from enum import IntEnum


class ErrorCode(IntEnum):
    """RFC 9113 section 7."""

    NO_ERROR = 0x0
    PROTOCOL_ERROR = 0x1
    INTERNAL_ERROR = 0x2
    FLOW_CONTROL_ERROR = 0x3
    SETTINGS_TIMEOUT = 0x4
    STREAM_CLOSED = 0x5
    FRAME_SIZE_ERROR = 0x6
    REFUSED_STREAM = 0x7
    CANCEL = 0x8
    COMPRESSION_ERROR = 0x9
    CONNECT_ERROR = 0xA
    ENHANCE_YOUR_CALM = 0xB
    INADEQUATE_SECURITY = 0xC
    HTTP_1_1_REQUIRED = 0xD


def error_code_name(code: int) -> str:
    try:
        return ErrorCode(code).name
    except ValueError:
        return f"UNKNOWN_{code:#x}"


class H2ConnectionError(Exception):
    """The peer broke the protocol: the whole connection ends with GOAWAY(code)."""

    def __init__(self, code: ErrorCode, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message


class Http1RequestError(H2ConnectionError):
    """The peer spoke HTTP/1.x to a port that speaks gRPC over HTTP/2 with prior knowledge.
    `data`: every byte received so far, for an HTTP/1 parser to take over (gRPC-Web)."""

    def __init__(self, data: bytes = b"") -> None:
        super().__init__(ErrorCode.PROTOCOL_ERROR, "HTTP/1.x request on an HTTP/2 port")
        self.data = data


class TLSOnCleartextError(H2ConnectionError):
    """A TLS ClientHello on a cleartext (h2c) port: the client wanted TLS. It ends like any
    bad preface (GOAWAY(PROTOCOL_ERROR), which the client will not understand, then close);
    the own class lets the log and the counters say what happened."""

    def __init__(self) -> None:
        super().__init__(ErrorCode.PROTOCOL_ERROR, "TLS handshake on a cleartext h2c port")


class FloodError(H2ConnectionError):
    """An abuse limit tripped: the connection ends with GOAWAY(ENHANCE_YOUR_CALM)."""

    def __init__(self, limit: str, message: str) -> None:
        super().__init__(ErrorCode.ENHANCE_YOUR_CALM, message)
        self.limit = limit

"""gRPC-Web <-> gRPC: what changes between the two, as pure functions and small codecs.

Theory of operation
-------------------
gRPC-Web (https://github.com/grpc/grpc/blob/master/doc/PROTOCOL-WEB.md) is gRPC with the
parts a browser cannot do taken out: no HTTP trailers, no `te: trailers`, and optionally no
binary bodies. The proxy turns a gRPC-Web request into a native gRPC call to the backend and
turns the answer back, so a backend never knows a browser called it:

* The request's content-type `application/grpc-web[+proto]` (binary) or
  `application/grpc-web-text[+proto]` (base64) becomes `application/grpc[+proto]`, `te:
  trailers` is added, and what belongs to the hop is dropped (content-length, which base64
  changes, and the HTTP/1 connection headers); metadata and `grpc-timeout` pass as they are.
* A request body is the same length-prefixed messages as gRPC's. In text mode it is base64,
  decoded here incrementally: chunks arrive cut anywhere, and a client may pad each message
  on its own (`TextDecoder`). The frames are followed (`FrameChecker`), so a body that ends
  inside a frame, or a frame with a flag gRPC does not know, is a clear error for that call.
* The response's headers pass with the content-type turned back; the messages pass byte for
  byte, and the backend's trailers become the last frame of the body, flagged 0x80, holding
  `name: value\\r\\n` lines (`trailer_frame`). In text mode every chunk is base64-encoded on
  its own, padded (as grpc-web's own server-side code does), so each flush is a whole base64
  unit and a browser can decode a message the moment it arrives. A trailers-only response
  (an error before any message) stays a header block: gRPC-Web clients read grpc-status from
  the response headers then.
* Text mode changes byte counts, and flow control counts bytes: `WebRequest.acked` and
  `WebResponse.flushed` turn counts of one side into counts of the other.
* CORS (`CorsPolicy`): browsers send a preflight OPTIONS before any gRPC-Web call from another
  origin, which the proxy answers itself; allowed origins come from a setting and are none by
  default, so no browser page can call through the proxy until an operator says which.

Nothing here does I/O; the adapters are in proxy/core/web_call.py (HTTP/2) and
proxy/runtime/http1.py (HTTP/1.1).
"""

from __future__ import annotations

import binascii
from collections import deque
from dataclasses import dataclass
from typing import Final

from proxy.core.h2.events import HeaderList
from proxy.core.units import KiB, MiB

# What `web_kind` says of a request.
NATIVE: Final = 0  # not gRPC-Web: relayed as it is
BINARY: Final = 1  # application/grpc-web[+proto]
TEXT: Final = 2  # application/grpc-web-text[+proto]: base64 bodies
PREFLIGHT: Final = 3  # OPTIONS: a CORS preflight, answered by the proxy

_WEB: Final = b"application/grpc-web"
_TEXT_SUFFIX: Final = b"-text"
_GRPC: Final = b"application/grpc"
_WEB_CT: Final = b"application/grpc-web"
_TEXT_CT: Final = b"application/grpc-web-text"

# Fields that describe the hop, not the call: never passed on to the backend (RFC 9113 8.2.2
# forbids the connection-specific ones on HTTP/2). `host` becomes `:authority`; `te` is set
# anew; content-length would be wrong in text mode and is not needed in binary mode.
HOP_FIELDS: Final = frozenset(
    (
        b"connection",
        b"keep-alive",
        b"proxy-connection",
        b"transfer-encoding",
        b"upgrade",
        b"te",
        b"host",
        b"content-length",
        b"expect",
    )
)

# HTTP/1 limits, per request (`http1_*` settings). The head limit is h11's own default; the
# request line is what nginx allows by default (large_client_header_buffers 8k). A body is
# streamed under flow control, not buffered, so its limit bounds how much one request may
# send, not memory: 64 MiB is the largest message the native path is documented to carry,
# with room for base64.
DEFAULT_HTTP1_MAX_HEADER_SIZE: Final = 16 * KiB
DEFAULT_HTTP1_MAX_REQUEST_LINE: Final = 8 * KiB
DEFAULT_HTTP1_MAX_BODY_SIZE: Final = 64 * MiB

# The request headers a browser's gRPC-Web client sends beyond the CORS-safelisted ones,
# always allowed in a preflight answer (grpc-web and connect-web send these).
CORS_ALLOW_HEADERS: Final = (
    b"content-type",
    b"x-grpc-web",
    b"x-user-agent",
    b"grpc-timeout",
    b"grpc-accept-encoding",
    b"grpc-encoding",
    b"connect-protocol-version",
    b"connect-timeout-ms",
    b"authorization",
)
# The response fields a gRPC-Web client must read (a trailers-only response carries them in
# the headers), exposed to the page's script in every answer.
CORS_EXPOSE_HEADERS: Final = (b"grpc-status", b"grpc-message", b"grpc-status-details-bin")
# How long a browser may reuse a preflight answer: Chromium caps it at 2 h; 10 min lets a
# change of the allowed origins (SIGHUP needs a restart here, see the docs) take effect soon.
CORS_MAX_AGE_S: Final = 600


class WebRequestError(Exception):
    """A gRPC-Web request body that cannot be a gRPC request: ends that call alone."""


def web_kind(headers: HeaderList) -> int:
    """NATIVE, BINARY, TEXT or PREFLIGHT. Runs for every new stream while gRPC-Web is on, so
    a native request (content-type `application/grpc[+...]`) is told apart by two prefix
    compares once its content-type is found, with no allocation."""
    method = b""
    for name, value in headers:
        if name == b"content-type":
            kind = content_kind(value)
            # Pseudo-headers come first (RFC 9113 8.3), so the method is known by now.
            return PREFLIGHT if kind and method == b"OPTIONS" else kind
        if name == b":method":
            method = value
    return PREFLIGHT if method == b"OPTIONS" else NATIVE


def content_kind(content_type: bytes) -> int:
    """The kind of a request with this content-type (NATIVE for anything not gRPC-Web)."""
    if content_type == _GRPC:
        return NATIVE  # the usual spelling, by one compare
    # A slice compare, not startswith(b"-web", 16): compiled, startswith with a start offset
    # is a Python method call (about 1,000 instructions a stream).
    if content_type[16:20] == b"-web":
        return _web_content_kind(content_type)
    if content_type.startswith(_GRPC):
        return NATIVE  # application/grpc[+proto]: the native path, at no cost
    return _web_content_kind(content_type)  # other spellings: media types ignore case


def _web_content_kind(value: bytes) -> int:
    lowered = value.lower()
    if not lowered.startswith(_WEB):
        return NATIVE
    rest = lowered[len(_WEB) :]
    kind = BINARY
    if rest.startswith(_TEXT_SUFFIX):
        kind = TEXT
        rest = rest[len(_TEXT_SUFFIX) :]
    # `application/grpc-webfoo` is not gRPC-Web; `+proto`, `+json` and parameters are.
    if rest and rest[:1] not in (b"+", b";"):
        return NATIVE
    return kind


def _subtype_suffix(content_type: bytes, kind: int) -> bytes:
    """`+proto` of `application/grpc-web-text+proto`: the message format, kept."""
    skip = len(_TEXT_CT) if kind == TEXT else len(_WEB_CT)
    return content_type[skip:]


def native_request(headers: HeaderList, kind: int) -> HeaderList:
    """The backend's request headers for a gRPC-Web request's (pseudo-headers first)."""
    out: HeaderList = []
    for name, value in headers:
        if name in HOP_FIELDS:
            continue
        if name == b"content-type":
            value = _GRPC + _subtype_suffix(value, kind)
        out.append((name, value))
    out.append((b"te", b"trailers"))
    return out


def response_text(kind: int, accept: bytes | None) -> bool:
    """Whether the response is base64: text requests get text, and a binary request whose
    Accept asks for text does too (as Envoy's grpc_web filter decides)."""
    return kind == TEXT or (accept is not None and _TEXT_CT in accept.lower())


def header_value(headers: HeaderList, wanted: bytes) -> bytes | None:
    for name, value in headers:
        if name == wanted:
            return value
    return None


def trailer_frame(trailers: HeaderList) -> bytes:
    """The backend's trailers as gRPC-Web's last frame: flag 0x80, a 4-byte length, then
    `name: value\\r\\n` per field (names are lower-case already: HTTP/2 requires it)."""
    block = b"".join(name + b": " + value + b"\r\n" for name, value in trailers)
    return b"\x80" + len(block).to_bytes(4, "big") + block


# ---------------------------------------------------------------------------- requests


class TextDecoder:
    """Incremental base64 for text-mode request bodies. A chunk may end anywhere (the rest of
    its last 4-character unit waits for the next), and a unit may end with padding in the
    middle of the body (a client that encodes each message on its own)."""

    __slots__ = ("_pending", "offset")

    def __init__(self) -> None:
        self._pending = b""
        self.offset = 0  # characters decoded so far, for the error message

    def decode(self, data: bytes) -> bytes:
        buf = self._pending + data if self._pending else data
        n = len(buf) & ~3
        self._pending = buf[n:]
        if not n:
            return b""
        block = buf[:n]
        try:
            if b"=" not in block:  # the usual case: no padding (or only at the very end)
                out = binascii.a2b_base64(block, strict_mode=True)
            else:
                out = self._decode_units(block)
        except (binascii.Error, ValueError) as exc:
            raise WebRequestError(
                f"malformed gRPC-Web text request: invalid base64 after {self.offset} "
                f"characters ({exc})"
            ) from None
        self.offset += n
        return out

    @staticmethod
    def _decode_units(block: bytes) -> bytes:
        """Padded units one after the other: decode up to each padding's unit end."""
        parts = []
        start = 0
        while start < len(block):
            pad = block.find(b"=", start)
            end = len(block) if pad < 0 else (pad // 4 + 1) * 4
            # A padded unit is `xx==` or `xxx=` (binascii lets `====` through).
            if pad >= 0 and (pad % 4 < 2 or block[end - 1 : end] != b"="):
                raise ValueError("misplaced padding")
            parts.append(binascii.a2b_base64(block[start:end], strict_mode=True))
            start = end
        return b"".join(parts)

    def finish(self) -> None:
        if self._pending:
            raise WebRequestError(
                f"malformed gRPC-Web text request: the body ends inside a base64 unit "
                f"({len(self._pending)} characters after {self.offset})"
            )


class FrameChecker:
    """Follows the length-prefixed frames of a request body: a body that ends inside one, or
    a frame flagged other than 0 (plain) or 1 (compressed), is not a gRPC request. gRPC-Web
    requests carry no trailer frame (0x80): clients end the body instead."""

    __slots__ = ("_header", "_remaining")

    def __init__(self) -> None:
        self._header = b""  # a frame header split across chunks
        self._remaining = 0  # bytes of the current message still to come

    def feed(self, data: bytes) -> None:
        pos = 0
        end = len(data)
        while pos < end:
            if self._remaining:
                step = min(self._remaining, end - pos)
                self._remaining -= step
                pos += step
                continue
            take = min(5 - len(self._header), end - pos)
            self._header += data[pos : pos + take]
            pos += take
            if len(self._header) == 5:
                flag = self._header[0]
                if flag > 1:
                    raise WebRequestError(
                        f"malformed gRPC-Web request: a frame flagged {flag:#04x} "
                        "(only 0 and 1 are messages)"
                    )
                self._remaining = int.from_bytes(self._header[1:], "big")
                self._header = b""

    def finish(self) -> None:
        if self._header or self._remaining:
            missing = self._remaining or 5 - len(self._header)
            raise WebRequestError(
                f"malformed gRPC-Web request: the body ends inside a frame ({missing} bytes "
                "missing)"
            )


class WebRequest:
    """One request body on its way to the backend: decoded (text), checked, and with the
    counts to acknowledge to the client in its own bytes."""

    __slots__ = ("_acked_in", "_acked_out", "_frames", "_in", "_out", "_text")

    def __init__(self, text: bool) -> None:
        self._text = TextDecoder() if text else None
        self._frames = FrameChecker()
        self._in = 0  # bytes received from the client
        self._out = 0  # bytes handed to the call (decoded)
        self._acked_in = 0
        self._acked_out = 0

    def feed(self, data: bytes, end: bool) -> bytes:
        """The bytes for the backend; raises WebRequestError."""
        self._in += len(data)
        if self._text is not None:
            data = self._text.decode(data)
            if end:
                self._text.finish()
        self._frames.feed(data)
        if end:
            self._frames.finish()
        self._out += len(data)
        return data

    def acked(self, length: int) -> int:
        """The call forwarded `length` more bytes: how many client bytes that frees. In text
        mode it is the share of the received bytes (4 characters carry 3 bytes), all of them
        once everything decoded has been forwarded."""
        if self._text is None:
            return length
        self._acked_out += length
        if self._acked_out >= self._out:
            target = self._in
        else:
            target = self._acked_out * self._in // self._out
        n = target - self._acked_in
        self._acked_in = target
        return n


# ---------------------------------------------------------------------------- responses


class WebResponse:
    """One response on its way to the browser: headers turned back, messages (base64 in text
    mode), the trailer frame, and in text mode which backend bytes a flushed count covers."""

    __slots__ = ("_chunks", "text")

    def __init__(self, text: bool) -> None:
        self.text = text
        # Text mode: (encoded bytes, backend bytes) per chunk not yet reported flushed.
        self._chunks: deque[tuple[int, int]] = deque()

    def head(self, headers: HeaderList, extra: HeaderList) -> HeaderList:
        """Response headers (or a trailers-only block) for the client, with `extra` (CORS)."""
        out: HeaderList = []
        for name, value in headers:
            if name == b"content-type" and value.startswith(_GRPC):
                value = (_TEXT_CT if self.text else _WEB_CT) + value[len(_GRPC) :]
            elif name in HOP_FIELDS:
                continue  # a backend's content-length would be wrong once trailers are in the body
            out.append((name, value))
        out.extend(extra)
        return out

    def data(self, data: bytes) -> bytes:
        if not self.text:
            return data
        encoded = binascii.b2a_base64(data, newline=False)
        self._chunks.append((len(encoded), len(data)))
        return encoded

    def trailers(self, trailers: HeaderList) -> bytes:
        frame = trailer_frame(trailers)
        if not self.text:
            return frame
        encoded = binascii.b2a_base64(frame, newline=False)
        self._chunks.append((len(encoded), 0))  # ours: nothing to acknowledge to the backend
        return encoded

    def flushed(self, length: int) -> int:
        """`length` bytes of ours reached the client: the backend bytes they carried."""
        if not self.text:
            return length
        chunks = self._chunks
        raw = 0
        while length and chunks:
            encoded, backend = chunks[0]
            if length >= encoded:
                chunks.popleft()
                length -= encoded
                raw += backend
            else:  # part of a chunk: its share, the rest when the chunk is through
                part = backend * length // encoded
                chunks[0] = (encoded - length, backend - part)
                raw += part
                length = 0
        return raw


# ---------------------------------------------------------------------------- CORS


@dataclass(frozen=True, slots=True)
class CorsPolicy:
    """Which browser origins may call, and what their pages may send and read."""

    origins: frozenset[bytes] = frozenset()  # b"*": any origin
    allow_headers: bytes = b", ".join(CORS_ALLOW_HEADERS)
    expose_headers: bytes = b", ".join(CORS_EXPOSE_HEADERS)

    def allows(self, origin: bytes) -> bool:
        return origin in self.origins or b"*" in self.origins

    def response_headers(self, origin: bytes | None) -> HeaderList:
        """Added to a call's response: without them a page from another origin may not read
        it. The origin is echoed rather than `*`, which would not work with credentials."""
        if origin is None or not self.allows(origin):
            return []
        return [
            (b"access-control-allow-origin", origin),
            (b"access-control-expose-headers", self.expose_headers),
            (b"vary", b"origin"),
        ]

    def preflight(self, headers: HeaderList) -> tuple[int, HeaderList]:
        """The status and headers that answer an OPTIONS request. An origin not allowed gets
        403 without CORS headers, which the browser reports as a CORS failure."""
        origin = header_value(headers, b"origin")
        if origin is None or header_value(headers, b"access-control-request-method") is None:
            # Not a CORS preflight: say what the resource takes.
            return 204, [(b"allow", b"POST, OPTIONS")]
        if not self.allows(origin):
            return 403, [(b"content-length", b"0"), (b"vary", b"origin")]
        return 204, [
            (b"access-control-allow-origin", origin),
            (b"access-control-allow-methods", b"POST, OPTIONS"),
            (b"access-control-allow-headers", self.allow_headers),
            (b"access-control-max-age", b"%d" % CORS_MAX_AGE_S),
            (b"vary", b"origin"),
        ]


def cors_policy(
    origins: tuple[str, ...], allow_headers: tuple[str, ...], expose_headers: tuple[str, ...]
) -> CorsPolicy:
    allow = dict.fromkeys([*CORS_ALLOW_HEADERS, *(h.lower().encode() for h in allow_headers)])
    expose = dict.fromkeys([*CORS_EXPOSE_HEADERS, *(h.lower().encode() for h in expose_headers)])
    return CorsPolicy(
        frozenset(o.rstrip("/").encode() for o in origins),
        b", ".join(allow),
        b", ".join(expose),
    )


@dataclass(frozen=True, slots=True)
class WebSettings:
    """gRPC-Web as the listeners serve it (None on the listener: switched off)."""

    cors: CorsPolicy = CorsPolicy()
    http1_max_header_size: int = DEFAULT_HTTP1_MAX_HEADER_SIZE
    http1_max_request_line: int = DEFAULT_HTTP1_MAX_REQUEST_LINE
    http1_max_body_size: int = DEFAULT_HTTP1_MAX_BODY_SIZE

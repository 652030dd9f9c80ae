"""A gRPC-Web call: a `Call` whose client side translates (see proxy/core/grpcweb.py).

Theory of operation
-------------------
A `Call` talks to its client through `ClientSide.h2` (the codec's send_headers, send_data,
ack_data, grant). A gRPC-Web call gets a `WebClient` there instead: the same methods, which
turn the backend's answer into gRPC-Web (headers, base64 in text mode, the trailer frame)
before handing it to the real output, a client HTTP/2 stream (`H2WebClient`, here) or an
HTTP/1.1 response (`proxy.runtime.http1`). Native calls never meet any of this: they keep
their `Downstream` as client, and a `WebCall` is made only for a request `web_kind` named.

`WebCall` adds the two things the translator cannot see: request bytes from the client are
decoded and checked before the call relays them (`on_request_data`), and a count of bytes
flushed to the client is in the client's bytes, which base64 makes more than the backend's
(`on_client_flushed`), so it is turned into the backend's before the backend is credited.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Final

from proxy.core.call import Call
from proxy.core.grpc_status import Status, trailers
from proxy.core.grpcweb import (
    PREFLIGHT,
    TEXT,
    WebRequest,
    WebRequestError,
    WebResponse,
    WebSettings,
    header_value,
    native_request,
    response_text,
)
from proxy.core.h2.events import HeaderList

if TYPE_CHECKING:
    from proxy.core.buffers import ConnectionBuffer
    from proxy.core.identity import Identity
    from proxy.core.ports import CallRouter, ClientSide, ClientStreams

NO_TRAILERS: Final = "the backend ended the response without trailers"


class WebClient:
    """The `ClientSide` of one gRPC-Web call, and its `h2`: subclasses write the output."""

    def __init__(
        self,
        peer: str,
        identity: Identity | None,
        buffer: ConnectionBuffer,
        request: WebRequest,
        response: WebResponse,
        extra: HeaderList,
    ) -> None:
        self.peer = peer
        self.identity = identity
        self.buffer = buffer
        self.request = request
        self.response = response
        self.extra = extra  # CORS headers for the response
        self.responded = False  # the response's head went out

    @property
    def h2(self) -> WebClient:
        return self

    # ------------------------------------------------------------------ the output (subclasses)

    @property
    def queued(self) -> int:
        raise NotImplementedError

    def mark(self) -> None:
        raise NotImplementedError

    def call_finished(self, stream_id: int) -> None:
        raise NotImplementedError

    def write_head(self, sid: int, headers: HeaderList, end_stream: bool) -> None:
        raise NotImplementedError

    def write_body(self, sid: int, data: bytes, end_stream: bool) -> int:
        """Returns the bytes written at once (the rest are reported flushed later)."""
        raise NotImplementedError

    def ack_data(self, sid: int, length: int) -> None:
        raise NotImplementedError

    def grant(self, sid: int, length: int) -> None:
        raise NotImplementedError

    # ------------------------------------------------------------------ what Call calls

    def send_headers(self, sid: int, headers: HeaderList, end_stream: bool) -> None:
        if not self.responded:
            # Response headers, or a trailers-only response (end_stream): one header block
            # in both protocols, where gRPC-Web clients look for grpc-status too.
            self.responded = True
            self.write_head(sid, self.response.head(headers, self.extra), end_stream)
            return
        self.write_body(sid, self.response.trailers(headers), True)

    def send_data(self, sid: int, data: bytes, end_stream: bool = False) -> int:
        flushed = self.write_body(sid, self.response.data(data), False) if data else 0
        if end_stream:
            # A backend that ends without trailers: a native client fails the call as
            # INTERNAL itself; a gRPC-Web client needs the trailer frame to know.
            self.write_body(
                sid, self.response.trailers(trailers(Status.INTERNAL, NO_TRAILERS)), True
            )
        return flushed


class H2WebClient(WebClient):
    """Output to a stream of the client's HTTP/2 connection."""

    def __init__(
        self,
        down: ClientSide,
        request: WebRequest,
        response: WebResponse,
        extra: HeaderList,
    ) -> None:
        super().__init__(down.peer, down.identity, down.buffer, request, response, extra)
        self.down = down
        self.conn: ClientStreams = down.h2
        self.text = response.text

    @property
    def queued(self) -> int:
        return self.conn.queued

    def mark(self) -> None:
        self.down.mark()

    def call_finished(self, stream_id: int) -> None:
        self.down.call_finished(stream_id)

    def write_head(self, sid: int, headers: HeaderList, end_stream: bool) -> None:
        self.conn.send_headers(sid, headers, end_stream)

    def write_body(self, sid: int, data: bytes, end_stream: bool) -> int:
        return self.conn.send_data(sid, data, end_stream)

    def ack_data(self, sid: int, length: int) -> None:
        n = self.request.acked(length)
        if n:
            self.conn.ack_data(sid, n)

    def grant(self, sid: int, length: int) -> None:
        # A grant is window for bytes of the client's: base64 takes a third more.
        self.conn.grant(sid, length * 4 // 3 if self.text else length)


class WebCall(Call):
    """A call from a gRPC-Web client (its `client` is a `WebClient`)."""

    __slots__ = ("web",)

    def __init__(
        self,
        web: WebClient,
        stream_id: int,
        headers: HeaderList,
        end_stream: bool,
        router: CallRouter,
    ) -> None:
        super().__init__(web, stream_id, headers, end_stream, router)
        self.web = web

    def on_request_data(self, data: bytes, end_stream: bool) -> None:
        try:
            data = self.web.request.feed(data, end_stream)
        except WebRequestError as exc:
            # This call only: its backend stream is cancelled, the client told why.
            self.fail(Status.INTERNAL, str(exc))
            return
        super().on_request_data(data, end_stream)

    def on_client_flushed(self, length: int) -> None:
        raw = self.web.response.flushed(length)
        if raw:
            super().on_client_flushed(raw)


def open_h2_web_call(
    down: ClientSide,
    stream_id: int,
    headers: HeaderList,
    end_stream: bool,
    kind: int,
    web: WebSettings,
    router: CallRouter,
) -> WebCall | None:
    """A gRPC-Web request on a client HTTP/2 stream: its call (not started), or None for a
    CORS preflight, which is answered here and then."""
    origin = header_value(headers, b"origin")
    if kind == PREFLIGHT:
        status, answer = web.cors.preflight(headers)
        down.h2.send_headers(stream_id, [(b":status", b"%d" % status), *answer], True)
        down.mark()
        return None
    text = response_text(kind, header_value(headers, b"accept"))
    client = H2WebClient(
        down, WebRequest(kind == TEXT), WebResponse(text), web.cors.response_headers(origin)
    )
    return WebCall(client, stream_id, native_request(headers, kind), end_stream, router)

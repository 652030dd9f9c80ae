"""The client-facing side: one instance per accepted connection.

It turns codec events into calls: a request's HEADERS start a Call, DATA and trailers feed
it, RST_STREAM or a lost connection cancel it. A protocol error ends this connection alone
with GOAWAY; an HTTP/1.x request gets a short HTTP/1.1 answer saying what this port speaks.
"""

from __future__ import annotations

import asyncio
from typing import TYPE_CHECKING

import structlog

from proxy.h2.connection import Connection, Role
from proxy.h2.errors import FloodError, H2ConnectionError, Http1RequestError
from proxy.h2.events import (
    DataFlushed,
    DataReceived,
    GoAwayReceived,
    HeadersReceived,
    StreamReset,
)
from proxy.relay.call import Call
from proxy.relay.protocol import H2Protocol

if TYPE_CHECKING:
    from proxy.relay.server import ProxyServer

log = structlog.get_logger("proxy.downstream")

LINGER_S = 2.0

HTTP1_RESPONSE = (
    b"HTTP/1.1 505 HTTP Version Not Supported\r\n"
    b"content-type: text/plain\r\n"
    b"connection: close\r\n"
    b"content-length: 72\r\n\r\n"
    b"This port speaks gRPC over HTTP/2 (prior knowledge); HTTP/1 is refused.\n"
)


class Downstream(H2Protocol):
    def __init__(self, server: ProxyServer) -> None:
        super().__init__(server.flusher)
        self.server = server
        self.calls: dict[int, Call] = {}
        self.peer = "?"
        self._linger: asyncio.TimerHandle | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]  # uvloop's is not a subclass
        peer = transport.get_extra_info("peername")
        self.peer = f"{peer[0]}:{peer[1]}" if peer else "?"
        self.h2 = Connection(Role.SERVER, self.server.limits)
        self.server.connections.add(self)
        self.mark()

    def data_received(self, data: bytes) -> None:
        if self.closed:
            return  # lingering after GOAWAY: read and drop until the peer closes
        try:
            events = self.h2.receive_data(data)
        except Http1RequestError:
            self._abort(HTTP1_RESPONSE)
            return
        except H2ConnectionError as exc:
            limit = exc.limit if isinstance(exc, FloodError) else None
            log.warning(
                "client_protocol_error",
                peer=self.peer,
                code=exc.code.name,
                reason=exc.message,
                limit=limit,
            )
            self.server.count_connection_error(exc)
            self._abort(self.h2.close_with_error(exc))
            return
        calls = self.calls
        for ev in events:
            if isinstance(ev, DataReceived):
                call = calls.get(ev.stream_id)
                if call is not None:
                    call.on_request_data(ev.data, ev.end_stream)
                elif ev.data:
                    self.h2.ack_data(ev.stream_id, len(ev.data))  # nobody to give it to
            elif isinstance(ev, HeadersReceived):
                if ev.is_trailers:
                    call = calls.get(ev.stream_id)
                    if call is not None:
                        call.on_request_trailers(ev.headers)
                else:
                    call = Call(self, ev.stream_id, ev.headers, ev.end_stream, self.server)
                    calls[ev.stream_id] = call
                    call.start()
            elif isinstance(ev, DataFlushed):
                call = calls.get(ev.stream_id)
                if call is not None:
                    call.on_client_flushed(ev.length)
            elif isinstance(ev, StreamReset):
                call = calls.pop(ev.stream_id, None)
                if call is not None:
                    call.on_client_reset(ev.error_code)
            elif isinstance(ev, GoAwayReceived):
                pass  # the client opens no more streams; the ones it has finish
        self.mark()

    def data_flushed(self, stream_id: int, length: int) -> None:
        call = self.calls.get(stream_id)
        if call is not None:
            call.on_client_flushed(length)

    def call_finished(self, stream_id: int) -> None:
        self.calls.pop(stream_id, None)

    def _abort(self, last_words: bytes) -> None:
        """Say the last words (GOAWAY, or the HTTP/1 answer), then close. Closing a socket with
        unread input makes the kernel send RST, which can destroy the GOAWAY before the peer
        reads it; so we send FIN, drop what still arrives, and close when the peer does (or
        after a grace period)."""
        transport = self.transport
        if transport is not None and not self.closed:
            if last_words:
                transport.write(last_words)
            if transport.can_write_eof():
                transport.write_eof()
                self._linger = self.server.loop.call_later(LINGER_S, transport.close)
            else:
                transport.close()
        self.closed = True
        self._drop_calls()

    def _drop_calls(self) -> None:
        calls, self.calls = self.calls, {}
        for call in calls.values():
            call.on_client_reset(0x8)

    def eof_received(self) -> bool:
        return False  # close our side too

    def connection_lost(self, exc: Exception | None) -> None:
        if self._linger is not None:
            self._linger.cancel()
        self.closed = True
        self.server.connections.discard(self)
        self._drop_calls()

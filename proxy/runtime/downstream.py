"""The client-facing side: one instance per accepted connection.

It turns codec events into calls: a request's HEADERS start a Call, DATA and trailers feed
it, RST_STREAM or a lost connection cancel it. A protocol error ends this connection alone
with GOAWAY; an HTTP/1.x request gets a short HTTP/1.1 answer saying what this port speaks,
or, with gRPC-Web on, the connection is handed to the HTTP/1.1 protocol (proxy.runtime.http1).
A gRPC-Web request on HTTP/2 becomes a `WebCall` (proxy.core.web_call); native calls do not
pay for it beyond a look at each new stream's content-type.

Graceful drain (`start_drain`, when the proxy shuts down) takes two GOAWAYs, as RFC 9113
section 6.8 recommends and grpc-go's server does: first GOAWAY(NO_ERROR, last id 2^31-1)
with a PING, which tells the client to open no more streams while still serving the ones it
may have sent before it read that; then, when the PING comes back (everything the client sent
before it is here) or after `FINAL_GOAWAY_AFTER_S`, GOAWAY with the highest stream id we got,
after which the codec refuses new streams with RST_STREAM(REFUSED_STREAM), which a gRPC client
retries elsewhere. The connection closes as soon as its last call has ended and its last bytes
are out; `terminate` ends what is left when the drain time is up.
"""

from __future__ import annotations

import asyncio
from enum import IntEnum
from typing import TYPE_CHECKING, Final, Protocol

import structlog

from proxy.core.buffers import SHED_AT, ConnectionBuffer
from proxy.core.call import Call
from proxy.core.grpc_status import Status
from proxy.core.grpcweb import web_kind
from proxy.core.h2.connection import Connection, Role
from proxy.core.h2.errors import ErrorCode, FloodError, H2ConnectionError, Http1RequestError
from proxy.core.h2.events import (
    DataFlushed,
    DataReceived,
    GoAwayReceived,
    HeadersReceived,
    PingAcked,
    StreamReset,
)
from proxy.core.identity import identity_of
from proxy.core.web_call import open_h2_web_call
from proxy.runtime.http1 import Http1Connection
from proxy.runtime.protocol import H2Protocol
from proxy.runtime.tls import ALPN_H2, ALPN_HTTP1

if TYPE_CHECKING:
    from collections import Counter

    from proxy.core.buffers import BufferMeter
    from proxy.core.grpcweb import WebSettings
    from proxy.core.h2.limits import Limits
    from proxy.core.identity import Identity
    from proxy.core.ports import CallRouter
    from proxy.runtime.flusher import Flusher

log = structlog.get_logger("proxy.downstream")

LINGER_S = 2.0

MAX_STREAM_ID: Final = 0x7FFF_FFFF
# Our PING's payload, so its ack is told apart from anything else (we send no other PINGs).
DRAIN_PING: Final = b"drain\x00\x00\x01"
# A client that does not answer the PING gets the final GOAWAY after this. One second covers
# the round trip of any sane network; grpc-go waits 5 s (it once waited a minute) and Envoy
# its drain_timeout (5 s) with no PING, but each of those seconds is a second the shutdown
# cannot use for calls in flight, and a client that sent a stream in the gap gets it refused
# (REFUSED_STREAM: never processed, safe to retry), not lost.
FINAL_GOAWAY_AFTER_S: Final = 1.0


class Drain(IntEnum):
    NONE = 0
    WANTED = 1  # waiting for the client's preface: a server's first frame must be SETTINGS
    NOTICE_SENT = 2  # GOAWAY(2^31-1) and PING sent
    FINAL_SENT = 3  # GOAWAY(last stream id) sent: close once the calls have ended


HTTP1_RESPONSE = (
    b"HTTP/1.1 505 HTTP Version Not Supported\r\n"
    b"content-type: text/plain\r\n"
    b"connection: close\r\n"
    b"content-length: 72\r\n\r\n"
    b"This port speaks gRPC over HTTP/2 (prior knowledge); HTTP/1 is refused.\n"
)


class ListenerContext(Protocol):
    """What a client connection needs of the listener that accepted it."""

    router: CallRouter  # where its calls are routed
    flusher: Flusher
    limits: Limits
    client_limits: Limits  # `limits` with the base stream window, as client codecs use it
    meter: BufferMeter  # bytes held for clients, process-wide
    connection_buffer: int  # what one connection may hold (grants and queues)
    base_stream_window: int
    overload: Counter[str]  # what the proxy shed, by action
    loop: asyncio.AbstractEventLoop
    connections: set[Downstream]  # the open client connections
    draining: bool
    tls_failures: Counter[str]

    max_connections: int
    preface_timeout: float
    web: WebSettings | None  # gRPC-Web, or None: switched off
    http1_connections: set[Http1Connection]  # connections handed to HTTP/1.1 (gRPC-Web)

    def count_connection_error(self, exc: H2ConnectionError) -> None: ...

    def make_room(self, new: Downstream) -> bool:
        """Past max_connections: close an idle connection (True) or refuse `new` (False)."""
        ...


class Downstream(H2Protocol):
    def __init__(self, listener: ListenerContext) -> None:
        super().__init__(listener.flusher)
        self.listener = listener
        self.router = listener.router
        meter = listener.meter
        self.meter = meter
        # Made here, not on connect, so that every path to connection_lost finds it.
        self.h2 = Connection(Role.SERVER, listener.client_limits, meter=meter)
        self._shed_at = meter.budget * SHED_AT
        self.buffer = ConnectionBuffer(
            meter,
            listener.connection_buffer,
            listener.base_stream_window,
            listener.limits.stream_window,
        )
        # Streams holding data their client gives no window for: stream id -> (queued
        # bytes, send window, since when), updated by the listener's sweep (`stalled`).
        self._stall_marks: dict[int, tuple[int, int, float]] = {}
        self.idle_since = 0.0  # loop time since when it has had no call
        self.calls: dict[int, Call] = {}
        self.web = listener.web
        self.peer = "?"
        # What the client's verified certificate names (a TLS listener that requires one).
        self.identity: Identity | None = None
        self._linger: asyncio.TimerHandle | None = None
        self.draining = False  # the one drain check on the hot path
        self.drain = Drain.NONE
        self._drain_timer: asyncio.TimerHandle | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]  # uvloop's is not a subclass
        peer = transport.get_extra_info("peername")
        if isinstance(peer, tuple):
            self.peer = f"{peer[0]}:{peer[1]}"
        else:  # a Unix socket's peer has no address ('' from the kernel)
            self.peer = "unix" if peer is not None else "?"
        ssl_object = transport.get_extra_info("ssl_object")
        self.gather = ssl_object is None
        if ssl_object is not None:  # a TLS listener, the handshake done (tls_accept.py)
            alpn = ssl_object.selected_alpn_protocol()
            if alpn == ALPN_HTTP1 and self.web is not None:
                # Offered only with gRPC-Web on (tls.server_context): HTTP/1.1 from the start.
                self.identity = identity_of(ssl_object.getpeercert())
                self._to_http1(self.web, b"")
                return
            if alpn != ALPN_H2:
                # RFC 9113 3.2: h2 over TLS is chosen by ALPN. Python's ssl cannot send the
                # no_application_protocol alert, so the client gets close_notify at once.
                self.listener.tls_failures["no_h2"] += 1
                log.warning(
                    "tls_handshake_failed",
                    peer=self.peer,
                    kind="no_h2",
                    reason="the client did not select ALPN h2",
                )
                self.closed = True
                transport.close()
                return
            self.identity = identity_of(ssl_object.getpeercert())
        listener = self.listener
        self.idle_since = listener.loop.time()
        listener.loop.call_later(listener.preface_timeout, self._preface_timed_out)
        listener.connections.add(self)
        open_now = len(listener.connections) + len(listener.http1_connections)
        if open_now > listener.max_connections and not listener.make_room(self):
            return  # at the cap with nothing idle: this one was closed
        self.mark()
        if self.listener.draining:  # accepted just before the listener closed
            self.start_drain()

    def data_received(self, data: bytes) -> None:
        if self.closed:
            return  # lingering after GOAWAY: read and drop until the peer closes
        try:
            events = self.h2.receive_data(data)
        # Each except clause names its exception differently: compiled, one name is one
        # variable of one type, and the second clause would fail its type check.
        except Http1RequestError as http1:
            if self.web is not None:
                self._to_http1(self.web, http1.data)
            else:
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
            self.listener.count_connection_error(exc)
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
                elif self.h2.queued and self.meter.queued + self.meter.granted > self._shed_at:
                    # Near the buffer budget, a connection that leaves bytes unread gets no new
                    # streams (REFUSED_STREAM: never processed, safe to retry). Connections that
                    # read what they get are not refused: they hold nothing.
                    self.h2.reset_stream(ev.stream_id, ErrorCode.REFUSED_STREAM)
                    self.listener.overload["refused_stream"] += 1
                elif self.web is not None and (kind := web_kind(ev.headers)):
                    call = open_h2_web_call(
                        self, ev.stream_id, ev.headers, ev.end_stream, kind, self.web, self.router
                    )
                    if call is not None:  # None: a CORS preflight, answered
                        calls[ev.stream_id] = call
                        call.start()
                else:
                    call = Call(self, ev.stream_id, ev.headers, ev.end_stream, self.router)
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
            elif isinstance(ev, PingAcked) and ev.opaque == DRAIN_PING:
                self._final_goaway()
        self.mark()
        if self.draining:
            self._drain_step()

    def _to_http1(self, web: WebSettings, data: bytes) -> None:
        """The client speaks HTTP/1.x: from now on the connection is an Http1Connection's.
        Nothing was sent yet (a server's SETTINGS wait for the preface)."""
        transport = self.transport
        self.closed = True  # this object is done: its timers find it closed
        self.listener.connections.discard(self)
        if transport is None:
            return
        conn = Http1Connection(self.listener, web, self.peer, self.identity)
        transport.set_protocol(conn)
        conn.start(transport, data)

    def data_flushed(self, stream_id: int, length: int) -> None:
        call = self.calls.get(stream_id)
        if call is not None:
            call.on_client_flushed(length)

    def call_finished(self, stream_id: int) -> None:
        calls = self.calls
        try:  # noqa: SIM105 (compiled, pop(sid, None) and suppress are Python calls)
            del calls[stream_id]
        except KeyError:
            pass
        if not calls:
            self.idle_since = self.listener.loop.time()
        if self.draining:
            self._drain_step()

    # ------------------------------------------------------------------ graceful drain

    def start_drain(self) -> None:
        if self.draining or self.closed:
            return
        self.draining = True
        self.drain = Drain.WANTED
        self._drain_step()

    def _drain_step(self) -> None:
        """Move the drain on as far as it can go now."""
        if self.closed:
            return
        h2 = self.h2
        if self.drain is Drain.WANTED:
            if not h2.remote_settings_seen:
                return  # no preface yet; data_received calls again
            h2.goaway(ErrorCode.NO_ERROR, MAX_STREAM_ID)
            h2.ping(DRAIN_PING)
            self.drain = Drain.NOTICE_SENT
            self._drain_timer = self.listener.loop.call_later(
                FINAL_GOAWAY_AFTER_S, self._final_goaway
            )
            self.mark()
        elif self.drain is Drain.FINAL_SENT and not self.calls and not self._output_queued():
            self._abort(h2.data_to_send())

    def _final_goaway(self) -> None:
        if self.drain is not Drain.NOTICE_SENT or self.closed:
            return
        if self._drain_timer is not None:
            self._drain_timer.cancel()
            self._drain_timer = None
        self.drain = Drain.FINAL_SENT
        self.h2.goaway(ErrorCode.NO_ERROR)  # the highest stream id the client opened
        self.mark()
        self._drain_step()

    def _output_queued(self) -> bool:
        """Response bytes that flow control still holds back: the call has ended on our side,
        but closing now would cut its tail off."""
        return any(st.pending_len or st.pending_end for st in self.h2.streams.values())

    def terminate(self, message: str) -> None:
        """The drain time is up: end every call still running and close. A call gets
        UNAVAILABLE trailers, unless response bytes are stuck behind flow control (trailers
        would wait behind them), then RST_STREAM(CANCEL)."""
        if self.closed:
            return
        self.draining = False  # the calls ended below must not close us half-way through
        h2 = self.h2
        started = h2.remote_settings_seen
        if started and self.drain is not Drain.FINAL_SENT:
            h2.goaway(ErrorCode.NO_ERROR)
        self.drain = Drain.FINAL_SENT
        if self._drain_timer is not None:
            self._drain_timer.cancel()
            self._drain_timer = None
        for sid, call in list(self.calls.items()):
            if h2.pending_bytes(sid):
                del self.calls[sid]
                h2.reset_stream(sid, ErrorCode.CANCEL)
                call.on_client_reset(ErrorCode.CANCEL)
            else:
                call.fail(Status.UNAVAILABLE, message)
        # Calls that ended on our side with their last bytes still held back by the client:
        # without a reset the client would see the connection close under an open stream.
        for sid, st in list(h2.streams.items()):
            if st.pending_len or st.pending_end:
                h2.reset_stream(sid, ErrorCode.CANCEL)
        self._abort(h2.data_to_send() if started else b"")

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
                self._linger = self.listener.loop.call_later(LINGER_S, transport.close)
            else:
                transport.close()
        self.closed = True
        self._drop_calls()

    def _drop_calls(self) -> None:
        calls, self.calls = self.calls, {}
        for call in calls.values():
            call.on_client_reset(0x8)
        self.h2.discard_queued()  # never to be sent: out of the buffer budget

    def reset_stalled(self, now: float, timeout_s: float) -> int:
        """Reset the streams that have held queued data, with no window from the client, for
        `timeout_s` (their backend streams are cancelled); returns how many."""
        h2 = self.h2
        marks = self._stall_marks
        if not h2.queued:
            marks.clear()
            return 0
        seen: dict[int, tuple[int, int, float]] = {}
        stalled = []
        for sid, st in h2.streams.items():
            if not st.pending_len:
                continue
            state = (st.pending_len, st.send_window)
            mark = marks.get(sid)
            since = mark[2] if mark is not None and mark[:2] == state else now
            seen[sid] = (*state, since)
            if now - since >= timeout_s:
                stalled.append(sid)
        self._stall_marks = seen
        for sid in stalled:
            log.warning(
                "stalled_stream_reset",
                peer=self.peer,
                stream_id=sid,
                queued_bytes=h2.streams[sid].pending_len,
                stalled_s=round(now - seen[sid][2], 1),
            )
            h2.reset_stream(sid, ErrorCode.CANCEL)
            call = self.calls.pop(sid, None)
            if call is not None:
                call.on_client_reset(ErrorCode.CANCEL)
            seen.pop(sid, None)
        if stalled:
            self.mark()
        return len(stalled)

    def _preface_timed_out(self) -> None:
        if not self.closed and not self.h2.remote_settings_seen:
            log.warning("preface_timeout", peer=self.peer)
            self.listener.overload["preface_timeout"] += 1
            self._abort(b"")

    @property
    def idle(self) -> bool:
        """No call, nothing held: closing it loses nothing."""
        return not self.calls and not self.h2.queued and not self.closed

    def close_idle(self, why: str) -> None:
        """GOAWAY(NO_ERROR) and close: a client reconnects when it needs to."""
        log.info("idle_connection_closed", peer=self.peer, reason=why)
        h2 = self.h2
        h2.goaway(ErrorCode.NO_ERROR)
        self._abort(h2.data_to_send() if h2.remote_settings_seen else b"")

    def refuse(self) -> None:
        """At the connection cap with nothing idle to close: this connection is not served."""
        log.warning("connection_refused", peer=self.peer, reason="at --max-connections")
        self._abort(b"")

    def shed(self) -> None:
        """The process is over its buffer budget and this connection holds the most: its
        calls are cancelled (their backend streams reset), and it gets GOAWAY
        (ENHANCE_YOUR_CALM) and is closed."""
        if self.closed:
            return
        h2 = self.h2
        log.warning("buffer_shed", peer=self.peer, queued_bytes=h2.queued, calls=len(self.calls))
        for sid in list(h2.streams):
            h2.reset_stream(sid, ErrorCode.ENHANCE_YOUR_CALM)
        self._drop_calls()
        h2.goaway(ErrorCode.ENHANCE_YOUR_CALM, debug=b"over the buffer budget")
        self._abort(h2.data_to_send())

    def eof_received(self) -> bool:
        return False  # close our side too

    def connection_lost(self, exc: Exception | None) -> None:
        if self._linger is not None:
            self._linger.cancel()
        if self._drain_timer is not None:
            self._drain_timer.cancel()
        self.closed = True
        self.listener.connections.discard(self)
        self._drop_calls()

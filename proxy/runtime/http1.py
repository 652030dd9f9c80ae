"""gRPC-Web over HTTP/1.1: a client connection whose first bytes were an HTTP/1.x request.

Theory of operation
-------------------
A browser on a cleartext origin speaks HTTP/1.1, and gRPC-Web is built for that. `Downstream`
sees the request line where the HTTP/2 preface should be and, with gRPC-Web on, hands the
connection (`transport.set_protocol`) and the bytes read so far to an `Http1Connection`.

The HTTP/1.1 parsing is h11's (sans-I/O, like the HTTP/2 codec: bytes in, events out). One
request at a time, as HTTP/1.1 has it; a pipelined request waits in h11 until the response
before it is complete, then the connection goes on (keep-alive):

* OPTIONS: a CORS preflight, answered here (proxy.core.grpcweb.CorsPolicy).
* POST with a gRPC-Web content-type: a `WebCall` (proxy.core.web_call), relayed like any call.
  Its `Http1WebClient` writes h11 events: the response head, each message as a chunk of a
  chunked body as it arrives (never buffered to the end), and the trailer frame.
* Anything else: 405 or 415, with a body saying what the port takes, and the connection
  closes (its request body, if any, is not read).

Bad HTTP/1 (h11's RemoteProtocolError), a head over `http1_max_header_size`, a request line
over `http1_max_request_line` and a body over `http1_max_body_size` get 400, 431, 414 and 413
(or, once a response has started, the call fails) and close this connection only.

Flow control: HTTP/1.1 has none, so TCP is the window. Request bytes given to the call and
not yet acknowledged by it (forwarded to the backend) are counted; past a stream window the
connection stops reading, below half of it it reads again. Response bytes written while the
transport is over its high-water mark are acknowledged to the backend only when it drains
(`resume_writing`), so a browser that does not read holds back its backend stream alone.

A connection that closes under a call cancels it (RST_STREAM to the backend), as a client
stream reset does.
"""

from __future__ import annotations

import asyncio
from http import HTTPStatus
from typing import TYPE_CHECKING, Any, Final, cast

import h11
import structlog

from proxy.core.buffers import ConnectionBuffer
from proxy.core.grpc_status import Status
from proxy.core.grpcweb import (
    NATIVE,
    TEXT,
    WebRequest,
    WebResponse,
    WebSettings,
    content_kind,
    header_value,
    native_request,
    response_text,
)
from proxy.core.h2.errors import ErrorCode
from proxy.core.web_call import WebCall, WebClient

if TYPE_CHECKING:
    from proxy.core.h2.events import HeaderList
    from proxy.core.identity import Identity
    from proxy.runtime.downstream import ListenerContext

log = structlog.get_logger("proxy.http1")

LINGER_S: Final = 2.0
ACCEPTS: Final = (
    b"This port speaks gRPC over HTTP/2, and gRPC-Web over HTTP/1.1 and HTTP/2: POST with "
    b"content-type application/grpc-web, application/grpc-web+proto or "
    b"application/grpc-web-text (and OPTIONS, for CORS preflights).\n"
)
# The statuses a bad request may get (h11's hints are among them; any other is 400).
_ERRORS: Final = frozenset((400, 408, 413, 414, 415, 431))


def _reason(status: int) -> bytes:
    try:
        return HTTPStatus(status).phrase.encode()
    except ValueError:  # a status of the backend's own invention
        return b""


class Http1WebClient(WebClient):
    """The `ClientSide` of a call on an HTTP/1.1 connection: writes the response as h11
    events on that connection."""

    def __init__(
        self,
        conn: Http1Connection,
        request: WebRequest,
        response: WebResponse,
        extra: HeaderList,
    ) -> None:
        super().__init__(conn.peer, conn.identity, conn.buffer, request, response, extra)
        self.conn = conn

    @property
    def queued(self) -> int:
        return self.conn.queued

    def mark(self) -> None:
        self.conn.mark()

    def call_finished(self, stream_id: int) -> None:
        self.conn.call_finished()

    def write_head(self, sid: int, headers: HeaderList, end_stream: bool) -> None:
        status = 200
        fields: list[tuple[bytes, bytes]] = []
        for name, value in headers:
            if name == b":status":
                status = int(value)
            elif name[:1] != b":":
                fields.append((name, value))
        self.conn.respond(status, fields, end_stream)

    def write_body(self, sid: int, data: bytes, end_stream: bool) -> int:
        return self.conn.body(data, end_stream)

    def ack_data(self, sid: int, length: int) -> None:
        n = self.request.acked(length)
        if n:
            self.conn.request_acked(n)

    def grant(self, sid: int, length: int) -> None:
        self.conn.window += length


class Http1Connection(asyncio.Protocol):
    def __init__(
        self,
        listener: ListenerContext,
        web: WebSettings,
        peer: str,
        identity: Identity | None,
    ) -> None:
        self.listener = listener
        self.web = web
        self.peer = peer
        self.identity = identity
        self.loop = listener.loop
        self.flusher = listener.flusher
        self.router = listener.router
        self.h11 = h11.Connection(h11.SERVER, max_incomplete_event_size=web.http1_max_header_size)
        self.transport: asyncio.Transport | None = None
        self.buffer = ConnectionBuffer(
            listener.meter,
            listener.connection_buffer,
            listener.base_stream_window,
            listener.limits.stream_window,
        )
        self.call: WebCall | None = None
        self.closed = False
        self.dirty = False  # marked with the flusher (proxy.runtime.flusher.Writer)
        self.draining = False
        self.idle_since = self.loop.time()
        self._out: list[bytes] = []
        self._sid = -1  # the calls' stream ids: odd, one per request, as on HTTP/2
        self._body_bytes = 0  # of the current request
        # Request bytes the call has not acknowledged; past `window`, reading pauses.
        self._unacked = 0
        self.window = listener.client_limits.stream_window
        self._reading_paused = False
        self._write_paused = False
        self._paused_since = 0.0
        self._held = 0  # response bytes written while the transport was paused
        self._responding = False  # a response head went out, its end not yet
        self._close_after = False  # close once the current response is out
        self._closing = False  # closing once the output is written
        self._processing = False
        self._head_timer: asyncio.TimerHandle | None = None
        self._linger: asyncio.TimerHandle | None = None

    def start(self, transport: asyncio.Transport, data: bytes) -> None:
        """Take over from Downstream, with what it read."""
        self.transport = transport
        self.listener.http1_connections.add(self)
        if self.listener.draining:
            self.draining = True
        if data:  # none when TLS chose http/1.1 by ALPN: b"" would tell h11 the client left
            self.data_received(data)

    # ------------------------------------------------------------------ input

    def data_received(self, data: bytes) -> None:
        if self.closed or self._closing:
            return  # closing: what still arrives is dropped
        self.h11.receive_data(data)
        self._process()
        h = self.h11
        if self._head_timer is None and h.their_state is h11.IDLE and h.trailing_data[0]:
            # Part of a request head waits in h11: the rest must come in time (a slow-loris
            # client would hold the connection with a byte now and then). A head that came
            # whole, as it almost always does, costs no timer.
            self._head_timer = self.loop.call_later(
                self.listener.preface_timeout, self._head_timed_out
            )

    def eof_received(self) -> bool:
        return False  # close our side too; connection_lost cancels a call in flight

    def _process(self) -> None:
        if self._processing:
            return  # the loop below is running: it sees what changed
        self._processing = True
        try:
            while not self.closed and not self._closing:
                try:
                    event = self.h11.next_event()
                except h11.RemoteProtocolError as exc:
                    self._bad_request(exc.error_status_hint, str(exc))
                    break
                if event is h11.NEED_DATA:
                    break
                if event is h11.PAUSED:
                    if not self._next_cycle():
                        break
                elif isinstance(event, h11.Request):
                    self._on_request(event)
                elif isinstance(event, h11.Data):
                    # h11 hands out slices of its bytearray buffer, typed as bytes: compiled
                    # code checks the type, so it gets what the annotation says.
                    data = cast(Any, event).data  # as Any: no check on reading it
                    self._on_body(data if type(data) is bytes else bytes(data), False)
                elif isinstance(event, h11.EndOfMessage):
                    self._on_body(b"", True)
                elif isinstance(event, h11.ConnectionClosed):
                    self._close()
                    break
                else:  # h11 gives a server no other events; anything else is a bug here
                    raise AssertionError(f"unexpected h11 event {event!r}")
        finally:
            self._processing = False
        self.mark()

    def _on_request(self, req: h11.Request) -> None:
        if self._head_timer is not None:
            self._head_timer.cancel()
            self._head_timer = None
        web = self.web
        if len(req.method) + len(req.target) + 10 > web.http1_max_request_line:
            self._refuse(414, b"request line over %d bytes\n" % web.http1_max_request_line)
            return
        headers: HeaderList = [(name, value) for name, value in req.headers]
        # h11 bounds a head still arriving; one that came whole in a read is measured here.
        head_size = len(req.target) + sum(len(n) + len(v) + 4 for n, v in headers)
        if head_size > web.http1_max_header_size:
            self._refuse(431, b"request head over %d bytes\n" % web.http1_max_header_size)
            return
        if self.draining:
            self._close_after = True
        if req.method == b"OPTIONS":
            status, answer = web.cors.preflight(headers)
            self._answer(status, answer, b"")
            return
        content_type = header_value(headers, b"content-type")
        kind = content_kind(content_type) if content_type is not None else NATIVE
        if req.method != b"POST":
            self._refuse(405, ACCEPTS, [(b"allow", b"POST, OPTIONS")])
            return
        if kind == NATIVE:
            self._refuse(415, ACCEPTS)
            return
        if not req.target.startswith(b"/"):
            self._refuse(400, b"the request target must be a path (origin-form)\n")
            return
        length = header_value(headers, b"content-length")
        if length is not None and length.isdigit() and int(length) > web.http1_max_body_size:
            self._refuse(413, b"request body over %d bytes\n" % web.http1_max_body_size)
            return
        self._start_call(req, headers, kind)

    def _start_call(self, req: h11.Request, headers: HeaderList, kind: int) -> None:
        authority = header_value(headers, b"host") or b""
        native: HeaderList = [
            (b":method", b"POST"),
            (b":scheme", b"http"),  # TLS listeners speak h2 only (ALPN): HTTP/1 is cleartext
            (b":path", req.target),
            (b":authority", authority),
            *native_request(headers, kind),
        ]
        self._sid += 2
        self._body_bytes = 0
        self._unacked = 0
        self.window = self.listener.client_limits.stream_window
        text = response_text(kind, header_value(headers, b"accept"))
        client = Http1WebClient(
            self,
            WebRequest(kind == TEXT),
            WebResponse(text),
            self.web.cors.response_headers(header_value(headers, b"origin")),
        )
        call = WebCall(client, self._sid, native, False, self.router)
        self.call = call
        call.start()

    def _on_body(self, data: bytes, end: bool) -> None:
        call = self.call
        if call is None:
            return  # no call (a preflight, or one that already ended): the body is dropped
        if data:
            self._body_bytes += len(data)
            limit = self.web.http1_max_body_size
            if self._body_bytes > limit:
                self._close_after = True  # the rest of the body is not read
                call.fail(
                    Status.RESOURCE_EXHAUSTED,
                    f"request body over {limit} bytes (--http1-max-body-size)",
                )
                return
            self._unacked += len(data)
            if self._unacked > self.window and not self._reading_paused:
                self._reading_paused = True
                if self.transport is not None:
                    self.transport.pause_reading()
        call.on_request_data(data, end)

    def request_acked(self, length: int) -> None:
        self._unacked -= length
        if self._reading_paused and self._unacked <= self.window // 2:
            self._reading_paused = False
            if self.transport is not None and not self.closed:
                self.transport.resume_reading()

    def _next_cycle(self) -> bool:
        """Both sides are done with a request: go on with the next one (keep-alive)."""
        h = self.h11
        if h.our_state is not h11.DONE or h.their_state is not h11.DONE:
            return False  # our response is still on its way
        h.start_next_cycle()
        return True

    # ------------------------------------------------------------------ output

    def respond(self, status: int, fields: list[tuple[bytes, bytes]], end: bool) -> None:
        if self._close_after or self.draining:
            fields.append((b"connection", b"close"))
        if end:
            fields.append((b"content-length", b"0"))
        self._responding = True
        self._send(h11.Response(status_code=status, headers=fields, reason=_reason(status)))
        if end:
            self._send(h11.EndOfMessage())
            self._response_done()

    def body(self, data: bytes, end: bool) -> int:
        if data:
            self._send(h11.Data(data=data))
        if end:
            self._send(h11.EndOfMessage())
            self._response_done()
        if self._write_paused:
            self._held += len(data)
            return 0
        return len(data)

    def _answer(
        self, status: int, fields: list[tuple[bytes, bytes]], body: bytes, close: bool = False
    ) -> None:
        """A response of the proxy's own (preflight, refusal)."""
        if close:
            self._close_after = True
        fields = [f for f in fields if f[0] != b"content-length"]
        fields.append((b"content-length", b"%d" % len(body)))
        if body:
            fields.append((b"content-type", b"text/plain; charset=utf-8"))
        self.respond(status, fields, False)
        self.body(body, True)

    def _refuse(
        self, status: int, body: bytes, fields: list[tuple[bytes, bytes]] | None = None
    ) -> None:
        """A request the port does not serve: answered, then the connection closes (its body,
        if it has one, is not worth reading)."""
        log.info("http1_refused", peer=self.peer, status=status, reason=body.decode().strip())
        self._answer(status, fields or [], body, close=True)

    def _send(self, event: h11.Event) -> None:
        try:
            data = self.h11.send(event)
        except h11.LocalProtocolError as exc:
            # A backend header HTTP/1 cannot carry, or a state we did not expect: this
            # connection cannot go on.
            log.warning("http1_send_failed", peer=self.peer, reason=str(exc))
            self._fail_connection()
            return
        if data:
            self._out.append(data)

    def _response_done(self) -> None:
        self._responding = False
        self.idle_since = self.loop.time()
        h = self.h11
        if self._close_after or self.draining or h.our_state is h11.MUST_CLOSE:
            self._closing = True
        elif h.their_state is h11.DONE:
            h.start_next_cycle()
            if h.trailing_data[0] and not self._processing:
                # A pipelined request already read: go on once this turn's output is out.
                self.loop.call_soon(self._process)
        self.mark()

    def call_finished(self) -> None:
        self.call = None
        self.idle_since = self.loop.time()
        if self._reading_paused and self.transport is not None and not self.closed:
            self._reading_paused = False  # what is left of the body is read and dropped
            self.transport.resume_reading()

    def mark(self) -> None:
        if not self.dirty:
            self.dirty = True
            self.flusher.mark(self)

    def flush(self) -> None:
        self.dirty = False
        transport = self.transport
        if self.closed or transport is None:
            return
        if self._out:
            out, self._out = self._out, []
            transport.write(out[0] if len(out) == 1 else b"".join(out))
        if self._closing:
            self._close()

    @property
    def queued(self) -> int:
        """Response bytes written and not yet taken by the kernel."""
        transport = self.transport
        held = transport.get_write_buffer_size() if transport is not None else 0
        return held + sum(len(b) for b in self._out)

    def pause_writing(self) -> None:
        self._write_paused = True
        self._paused_since = self.loop.time()

    def resume_writing(self) -> None:
        self._write_paused = False
        held, self._held = self._held, 0
        call = self.call
        if held and call is not None:
            call.on_client_flushed(held)
        self.mark()

    # ------------------------------------------------------------------ errors and closing

    def _bad_request(self, status: int, reason: str) -> None:
        log.warning("http1_bad_request", peer=self.peer, status=status, reason=reason)
        if status not in _ERRORS:
            status = 400
        call = self.call
        if call is not None:
            self.call = None
            call.on_client_reset(ErrorCode.CANCEL)
        if self._responding:  # the response head is out: all that is left is to close
            self._fail_connection()
            return
        body = reason.encode("utf-8", "replace") + b"\n"
        # h11 is in its error state now: the answer is written by hand.
        self._out.append(
            b"HTTP/1.1 %d %s\r\ncontent-type: text/plain; charset=utf-8\r\n"
            b"content-length: %d\r\nconnection: close\r\n\r\n"
            % (status, _reason(status), len(body))
            + body
        )
        self._closing = True
        self.mark()

    def _head_timed_out(self) -> None:
        self._head_timer = None
        if self.closed or self._closing or self.h11.their_state is not h11.IDLE:
            return
        self.listener.overload["preface_timeout"] += 1
        self._bad_request(408, "the request head did not arrive in time")

    def _fail_connection(self) -> None:
        call = self.call
        if call is not None:
            self.call = None
            call.on_client_reset(ErrorCode.CANCEL)
        self._out.clear()
        self._closing = True
        self._close()

    def _close(self) -> None:
        """Half-close after the last bytes, then close when the peer does (or after a grace
        period): closing with unread input would make the kernel reset the connection, and
        with it the answer the client has not read yet."""
        transport = self.transport
        if self.closed:
            return
        self.closed = True
        if self._head_timer is not None:
            self._head_timer.cancel()
            self._head_timer = None
        if transport is None:
            return
        if self._out:
            transport.write(b"".join(self._out))
            self._out = []
        if transport.can_write_eof():
            transport.write_eof()
            self._linger = self.loop.call_later(LINGER_S, transport.close)
            if self._reading_paused:
                transport.resume_reading()  # read and drop, so the peer's close is seen
        else:
            transport.close()

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        if self._linger is not None:
            self._linger.cancel()
        if self._head_timer is not None:
            self._head_timer.cancel()
            self._head_timer = None
        self.listener.http1_connections.discard(self)
        call = self.call
        if call is not None:
            # The browser went away (a closed tab, an aborted fetch): cancel the backend stream.
            self.call = None
            call.on_client_reset(ErrorCode.CANCEL)

    # ------------------------------------------------------------------ what the listener asks

    @property
    def idle(self) -> bool:
        return self.call is None and not self._responding and not self.closed

    def sweep(self, now: float, idle_timeout_s: float, stalled_timeout_s: float) -> str | None:
        """Close if idle too long, or if the client has not read for too long while a call
        waits on it; returns why, or None."""
        if self.closed:
            return None
        if self.idle and now - self.idle_since >= idle_timeout_s:
            log.info("idle_connection_closed", peer=self.peer, reason="idle timeout")
            self._close()
            return "idle_timeout"
        stalled = self._write_paused and now - self._paused_since >= stalled_timeout_s
        if stalled and self.call is not None:
            log.warning("stalled_stream_reset", peer=self.peer, http1=True)
            self._fail_connection()
            return "stalled_stream"
        return None

    def start_drain(self) -> None:
        """Shutting down: close now if idle, else once the response in flight is out."""
        self.draining = True
        if self.idle:
            self._close()

    def terminate(self, message: str) -> None:
        """The drain time is up: end the call in flight (UNAVAILABLE) and close."""
        call = self.call
        if call is not None:
            self._close_after = True
            call.fail(Status.UNAVAILABLE, message)
        self.flush()
        self._close()

"""One gRPC call: a client stream bound to a backend stream.

Theory of operation
-------------------
The call picks a backend, attaches to a pooled backend connection (at once, or when it is
connected), and then moves bytes: request DATA from the client goes out on the backend stream,
response HEADERS, DATA and trailers come back. Bytes are acknowledged to the side they came
from (WINDOW_UPDATE) only when they have been written towards the other side, so a slow
reader holds back its own stream and nothing else; what waits in between is bounded by the
stream windows.

Until the backend answers, the call keeps a copy of the request bytes it sent (up to
`replay_limit`). A call that reached no application code -- the connection could not be made,
the backend refused the stream (REFUSED_STREAM), or the stream was above a GOAWAY's last id --
is then replayed on another backend, as long as attempts are left (`max_attempts`) and the
retry budget has room (`CallRouter.retry`); otherwise the client gets UNAVAILABLE saying why.
Once response headers arrive, the copy is dropped and a failure is final.

However a call ends, it tells the router once (`call_ended`) with its grpc-status -- the
backend's, the proxy's own, or CANCELLED when the client went away -- and whether the backend
gave it (`answered`): that feeds the stats, outlier detection and the access log.
"""

from __future__ import annotations

from collections.abc import Callable
from enum import IntEnum
from typing import TYPE_CHECKING, Final

from proxy.core.grpc_status import (
    CANCELLED,
    INTERNAL,
    Status,
    grpc_status_of,
    status_for_reset,
    trailers,
    trailers_only,
)
from proxy.core.h2.connection import Connection
from proxy.core.h2.errors import ErrorCode, error_code_name
from proxy.core.h2.events import HeaderList
from proxy.core.ports import BackendSide, CallRouter, ClientSide, ClientStreams, Refusal

if TYPE_CHECKING:
    from proxy.core.buffers import ConnectionBuffer
    from proxy.core.endpoints import Endpoint, TargetPool
    from proxy.core.waiting import WaitQueue


class Phase(IntEnum):
    """Where a call is. Failures before RESPONDING may be replayed on another backend."""

    ROUTING = 0  # no backend stream: picking, connecting, or waiting in a pool's queue
    STREAMING = 1  # a backend stream is open; no response yet (the request copy is kept)
    RESPONDING = 2  # response headers went to the client: any failure is final
    DONE = 3  # ended; the router was told once (`call_ended`)


# The phases as plain ints, for the per-frame checks (an IntEnum member costs a lookup).
ROUTING: Final = int(Phase.ROUTING)
STREAMING: Final = int(Phase.STREAMING)
RESPONDING: Final = int(Phase.RESPONDING)
DONE: Final = int(Phase.DONE)


class Call:
    __slots__ = (
        "acked",
        "ask_after",
        "attempts",
        "bh2",
        "bsid",
        "buffer",
        "ch2",
        "client",
        "conn",
        "csid",
        "endpoint",
        "errors",
        "granted",
        "granted_in",
        "headers",
        "holding",
        "mark_client",
        "path",
        "phase",
        "replay",
        "replay_held",
        "replay_len",
        "request_bytes",
        "request_ended",
        "request_trailers",
        "response_bytes",
        "retry_slot",
        "router",
        "sent",
        "started_at",
        "stats_row",
        "target",
        "tried",
        "unsent",
        "upstream",
        "waiting",
    )
    # Set by the router's first pick, before anything can end the call: where it was routed,
    # and when it started (loop time).
    target: TargetPool | None
    started_at: float

    def __init__(
        self,
        client: ClientSide,
        stream_id: int,
        headers: HeaderList,
        end_stream: bool,
        router: CallRouter,
    ) -> None:
        self.client = client
        # The client's streams, kept: reached through ClientSide each use would be a Python
        # attribute lookup. `conn` is the same object when it is the codec (a native call,
        # where through ClientStreams each is a Python method call); None for a gRPC-Web
        # translator. `mark_client` is client.mark, bound once for the same reason.
        self.ch2: ClientStreams = client.h2
        ch2 = self.ch2
        self.conn: Connection | None = ch2 if isinstance(ch2, Connection) else None
        self.mark_client: Callable[[], None] = client.mark
        self.csid = stream_id
        self.headers = headers
        self.request_ended = end_stream
        self.request_trailers: HeaderList | None = None
        self.router = router
        self.phase = ROUTING
        self.upstream: BackendSide | None = None
        # upstream.h2 and client.buffer, kept here: reached through their protocols, each use
        # would be a Python attribute lookup; kept in a slot, compiled, it is a C load.
        self.bh2: Connection | None = None
        self.buffer: ConnectionBuffer = client.buffer
        self.endpoint: Endpoint | None = None
        self.bsid = 0
        self.unsent: list[bytes] = []  # request bytes not yet handed to a backend stream
        self.replay: list[bytes] | None = []  # handed over on this attempt, kept for a retry
        self.replay_len = 0
        self.replay_held = 0  # the copy's bytes, counted in the buffer budget
        self.sent = 0  # bytes written to the backend on this attempt
        self.acked = 0  # bytes acknowledged to the client, over all attempts
        self.holding = False  # counted as in flight at self.endpoint
        self.attempts = 0
        self.tried: set[str] = set()
        self.errors: list[str] = []
        # The pool queue it waits in (written by WaitQueue only).
        self.waiting: WaitQueue | None = None
        path = b""
        for name, value in headers:
            if name == b":path":
                path = value
                break
        self.path = path
        self.request_bytes = 0  # DATA payload from the client, over all attempts
        self.response_bytes = 0  # DATA payload from the backend
        self.retry_slot = False  # holds a place in the retry budget until it ends
        self.stats_row: list[float] | None = None  # its CallStats row, from its first pick
        self.granted = 0  # backend window granted beyond the base (see proxy.core.buffers)
        self.granted_in = 0  # the same for the client's request stream
        # Past this many bytes a message asks for a window grant, and its replay copy counts.
        self.ask_after = self.buffer.ask_after

    # ------------------------------------------------------------------ choosing a backend

    def start(self) -> None:
        picked = self.router.pick(self)
        if isinstance(picked, Refusal):
            self.fail(picked.status, picked.message)
            return
        self.attempts += 1
        self.endpoint = picked
        self.tried.add(picked.address)
        self.router.attach(picked, self)

    def retry_or_fail(self, reason: str, kind: str) -> None:
        """The attempt reached no application code: try another backend, if allowed.
        `kind` names the failure in a word or two, for the retry counters."""
        if self.phase == DONE:
            return
        address = self.endpoint.address if self.endpoint else "?"
        if self.phase == RESPONDING:
            # The response started (a backend's GOAWAY below a stream it answered breaks
            # RFC 9113 6.8, but happens): nothing can be replayed, and the client needs
            # trailers, not a second trailers-only response.
            self.fail(Status.UNAVAILABLE, f"backend {address} {reason} after responding")
            return
        self.phase = ROUTING
        self._release_window()
        self.errors.append(f"{address}: {reason}")
        self.router.release(self)
        self.upstream = None
        self.bh2 = None
        self.bsid = 0
        if self.replay is None:
            why = (
                "the proxy's buffer budget had no room to keep a copy of the request"
                if self.replay_len <= self.router.replay_limit
                else "the request was too large to replay on another backend"
            )
            self.fail(
                Status.UNAVAILABLE, f"backend {address} refused the call ({reason}) and {why}"
            )
            return
        if self.replay:
            self.unsent[:0] = self.replay
            self.replay = []
            self.replay_len = 0
            self._release_replay()
        self.sent = 0
        if self.attempts >= self.router.max_attempts:
            self.fail(Status.UNAVAILABLE, self.no_backend_message())
            return
        picked = self.router.pick(self)
        if isinstance(picked, Refusal):
            self.fail(picked.status, picked.message if picked.final else self.no_backend_message())
            return
        refused = self.router.retry(self, kind)
        if refused is not None:
            self.fail(refused.status, refused.message)
            return
        self.attempts += 1
        self.endpoint = picked
        self.tried.add(picked.address)
        self.router.attach(picked, self)

    def no_backend_message(self) -> str:
        return (
            "no backend reachable for "
            + self.path.decode("latin-1")
            + ": "
            + "; ".join(self.errors)
        )

    # ------------------------------------------------------------------ backend side events

    def on_stream_opened(self, upstream: BackendSide, bsid: int) -> None:
        """The backend stream exists (its HEADERS are queued): send what the client sent."""
        self.phase = STREAMING
        self.upstream = upstream
        self.bh2 = upstream.h2
        self.bsid = bsid
        if self.unsent:
            chunks, self.unsent = self.unsent, []
            last = len(chunks) - 1
            for i, chunk in enumerate(chunks):
                self._send_request_bytes(
                    chunk, self.request_ended and i == last and self.request_trailers is None
                )
        if self.request_trailers is not None:
            upstream.h2.send_headers(bsid, self.request_trailers, True)

    def _send_request_bytes(self, data: bytes, end_stream: bool) -> None:
        up = self.upstream
        assert up is not None
        if self.replay is not None:
            self.replay_len += len(data)
            # The copy is memory held for the client: it counts in the buffer budget from its
            # first byte (a flood of small calls would otherwise hold copies nobody counts),
            # and when the budget has no room the call gives up its replay rather than the
            # process its memory.
            if self.replay_len > self.router.replay_limit:
                self.replay = None  # too big to replay: a refusal now fails the call
                self._release_replay()
            elif self.buffer.hold(len(data), self._client_queued()):
                self.replay.append(data)
                self.replay_held += len(data)
            else:
                self.replay = None  # no room in the budget: a refusal now fails the call
                self._release_replay()
        bh2 = self.bh2
        assert bh2 is not None
        flushed = bh2.send_data(self.bsid, data, end_stream)
        if flushed:
            self.on_upstream_flushed(flushed)
        up.mark()

    def on_upstream_flushed(self, length: int) -> None:
        """Request bytes left for the backend: the client may send that much more."""
        self.sent += length
        if self.sent > self.acked:
            self._ack_client(self.sent - self.acked)
            self.acked = self.sent
            self.mark_client()

    def on_response_headers(self, headers: HeaderList, end_stream: bool) -> None:
        self.phase = RESPONDING
        self.replay = None
        if self.replay_held:
            self._release_replay()
        self._send_client_headers(headers, end_stream)
        self.mark_client()
        if end_stream:  # trailers-only: the status is in these headers
            self._finish(grpc_status_of(headers), True)

    def on_response_data(self, data: bytes, end_stream: bool) -> None:
        self.response_bytes += len(data)
        if not self.granted and self.response_bytes > self.ask_after:
            self._ask_for_window()
        flushed = self._send_client_data(data, end_stream)
        if flushed:
            self.on_client_flushed(flushed)
        self.mark_client()
        if end_stream:
            # No trailers: gRPC clients fail such a call as INTERNAL.
            self._finish(INTERNAL, True)

    def _ask_for_window(self) -> None:
        """A response longer than half the base window: grow the backend stream's window
        to the full one, if the client connection and the process have room."""
        up = self.upstream
        if up is None or not self.bsid:
            return
        buffer = self.buffer
        n = buffer.grant(buffer.want, self._client_queued())
        if n:
            self.granted = n
            up.h2.grant(self.bsid, n)
            up.mark()

    def _ask_for_request_window(self) -> None:
        """A request longer than half the base window: grow the client stream's window."""
        buffer = self.buffer
        n = buffer.grant(buffer.want, self._client_queued())
        if n:
            self.granted_in = n
            self.ch2.grant(self.csid, n)
            self.mark_client()

    def _release_window(self) -> None:
        """The backend stream is over: its grant goes back to the budget."""
        if self.granted:
            self.buffer.release(self.granted)
            self.granted = 0

    def _release_replay(self) -> None:
        if self.replay_held:
            self.buffer.release(self.replay_held)
            self.replay_held = 0

    def _release_windows(self) -> None:
        """The call is over: both streams' grants go back."""
        self._release_window()
        if self.granted_in:
            self.buffer.release(self.granted_in)
            self.granted_in = 0

    # The client's streams: through `conn` when they are the codec (see __init__).

    def _send_client_headers(self, headers: HeaderList, end_stream: bool) -> None:
        conn = self.conn
        if conn is not None:
            conn.send_headers(self.csid, headers, end_stream)
        else:
            self.ch2.send_headers(self.csid, headers, end_stream)

    def _send_client_data(self, data: bytes, end_stream: bool) -> int:
        conn = self.conn
        if conn is not None:
            return conn.send_data(self.csid, data, end_stream)
        return self.ch2.send_data(self.csid, data, end_stream)

    def _ack_client(self, length: int) -> None:
        conn = self.conn
        if conn is not None:
            conn.ack_data(self.csid, length)
        else:
            self.ch2.ack_data(self.csid, length)

    def _client_queued(self) -> int:
        conn = self.conn
        return conn.queued if conn is not None else self.ch2.queued

    def on_response_trailers(self, headers: HeaderList) -> None:
        self._send_client_headers(headers, True)
        self.mark_client()
        self._finish(grpc_status_of(headers), True)

    def on_backend_reset(self, code: int, remote: bool) -> None:
        if remote and self.endpoint is not None:
            self.router.backend_failed(self.endpoint.address)
        if remote and code == ErrorCode.REFUSED_STREAM and self.phase != RESPONDING:
            self.retry_or_fail("refused the stream (REFUSED_STREAM)", "refused_stream")
            return
        who = "backend" if remote else "proxy"
        self.fail(
            status_for_reset(code),
            f"{who} reset the stream ({error_code_name(code)}) at {self._backend_name()}",
        )

    def on_upstream_lost(self, reason: str) -> None:
        self.fail(Status.UNAVAILABLE, f"backend {self._backend_name()} {reason}")

    def _backend_name(self) -> str:
        return self.endpoint.address if self.endpoint else "?"

    # ------------------------------------------------------------------ client side events

    def on_request_data(self, data: bytes, end_stream: bool) -> None:
        self.request_bytes += len(data)
        if not self.granted_in and not end_stream and self.request_bytes > self.ask_after:
            self._ask_for_request_window()
        if end_stream:
            self.request_ended = True
        if self.upstream is None:
            if data:
                self.unsent.append(data)
            return
        self._send_request_bytes(data, end_stream)

    def on_request_trailers(self, headers: HeaderList) -> None:
        self.request_ended = True
        if self.upstream is None:
            self.request_trailers = headers
            return
        self.upstream.h2.send_headers(self.bsid, headers, True)
        self.upstream.mark()

    def on_client_flushed(self, length: int) -> None:
        """Response bytes reached the client's socket: the backend may send that much more."""
        up = self.upstream
        bh2 = self.bh2
        if up is not None and bh2 is not None and self.bsid:
            bh2.ack_data(self.bsid, length)
            up.mark()

    def on_client_reset(self, code: int) -> None:
        """The client cancelled (RST_STREAM) or went away: cancel the backend stream."""
        if self.phase == DONE:
            return
        self.phase = DONE
        self._release_windows()
        self.router.call_ended(self, CANCELLED, False)
        if self.waiting is not None:
            self.waiting.withdraw(self)
        up = self.upstream
        if up is not None:
            up.cancel(self)

    # ------------------------------------------------------------------ ending

    def fail(self, status: Status, message: str) -> None:
        """End the call with a gRPC error of the proxy's own, and let the backend stream go."""
        if self.phase == DONE:
            return
        if self.phase == RESPONDING:
            self._send_client_headers(trailers(status, message), True)
        else:
            self._send_client_headers(trailers_only(status, message), True)
        self.mark_client()
        if self.waiting is not None:  # ended while waiting for a stream: out of the queue
            self.waiting.withdraw(self)
        up = self.upstream
        if up is not None:
            up.cancel(self)
        self._finish(status, False)

    def _finish(self, status: int, answered: bool) -> None:
        self.phase = DONE
        self.replay = None
        if self.granted or self.granted_in or self.replay_held:
            self._release_windows()
            self._release_replay()
        self.router.call_ended(self, status, answered)
        self.client.call_finished(self.csid)

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

import contextlib
from dataclasses import dataclass
from typing import TYPE_CHECKING, Final, Protocol

from proxy.h2.errors import ErrorCode, error_code_name
from proxy.h2.events import HeaderList
from proxy.relay.grpc_status import Status, status_for_reset, trailers, trailers_only

if TYPE_CHECKING:
    from proxy.h2.connection import Connection
    from proxy.pool.endpoints import Endpoint, TargetPool
    from proxy.relay.upstream import BackendConnection
    from proxy.tls import Identity

# Statuses as plain ints: an IntEnum member costs a metaclass lookup each time it is named,
# and these are on the path of every call.
_UNKNOWN: Final = int(Status.UNKNOWN)
_INTERNAL: Final = int(Status.INTERNAL)
_CANCELLED: Final = int(Status.CANCELLED)
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
            return _STATUS_VALUES.get(value, _UNKNOWN)
    for name, value in headers:
        if name == b":status":
            return int(_HTTP_TO_STATUS.get(value, _UNKNOWN))
    return _UNKNOWN


class ClientSide(Protocol):
    """What a call needs of the client connection it belongs to."""

    h2: Connection
    peer: str
    identity: Identity | None  # what a verified client certificate names

    def mark(self) -> None: ...

    def call_finished(self, stream_id: int) -> None: ...


@dataclass(frozen=True, slots=True)
class Refusal:
    """Why a call gets no backend, and the status that says so."""

    status: Status
    message: str
    final: bool = False  # the message stands as is, even after retries


class CallRouter(Protocol):
    """What a call needs of the proxy: where to go next, and the way to get there."""

    def pick(self, call: Call) -> Endpoint | Refusal:
        """An endpoint for this call (not one it tried), or why there is none. The first
        pick (no attempt yet) also starts the call's clock."""
        ...

    def retry(self, call: Call, kind: str) -> Refusal | None:
        """May the call be sent again (after a failure of `kind`)? None: yes, counted."""
        ...

    def backend_failed(self, address: str) -> None:
        """A failure that outlier detection counts against this backend."""
        ...

    def call_ended(self, call: Call, status: int, answered: bool) -> None:
        """The call is over with this grpc-status; `answered`: the backend gave the status.
        Releases the call's endpoint as `release` does."""
        ...

    def attach(self, endpoint: Endpoint, call: Call) -> None:
        """Send the call to this endpoint (counts it as in flight there, and as started
        there on its first attempt)."""
        ...

    def release(self, call: Call) -> None:
        """The call no longer occupies its endpoint (finished, or moving to another)."""
        ...

    @property
    def max_attempts(self) -> int: ...

    @property
    def replay_limit(self) -> int: ...


class Call:
    __slots__ = (
        "acked",
        "attempts",
        "bsid",
        "client",
        "csid",
        "endpoint",
        "errors",
        "finished",
        "headers",
        "holding",
        "parked_in",
        "path",
        "replay",
        "replay_len",
        "request_bytes",
        "request_ended",
        "request_trailers",
        "response_bytes",
        "response_started",
        "retry_slot",
        "router",
        "sent",
        "started_at",
        "stats_row",
        "target",
        "tried",
        "unsent",
        "upstream",
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
        self.csid = stream_id
        self.headers = headers
        self.request_ended = end_stream
        self.request_trailers: HeaderList | None = None
        self.router = router
        self.upstream: BackendConnection | None = None
        self.endpoint: Endpoint | None = None
        self.bsid = 0
        self.unsent: list[bytes] = []  # request bytes not yet handed to a backend stream
        self.replay: list[bytes] | None = []  # handed over on this attempt, kept for a retry
        self.replay_len = 0
        self.sent = 0  # bytes written to the backend on this attempt
        self.acked = 0  # bytes acknowledged to the client, over all attempts
        self.response_started = False
        self.finished = False
        self.holding = False  # counted as in flight at self.endpoint
        self.attempts = 0
        self.tried: set[str] = set()
        self.errors: list[str] = []
        self.parked_in: list[Call] | None = None
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
        if self.finished:
            return
        address = self.endpoint.address if self.endpoint else "?"
        self.errors.append(f"{address}: {reason}")
        self.router.release(self)
        self.upstream = None
        self.bsid = 0
        if self.replay is None:
            self.fail(
                Status.UNAVAILABLE,
                f"backend {address} refused the call ({reason}) and the "
                "request was too large to replay on another backend",
            )
            return
        if self.replay:
            self.unsent[:0] = self.replay
            self.replay = []
            self.replay_len = 0
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

    def on_stream_opened(self, upstream: BackendConnection, bsid: int) -> None:
        """The backend stream exists (its HEADERS are queued): send what the client sent."""
        self.upstream = upstream
        self.bsid = bsid
        self.parked_in = None
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
            if self.replay_len <= self.router.replay_limit:
                self.replay.append(data)
            else:
                self.replay = None  # too big to replay: a refusal now fails the call
        flushed = up.h2.send_data(self.bsid, data, end_stream)
        if flushed:
            self.on_upstream_flushed(flushed)
        up.mark()

    def on_upstream_flushed(self, length: int) -> None:
        """Request bytes left for the backend: the client may send that much more."""
        self.sent += length
        if self.sent > self.acked:
            self.client.h2.ack_data(self.csid, self.sent - self.acked)
            self.acked = self.sent
            self.client.mark()

    def on_response_headers(self, headers: HeaderList, end_stream: bool) -> None:
        self.response_started = True
        self.replay = None
        self.client.h2.send_headers(self.csid, headers, end_stream)
        self.client.mark()
        if end_stream:  # trailers-only: the status is in these headers
            self._finish(grpc_status_of(headers), True)

    def on_response_data(self, data: bytes, end_stream: bool) -> None:
        self.response_bytes += len(data)
        client = self.client
        flushed = client.h2.send_data(self.csid, data, end_stream)
        if flushed:
            self.on_client_flushed(flushed)
        client.mark()
        if end_stream:
            # No trailers: gRPC clients fail such a call as INTERNAL.
            self._finish(_INTERNAL, True)

    def on_response_trailers(self, headers: HeaderList) -> None:
        self.client.h2.send_headers(self.csid, headers, True)
        self.client.mark()
        self._finish(grpc_status_of(headers), True)

    def on_backend_reset(self, code: int, remote: bool) -> None:
        if remote and self.endpoint is not None:
            self.router.backend_failed(self.endpoint.address)
        if remote and code == ErrorCode.REFUSED_STREAM and not self.response_started:
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
        if up is not None and self.bsid:
            up.h2.ack_data(self.bsid, length)
            up.mark()

    def on_client_reset(self, code: int) -> None:
        """The client cancelled (RST_STREAM) or went away: cancel the backend stream."""
        if self.finished:
            return
        self.finished = True
        self.router.call_ended(self, _CANCELLED, False)
        if self.parked_in is not None:
            with contextlib.suppress(ValueError):
                self.parked_in.remove(self)
            self.parked_in = None
        up = self.upstream
        if up is not None:
            up.cancel(self)

    # ------------------------------------------------------------------ ending

    def fail(self, status: Status, message: str) -> None:
        """End the call with a gRPC error of the proxy's own, and let the backend stream go."""
        if self.finished:
            return
        h2 = self.client.h2
        if self.response_started:
            h2.send_headers(self.csid, trailers(status, message), True)
        else:
            h2.send_headers(self.csid, trailers_only(status, message), True)
        self.client.mark()
        up = self.upstream
        if up is not None:
            up.cancel(self)
        self._finish(status, False)

    def _finish(self, status: int, answered: bool) -> None:
        self.finished = True
        self.replay = None
        self.router.call_ended(self, status, answered)
        self.client.call_finished(self.csid)

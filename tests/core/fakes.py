"""Small fakes of the core's ports (proxy/core/ports.py), for driving a `Call` and a
`BackendConnection` frame by frame with no socket, no etcd and no grpcio.

Import as ``from fakes import ...`` (pytest puts ``tests/core`` on ``sys.path``).

* `FakeClient` is a client connection: the proxy's own server-role codec with an `h2` library
  client as its peer. It plays Downstream's part for the calls on it (HEADERS start a Call,
  DATA feeds it, RST_STREAM cancels it) and decodes what the calls send back into `Response`s.
* `FakeRouter` is a `CallRouter`: endpoints handed out in order, a configurable retry answer,
  and a record of everything the calls told it.
* `FakeOwner` is a `ConnectionOwner`: one connection per address, and a record of what the
  connection told it.
* `FakeBackend` is one real `BackendConnection` on a `FakeTransport`, with the backend's end of
  the wire driven by hand: frames built with proxy.core.h2.frames go in (`feed`), the bytes the
  proxy wrote come out parsed (`read`), as tests/h2 does.
* `manual_flusher()` writes marked connections when told to (`run_turn`): the end of a loop
  turn.
"""

from __future__ import annotations

import asyncio
import struct
from collections import defaultdict
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Protocol
from urllib.parse import unquote_to_bytes

from h2 import events as h2events
from h2.config import H2Configuration
from h2.connection import H2Connection
from hpack import Decoder, Encoder

from proxy.core.buffers import BufferMeter, ConnectionBuffer
from proxy.core.call import Call
from proxy.core.endpoints import Endpoint
from proxy.core.grpc_status import Status
from proxy.core.h2 import frames as fr
from proxy.core.h2.connection import Connection, Role
from proxy.core.h2.errors import ErrorCode
from proxy.core.h2.events import (
    DataFlushed,
    DataReceived,
    Event,
    HeaderList,
    HeadersReceived,
    StreamReset,
)
from proxy.core.h2.limits import Limits
from proxy.core.identity import Identity
from proxy.core.ports import ConnectionOwner, Refusal
from proxy.core.units import KiB
from proxy.runtime.flusher import Flusher
from proxy.runtime.upstream import BackendConnection

REQUEST: HeaderList = [
    (b":method", b"POST"),
    (b":scheme", b"http"),
    (b":path", b"/echo.Echo/UnaryEcho"),
    (b":authority", b"proxy.test"),
    (b"content-type", b"application/grpc"),
    (b"te", b"trailers"),
]
RESPONSE: HeaderList = [(b":status", b"200"), (b"content-type", b"application/grpc")]
OK_TRAILERS: HeaderList = [(b"grpc-status", b"0"), (b"grpc-message", b"")]


def grpc_message(payload: bytes) -> bytes:
    """One length-prefixed gRPC message (uncompressed)."""
    return b"\x00" + struct.pack(">I", len(payload)) + payload


# ---------------------------------------------------------------------------- the client side


@dataclass
class Response:
    """What the client's `h2` peer decoded on one stream."""

    headers: HeaderList | None = None
    data: bytes = b""
    trailers: HeaderList | None = None
    ended: bool = False
    reset: int | None = None  # the code of a RST_STREAM from the proxy
    window_credit: int = 0  # WINDOW_UPDATE increments the proxy gave on this stream

    def _status_block(self) -> HeaderList:
        if self.trailers is not None:
            return self.trailers
        return self.headers or []

    @property
    def trailers_only(self) -> bool:
        """One HEADERS frame with END_STREAM carrying grpc-status, and nothing else."""
        return (
            self.ended
            and self.trailers is None
            and self.data == b""
            and any(name == b"grpc-status" for name, _ in self.headers or [])
        )

    @property
    def status(self) -> int | None:
        for name, value in self._status_block():
            if name == b"grpc-status":
                return int(value)
        return None

    @property
    def message(self) -> str:
        for name, value in self._status_block():
            if name == b"grpc-message":
                return unquote_to_bytes(value).decode("utf-8")
        return ""


class FakeClient:
    """A `ClientSide`: a real server-role `Connection`, its peer an `h2` client."""

    def __init__(
        self,
        router: FakeRouter,
        limits: Limits | None = None,
        buffer: ConnectionBuffer | None = None,
    ) -> None:
        self.router = router
        self.h2 = Connection(Role.SERVER, limits or Limits())
        self.peer = "192.0.2.7:40000"
        self.identity: Identity | None = None
        # Its share of the buffer budget (by default a whole budget to itself).
        self.buffer = buffer or ConnectionBuffer(BufferMeter())
        self.calls: dict[int, Call] = {}  # as Downstream.calls
        self.finished: list[int] = []  # call_finished, in order
        self.marks = 0
        self.dirty = False
        self.responses: defaultdict[int, Response] = defaultdict(Response)
        self.app = H2Connection(H2Configuration(client_side=True, header_encoding=None))
        self.app.initiate_connection()
        self.exchange()

    # ClientSide

    def mark(self) -> None:
        self.marks += 1
        self.dirty = True

    def call_finished(self, stream_id: int) -> None:
        self.finished.append(stream_id)
        self.calls.pop(stream_id, None)

    # What the client does

    def start(self, headers: HeaderList = REQUEST, end_stream: bool = False) -> Call:
        """Open a stream: the proxy makes a Call of it and starts it."""
        sid = self.app.get_next_available_stream_id()
        self.app.send_headers(sid, headers, end_stream=end_stream)
        self.exchange()
        return self.calls[sid]

    def send(self, sid: int, data: bytes, end_stream: bool = False) -> None:
        self.app.send_data(sid, data, end_stream=end_stream)
        self.exchange()

    def send_trailers(self, sid: int, headers: HeaderList) -> None:
        self.app.send_headers(sid, headers, end_stream=True)
        self.exchange()

    def reset(self, sid: int, code: int = ErrorCode.CANCEL) -> None:
        self.app.reset_stream(sid, code)
        self.exchange()

    def response(self, sid: int) -> Response:
        """What the client has got on this stream so far (reading what is queued first)."""
        self.exchange()
        return self.responses[sid]

    # The wire between them

    def exchange(self) -> None:
        """Move bytes both ways until both ends are quiet."""
        for _ in range(100):
            up = self.app.data_to_send()
            if up:
                self._dispatch(self.h2.receive_data(up))
            down = self.h2.data_to_send()
            if down:
                assert self.dirty, "output was queued for the client without mark()"
            self.dirty = False
            if not up and not down:
                return
            if down:
                self._record(self.app.receive_data(down))
        raise AssertionError("the client connection never went quiet")

    def _dispatch(self, events: list[Event]) -> None:
        """What Downstream.data_received does with the codec's events."""
        for ev in events:
            if isinstance(ev, HeadersReceived):
                if ev.is_trailers:
                    call = self.calls.get(ev.stream_id)
                    if call is not None:
                        call.on_request_trailers(ev.headers)
                else:
                    call = Call(self, ev.stream_id, ev.headers, ev.end_stream, self.router)
                    self.calls[ev.stream_id] = call
                    call.start()
            elif isinstance(ev, DataReceived):
                call = self.calls.get(ev.stream_id)
                if call is not None:
                    call.on_request_data(ev.data, ev.end_stream)
                elif ev.data:
                    self.h2.ack_data(ev.stream_id, len(ev.data))
            elif isinstance(ev, DataFlushed):
                call = self.calls.get(ev.stream_id)
                if call is not None:
                    call.on_client_flushed(ev.length)
            elif isinstance(ev, StreamReset):
                call = self.calls.pop(ev.stream_id, None)
                if call is not None:
                    call.on_client_reset(ev.error_code)
        self.mark()

    def _record(self, events: list[h2events.Event]) -> None:
        for ev in events:
            if isinstance(ev, h2events.ResponseReceived):
                self.responses[ev.stream_id].headers = _header_list(ev.headers)
            elif isinstance(ev, h2events.DataReceived):
                self.responses[ev.stream_id].data += ev.data
                self.app.acknowledge_received_data(ev.flow_controlled_length, ev.stream_id)
            elif isinstance(ev, h2events.TrailersReceived):
                self.responses[ev.stream_id].trailers = _header_list(ev.headers)
            elif isinstance(ev, h2events.StreamEnded):
                self.responses[ev.stream_id].ended = True
            elif isinstance(ev, h2events.StreamReset):
                self.responses[ev.stream_id].reset = ev.error_code
            elif isinstance(ev, h2events.WindowUpdated) and ev.stream_id:
                self.responses[ev.stream_id].window_credit += ev.delta


def _header_list(headers: object) -> HeaderList:
    return [(bytes(name), bytes(value)) for name, value in headers]  # type: ignore[attr-defined]


# ---------------------------------------------------------------------------- the router


class Attachable(Protocol):
    def attach(self, call: Call) -> None: ...


class FakeRouter:
    """A `CallRouter`: hands out its endpoints in order (those the call has not tried), answers
    `retry` with `retry_answer`, and gives attached calls to `owners[address]` if there is one.
    Counts calls in flight per address as the dispatcher does (`inflight`), so a test can check
    that every attach was released."""

    def __init__(
        self,
        *addresses: str,
        max_attempts: int = 3,
        replay_limit: int = 64 * KiB,
        retry_answer: Refusal | None = None,
    ) -> None:
        self.endpoints = [Endpoint(address, "static") for address in addresses]
        self.max_attempts = max_attempts
        self.replay_limit = replay_limit
        self.retry_answer = retry_answer
        self.owners: dict[str, Attachable] = {}
        self.picks = 0
        self.attached: list[tuple[str, Call]] = []
        self.released: list[Call] = []
        self.retries: list[tuple[Call, str]] = []
        self.failed: list[str] = []  # backend_failed, by address
        self.ended: list[tuple[Call, int, bool]] = []
        self.inflight: dict[str, int] = {}

    def pick(self, call: Call) -> Endpoint | Refusal:
        self.picks += 1
        if not call.attempts:
            call.started_at = 0.0
            call.target = None
        for endpoint in self.endpoints:
            if endpoint.address not in call.tried:
                return endpoint
        return Refusal(Status.UNAVAILABLE, call.no_backend_message())

    def retry(self, call: Call, kind: str) -> Refusal | None:
        self.retries.append((call, kind))
        return self.retry_answer

    def backend_failed(self, address: str) -> None:
        self.failed.append(address)

    def call_ended(self, call: Call, status: int, answered: bool) -> None:
        self.ended.append((call, status, answered))
        self._let_go(call)

    def attach(self, endpoint: Endpoint, call: Call) -> None:
        address = endpoint.address
        self.attached.append((address, call))
        self.inflight[address] = self.inflight.get(address, 0) + 1
        call.holding = True
        owner = self.owners.get(address)
        if owner is not None:
            owner.attach(call)

    def release(self, call: Call) -> None:
        self.released.append(call)
        self._let_go(call)

    def _let_go(self, call: Call) -> None:
        if call.holding and call.endpoint is not None:
            call.holding = False
            address = call.endpoint.address
            self.inflight[address] -= 1
            if not self.inflight[address]:
                del self.inflight[address]

    # What tests ask

    def addresses(self) -> list[str]:
        """The addresses attached to, in order."""
        return [address for address, _ in self.attached]

    def endings(self, call: Call) -> list[tuple[int, bool]]:
        return [(status, answered) for c, status, answered in self.ended if c is call]

    def retry_kinds(self) -> list[str]:
        return [kind for _, kind in self.retries]


# ---------------------------------------------------------------------------- the backend side


class _TurnLoop(asyncio.AbstractEventLoop):
    """Just enough of a loop for a Flusher: call_soon keeps the callback until `run_turn`."""

    def __init__(self) -> None:
        self.soon: list[Callable[[], object]] = []

    def call_soon(self, callback: Callable[..., object], *args: Any, context: Any = None) -> Any:
        self.soon.append(lambda: callback(*args))

    def run_turn(self) -> None:
        soon, self.soon = self.soon, []
        for callback in soon:
            callback()


def manual_flusher() -> Flusher:
    """The real Flusher on a loop that never runs by itself: marked connections are written
    when the test says so (`run_turn`), which stands for the end of the loop turn. (The real
    one, not a subclass: compiled, Flusher cannot be subclassed from Python.)"""
    return Flusher(_TurnLoop())


def run_turn(flusher: Flusher) -> None:
    loop = flusher._loop
    assert isinstance(loop, _TurnLoop)
    loop.run_turn()


class FakeTransport:
    """Collects what is written; remembers close and abort."""

    def __init__(self) -> None:
        self.buffer = bytearray()
        self.closed = False
        self.aborted = False
        self.writes_after_close = 0
        self.gathered_writes = 0

    def write(self, data: bytes) -> None:
        if self.closed:
            self.writes_after_close += 1
        self.buffer += data

    def writelines(self, chunks: list[bytes]) -> None:
        """A cleartext transport's gathered write: counted as one write."""
        self.gathered_writes += 1
        self.write(b"".join(chunks))

    def close(self) -> None:
        self.closed = True

    def abort(self) -> None:
        self.aborted = True
        self.closed = True

    def is_closing(self) -> bool:
        return self.closed

    def get_extra_info(self, name: str, default: object = None) -> object:
        return default

    def take(self) -> bytes:
        data = bytes(self.buffer)
        self.buffer.clear()
        return data


class FakeOwner:
    """A `ConnectionOwner` for one connection (`conn`): `attach` opens the call on it when it
    has room, queues the call when it is being set up, and otherwise only records the call
    (a real pool would open another connection)."""

    def __init__(self, address: str, connect_timeout_s: float = 5.0) -> None:
        self.address = address
        self._connect_timeout_s = connect_timeout_s
        self.conn: BackendConnection | None = None
        self.attached: list[Call] = []
        self.finished: list[BackendConnection] = []  # stream_finished
        self.capacity_changes: list[BackendConnection] = []
        self.draining: list[BackendConnection] = []
        self.closed: list[BackendConnection] = []  # connection_closed
        self.failures = 0  # backend_failed

    @property
    def connect_timeout_s(self) -> float:
        return self._connect_timeout_s

    def attach(self, call: Call) -> None:
        self.attached.append(call)
        conn = self.conn
        if conn is None:
            return
        if conn.has_capacity:
            conn.open(call)
        elif conn.is_pending:
            conn.waiting.add(call)

    def stream_finished(self, conn: BackendConnection) -> None:
        self.finished.append(conn)

    def capacity_changed(self, conn: BackendConnection) -> None:
        self.capacity_changes.append(conn)

    def connection_draining(self, conn: BackendConnection) -> None:
        self.draining.append(conn)

    def connection_closed(self, conn: BackendConnection) -> None:
        self.closed.append(conn)

    def backend_failed(self) -> None:
        self.failures += 1


@dataclass(frozen=True)
class Frame:
    kind: int
    flags: int
    stream_id: int
    payload: bytes
    headers: HeaderList | None = None  # decoded, for HEADERS

    @property
    def end_stream(self) -> bool:
        return self.kind in (fr.DATA, fr.HEADERS) and bool(self.flags & fr.FLAG_END_STREAM)

    @property
    def error_code(self) -> int:
        assert self.kind in (fr.RST_STREAM, fr.GOAWAY), self
        offset = 4 if self.kind == fr.GOAWAY else 0
        return int(struct.unpack_from(">I", self.payload, offset)[0])


@dataclass
class BackendStream:
    """What the backend got on one stream."""

    headers: HeaderList | None = None
    data: list[bytes] = field(default_factory=list)  # DATA payloads, one per frame
    trailers: HeaderList | None = None
    ended: bool = False
    reset: int | None = None


class FakeBackend:
    """One `BackendConnection` under test, owned by `owner`, and the backend's end of its wire.

    `connect()` is connection_made (it needs a running loop: it arms the handshake timer);
    `handshake()` delivers the backend's SETTINGS. `feed` hands the connection frames built
    with the helpers below; `read` flushes what the connection marked and parses what it wrote
    into frames (kept in `frames`, and per stream in `streams`)."""

    def __init__(
        self,
        owner: ConnectionOwner[BackendConnection],
        flusher: Flusher,
        limits: Limits | None = None,
    ) -> None:
        self.owner = owner
        self.flusher = flusher
        self.conn = BackendConnection(owner, flusher, limits or Limits())
        self.transport = FakeTransport()
        self.encoder = Encoder()
        self.decoder = Decoder()
        self.frames: list[Frame] = []
        self.streams: defaultdict[int, BackendStream] = defaultdict(BackendStream)
        self._preface_read = False
        if isinstance(owner, FakeOwner):
            owner.conn = self.conn

    def connect(self) -> None:
        self.conn.connection_made(self.transport)  # type: ignore[arg-type]

    def handshake(self, settings: dict[int, int] | None = None) -> list[Frame]:
        self.feed(self.settings(settings))
        return self.read()

    # Frames from the backend

    def feed(self, *frames: bytes) -> None:
        """These frames arrive together (one read)."""
        self.conn.data_received(b"".join(frames))

    def settings(self, values: dict[int, int] | None = None) -> bytes:
        return fr.settings(values or {})

    def headers(self, sid: int, headers: HeaderList, end_stream: bool = False) -> bytes:
        return fr.headers(sid, self.encoder.encode(headers), end_stream)

    def data(self, sid: int, payload: bytes, end_stream: bool = False) -> bytes:
        return fr.data(sid, payload, end_stream)

    def rst(self, sid: int, code: int) -> bytes:
        return fr.rst_stream(sid, code)

    def goaway(self, last_stream_id: int, code: int = ErrorCode.NO_ERROR) -> bytes:
        return fr.goaway(last_stream_id, code)

    def respond(
        self, sid: int, payload: bytes = b"reply", trailers: HeaderList = OK_TRAILERS
    ) -> None:
        """A whole unary response: headers, one message, trailers."""
        self.feed(
            self.headers(sid, RESPONSE),
            self.data(sid, grpc_message(payload)),
            self.headers(sid, trailers, end_stream=True),
        )

    # What the proxy wrote

    def read(self) -> list[Frame]:
        """The frames written since the last read (running the flusher first)."""
        run_turn(self.flusher)
        if not self.conn.closed and not self.transport.closed:
            assert self.conn.h2.data_to_send() == b"", "output was queued without mark()"
        data = self.transport.take()
        if not self._preface_read and data:
            assert data.startswith(fr.PREFACE), data[:32]
            data = data[len(fr.PREFACE) :]
            self._preface_read = True
        frames = []
        pos = 0
        while pos < len(data):
            length, kind, flags, sid = fr.parse_header(data, pos)
            start = pos + fr.FRAME_HEADER_SIZE
            assert start + length <= len(data), "truncated frame"
            payload = data[start : start + length]
            pos = start + length
            headers = None
            if kind == fr.HEADERS:
                assert flags & fr.FLAG_END_HEADERS, "CONTINUATION is not expected here"
                headers = [(bytes(n), bytes(v)) for n, v in self.decoder.decode(payload, raw=True)]
            frame = Frame(kind, flags, sid, payload, headers)
            frames.append(frame)
            self._record(frame)
        self.frames += frames
        return frames

    def _record(self, frame: Frame) -> None:
        if frame.stream_id == 0:
            return
        st = self.streams[frame.stream_id]
        if frame.kind == fr.HEADERS:
            if st.headers is None:
                st.headers = frame.headers
            else:
                st.trailers = frame.headers
        elif frame.kind == fr.DATA and (frame.payload or not frame.end_stream):
            st.data.append(frame.payload)
        elif frame.kind == fr.RST_STREAM:
            st.reset = frame.error_code
        if frame.end_stream:
            st.ended = True

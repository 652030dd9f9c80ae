"""A `Call` driven through fake ports, frame by frame: a client (`FakeClient`, the proxy's
server-role codec with an `h2` client peer), a router (`FakeRouter`) and real
`BackendConnection`s on fake transports whose backend end is fed frames by hand.

Each test feeds events and compares what comes out: the frames the backends got, the response
the client decoded, and what the router was told. The tests are async only because
`BackendConnection.connection_made` arms its handshake timer on the running loop.
"""

from __future__ import annotations

import pytest
from fakes import (
    OK_TRAILERS,
    REQUEST,
    RESPONSE,
    FakeBackend,
    FakeClient,
    FakeOwner,
    FakeRouter,
    FakeTransport,
    Frame,
    Response,
    grpc_message,
    manual_flusher,
)

from proxy.build_info import build_info
from proxy.core.buffers import BufferMeter, ConnectionBuffer
from proxy.core.call import DONE, RESPONDING, ROUTING, STREAMING, Call
from proxy.core.grpc_status import Status
from proxy.core.h2 import frames as fr
from proxy.core.h2.errors import ErrorCode
from proxy.core.h2.limits import Limits
from proxy.core.ports import Refusal
from proxy.core.waiting import WaitQueue
from proxy.runtime.flusher import Flusher
from proxy.runtime.pool import BackendPool
from proxy.runtime.upstream import State

A = "10.0.0.1:50051"
B = "10.0.0.2:50051"
PATH = "/echo.Echo/UnaryEcho"
UNAVAILABLE = int(Status.UNAVAILABLE)
CANCELLED = int(Status.CANCELLED)


@pytest.fixture
def flusher() -> Flusher:
    return manual_flusher()


def ready(
    router: FakeRouter,
    address: str,
    flusher: Flusher,
    settings: dict[int, int] | None = None,
) -> FakeBackend:
    """A connection to `address` that has done its handshake, reached through the router."""
    backend = pending(router, address, flusher)
    backend.handshake(settings)
    assert backend.conn.state is State.READY
    return backend


def pending(router: FakeRouter, address: str, flusher: Flusher) -> FakeBackend:
    """A connection to `address` that is connected but has no SETTINGS from the backend yet."""
    owner = FakeOwner(address)
    backend = FakeBackend(owner, flusher)
    backend.connect()
    router.owners[address] = owner
    assert backend.conn.state is State.HANDSHAKE
    return backend


def owner_of(backend: FakeBackend) -> FakeOwner:
    assert isinstance(backend.owner, FakeOwner)
    return backend.owner


# ---------------------------------------------------------------------------- writes


class _TLSTransport(FakeTransport):
    """What a TLS transport says of itself (uvloop's SSL transport has an ssl_object)."""

    def get_extra_info(self, name: str, default: object = None) -> object:
        return object() if name == "ssl_object" else default


@pytest.mark.parametrize("tls", [False, True], ids=["cleartext", "tls"])
async def test_big_request_data_is_gathered_on_cleartext_and_joined_on_tls(
    flusher: Flusher, tls: bool
) -> None:
    """Cleartext, the backend connection hands the transport its payloads as they are (one
    writelines, a writev); TLS joins them into one write, since each item written apart
    would become a TLS record of its own. The backend gets the same frames either way."""
    router = FakeRouter(A)
    owner = FakeOwner(A)
    backend = FakeBackend(owner, flusher)
    if tls:
        backend.transport = _TLSTransport()
    backend.connect()
    router.owners[A] = owner
    backend.handshake()
    client = FakeClient(router)
    client.start()
    payload = bytes(range(256)) * 40  # 10 KiB: a frame, over the size gathered apart
    client.send(1, payload)
    client.send(1, payload, end_stream=True)
    backend.read()
    assert backend.streams[1].data == [payload, payload]
    assert backend.streams[1].ended
    assert (backend.transport.gathered_writes > 0) is not tls


# ---------------------------------------------------------------------------- replay


async def test_refused_stream_replays_the_same_request_bytes_on_another_backend(
    flusher: Flusher,
) -> None:
    router = FakeRouter(A, B)
    a, b = ready(router, A, flusher), ready(router, B, flusher)
    client = FakeClient(router)
    call = client.start()
    client.send(1, b"part-1")
    client.send(1, b"part-2", end_stream=True)

    a.read()
    assert a.streams[1].headers == REQUEST
    assert a.streams[1].data == [b"part-1", b"part-2"]
    assert a.streams[1].ended
    assert call.phase == STREAMING and call.upstream is a.conn

    a.feed(a.rst(1, ErrorCode.REFUSED_STREAM))

    b.read()
    assert list(b.streams) == [1]
    assert b.streams[1].headers == REQUEST
    assert b.streams[1].data == [b"part-1", b"part-2"]
    assert b.streams[1].ended
    assert router.failed == [A]
    assert router.addresses() == [A, B]
    assert router.retry_kinds() == ["refused_stream"]
    assert router.released == [call]
    assert router.ended == []
    assert router.inflight == {B: 1}
    assert call.phase == STREAMING
    assert (call.upstream, call.bsid, call.attempts) == (b.conn, 1, 2)
    assert call.errors == [f"{A}: refused the stream (REFUSED_STREAM)"]
    assert a.conn.calls == {} and owner_of(a).finished == [a.conn]
    assert client.response(1) == Response()  # the client saw nothing of the refusal

    b.respond(1, b"from b")
    got = client.response(1)
    assert got.headers == RESPONSE
    assert got.data == grpc_message(b"from b")
    assert got.trailers == OK_TRAILERS
    assert got.ended and got.reset is None
    assert call.phase == DONE
    assert router.ended == [(call, 0, True)]
    assert router.inflight == {}
    assert client.finished == [1]


async def test_replayed_request_bytes_are_not_acknowledged_to_the_client_twice(
    flusher: Flusher,
) -> None:
    router = FakeRouter(A, B)
    a, b = ready(router, A, flusher), ready(router, B, flusher)
    # A small window, so that 600 bytes pass the codec's WINDOW_UPDATE threshold (1/4).
    client = FakeClient(router, Limits(stream_window=1024))
    client.start()
    client.send(1, b"x" * 600)  # the request stays open: a closed stream gets no credit
    assert client.response(1).window_credit == 600

    a.read()
    a.feed(a.rst(1, ErrorCode.REFUSED_STREAM))
    b.read()
    assert b.streams[1].data == [b"x" * 600]
    assert client.response(1).window_credit == 600  # the replay was credited already

    client.send(1, b"y" * 300)  # new bytes are credited as usual
    b.read()
    assert b.streams[1].data == [b"x" * 600, b"y" * 300]
    assert client.response(1).window_credit == 900


async def test_retry_budget_refusing_fails_the_call_with_its_message(
    flusher: Flusher,
) -> None:
    refusal = Refusal(
        Status.UNAVAILABLE,
        "retry budget exhausted (3 retries in flight, at most 3): not retrying " + PATH,
    )
    router = FakeRouter(A, B, retry_answer=refusal)
    a, b = ready(router, A, flusher), ready(router, B, flusher)
    client = FakeClient(router)
    call = client.start()
    client.send(1, b"request", end_stream=True)
    a.read()

    a.feed(a.rst(1, ErrorCode.REFUSED_STREAM))

    got = client.response(1)
    assert got.trailers_only
    assert got.headers is not None and (b":status", b"200") in got.headers
    assert got.status == UNAVAILABLE
    assert got.message == refusal.message
    assert call.phase == DONE
    assert router.ended == [(call, UNAVAILABLE, False)]
    assert router.retry_kinds() == ["refused_stream"]
    assert router.addresses() == [A]  # never sent to B
    assert router.failed == [A]
    assert router.inflight == {}
    assert b.read() == [] and dict(b.streams) == {}
    assert client.finished == [1]


async def test_no_attempts_left_fails_with_what_each_backend_said(flusher: Flusher) -> None:
    router = FakeRouter(A, B, max_attempts=1)
    a, b = ready(router, A, flusher), ready(router, B, flusher)
    client = FakeClient(router)
    call = client.start()
    client.send(1, b"request", end_stream=True)
    a.read()

    a.feed(a.rst(1, ErrorCode.REFUSED_STREAM))

    got = client.response(1)
    assert got.trailers_only and got.status == UNAVAILABLE
    assert (
        got.message == f"no backend reachable for {PATH}: {A}: refused the stream (REFUSED_STREAM)"
    )
    assert router.retries == []  # the budget is not asked when no attempt is left
    assert router.addresses() == [A]
    assert router.endings(call) == [(UNAVAILABLE, False)]
    assert dict(b.streams) == {}


async def test_a_request_larger_than_the_replay_limit_is_not_replayed(
    flusher: Flusher,
) -> None:
    router = FakeRouter(A, B, replay_limit=8)
    a, b = ready(router, A, flusher), ready(router, B, flusher)
    client = FakeClient(router)
    call = client.start()
    client.send(1, b"12345")
    assert call.replay == [b"12345"]  # still within the limit
    client.send(1, b"67890", end_stream=True)
    assert call.replay is None
    a.read()
    assert a.streams[1].data == [b"12345", b"67890"]  # sent all the same

    a.feed(a.rst(1, ErrorCode.REFUSED_STREAM))

    got = client.response(1)
    assert got.trailers_only and got.status == UNAVAILABLE
    assert got.message == (
        f"backend {A} refused the call (refused the stream (REFUSED_STREAM)) and the "
        "request was too large to replay on another backend"
    )
    assert "too large to replay" in got.message
    assert call.phase == DONE
    assert router.addresses() == [A]
    assert router.retries == []
    assert router.ended == [(call, UNAVAILABLE, False)]
    assert router.inflight == {}
    assert b.read() == []


# ---------------------------------------------------------------------------- final failures


@pytest.mark.parametrize(
    ("code", "status"),
    [
        (ErrorCode.REFUSED_STREAM, Status.UNAVAILABLE),
        (ErrorCode.CANCEL, Status.CANCELLED),
        (ErrorCode.INTERNAL_ERROR, Status.INTERNAL),
        (ErrorCode.ENHANCE_YOUR_CALM, Status.RESOURCE_EXHAUSTED),
    ],
)
async def test_a_reset_after_response_headers_is_final(
    flusher: Flusher, code: ErrorCode, status: Status
) -> None:
    router = FakeRouter(A, B)
    a, b = ready(router, A, flusher), ready(router, B, flusher)
    client = FakeClient(router)
    call = client.start()
    client.send(1, b"request", end_stream=True)
    a.feed(a.headers(1, RESPONSE))
    assert call.phase == RESPONDING
    assert call.replay is None  # the copy is dropped once the backend answers

    a.feed(a.rst(1, code))

    got = client.response(1)
    assert got.headers == RESPONSE
    assert not got.trailers_only
    assert got.trailers == [
        (b"grpc-status", b"%d" % status),
        (b"grpc-message", f"backend reset the stream ({code.name}) at {A}".encode()),
    ]
    assert got.status == status
    assert got.ended
    assert call.phase == DONE
    assert router.addresses() == [A]
    assert router.retries == []
    assert router.failed == [A]
    assert router.ended == [(call, status, False)]
    assert router.inflight == {}
    assert b.read() == []


@pytest.mark.parametrize("code", [ErrorCode.INTERNAL_ERROR, ErrorCode.CANCEL, ErrorCode.NO_ERROR])
async def test_only_refused_stream_is_replayed_before_the_response(
    flusher: Flusher, code: ErrorCode
) -> None:
    """Any other reset may come after the application saw the call: it is final."""
    router = FakeRouter(A, B)
    a, b = ready(router, A, flusher), ready(router, B, flusher)
    client = FakeClient(router)
    call = client.start()
    client.send(1, b"request", end_stream=True)
    a.read()

    a.feed(a.rst(1, code))

    got = client.response(1)
    assert got.trailers_only
    assert got.status == {ErrorCode.CANCEL: CANCELLED}.get(code, int(Status.INTERNAL))
    assert got.message == f"backend reset the stream ({code.name}) at {A}"
    assert router.addresses() == [A]
    assert router.endings(call) == [(got.status, False)]
    assert b.read() == []


# ---------------------------------------------------------------------------- client resets


async def test_client_reset_while_waiting_for_a_handshake_leaves_the_queue(
    flusher: Flusher,
) -> None:
    router = FakeRouter(A)
    a = pending(router, A, flusher)
    client = FakeClient(router)
    first = client.start()
    client.send(1, b"first", end_stream=True)
    second = client.start()
    client.send(3, b"second", end_stream=True)
    queue = a.conn.waiting
    assert len(queue) == 2 and first in queue and second in queue
    assert second.waiting is queue and second.phase == ROUTING

    client.reset(3)

    assert len(queue) == 1 and second not in queue and first in queue
    assert second.waiting is None
    assert second.phase == DONE
    assert router.ended == [(second, CANCELLED, False)]
    assert router.inflight == {A: 1}

    a.handshake()  # the backend's SETTINGS: the connection is ready, the queue is opened
    assert len(queue) == 0
    assert list(a.streams) == [1]  # the first call only
    assert a.streams[1].data == [b"first"] and a.streams[1].ended
    assert a.conn.calls == {1: first}
    assert (second.upstream, second.bsid) == (None, 0)
    assert [f for f in a.frames if f.kind == fr.HEADERS and f.stream_id != 1] == []


async def test_client_reset_while_parked_in_the_backlog_leaves_it(flusher: Flusher) -> None:
    """A backend allowing 1 stream, 1 connection per backend: the second call is parked in
    EndpointConnections.backlog until a stream finishes."""
    router = FakeRouter(A)
    pool = BackendPool(flusher, Limits(), max_connections_per_backend=1)
    endpoint = pool.get(A)
    a = FakeBackend(endpoint, flusher)
    endpoint.conns.append(a.conn)
    a.connect()
    a.handshake({fr.SETTINGS_MAX_CONCURRENT_STREAMS: 1})
    router.owners[A] = endpoint
    client = FakeClient(router)
    first = client.start()
    client.send(1, b"first", end_stream=True)
    second = client.start()
    client.send(3, b"second", end_stream=True)
    assert second.waiting is endpoint.backlog and len(endpoint.backlog) == 1
    assert second.phase == ROUTING

    client.reset(3)

    assert len(endpoint.backlog) == 0 and second not in endpoint.backlog
    assert second.waiting is None
    assert router.ended == [(second, CANCELLED, False)]

    a.respond(1)  # the first stream finishes: room for a parked call, and none is left
    a.read()
    assert list(a.streams) == [1]
    assert a.conn.calls == {}
    assert second.upstream is None
    assert client.response(1).status == 0
    assert router.endings(first) == [(0, True)]
    assert router.inflight == {}


async def test_a_parked_call_opens_when_a_stream_finishes(flusher: Flusher) -> None:
    """The counterpart of the test above: not reset, the parked call gets the free stream."""
    router = FakeRouter(A)
    pool = BackendPool(flusher, Limits(), max_connections_per_backend=1)
    endpoint = pool.get(A)
    a = FakeBackend(endpoint, flusher)
    endpoint.conns.append(a.conn)
    a.connect()
    a.handshake({fr.SETTINGS_MAX_CONCURRENT_STREAMS: 1})
    router.owners[A] = endpoint
    client = FakeClient(router)
    client.start()
    client.send(1, b"first", end_stream=True)
    second = client.start()
    client.send(3, b"second", end_stream=True)
    a.read()
    assert list(a.streams) == [1]

    a.respond(1)

    a.read()
    assert list(a.streams) == [1, 3]
    assert a.streams[3].headers == REQUEST and a.streams[3].data == [b"second"]
    assert a.conn.calls == {3: second}
    assert second.waiting is None and second.phase == STREAMING


async def test_a_call_failed_while_waiting_for_a_handshake_is_not_opened(
    flusher: Flusher,
) -> None:
    """Downstream.terminate (the drain time is up) ends waiting calls with `fail`."""
    router = FakeRouter(A)
    a = pending(router, A, flusher)
    client = FakeClient(router)
    call = client.start()
    client.send(1, b"request", end_stream=True)

    call.fail(Status.UNAVAILABLE, "the proxy is shutting down")

    got = client.response(1)
    assert got.trailers_only and got.status == UNAVAILABLE
    assert got.message == "the proxy is shutting down"
    a.handshake()
    assert dict(a.streams) == {} and a.conn.calls == {}
    assert router.ended == [(call, UNAVAILABLE, False)]
    assert router.inflight == {}


async def test_a_call_failed_while_parked_in_the_backlog_is_not_opened(
    flusher: Flusher,
) -> None:
    router = FakeRouter(A)
    pool = BackendPool(flusher, Limits(), max_connections_per_backend=1)
    endpoint = pool.get(A)
    a = FakeBackend(endpoint, flusher)
    endpoint.conns.append(a.conn)
    a.connect()
    a.handshake({fr.SETTINGS_MAX_CONCURRENT_STREAMS: 1})
    router.owners[A] = endpoint
    client = FakeClient(router)
    client.start()
    client.send(1, b"first", end_stream=True)
    second = client.start()
    assert second.waiting is endpoint.backlog

    second.fail(Status.UNAVAILABLE, "the proxy is shutting down")
    a.respond(1)

    a.read()
    assert list(a.streams) == [1] and a.conn.calls == {}
    assert router.endings(second) == [(UNAVAILABLE, False)]
    assert client.response(3).status == UNAVAILABLE


async def test_client_reset_while_streaming_cancels_the_backend_stream(
    flusher: Flusher,
) -> None:
    router = FakeRouter(A)
    a = ready(router, A, flusher)
    client = FakeClient(router)
    call = client.start()
    client.send(1, b"partial")
    a.read()

    client.reset(1)

    frames = a.read()
    assert [(f.kind, f.stream_id, f.error_code) for f in frames] == [
        (fr.RST_STREAM, 1, ErrorCode.CANCEL)
    ]
    assert a.conn.calls == {}
    assert owner_of(a).finished == [a.conn]
    assert call.phase == DONE
    assert router.ended == [(call, CANCELLED, False)]
    assert router.inflight == {}


# ---------------------------------------------------------------------------- GOAWAY


async def test_goaway_with_the_settings_retries_the_waiting_calls_elsewhere(
    flusher: Flusher,
) -> None:
    router = FakeRouter(A, B)
    a = pending(router, A, flusher)
    b = ready(router, B, flusher)
    client = FakeClient(router)
    first = client.start()
    client.send(1, b"first", end_stream=True)
    second = client.start()
    client.send(3, b"second", end_stream=True)
    assert len(a.conn.waiting) == 2

    a.feed(a.settings(), a.goaway(0))  # together, in one read

    owner = owner_of(a)
    assert owner.failures == 1  # once per connection, not per call
    assert owner.draining == [a.conn]
    assert a.conn.state is State.DRAINING
    assert a.transport.closed  # nothing on it: closed at once
    assert len(a.conn.waiting) == 0
    assert [f.kind for f in a.read() if f.kind == fr.HEADERS] == []
    assert a.conn.calls == {}
    assert router.addresses() == [A, A, B, B]
    assert router.retry_kinds() == ["goaway", "goaway"]
    assert router.failed == []  # no stream was reset: outlier counting is the owner's
    b.read()
    assert list(b.streams) == [1, 3]
    assert b.streams[1].data == [b"first"] and b.streams[3].data == [b"second"]
    assert b.conn.calls == {1: first, 3: second}
    assert first.phase == second.phase == STREAMING
    assert first.errors == [f"{A}: GOAWAY before the call could start"]


async def test_goaway_with_the_settings_and_no_attempts_left_fails_naming_goaway(
    flusher: Flusher,
) -> None:
    router = FakeRouter(A, B, max_attempts=1)
    a = pending(router, A, flusher)
    ready(router, B, flusher)
    client = FakeClient(router)
    first = client.start()
    second = client.start()

    a.feed(a.settings(), a.goaway(0))

    for sid, call in ((1, first), (3, second)):
        got = client.response(sid)
        assert got.trailers_only and got.status == UNAVAILABLE
        assert (
            got.message
            == f"no backend reachable for {PATH}: {A}: GOAWAY before the call could start"
        )
        assert router.endings(call) == [(UNAVAILABLE, False)]
    assert router.addresses() == [A, A]
    assert owner_of(a).failures == 1
    assert router.inflight == {}


async def test_goaway_replays_the_streams_above_its_last_id_and_keeps_the_others(
    flusher: Flusher,
) -> None:
    router = FakeRouter(A, B)
    a, b = ready(router, A, flusher), ready(router, B, flusher)
    client = FakeClient(router)
    calls: list[Call] = []
    for sid in (1, 3, 5):
        calls.append(client.start())
        client.send(sid, b"request-%d" % sid, end_stream=True)
    kept, moved3, moved5 = calls
    a.read()
    assert list(a.streams) == [1, 3, 5]

    a.feed(a.goaway(1))

    frames = a.read()
    assert [(f.kind, f.stream_id, f.error_code) for f in frames] == [
        (fr.RST_STREAM, 3, ErrorCode.CANCEL),
        (fr.RST_STREAM, 5, ErrorCode.CANCEL),
    ]
    owner = owner_of(a)
    assert owner.failures == 1
    assert owner.draining == [a.conn]
    assert a.conn.state is State.DRAINING
    assert not a.transport.closed  # stream 1 is still running
    assert a.conn.calls == {1: kept}
    assert router.addresses() == [A, A, A, B, B]
    assert router.retry_kinds() == ["goaway", "goaway"]
    b.read()
    assert list(b.streams) == [1, 3]
    assert b.streams[1].data == [b"request-3"] and b.streams[1].ended
    assert b.streams[3].data == [b"request-5"] and b.streams[3].ended
    assert b.conn.calls == {1: moved3, 3: moved5}
    assert moved3.errors == [f"{A}: GOAWAY (NO_ERROR) above stream 1"]
    assert kept.phase == STREAMING and kept.upstream is a.conn

    a.respond(1, b"from a")
    b.respond(1, b"from b")
    b.respond(3, b"also from b")
    assert client.response(1).data == grpc_message(b"from a")
    assert client.response(3).data == grpc_message(b"from b")
    assert client.response(5).data == grpc_message(b"also from b")
    assert [client.response(sid).status for sid in (1, 3, 5)] == [0, 0, 0]
    assert router.ended == [(kept, 0, True), (moved3, 0, True), (moved5, 0, True)]
    assert router.inflight == {}


async def test_goaway_below_an_answered_stream_ends_it_with_trailers(
    flusher: Flusher,
) -> None:
    """A backend that sends GOAWAY with a last stream id below a stream it already answered
    breaks RFC 9113 6.8; the proxy must still give the client valid trailers (not a second,
    trailers-only header block, which a client rejects), and must not replay the call."""
    router = FakeRouter(A, B)
    a, b = ready(router, A, flusher), ready(router, B, flusher)
    client = FakeClient(router)
    call = client.start()
    client.send(1, b"request", end_stream=True)
    a.feed(a.headers(1, RESPONSE))
    assert call.phase == RESPONDING

    a.feed(a.goaway(0))

    got = client.response(1)
    assert got.headers == RESPONSE
    assert not got.trailers_only
    assert got.status == UNAVAILABLE
    assert got.trailers is not None and all(not name.startswith(b":") for name, _ in got.trailers)
    assert f"backend {A} GOAWAY".encode() in dict(got.trailers)[b"grpc-message"]
    assert got.ended
    assert call.phase == DONE
    assert router.addresses() == [A]  # not replayed
    assert router.ended == [(call, UNAVAILABLE, False)]
    assert router.inflight == {}
    assert b.read() == []


# ---------------------------------------------------------------------------- WaitQueue


def make_calls(count: int, cls: type[Call] = Call) -> list[Call]:
    router = FakeRouter(A)
    client = FakeClient(router)
    return [cls(client, 1 + 2 * i, REQUEST, False, router) for i in range(count)]


def test_wait_queue_pops_in_order_of_arrival() -> None:
    one, two, three = make_calls(3)
    queue = WaitQueue()
    assert not queue and len(queue) == 0
    for call in (one, two, three):
        queue.add(call)
    assert queue and len(queue) == 3
    assert [c.waiting for c in (one, two, three)] == [queue, queue, queue]

    assert queue.pop() is one
    assert one.waiting is None and one not in queue
    assert queue.pop() is two
    queue.add(one)  # back in line, behind three
    assert queue.pop() is three
    assert queue.pop() is one
    assert not queue
    with pytest.raises(StopIteration):
        queue.pop()


def test_wait_queue_take_all_empties_it_and_clears_waiting() -> None:
    calls = make_calls(4)
    queue = WaitQueue()
    for call in calls:
        queue.add(call)
    queue.withdraw(calls[1])

    taken = queue.take_all()

    assert taken == [calls[0], calls[2], calls[3]]
    assert len(queue) == 0 and not queue
    assert [c.waiting for c in calls] == [None, None, None, None]
    assert queue.take_all() == []


class CountingCall(Call):
    """Counts the hashing and comparing a queue does with it."""

    hashes = 0
    compares = 0

    def __hash__(self) -> int:
        CountingCall.hashes += 1
        return id(self) >> 4

    def __eq__(self, other: object) -> bool:
        CountingCall.compares += 1
        return self is other


@pytest.mark.skipif(
    build_info().kind == "compiled",
    reason="counts a Call subclass's hashing; a compiled Call cannot be subclassed from "
    "Python: this runs in make test's pure-Python pass",
)
def test_wait_queue_withdraw_is_one_lookup_and_idempotent() -> None:
    calls = make_calls(1000, CountingCall)
    queue = WaitQueue()
    for call in calls:
        queue.add(call)
    last, middle = calls[-1], calls[500]
    CountingCall.hashes = CountingCall.compares = 0

    queue.withdraw(last)  # the worst case for a list: behind 999 others

    # One hash lookup; a scan would compare the call with each one ahead of it.
    assert (CountingCall.hashes, CountingCall.compares) == (1, 0)
    assert len(queue) == 999 and last not in queue and last.waiting is None

    queue.withdraw(last)  # again: nothing happens
    queue.withdraw(middle)
    assert CountingCall.compares == 0
    assert len(queue) == 998 and middle not in queue and middle.waiting is None
    assert queue.take_all() == [c for c in calls if c is not last and c is not middle]


def test_a_call_in_two_queues_trips_the_assertion() -> None:
    (call,) = make_calls(1)
    first, second = WaitQueue(), WaitQueue()
    first.add(call)

    with pytest.raises(AssertionError, match="one queue at a time"):
        second.add(call)

    assert call.waiting is first and call in first
    assert call not in second and len(second) == 0
    first.withdraw(call)
    second.add(call)  # once out of the first, it may join another
    assert call.waiting is second


# ---------------------------------------------------------------------------- buffer budget


def _window_updates(frames: list[Frame], sid: int) -> list[int]:
    return [
        int.from_bytes(f.payload[:4], "big") & 0x7FFF_FFFF
        for f in frames
        if f.kind == fr.WINDOW_UPDATE and f.stream_id == sid
    ]


BASE = 32 * 1024
FULL = 256 * 1024


def _chunks(backend: FakeBackend, sid: int, data: bytes) -> list[bytes]:
    """DATA frames of at most 16 KiB (the frame size every peer accepts)."""
    step = 16 * 1024
    return [backend.data(sid, data[i : i + step]) for i in range(0, len(data), step)]


def _limited_backend(router: FakeRouter, flusher: Flusher) -> FakeBackend:
    """A ready backend connection whose streams start with the base window, as the
    dispatcher builds them (`base_stream_window`)."""
    owner = FakeOwner(A)
    backend = FakeBackend(owner, flusher, Limits(stream_window=BASE))
    backend.connect()
    router.owners[A] = owner
    backend.handshake()
    return backend


async def test_a_long_response_grows_its_backend_window_and_gives_it_back_at_the_end(
    flusher: Flusher,
) -> None:
    meter = BufferMeter(budget=64 * 1024 * 1024)
    router = FakeRouter(A)
    a = _limited_backend(router, flusher)
    client = FakeClient(router, buffer=ConnectionBuffer(meter, 1024 * 1024, BASE, FULL))
    call = client.start()
    client.send(1, b"request", end_stream=True)
    a.read()
    a.feed(a.headers(1, RESPONSE), *_chunks(a, 1, b"x" * (BASE // 2)))
    # Half the base window: no grant asked yet (what updates there are acknowledge bytes the
    # client took, never more).
    assert sum(_window_updates(a.read(), 1)) <= BASE // 2

    a.feed(a.data(1, b"y" * 100))

    assert _window_updates(a.read(), 1) == [FULL - BASE]
    assert call.granted == FULL - BASE
    assert client.buffer.granted == meter.granted == FULL - BASE
    a.feed(a.headers(1, OK_TRAILERS, end_stream=True))
    assert client.response(1).status == 0
    assert call.granted == 0 and client.buffer.granted == meter.granted == 0


async def test_a_connection_over_its_cap_gets_no_grant(flusher: Flusher) -> None:
    """What the client leaves unread counts: a connection holding its cap in queued bytes
    gets no more window for its backend streams, so a backend can send it only the base."""
    meter = BufferMeter(budget=64 * 1024 * 1024)
    router = FakeRouter(A)
    a = _limited_backend(router, flusher)
    cap = 64 * 1024
    client = FakeClient(router, buffer=ConnectionBuffer(meter, cap, BASE, FULL))
    call = client.start()
    client.send(1, b"request", end_stream=True)
    a.read()
    client.h2.queued = cap  # as if its other streams held that much unread

    a.feed(a.headers(1, RESPONSE), *_chunks(a, 1, b"x" * (BASE - 1)))

    assert sum(_window_updates(a.read(), 1)) <= BASE - 1  # acknowledgements only
    assert call.granted == 0 and meter.granted == 0
    client.h2.queued = 0
    a.feed(a.data(1, b"z"))  # room again: the next frame asks, and gets what the cap leaves
    assert cap in _window_updates(a.read(), 1)
    assert call.granted == cap == meter.granted


async def test_a_client_reset_gives_the_grant_back(flusher: Flusher) -> None:
    meter = BufferMeter()
    router = FakeRouter(A)
    a = _limited_backend(router, flusher)
    client = FakeClient(router, buffer=ConnectionBuffer(meter, 1024 * 1024, BASE, FULL))
    call = client.start()
    client.send(1, b"request", end_stream=True)
    a.read()
    a.feed(a.headers(1, RESPONSE), *_chunks(a, 1, b"x" * BASE))
    assert meter.granted == FULL - BASE

    client.reset(1)

    assert call.phase == DONE and call.granted == 0 and meter.granted == 0


async def test_a_replay_copy_counts_and_is_given_up_when_the_budget_has_no_room(
    flusher: Flusher,
) -> None:
    meter = BufferMeter()
    router = FakeRouter(A)
    a = ready(router, A, flusher)
    # Room for the request stream's window grant, and 40 KiB more.
    cap = (FULL - BASE) + 40 * 1024
    client = FakeClient(router, buffer=ConnectionBuffer(meter, cap, BASE, FULL))
    call = client.start()
    first = b"a" * 8_000  # counted from the first byte
    client.send(1, first)
    assert call.replay == [first] and call.replay_held == 8_000
    assert meter.granted == 8_000
    client.send(1, b"b" * 16_000)  # past half the base: the stream's window grows too
    assert call.granted_in == FULL - BASE
    assert call.replay_held == 24_000
    assert meter.granted == FULL - BASE + 24_000
    client.send(1, b"c" * 16_000)  # 40,000 of 40,960: still counted
    assert call.replay_held == 40_000
    client.send(1, b"d" * 16_000)  # would pass the cap: the copy is given up, not the memory
    assert call.replay is None
    assert call.replay_held == 0 and meter.granted == FULL - BASE
    # Refused now, the call cannot move, and says why.
    a.read()
    a.feed(a.rst(1, ErrorCode.REFUSED_STREAM))
    got = client.response(1)
    assert got.status == UNAVAILABLE
    assert "buffer budget had no room to keep a copy of the request" in got.message

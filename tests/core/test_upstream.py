"""`BackendConnection` (proxy/runtime/upstream.py) through its ports: the handshake, a lost
connection, the backend's stream limit and a two-step GOAWAY, with the fakes of test_call.py."""

from __future__ import annotations

import asyncio

from fakes import REQUEST, FakeBackend, FakeClient, FakeOwner, FakeRouter, manual_flusher

from proxy.core.call import DONE, STREAMING
from proxy.core.grpc_status import Status
from proxy.core.h2 import frames as fr
from proxy.runtime.flusher import Flusher
from proxy.runtime.upstream import State

A = "10.0.0.1:50051"
B = "10.0.0.2:50051"
UNAVAILABLE = int(Status.UNAVAILABLE)


def backend(
    router: FakeRouter, address: str, flusher: Flusher, timeout_s: float = 5.0
) -> tuple[FakeBackend, FakeOwner]:
    owner = FakeOwner(address, connect_timeout_s=timeout_s)
    conn = FakeBackend(owner, flusher)
    conn.connect()
    router.owners[address] = owner
    return conn, owner


async def test_the_first_frames_are_the_preface_and_settings() -> None:
    flusher = manual_flusher()
    a, _ = backend(FakeRouter(A), A, flusher)
    frames = a.read()  # read() checks and strips the preface
    assert [f.kind for f in frames] == [fr.SETTINGS, fr.WINDOW_UPDATE]
    conn = a.conn
    assert conn.state is State.HANDSHAKE and conn.is_pending and not conn.has_capacity

    frames = a.handshake({fr.SETTINGS_MAX_CONCURRENT_STREAMS: 7})

    assert [(f.kind, f.flags) for f in frames] == [(fr.SETTINGS, fr.FLAG_ACK)]
    assert a.conn.state is State.READY and a.conn.has_capacity
    assert a.conn.h2.remote_max_concurrent_streams == 7


async def test_a_handshake_that_times_out_sends_the_waiting_calls_elsewhere() -> None:
    flusher = manual_flusher()
    router = FakeRouter(A, B)
    a, owner = backend(router, A, flusher, timeout_s=0.01)
    b, _ = backend(router, B, flusher)
    b.handshake()
    client = FakeClient(router)
    call = client.start()
    client.send(1, b"request", end_stream=True)
    assert call in a.conn.waiting

    await asyncio.sleep(0.05)

    assert a.conn.state is State.CLOSED and a.transport.closed
    assert owner.closed == [a.conn]
    assert owner.failures == 1
    assert router.retry_kinds() == ["handshake_timeout"]
    assert call.errors == [f"{A}: no SETTINGS from the backend (not an HTTP/2 server?)"]
    b.read()
    assert b.streams[1].headers == REQUEST and b.streams[1].data == [b"request"]
    assert call.upstream is b.conn and call.phase == STREAMING


async def test_a_connection_lost_before_the_settings_retries_its_waiting_calls() -> None:
    flusher = manual_flusher()
    router = FakeRouter(A, B)
    a, owner = backend(router, A, flusher)
    b, _ = backend(router, B, flusher)
    b.handshake()
    client = FakeClient(router)
    call = client.start()

    a.conn.connection_lost(ConnectionResetError("reset by peer"))

    assert owner.closed == [a.conn] and owner.failures == 1
    assert router.retry_kinds() == ["closed_before_start"]
    assert call.errors == [f"{A}: connection lost (reset by peer)"]
    assert call.upstream is b.conn


async def test_a_connection_lost_under_a_call_fails_it_without_replay() -> None:
    """The request reached the backend: it may have run, so it is not sent again."""
    flusher = manual_flusher()
    router = FakeRouter(A, B)
    a, owner = backend(router, A, flusher)
    a.handshake()
    client = FakeClient(router)
    call = client.start()
    client.send(1, b"request", end_stream=True)

    a.conn.connection_lost(ConnectionResetError("reset by peer"))

    got = client.response(1)
    assert got.trailers_only and got.status == UNAVAILABLE
    assert got.message == f"backend {A} connection lost (reset by peer)"
    assert call.phase == DONE
    assert router.addresses() == [A] and router.retries == []
    assert router.ended == [(call, UNAVAILABLE, False)]
    assert owner.closed == [a.conn] and owner.failures == 1


async def test_an_idle_connection_that_closes_is_no_failure() -> None:
    flusher = manual_flusher()
    a, owner = backend(FakeRouter(A), A, flusher)
    a.handshake()

    a.conn.connection_lost(None)

    assert owner.closed == [a.conn] and owner.failures == 0
    assert a.conn.state is State.CLOSED


async def test_calls_over_the_backends_stream_limit_go_back_to_the_owner() -> None:
    flusher = manual_flusher()
    router = FakeRouter(A)
    a, owner = backend(router, A, flusher)
    client = FakeClient(router)
    calls = [client.start() for _ in range(3)]
    assert len(a.conn.waiting) == 3

    a.handshake({fr.SETTINGS_MAX_CONCURRENT_STREAMS: 1})

    assert list(a.streams) == [1] and a.conn.calls == {1: calls[0]}
    # The router gave all three once; the connection handed the two it had no room for back.
    assert owner.attached == [calls[0], calls[1], calls[2], calls[1], calls[2]]
    assert router.addresses() == [A, A, A] and router.retries == []
    assert owner.failures == 0
    assert len(a.conn.waiting) == 0


async def test_a_graceful_goaway_then_the_final_one() -> None:
    """GOAWAY(2^31-1) refuses nothing and counts no failure; the second GOAWAY's last id
    decides which streams are replayed."""
    flusher = manual_flusher()
    router = FakeRouter(A, B)
    a, owner = backend(router, A, flusher)
    b, _ = backend(router, B, flusher)
    a.handshake()
    b.handshake()
    client = FakeClient(router)
    first, second = client.start(), client.start()

    a.feed(a.goaway(0x7FFF_FFFF))

    assert a.conn.state is State.DRAINING and not a.conn.has_capacity
    assert owner.draining == [a.conn] and owner.failures == 0
    assert a.conn.calls == {1: first, 3: second}
    assert router.retries == []

    a.feed(a.goaway(1))

    assert owner.draining == [a.conn, a.conn] and owner.failures == 1
    assert a.conn.calls == {1: first}
    assert second.upstream is b.conn
    assert router.retry_kinds() == ["goaway"]

"""What the server records of every call: stats, in-flight counts and the access log. In
process, so the test reads the server's counters; real sockets, grpcio backend and client."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any

import grpc
import pytest
from backends import EchoBackendsFactory
from proxy_process import ClosedPort

from proxy.core.endpoints import Endpoint, static_pool
from proxy.core.options import ServerOptions
from proxy.core.routing import Router
from proxy.core.stats import NO_BACKEND
from proxy.runtime import dispatcher as dispatcher_module
from proxy.runtime.server import ProxyServer
from proxy_examples.echo import echo_pb2, echo_pb2_grpc

UNARY = b"/echo.Echo/UnaryEcho"
CLIENT_STREAMING = b"/echo.Echo/ClientStreamingEcho"


class AccessLog(list[dict[str, Any]]):
    def info(self, event: str, **fields: Any) -> None:
        self.append({"event": event, **fields})


@pytest.fixture
def access_log(monkeypatch: pytest.MonkeyPatch) -> AccessLog:
    # The module's structlog logger may be cached by another test's configuration.
    recorded = AccessLog()
    monkeypatch.setattr(dispatcher_module, "access_log", recorded)
    return recorded


@pytest.fixture
async def proxy(
    echo_backends: EchoBackendsFactory,
) -> AsyncIterator[tuple[ProxyServer, echo_pb2_grpc.EchoStub, str]]:
    (backend,) = echo_backends(1)
    server = ProxyServer(
        Router(default=static_pool("echo", [backend.address])),
        options=ServerOptions(access_log_sample=1.0),
    )
    [(host, port)] = await server.listen("127.0.0.1", 0)
    try:
        async with grpc.aio.insecure_channel(f"{host}:{port}") as channel:
            yield server, echo_pb2_grpc.EchoStub(channel), backend.address
    finally:
        await server.close()


async def settle(server: ProxyServer) -> None:
    for _ in range(100):
        if not server.dispatcher.inflight and not server.dispatcher.budget.retries:
            return
        await asyncio.sleep(0.02)


async def test_each_call_is_counted_once_with_its_status_and_bytes(
    proxy: tuple[ProxyServer, echo_pb2_grpc.EchoStub, str], access_log: AccessLog
) -> None:
    server, stub, address = proxy
    reply = await stub.UnaryEcho(echo_pb2.EchoRequest(payload=b"p" * 1000), timeout=5)
    assert reply.payload == b"p" * 1000
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await stub.UnaryEcho(echo_pb2.EchoRequest(), metadata=(("x-echo-status", "5"),))
    assert info.value.code() == grpc.StatusCode.NOT_FOUND
    requests = [echo_pb2.EchoRequest(payload=b"q" * 100) for _ in range(3)]
    await stub.ClientStreamingEcho(iter(requests), timeout=5)
    await settle(server)

    stats = server.dispatcher.stats
    assert stats.started == {(UNARY, address): 2, (CLIENT_STREAMING, address): 1}
    unary_ok = stats.finished[(UNARY, address, 0)]
    assert unary_ok[0] == 1 and stats.finished[(UNARY, address, 5)][0] == 1
    # DATA payload: the gRPC frame (5 bytes) around the protobuf message.
    assert unary_ok[1] == len(echo_pb2.EchoRequest(payload=b"p" * 1000).SerializeToString()) + 5
    assert unary_ok[2] > 1000
    streamed = stats.finished[(CLIENT_STREAMING, address, 0)]
    assert streamed[0] == 1
    assert streamed[1] == sum(len(r.SerializeToString()) + 5 for r in requests)
    assert sum(stats.durations[UNARY][:-1]) == 2
    assert stats.durations[UNARY][-1] > 0  # the sum of durations
    assert server.dispatcher.inflight == {} and server.dispatcher.budget.retries == 0

    lines = [e for e in access_log if e["event"] == "call"]
    assert [(e["method"], e["grpc_status"]) for e in lines] == [
        ("UnaryEcho", 0),
        ("UnaryEcho", 5),
        ("ClientStreamingEcho", 0),
    ]
    first = lines[0]
    assert first["service"] == "echo.Echo"
    assert first["target"] == "echo"
    assert first["backend"] == address
    assert first["request_bytes"] == unary_ok[1]
    assert first["response_bytes"] == unary_ok[2]
    assert first["duration_ms"] > 0
    assert first["peer"].startswith("127.0.0.1:")


async def test_a_cancelled_call_counts_as_cancelled(
    proxy: tuple[ProxyServer, echo_pb2_grpc.EchoStub, str], access_log: AccessLog
) -> None:
    server, stub, address = proxy
    call = stub.UnaryEcho(echo_pb2.EchoRequest(), metadata=(("x-echo-delay-ms", "5000"),))
    for _ in range(100):
        if server.dispatcher.inflight:
            break
        await asyncio.sleep(0.02)
    call.cancel()
    await settle(server)
    [(key, row)] = server.dispatcher.stats.finished.items()
    assert key == (UNARY, address, 1) and row[0] == 1 and row[2] == 0
    assert [e["grpc_status"] for e in access_log] == [1]
    assert server.dispatcher.inflight == {}


async def test_calls_the_proxy_fails_itself_count_with_its_status(
    echo_backends: EchoBackendsFactory, access_log: AccessLog
) -> None:
    dead = ClosedPort()
    server = ProxyServer(
        Router(routes={"echo.Echo": static_pool("dead", [dead.address])}),
        options=ServerOptions(max_retries=0, access_log_sample=0.0),
    )
    [(host, port)] = await server.listen("127.0.0.1", 0)
    try:
        async with grpc.aio.insecure_channel(f"{host}:{port}") as channel:
            stub = echo_pb2_grpc.EchoStub(channel)
            with pytest.raises(grpc.aio.AioRpcError) as info:
                await stub.UnaryEcho(echo_pb2.EchoRequest(), timeout=5)
            assert info.value.code() == grpc.StatusCode.UNAVAILABLE
            unrouted = channel.unary_unary("/other.Service/Method")
            with pytest.raises(grpc.aio.AioRpcError) as info:
                await unrouted(b"", timeout=5)
            assert info.value.code() == grpc.StatusCode.UNIMPLEMENTED
        await settle(server)
    finally:
        await server.close()
        dead.close()
    other = b"/other.Service/Method"
    assert server.dispatcher.stats.started == {(UNARY, dead.address): 1, (other, NO_BACKEND): 1}
    assert set(server.dispatcher.stats.finished) == {
        (UNARY, dead.address, 14),
        (other, NO_BACKEND, 12),
    }
    assert access_log == []  # sampling 0: off
    assert server.dispatcher.inflight == {}


async def test_retries_are_counted_by_kind(
    echo_backends: EchoBackendsFactory, access_log: AccessLog
) -> None:
    (backend,) = echo_backends(1)
    dead = ClosedPort()
    server = ProxyServer(
        Router(default=static_pool("echo", [dead.address, backend.address])),
        options=ServerOptions(outlier_consecutive_failures=0, access_log_sample=0.0),
    )
    [(host, port)] = await server.listen("127.0.0.1", 0)
    try:
        async with grpc.aio.insecure_channel(f"{host}:{port}") as channel:
            stub = echo_pb2_grpc.EchoStub(channel)
            for _ in range(4):
                await stub.UnaryEcho(echo_pb2.EchoRequest(), timeout=5)
        await settle(server)
    finally:
        await server.close()
        dead.close()
    # The dead backend is tried at least by the first call (then it is in connect backoff).
    assert server.dispatcher.stats.retries["connect_failed"] >= 1
    assert set(server.dispatcher.stats.retries) == {"connect_failed"}
    assert server.dispatcher.stats.budget_refusals == 0
    assert server.dispatcher.inflight == {} and server.dispatcher.budget.retries == 0
    # Each call is counted once, on the backend that last served it.
    assert sum(n for (_, b), n in server.dispatcher.stats.started.items()) == 4
    assert server.dispatcher.stats.finished[(UNARY, backend.address, 0)][0] == 4


async def test_a_pool_change_is_logged_once_with_what_joined_and_left(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    logs = AccessLog()  # records .info() calls; the module's logger may be cached elsewhere
    monkeypatch.setattr(dispatcher_module, "log", logs)
    pool = static_pool("echo", ["127.0.0.1:1", "127.0.0.1:2"])
    server = ProxyServer(Router(default=pool))
    try:
        pool.update([Endpoint("127.0.0.1:2"), Endpoint("127.0.0.1:3")])
        pool.update([Endpoint("127.0.0.1:2"), Endpoint("127.0.0.1:3")])  # no change
        assert [e for e in logs if e["event"] == "pool_changed"] == [
            {
                "event": "pool_changed",
                "target": "echo",
                "added": ["127.0.0.1:3"],
                "removed": ["127.0.0.1:1"],
                "size": 2,
            }
        ]
    finally:
        await server.close()

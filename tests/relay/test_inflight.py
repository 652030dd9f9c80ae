"""In-flight accounting per backend, which least-request and bounded load rely on: every call
is counted while it occupies a backend and released however it ends. In process, so the test
can read the server's counters; real sockets, real grpcio backend and client."""

from __future__ import annotations

import asyncio

import grpc
import pytest
from backends import EchoBackendsFactory

from proxy.core.endpoints import static_pool
from proxy.core.routing import Router
from proxy.runtime.server import ProxyServer
from proxy_examples.echo import echo_pb2, echo_pb2_grpc


async def test_inflight_counts_return_to_zero(echo_backends: EchoBackendsFactory) -> None:
    (backend,) = echo_backends(1)
    server = ProxyServer(Router(default=static_pool("static", [backend.address, "127.0.0.1:1"])))
    [(host, port)] = await server.listen("127.0.0.1", 0)
    try:
        async with grpc.aio.insecure_channel(f"{host}:{port}") as channel:
            stub = echo_pb2_grpc.EchoStub(channel)
            # Successes, including ones first tried on the dead backend and retried.
            for _ in range(6):
                await stub.UnaryEcho(echo_pb2.EchoRequest(message="x"), timeout=5)
            # An error from the backend.
            with pytest.raises(grpc.aio.AioRpcError):
                await stub.UnaryEcho(
                    echo_pb2.EchoRequest(), metadata=(("x-echo-status", "5"),), timeout=5
                )
            # A call cancelled while the backend holds it: counted while in flight.
            call = stub.UnaryEcho(
                echo_pb2.EchoRequest(), metadata=(("x-echo-delay-ms", "5000"),), timeout=10
            )
            for _ in range(100):
                if server.dispatcher.inflight.get(backend.address) == 1:
                    break
                await asyncio.sleep(0.02)
            assert server.dispatcher.inflight == {backend.address: 1}
            call.cancel()
            for _ in range(100):
                if not server.dispatcher.inflight:
                    break
                await asyncio.sleep(0.02)
        assert server.dispatcher.inflight == {}
    finally:
        await server.close()

"""Pooled backend connections: shared by many calls, and one more when the backend's
MAX_CONCURRENT_STREAMS is full."""

from __future__ import annotations

import threading
from concurrent import futures

import grpc
from proxy_process import start_proxy

_IDENTITY = {"request_deserializer": lambda b: b, "response_serializer": lambda b: b}


class PeerRecorder:
    """A backend that holds each call until `release` and records the connection it came on."""

    def __init__(self, max_concurrent_streams: int) -> None:
        self.peers: list[str] = []
        self.lock = threading.Lock()
        self.arrived = threading.Semaphore(0)
        self.release = threading.Event()
        self.server = grpc.server(
            futures.ThreadPoolExecutor(max_workers=32),
            options=[("grpc.max_concurrent_streams", max_concurrent_streams)],
        )
        handler = grpc.method_handlers_generic_handler(
            "test.Hold", {"Call": grpc.unary_unary_rpc_method_handler(self._call, **_IDENTITY)}
        )
        self.server.add_generic_rpc_handlers((handler,))
        self.port = self.server.add_insecure_port("127.0.0.1:0")
        self.server.start()

    def _call(self, request: bytes, context: grpc.ServicerContext) -> bytes:
        with self.lock:
            self.peers.append(context.peer())
        self.arrived.release()
        self.release.wait(20)
        return request


def test_streams_share_a_connection_until_the_backend_limit_then_a_new_one_opens() -> None:
    backend = PeerRecorder(max_concurrent_streams=2)
    try:
        with start_proxy(["serve", "--backend", f"127.0.0.1:{backend.port}"]) as (_, port):
            channel = grpc.insecure_channel(f"127.0.0.1:{port}")
            call = channel.unary_unary(
                "/test.Hold/Call",
                request_serializer=lambda b: b,
                response_deserializer=lambda b: b,
            )
            # One call first, so the proxy has the backend's SETTINGS (limit 2) before the rest.
            warm = call.future(b"w", timeout=30)
            assert backend.arrived.acquire(timeout=10)
            pending = [call.future(b"%d" % i, timeout=30) for i in range(5)]
            for _ in pending:
                # Every call reaches the backend while all are held: 6 streams at once on a
                # backend that takes 2 per connection means the proxy opened more connections.
                assert backend.arrived.acquire(timeout=10), "a call never reached the backend"
            backend.release.set()
            assert warm.result() == b"w"
            assert [f.result() for f in pending] == [b"%d" % i for i in range(5)]
            channel.close()
        connections = {peer for peer in backend.peers}
        assert len(backend.peers) == 6
        # 6 streams, at most 2 per connection: at least 3 connections, and not one per call.
        assert 3 <= len(connections) < 6, backend.peers
    finally:
        backend.release.set()
        backend.server.stop(0)

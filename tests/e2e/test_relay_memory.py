"""End to end: big messages and stalled readers through a real proxy process, with the
proxy's memory (from /proc/PID/status) held to a bound.

The bound, 32 MiB above the proxy's resident set after a warm-up call, is half of one 64 MiB
message: a proxy that holds a whole message (or lets a stalled stream pile up data) fails it.
What the proxy should hold per stream is its flow-control window (256 KiB by default).
"""

from __future__ import annotations

import hashlib
import os
import threading
import time
from collections.abc import Callable, Iterator
from concurrent import futures
from typing import Any

import grpc
import pytest
from backends import EchoSubprocessFactory, echo_stub
from relay_support import MiB, ProxyFactory, RunningProxy

from proxy_examples.echo import echo_pb2_grpc
from proxy_examples.echo.echo_pb2 import EchoRequest
from proxy_examples.echo.server import SERVER_OPTIONS, EchoServicer

LARGE = 64 * MiB
GROWTH_LIMIT = 32 * MiB


@pytest.fixture(scope="module")
def large_payload() -> tuple[bytes, bytes]:
    """64 MiB of random bytes (incompressible, no repeating pattern) and their SHA-256."""
    payload = os.urandom(LARGE)
    return payload, hashlib.sha256(payload).digest()


def _baseline(proxy: RunningProxy) -> int:
    """The proxy's resident set once it has served a call (connections and code warmed up)."""
    stub = echo_stub(proxy.channel())
    assert stub.UnaryEcho(EchoRequest(message="warm-up"), timeout=10).message == "warm-up"
    return proxy.memory().rss


def _assert_bounded(proxy: RunningProxy, baseline: int) -> None:
    grown = proxy.memory().peak - baseline
    assert grown < GROWTH_LIMIT, (
        f"proxy peak RSS grew by {grown / MiB:.1f} MiB (limit {GROWTH_LIMIT / MiB:.0f} MiB)"
    )


def test_64_mib_unary_both_ways_with_bounded_memory(
    echo_subprocess: EchoSubprocessFactory,
    run_proxy: ProxyFactory,
    large_payload: tuple[bytes, bytes],
) -> None:
    payload, digest = large_payload
    _, port = echo_subprocess("big")  # its own process: the backend's CPU is not ours
    proxy = run_proxy(f"127.0.0.1:{port}")
    baseline = _baseline(proxy)
    stub = echo_stub(proxy.channel())

    response = stub.UnaryEcho(EchoRequest(payload=payload), timeout=120)

    assert response.backend == "big"
    assert len(response.payload) == LARGE
    assert hashlib.sha256(response.payload).digest() == digest
    _assert_bounded(proxy, baseline)


def test_64_mib_server_streaming_messages_with_bounded_memory(
    echo_subprocess: EchoSubprocessFactory,
    run_proxy: ProxyFactory,
    large_payload: tuple[bytes, bytes],
) -> None:
    payload, digest = large_payload
    _, port = echo_subprocess("big")
    proxy = run_proxy(f"127.0.0.1:{port}")
    baseline = _baseline(proxy)
    stub = echo_stub(proxy.channel())

    responses = list(stub.ServerStreamingEcho(EchoRequest(payload=payload, count=2), timeout=120))

    assert len(responses) == 2
    for response in responses:
        assert response.backend == "big"
        assert len(response.payload) == LARGE
        assert hashlib.sha256(response.payload).digest() == digest
    _assert_bounded(proxy, baseline)


class _CountingServicer(EchoServicer):  # type: ignore[misc]  # generated base is untyped
    """The echo servicer, counting the ServerStreamingEcho messages grpc has taken from it.

    grpc asks the generator for the next message only once the previous one is sent, so the
    count shows how far flow control lets the stream run ahead of its reader.
    """

    def __init__(self, name: str) -> None:
        super().__init__(name)
        self.streamed = 0

    def ServerStreamingEcho(self, request: Any, context: grpc.ServicerContext) -> Iterator[Any]:
        for response in super().ServerStreamingEcho(request, context):
            yield response
            self.streamed += 1


@pytest.fixture
def counting_backend() -> Iterator[tuple[_CountingServicer, str]]:
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=16), options=SERVER_OPTIONS)
    port = server.add_insecure_port("127.0.0.1:0")
    servicer = _CountingServicer("counting")
    echo_pb2_grpc.add_EchoServicer_to_server(servicer, server)
    server.start()
    try:
        yield servicer, f"127.0.0.1:{port}"
    finally:
        server.stop(None).wait()


def _wait_until_still(count: Callable[[], int], quiet_s: float = 1.0, timeout: float = 30) -> int:
    """Wait until ``count()`` has not changed for ``quiet_s``; return it."""
    deadline = time.monotonic() + timeout
    last, since = count(), time.monotonic()
    while time.monotonic() < deadline:
        time.sleep(0.05)
        now = count()
        if now != last:
            last, since = now, time.monotonic()
        elif time.monotonic() - since >= quiet_s:
            return now
    raise AssertionError(f"the stream never stopped advancing (at {last} messages)")


def test_client_that_stops_reading_holds_back_only_its_own_stream(
    counting_backend: tuple[_CountingServicer, str], run_proxy: ProxyFactory
) -> None:
    """A 1000 x 1 MiB server stream whose client never reads: the backend must be held back
    by flow control (not buffered in the proxy), while another client's calls to the same
    backend -- over the same pooled backend connection -- all go through."""
    servicer, address = counting_backend
    proxy = run_proxy(address)
    baseline = _baseline(proxy)
    stalled_stub = echo_stub(proxy.channel())
    other_stub = echo_stub(proxy.channel())  # a second client connection

    stalled = stalled_stub.ServerStreamingEcho(
        EchoRequest(payload=os.urandom(MiB), count=1000), timeout=120
    )
    held = _wait_until_still(lambda: servicer.streamed)
    # A few MiB fit in the windows and socket buffers on the way; not 1000.
    assert held < 64, f"the backend streamed {held} MiB to a client that reads nothing"

    payload = os.urandom(100 * 1024)  # 50 calls move more than one connection window (4 MiB)
    for i in range(50):
        response = other_stub.UnaryEcho(EchoRequest(message=str(i), payload=payload), timeout=10)
        assert (response.message, response.payload) == (str(i), payload)

    assert servicer.streamed < 64
    _assert_bounded(proxy, baseline)

    cancelled_before = servicer.cancelled_calls
    assert stalled.cancel()
    assert servicer.wait_for_cancelled(cancelled_before + 1, timeout=10)
    assert servicer.streamed < 1000


def test_stalled_bidi_client_does_not_block_others(
    echo_subprocess: EchoSubprocessFactory, run_proxy: ProxyFactory
) -> None:
    """A bidi client that keeps sending 1 MiB messages but never reads the echoes: its
    requests are held back too (the backend stops reading when its responses cannot leave),
    and other calls keep working with the proxy's memory bounded."""
    _, port = echo_subprocess("bidi")
    proxy = run_proxy(f"127.0.0.1:{port}")
    baseline = _baseline(proxy)
    sent = 0
    done = threading.Event()
    chunk = os.urandom(MiB)

    def requests() -> Iterator[EchoRequest]:
        nonlocal sent
        while not done.is_set() and sent < 1000:
            yield EchoRequest(payload=chunk)
            sent += 1

    stalled = echo_stub(proxy.channel()).BidirectionalStreamingEcho(requests(), timeout=120)
    held = _wait_until_still(lambda: sent)
    assert held < 64, f"the client pushed {held} MiB into a call whose responses nobody reads"

    other_stub = echo_stub(proxy.channel())
    for i in range(50):
        assert other_stub.UnaryEcho(EchoRequest(message=str(i)), timeout=10).message == str(i)
    _assert_bounded(proxy, baseline)

    done.set()
    assert stalled.cancel()
    assert stalled.code() == grpc.StatusCode.CANCELLED

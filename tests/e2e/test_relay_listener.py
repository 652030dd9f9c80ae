"""End to end: what the proxy's port does with clients that do not speak HTTP/2 — while a
real gRPC client keeps using the same port.

An HTTP/1.x request gets an HTTP/1.1 answer and the connection is closed; anything else
that is not the HTTP/2 connection preface followed by SETTINGS gets GOAWAY(PROTOCOL_ERROR)
and the connection is closed. Neither disturbs other connections.
"""

from __future__ import annotations

import random
import socket
import struct
import time
from collections.abc import Iterator

import grpc
import pytest
from backends import EchoBackendsFactory, echo_stub
from relay_support import (
    FRAME_GOAWAY,
    PROTOCOL_ERROR,
    ProxyFactory,
    RunningProxy,
    goaway_error_code,
    parse_frames,
    read_until_eof,
)

from proxy_examples.echo.echo_pb2 import EchoRequest

PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"
PING_FRAME = struct.pack(">I", 8)[1:] + bytes([0x6, 0]) + struct.pack(">I", 0) + b"12345678"

# What a client sends, piece by piece; a float is a pause (seconds) between pieces. Pauses
# model client pacing -- a request sent a moment after connecting, as over any real network,
# or typed into telnet -- so the proxy has run (and flushed) before the bytes arrive. They
# are not assertions: a correct proxy answers the same whatever the pacing.
PAUSE_S = 0.3
HTTP1_REQUESTS: dict[str, list[bytes | float]] = {
    "get": [b"GET / HTTP/1.1\r\nHost: x\r\n\r\n"],
    "get_after_a_pause": [PAUSE_S, b"GET / HTTP/1.1\r\nHost: x\r\n\r\n"],
    "post_with_body": [
        b"POST /echo.Echo/UnaryEcho HTTP/1.1\r\nHost: x\r\nContent-Length: 2\r\n\r\nhi"
    ],
    # The method arrives in pieces: the proxy must wait for enough bytes to tell.
    "split_request_line": [b"GE", PAUSE_S, b"T / HTTP/1.1\r\n", b"Host: x\r\n\r\n"],
}
GARBAGE = {
    # The start of a TLS ClientHello: someone dialled the plaintext port with TLS.
    "tls_client_hello": bytes.fromhex("16030100c8010000c40303") + bytes(range(32)) + b"\x00" * 64,
    "random_bytes": b"\x00" + random.Random(7).randbytes(200),
    # A valid preface, then a PING where SETTINGS must come first.
    "preface_then_ping": PREFACE + PING_FRAME,
    # A preface that goes wrong halfway.
    "bad_preface": PREFACE[:10] + b"X" * 14,
}
GARBAGE_PACED: dict[str, list[bytes | float]] = {
    **{name: [data] for name, data in GARBAGE.items()},
    "tls_client_hello_after_a_pause": [PAUSE_S, GARBAGE["tls_client_hello"]],
}


@pytest.fixture
def busy_proxy(
    echo_backends: EchoBackendsFactory, run_proxy: ProxyFactory
) -> Iterator[tuple[RunningProxy, grpc.Channel]]:
    """A proxy with a gRPC client mid-stream on it for the whole test: the stream must keep
    flowing, and unary calls keep succeeding, whatever the raw sockets do."""
    [backend] = echo_backends(1)
    proxy = run_proxy(backend.address)
    channel = proxy.channel()
    stub = echo_stub(channel)
    stream = stub.ServerStreamingEcho(
        EchoRequest(message="live", count=100_000),
        metadata=[("x-echo-interval-ms", "10")],
        timeout=60,
    )
    assert next(stream).message == "live"
    yield proxy, channel
    for _ in range(3):
        assert next(stream).message == "live", "the in-flight stream was disturbed"
    assert stream.cancel()
    assert backend.wait_for_cancelled(1, timeout=10)


def _still_serving(channel: grpc.Channel) -> None:
    stub = echo_stub(channel)
    for i in range(3):
        assert stub.UnaryEcho(EchoRequest(message=str(i)), timeout=10).message == str(i)


def _raw_connection(proxy: RunningProxy) -> socket.socket:
    sock = socket.create_connection(("127.0.0.1", proxy.port), timeout=5)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    return sock


def _send(sock: socket.socket, pieces: list[bytes | float]) -> None:
    for piece in pieces:
        if isinstance(piece, float):
            time.sleep(piece)  # client pacing, see HTTP1_REQUESTS
        else:
            sock.sendall(piece)


def _assert_http1_answer(answer: bytes) -> None:
    """A well-formed HTTP/1.1 error response, from its very first byte."""
    assert answer.startswith(b"HTTP/1.1 "), f"not an HTTP/1.1 response: {answer[:80]!r}"
    status_line, _, rest = answer.partition(b"\r\n")
    assert int(status_line.split()[1]) >= 400, status_line
    assert b"\r\n\r\n" in rest, "an incomplete HTTP/1.1 response head"


@pytest.mark.parametrize("pieces", HTTP1_REQUESTS.values(), ids=HTTP1_REQUESTS.keys())
def test_http1_request_gets_http1_answer_and_close(
    busy_proxy: tuple[RunningProxy, grpc.Channel], pieces: list[bytes | float]
) -> None:
    """The answer must be HTTP/1.1 from the first byte: an HTTP/1 client (curl) rejects a
    response that starts with anything else, e.g. an HTTP/2 SETTINGS frame."""
    proxy, channel = busy_proxy
    with _raw_connection(proxy) as sock:
        _send(sock, pieces)
        answer = read_until_eof(sock)  # raises if the proxy keeps the connection open
    _assert_http1_answer(answer)
    _still_serving(channel)


@pytest.mark.parametrize("pieces", GARBAGE_PACED.values(), ids=GARBAGE_PACED.keys())
def test_garbage_gets_goaway_protocol_error_and_close(
    busy_proxy: tuple[RunningProxy, grpc.Channel], pieces: list[bytes | float]
) -> None:
    proxy, channel = busy_proxy
    with _raw_connection(proxy) as sock:
        _send(sock, pieces)
        received = read_until_eof(sock)  # raises if the proxy keeps the connection open
    frames = parse_frames(received)  # well-formed HTTP/2 frames, nothing else
    goaways = [f for f in frames if f.type == FRAME_GOAWAY]
    assert len(goaways) == 1, frames
    assert frames[-1] is goaways[0], "frames after GOAWAY"
    assert goaway_error_code(goaways[0]) == PROTOCOL_ERROR, goaways[0]
    _still_serving(channel)


def test_many_bad_connections_at_once(busy_proxy: tuple[RunningProxy, grpc.Channel]) -> None:
    """A burst of bad connections, all open together (and paced, see HTTP1_REQUESTS), then
    answered: each gets its answer."""
    proxy, channel = busy_proxy
    socks = [_raw_connection(proxy) for _ in range(20)]
    try:
        time.sleep(PAUSE_S)  # client pacing: the requests come a moment after the connects
        for i, sock in enumerate(socks):
            sock.sendall(
                b"GET / HTTP/1.1\r\nHost: x\r\n\r\n" if i % 2 else GARBAGE["tls_client_hello"]
            )
        for i, sock in enumerate(socks):
            received = read_until_eof(sock)
            if i % 2:
                _assert_http1_answer(received)
            else:
                [goaway] = [f for f in parse_frames(received) if f.type == FRAME_GOAWAY]
                assert goaway_error_code(goaway) == PROTOCOL_ERROR
    finally:
        for sock in socks:
            sock.close()
    _still_serving(channel)

"""End to end through a real proxy process, with real grpcio clients and echo backends:
what a call carries (messages, metadata, status) and how it is steered and ended.

The proxy must be transparent: a call through it must look exactly like the same call made
directly to the backend, byte for byte, for all four RPC kinds.
"""

from __future__ import annotations

import contextlib
import random
import threading
import time
from collections import Counter
from collections.abc import Iterator
from concurrent import futures
from dataclasses import dataclass
from typing import Any

import grpc
import pytest
from backends import (
    EchoBackendsFactory,
    echo_stub,
    open_channel,
    parse_status_details,
)
from proxy_process import start_proxy
from relay_support import ProxyFactory, wait_until

from proxy_examples.echo import echo_pb2_grpc
from proxy_examples.echo.echo_pb2 import EchoRequest, EchoResponse
from proxy_examples.echo.echo_pb2_grpc import EchoStub
from proxy_examples.echo.server import SERVER_OPTIONS, EchoServer, EchoServicer, status_details

KINDS = ["unary", "server_streaming", "client_streaming", "bidi_streaming"]

_rng = random.Random(20240611)
PRINTABLE = "".join(chr(c) for c in range(0x21, 0x7F))
# Echoed by the backend in its initial and trailing metadata; order and repeats matter.
META: list[tuple[str, str | bytes]] = [
    ("x-echo-meta-text", f"with spaces {PRINTABLE} end"),
    ("x-echo-meta-all-bytes-bin", bytes(range(256)) + bytes(range(255, -1, -1))),
    ("x-echo-meta-one-bin", b"\xff"),  # base64 padding cases: 1, 2 and 3 bytes
    ("x-echo-meta-two-bin", b"\x00\xfe"),
    ("x-echo-meta-three-bin", b"\xfb\xef\xbe"),
    ("x-echo-meta-random-bin", _rng.randbytes(2048)),
    ("x-echo-meta-repeated", "first"),
    ("x-echo-meta-repeated", "second"),
    ("x-echo-meta-repeated-bin", b"\x01"),
    ("x-echo-meta-repeated-bin", b"\x02\x03"),
]
# Non-ASCII, '%' and escapes that look like percent-encoding, control characters: all travel
# percent-encoded in grpc-message and must come out unchanged.
MESSAGE = "grüße, 世界 ✓ — 100% sure %41 is not A; tab\there\nnew line\r\x01\x7f end"
# Text metadata is ASCII only, so the message travels to the backend UTF-8 encoded in this
# -bin key, and _Utf8MessageContext hands it to the echo servicer as x-echo-message.
MESSAGE_KEY = "x-test-message-bin"
STATUS = grpc.StatusCode.FAILED_PRECONDITION  # 9

REQUESTS = [
    EchoRequest(message="ä", payload=b"\x00\x01"),
    EchoRequest(message="b", payload=bytes(range(256))),
    EchoRequest(message="", payload=b""),
    EchoRequest(message="ö", payload=_rng.randbytes(100_000)),
]


@dataclass
class Outcome:
    """Everything a client can observe of one call."""

    responses: list[tuple[str, bytes, str]]
    initial: list[tuple[str, str | bytes]]
    trailing: list[tuple[str, str | bytes]]
    code: grpc.StatusCode
    details: str | None


def _pairs(metadata: Any) -> list[tuple[str, str | bytes]]:
    return [(key, value) for key, value in metadata or ()]


def make_call(stub: EchoStub, kind: str, metadata: list[tuple[str, str | bytes]]) -> Outcome:
    call: Any
    responses: list[EchoResponse] = []
    if kind == "unary":
        try:
            response, call = stub.UnaryEcho.with_call(REQUESTS[1], metadata=metadata, timeout=20)
            responses.append(response)
        except grpc.RpcError as err:
            call = err
    elif kind == "server_streaming":
        request = EchoRequest(message="ß", payload=b"\x00" * 70_000 + b"\xff", count=3)
        call = stub.ServerStreamingEcho(request, metadata=metadata, timeout=20)
        with contextlib.suppress(grpc.RpcError):  # the outcome is read from the call
            responses.extend(call)
    elif kind == "client_streaming":
        try:
            response, call = stub.ClientStreamingEcho.with_call(
                iter(REQUESTS), metadata=metadata, timeout=20
            )
            responses.append(response)
        except grpc.RpcError as err:
            call = err
    else:
        call = stub.BidirectionalStreamingEcho(iter(REQUESTS), metadata=metadata, timeout=20)
        with contextlib.suppress(grpc.RpcError):  # the outcome is read from the call
            responses.extend(call)
    return Outcome(
        [(r.message, r.payload, r.backend) for r in responses],
        _pairs(call.initial_metadata()),
        _pairs(call.trailing_metadata()),
        call.code(),
        call.details(),
    )


def _echoed(metadata: list[tuple[str, str | bytes]]) -> list[tuple[str, str | bytes]]:
    return [(k, v) for k, v in metadata if k.startswith("x-echo-meta-")]


class _Utf8MessageContext:
    """A ServicerContext whose invocation metadata has ``x-echo-message`` decoded from the
    UTF-8 bytes of ``x-test-message-bin``; everything else goes to the real context."""

    def __init__(self, context: grpc.ServicerContext) -> None:
        self._context = context

    def invocation_metadata(self) -> list[tuple[str, str | bytes]]:
        out = []
        for key, value in self._context.invocation_metadata() or ():
            if key == MESSAGE_KEY:
                out.append(("x-echo-message", value.decode("utf-8")))
            else:
                out.append((key, value))
        return out

    def __getattr__(self, name: str) -> Any:
        return getattr(self._context, name)


class _Utf8MessageEchoServicer(EchoServicer):  # type: ignore[misc]
    def UnaryEcho(self, request: Any, context: grpc.ServicerContext) -> Any:
        return super().UnaryEcho(request, _Utf8MessageContext(context))

    def ServerStreamingEcho(self, request: Any, context: grpc.ServicerContext) -> Any:
        return super().ServerStreamingEcho(request, _Utf8MessageContext(context))

    def ClientStreamingEcho(self, requests: Any, context: grpc.ServicerContext) -> Any:
        return super().ClientStreamingEcho(requests, _Utf8MessageContext(context))

    def BidirectionalStreamingEcho(self, requests: Any, context: grpc.ServicerContext) -> Any:
        return super().BidirectionalStreamingEcho(requests, _Utf8MessageContext(context))


@pytest.fixture(scope="module")
def transparency_setup() -> Iterator[tuple[EchoStub, EchoStub]]:
    """(direct stub, proxied stub) to one in-process echo backend named b0."""
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=16), options=SERVER_OPTIONS)
    port = server.add_insecure_port("127.0.0.1:0")
    echo_pb2_grpc.add_EchoServicer_to_server(_Utf8MessageEchoServicer("b0"), server)
    server.start()
    address = f"127.0.0.1:{port}"
    try:
        with (
            start_proxy(["serve", "--backend", address]) as (_, proxy_port),
            open_channel(address) as direct,
            open_channel(f"127.0.0.1:{proxy_port}") as proxied,
        ):
            yield echo_stub(direct), echo_stub(proxied)
    finally:
        server.stop(None).wait()


VARIANTS = [
    (kind, variant)
    for kind in KINDS
    for variant in ("ok", "status", "status_after_2")
    if not (kind == "unary" and variant == "status_after_2")  # unary has no "after n"
]


@pytest.mark.parametrize(("kind", "variant"), VARIANTS)
def test_call_through_proxy_is_byte_exact(
    transparency_setup: tuple[EchoStub, EchoStub], kind: str, variant: str
) -> None:
    """Messages, metadata (text and -bin, initial and trailing), grpc-status, grpc-message and
    grpc-status-details-bin: identical through the proxy and directly, and as sent."""
    direct_stub, proxied_stub = transparency_setup
    metadata = list(META)
    if variant != "ok":
        metadata += [("x-echo-status", str(STATUS.value[0])), (MESSAGE_KEY, MESSAGE.encode())]
    if variant == "status_after_2":
        metadata.append(("x-echo-fail-after", "2"))

    direct = make_call(direct_stub, kind, metadata)
    proxied = make_call(proxied_stub, kind, metadata)

    # What the proxy delivers is what the backend says (the direct call is the reference) ...
    assert proxied == direct
    # ... and that is what we asked for: nothing lost or altered on either path.
    assert proxied.initial[0] == ("x-backend", "b0")
    assert _echoed(proxied.initial) == META
    assert _echoed(proxied.trailing) == META
    if variant == "ok":
        assert proxied.code == grpc.StatusCode.OK
        assert proxied.responses, "a successful call returns at least one message"
        assert all(backend == "b0" for _, _, backend in proxied.responses)
        if kind == "bidi_streaming":
            assert proxied.responses == [(r.message, r.payload, "b0") for r in REQUESTS]
        if kind == "client_streaming":
            total = sum(len(r.payload) for r in REQUESTS)
            assert ("x-echo-payload-bytes", str(total)) in proxied.trailing
    else:
        assert proxied.code == STATUS
        assert proxied.details == MESSAGE
        raw = dict(proxied.trailing)["grpc-status-details-bin"]
        assert isinstance(raw, bytes)
        assert raw == status_details(STATUS.value[0], MESSAGE, "b0")
        code, message, details = parse_status_details(raw)
        assert (code, message) == (STATUS.value[0], MESSAGE)
        assert [url for url, _ in details] == ["type.googleapis.com/echo.EchoResponse"]
        expected_messages = 2 if variant == "status_after_2" and kind != "client_streaming" else 0
        assert len(proxied.responses) == expected_messages


@pytest.mark.parametrize("kind", ["unary", "server_streaming"])
def test_expired_deadline_cancels_the_backend_call(
    echo_backends: EchoBackendsFactory, run_proxy: ProxyFactory, kind: str
) -> None:
    [backend] = echo_backends(1)
    proxy = run_proxy(backend.address)
    stub = echo_stub(proxy.channel())
    # Connected through to the backend first: the short deadline must end a call the backend
    # holds, not one still waiting for the proxy's first connection to it.
    assert stub.UnaryEcho(EchoRequest(message="warm"), timeout=10).message == "warm"

    with pytest.raises(grpc.RpcError) as info:
        if kind == "unary":
            stub.UnaryEcho(EchoRequest(), metadata=[("x-echo-delay-ms", "30000")], timeout=0.5)
        else:
            stream = stub.ServerStreamingEcho(
                EchoRequest(count=10_000), metadata=[("x-echo-interval-ms", "50")], timeout=1.0
            )
            assert next(stream).backend == "b0"  # the deadline hits mid-stream
            for _ in stream:
                pass
    assert info.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    assert backend.wait_for_cancelled(1, timeout=10), "the backend never saw the call end"

    # The proxy and the channel are still fine.
    assert stub.UnaryEcho(EchoRequest(message="after"), timeout=10).message == "after"


def _cancel_unary(stub: EchoStub, backend: EchoServer) -> None:
    future = stub.UnaryEcho.future(EchoRequest(), metadata=[("x-echo-delay-ms", "30000")])
    wait_until(lambda: backend.servicer.calls >= 1, what="the call to reach the backend")
    assert future.cancel()


def _cancel_server_streaming(stub: EchoStub, backend: EchoServer) -> None:
    stream = stub.ServerStreamingEcho(
        EchoRequest(payload=b"p", count=10_000), metadata=[("x-echo-interval-ms", "20")]
    )
    for _ in range(3):
        assert next(stream).payload == b"p"
    assert stream.cancel()


def _cancel_bidi(stub: EchoStub, backend: EchoServer) -> None:
    # Both directions open and the response started (headers relayed) when the client
    # cancels. The backend waits in its (cancellable) delay rather than in its request
    # iterator: grpcio's sync server sometimes misses a cancel that arrives while a handler
    # blocks reading requests (seen without any proxy, about 1 call in 10).
    cancelled = threading.Event()

    def requests() -> Iterator[EchoRequest]:
        yield EchoRequest(message="one")
        cancelled.wait(30)  # the client keeps its side open until it cancels

    stream = stub.BidirectionalStreamingEcho(requests(), metadata=[("x-echo-delay-ms", "30000")])
    assert ("x-backend", "b0") in _pairs(stream.initial_metadata())
    assert stream.cancel()
    cancelled.set()


@pytest.mark.parametrize(
    "cancel",
    [_cancel_unary, _cancel_server_streaming, _cancel_bidi],
    ids=["unary", "server_streaming", "bidi_streaming"],
)
def test_client_cancellation_reaches_the_backend(
    echo_backends: EchoBackendsFactory, run_proxy: ProxyFactory, cancel: Any
) -> None:
    """No deadline: only the proxy relaying the client's RST_STREAM can end the backend call."""
    [backend] = echo_backends(1)
    proxy = run_proxy(backend.address)
    stub = echo_stub(proxy.channel())
    cancel(stub, backend)
    assert backend.wait_for_cancelled(1, timeout=10), "the cancellation never reached the backend"
    assert stub.UnaryEcho(EchoRequest(message="after"), timeout=10).message == "after"


def test_round_robin_per_call_on_one_channel(
    echo_backends: EchoBackendsFactory, run_proxy: ProxyFactory
) -> None:
    backends = echo_backends(3)
    proxy = run_proxy(*(b.address for b in backends))
    stub = echo_stub(proxy.channel())  # one channel: one HTTP/2 connection to the proxy

    served = Counter(stub.UnaryEcho(EchoRequest(), timeout=10).backend for _ in range(30))
    assert served == {"b0": 10, "b1": 10, "b2": 10}


def test_response_headers_are_forwarded_before_the_first_message(
    echo_backends: EchoBackendsFactory, run_proxy: ProxyFactory
) -> None:
    """The echo backend sends its initial metadata when the call starts, then sleeps
    x-echo-delay-ms before the first message; the client must get the headers during the
    sleep, not with the message."""
    [backend] = echo_backends(1)
    proxy = run_proxy(backend.address)
    stub = echo_stub(proxy.channel())
    stream = stub.ServerStreamingEcho(
        EchoRequest(count=1), metadata=[("x-echo-delay-ms", "15000")], timeout=30
    )
    start = time.monotonic()
    initial = stream.initial_metadata()  # blocks until the response HEADERS arrive
    waited = time.monotonic() - start
    assert ("x-backend", "b0") in _pairs(initial)
    assert waited < 5.0, f"headers took {waited:.1f}s: held back until the first message?"
    assert stream.cancel()
    assert backend.wait_for_cancelled(1, timeout=10)

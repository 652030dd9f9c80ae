"""The echo backend on its own (no proxy): the behaviour proxy tests rely on."""

from __future__ import annotations

import queue
import signal
import time
from collections.abc import Callable, Iterator

import grpc
import pytest
from backends import (
    EchoBackendsFactory,
    EchoSubprocessFactory,
    echo_stub,
    open_channel,
    parse_status_details,
)
from google.protobuf import descriptor_pb2
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

from proxy_examples.echo.echo_pb2 import EchoRequest, EchoResponse
from proxy_examples.echo.echo_pb2_grpc import EchoStub
from proxy_examples.echo.server import EchoServer, status_details


@pytest.fixture
def backend(echo_backends: EchoBackendsFactory) -> EchoServer:
    return echo_backends(1)[0]


@pytest.fixture
def stub(backend: EchoServer) -> Iterator[EchoStub]:
    with open_channel(backend.address) as channel:
        yield echo_stub(channel)


def test_unary_echoes_and_names_backend(backend: EchoServer, stub: EchoStub) -> None:
    resp, call = stub.UnaryEcho.with_call(EchoRequest(message="hi", payload=b"\x00\x01"))
    assert (resp.message, resp.payload, resp.backend) == ("hi", b"\x00\x01", "b0")
    assert ("x-backend", "b0") in call.initial_metadata()
    assert backend.cancelled_calls == 0


def test_unary_64_mib(stub: EchoStub) -> None:
    payload = bytes(range(256)) * (64 * 1024 * 1024 // 256)
    resp = stub.UnaryEcho(EchoRequest(payload=payload), timeout=60)
    assert resp.payload == payload


def test_server_streaming_count(stub: EchoStub) -> None:
    resps = list(stub.ServerStreamingEcho(EchoRequest(message="m", payload=b"p", count=3)))
    assert [(r.message, r.payload, r.backend) for r in resps] == [("m", b"p", "b0")] * 3
    assert len(list(stub.ServerStreamingEcho(EchoRequest(message="m")))) == 1


def test_client_streaming_concatenates(stub: EchoStub) -> None:
    reqs = [EchoRequest(message=m, payload=b"x" * n) for m, n in [("a", 1), ("b", 10), ("c", 0)]]
    resp, call = stub.ClientStreamingEcho.with_call(iter(reqs))
    assert (resp.message, resp.payload, resp.backend) == ("abc", b"", "b0")
    assert ("x-echo-payload-bytes", "11") in call.trailing_metadata()


def test_bidi_echoes_each_message_as_it_arrives(stub: EchoStub) -> None:
    requests: queue.Queue[EchoRequest | None] = queue.Queue()
    call = stub.BidirectionalStreamingEcho(iter(requests.get, None))
    for i in range(3):
        requests.put(EchoRequest(message=str(i), payload=bytes([i])))
        resp = next(call)  # answered before the next request is even sent
        assert (resp.message, resp.payload, resp.backend) == (str(i), bytes([i]), "b0")
    requests.put(None)
    assert list(call) == []
    assert call.code() == grpc.StatusCode.OK


def test_status_with_details(stub: EchoStub) -> None:
    md = [("x-echo-status", "5"), ("x-echo-message", "no such thing")]
    with pytest.raises(grpc.RpcError) as info:
        stub.UnaryEcho(EchoRequest(message="hi"), metadata=md)
    err = info.value
    assert err.code() == grpc.StatusCode.NOT_FOUND
    assert err.details() == "no such thing"
    raw = dict(err.trailing_metadata())["grpc-status-details-bin"]
    assert raw == status_details(5, "no such thing", "b0")
    code, message, details = parse_status_details(raw)
    assert (code, message) == (5, "no such thing")
    [(type_url, value)] = details
    assert type_url == "type.googleapis.com/echo.EchoResponse"
    assert EchoResponse.FromString(value).backend == "b0"


def test_metadata_echoed_in_headers_and_trailers(stub: EchoStub) -> None:
    binary = bytes(range(256))
    md = [("x-echo-meta-text", "v a l"), ("x-echo-meta-blob-bin", binary), ("other", "no")]
    for kind in ("ok", "error"):
        extra = [("x-echo-status", "9")] if kind == "error" else []
        try:
            _, call = stub.UnaryEcho.with_call(EchoRequest(), metadata=md + extra)
        except grpc.RpcError as err:
            call = err
            assert call.code() == grpc.StatusCode.FAILED_PRECONDITION
        for got in (call.initial_metadata(), call.trailing_metadata()):
            assert ("x-echo-meta-text", "v a l") in got
            assert ("x-echo-meta-blob-bin", binary) in got
            assert "other" not in dict(got)


def test_fail_after_n_stream_messages(backend: EchoServer, stub: EchoStub) -> None:
    md = [("x-echo-fail-after", "2"), ("x-echo-status", "14")]
    call = stub.ServerStreamingEcho(EchoRequest(message="m", count=5), metadata=md)
    got = []
    with pytest.raises(grpc.RpcError):
        got.extend(call)
    assert len(got) == 2
    assert call.code() == grpc.StatusCode.UNAVAILABLE

    bidi = stub.BidirectionalStreamingEcho(
        iter([EchoRequest(message="x")] * 5), metadata=[("x-echo-fail-after", "1")]
    )
    assert next(bidi).message == "x"
    with pytest.raises(grpc.RpcError):
        next(bidi)
    assert bidi.code() == grpc.StatusCode.INTERNAL
    time.sleep(0.1)  # termination callbacks run just after the client sees the status
    assert backend.cancelled_calls == 0  # deliberate failures are not cancellations


def test_delay_and_interval(stub: EchoStub) -> None:
    start = time.monotonic()
    stub.UnaryEcho(EchoRequest(), metadata=[("x-echo-delay-ms", "200")])
    assert time.monotonic() - start >= 0.2
    start = time.monotonic()
    list(stub.ServerStreamingEcho(EchoRequest(count=3), metadata=[("x-echo-interval-ms", "100")]))
    assert time.monotonic() - start >= 0.2


def test_cancellation_reaches_backend(backend: EchoServer, stub: EchoStub) -> None:
    future = stub.UnaryEcho.future(EchoRequest(), metadata=[("x-echo-delay-ms", "30000")])
    _wait_until(lambda: backend.servicer.calls == 1)
    future.cancel()
    assert backend.wait_for_cancelled(1)

    stream = stub.ServerStreamingEcho(
        EchoRequest(count=100), metadata=[("x-echo-interval-ms", "50")]
    )
    next(stream)
    stream.cancel()
    assert backend.wait_for_cancelled(2)

    with pytest.raises(grpc.RpcError) as info:
        stub.UnaryEcho(EchoRequest(), metadata=[("x-echo-delay-ms", "30000")], timeout=0.2)
    assert info.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    assert backend.wait_for_cancelled(3)


def test_health_and_reflection(backend: EchoServer) -> None:
    with open_channel(backend.address) as channel:
        health = health_pb2_grpc.HealthStub(channel)
        for service in ("", "echo.Echo"):
            resp = health.Check(health_pb2.HealthCheckRequest(service=service))
            assert resp.status == health_pb2.HealthCheckResponse.SERVING
        reflect = reflection_pb2_grpc.ServerReflectionStub(channel)
        [resp] = reflect.ServerReflectionInfo(
            iter([reflection_pb2.ServerReflectionRequest(list_services="")])
        )
        names = {s.name for s in resp.list_services_response.service}
        assert {"echo.Echo", "grpc.health.v1.Health"} <= names

        # What ghz and grpcurl ask for: the file of a method (grpc/grpc#34743 otherwise).
        def file_of(symbol: str) -> reflection_pb2.ServerReflectionResponse:
            request = reflection_pb2.ServerReflectionRequest(file_containing_symbol=symbol)
            [reply] = reflect.ServerReflectionInfo(iter([request]))
            return reply

        for symbol in ("echo.Echo", "echo.Echo.UnaryEcho", "echo.EchoRequest"):
            protos = file_of(symbol).file_descriptor_response.file_descriptor_proto
            assert protos, symbol
            assert descriptor_pb2.FileDescriptorProto.FromString(protos[0]).name == "echo.proto"
        for symbol in ("echo.Echo.NoSuchMethod", "no.Such.Method", "nothing"):
            assert file_of(symbol).error_response.error_code == grpc.StatusCode.NOT_FOUND.value[0]


def test_subprocess_backend(echo_subprocess: EchoSubprocessFactory) -> None:
    proc, port = echo_subprocess(name="sub")
    with open_channel(f"127.0.0.1:{port}") as channel:
        stub = echo_stub(channel)
        assert stub.UnaryEcho(EchoRequest(message="x")).backend == "sub"
        stream = stub.ServerStreamingEcho(
            EchoRequest(count=100), metadata=[("x-echo-interval-ms", "50")]
        )
        next(stream)
        stream.cancel()
        time.sleep(0.5)  # let the cancellation reach the backend before stopping it
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=10)
    assert proc.returncode == 0
    assert "cancelled /echo.Echo/ServerStreamingEcho backend=sub" in err


def _wait_until(predicate: Callable[[], bool], timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "condition not met in time"
        time.sleep(0.01)

"""End to end: backends that die, are down, refuse streams or reset them, behind a real proxy.

A call that reached no backend code (connect refused, REFUSED_STREAM before any response,
a stream above a GOAWAY's last id) is replayed on another backend; once the backend has
answered, a failure is final and maps to a gRPC status.
"""

from __future__ import annotations

import os
import signal
import time
from collections import Counter
from collections.abc import Callable, Iterator

import grpc
import pytest
from backends import EchoBackendsFactory, EchoSubprocessFactory, echo_stub
from relay_support import ClosedPortFactory, ProxyFactory
from scripted_h2_backend import RESET_CODE_HEADER, Behaviour, running_scripted_backend

from proxy_examples.echo.echo_pb2 import EchoRequest
from proxy_examples.echo.echo_pb2_grpc import EchoStub

FAST_S = 5.0  # "fails fast instead of hanging": far above a healthy run, far below a hang


def _all_kinds_succeed_on(stub: EchoStub, backend_name: str) -> None:
    """One call of each kind (client streaming with several messages, so request bytes
    arriving while the proxy picks another backend must be replayed too)."""
    assert stub.UnaryEcho(EchoRequest(message="u"), timeout=10).backend == backend_name
    streamed = list(stub.ServerStreamingEcho(EchoRequest(message="s", count=3), timeout=10))
    assert [r.backend for r in streamed] == [backend_name] * 3
    requests = [EchoRequest(message=m, payload=os.urandom(10_000)) for m in "abcd"]
    response = stub.ClientStreamingEcho(iter(requests), timeout=10)
    assert (response.message, response.backend) == ("abcd", backend_name)
    echoed = list(stub.BidirectionalStreamingEcho(iter(requests), timeout=10))
    assert [(r.message, r.payload) for r in echoed] == [(r.message, r.payload) for r in requests]
    assert {r.backend for r in echoed} == {backend_name}


# ---------------------------------------------------------------------- backend killed


def test_backend_killed_mid_stream_fails_the_call_fast_and_others_continue(
    echo_subprocess: EchoSubprocessFactory,
    echo_backends: EchoBackendsFactory,
    run_proxy: ProxyFactory,
) -> None:
    victim, victim_port = echo_subprocess("victim")
    [survivor] = echo_backends(1)
    proxy = run_proxy(f"127.0.0.1:{victim_port}", survivor.address)
    stub = echo_stub(proxy.channel())

    # Round robin alternates: within a few calls one lands on the victim.
    for _ in range(4):
        stream = stub.ServerStreamingEcho(
            EchoRequest(message="m", count=100_000),
            metadata=[("x-echo-interval-ms", "20")],
            timeout=30,  # a hang would surface as DEADLINE_EXCEEDED, not as a pass
        )
        if next(stream).backend == "victim":
            break
        stream.cancel()
    else:
        pytest.fail("no streaming call landed on the victim backend")
    assert next(stream).backend == "victim"  # the stream is flowing

    victim.send_signal(signal.SIGKILL)
    killed_at = time.monotonic()
    with pytest.raises(grpc.RpcError) as info:
        for _ in stream:
            pass
    elapsed = time.monotonic() - killed_at
    assert info.value.code() in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.INTERNAL), (
        info.value.code(),
        info.value.details(),
    )
    assert elapsed < FAST_S, f"the client learnt of the dead backend after {elapsed:.1f}s"
    victim.wait(10)

    # New calls all go to the survivor (the victim's port now refuses connections), on the
    # same client connection and on a new one.
    for channel_stub in (stub, echo_stub(proxy.channel())):
        served = Counter(
            channel_stub.UnaryEcho(EchoRequest(), timeout=10).backend for _ in range(10)
        )
        assert served == {survivor.name: 10}
        _all_kinds_succeed_on(channel_stub, survivor.name)


# ---------------------------------------------------------------------- backends down


def test_backend_down_before_the_call_is_skipped(
    echo_backends: EchoBackendsFactory, run_proxy: ProxyFactory, closed_port: ClosedPortFactory
) -> None:
    dead = closed_port()
    [live] = echo_backends(1)
    proxy = run_proxy(dead.address, live.address)
    stub = echo_stub(proxy.channel())

    # Sequential calls: round robin offers the dead backend every other call.
    served = Counter(stub.UnaryEcho(EchoRequest(), timeout=10).backend for _ in range(12))
    assert served == {live.name: 12}
    # Concurrent calls: several may be waiting on the same failed connect at once.
    calls = [stub.UnaryEcho.future(EchoRequest(), timeout=10) for _ in range(20)]
    assert Counter(call.result().backend for call in calls) == {live.name: 20}
    _all_kinds_succeed_on(stub, live.name)


@pytest.mark.parametrize("dead_count", [1, 2])
def test_all_backends_down_is_unavailable(
    run_proxy: ProxyFactory, closed_port: ClosedPortFactory, dead_count: int
) -> None:
    dead = [closed_port() for _ in range(dead_count)]
    proxy = run_proxy(*(d.address for d in dead))
    stub = echo_stub(proxy.channel())

    def check(call: Callable[[], object]) -> None:
        start = time.monotonic()
        with pytest.raises(grpc.RpcError) as info:
            call()
        assert time.monotonic() - start < FAST_S
        assert info.value.code() == grpc.StatusCode.UNAVAILABLE, info.value.details()
        details = info.value.details() or ""
        assert "no backend reachable" in details
        for d in dead:
            assert d.address in details  # every backend tried is named

    requests = [EchoRequest(message="a"), EchoRequest(message="b")]
    for _ in range(3):  # also once the dead backends are in connect backoff
        check(lambda: stub.UnaryEcho(EchoRequest(), timeout=10))
        check(lambda: list(stub.ServerStreamingEcho(EchoRequest(count=2), timeout=10)))
        check(lambda: stub.ClientStreamingEcho(iter(requests), timeout=10))
        check(lambda: list(stub.BidirectionalStreamingEcho(iter(requests), timeout=10)))


# ---------------------------------------------------------------------- refusals


@pytest.mark.parametrize("behaviour", [Behaviour.REFUSE, Behaviour.GOAWAY_ON_CONNECT])
def test_backend_refusals_are_retried_on_another_backend(
    echo_backends: EchoBackendsFactory, run_proxy: ProxyFactory, behaviour: Behaviour
) -> None:
    [echo] = echo_backends(1)
    with running_scripted_backend(behaviour) as refusing:
        proxy = run_proxy(refusing.address, echo.address)
        stub = echo_stub(proxy.channel())

        served = Counter(stub.UnaryEcho(EchoRequest(), timeout=10).backend for _ in range(12))
        assert served == {echo.name: 12}
        calls = [stub.UnaryEcho.future(EchoRequest(), timeout=10) for _ in range(20)]
        assert Counter(call.result().backend for call in calls) == {echo.name: 20}
        _all_kinds_succeed_on(stub, echo.name)

        # The refusing backend was really offered calls (and said no).
        if behaviour is Behaviour.REFUSE:
            assert refusing.requests > 0
        else:
            assert refusing.connections > 0


@pytest.mark.parametrize("behaviour", [Behaviour.REFUSE, Behaviour.GOAWAY_ON_CONNECT])
def test_only_refusing_backends_is_unavailable(
    run_proxy: ProxyFactory, behaviour: Behaviour
) -> None:
    with running_scripted_backend(behaviour) as refusing:
        proxy = run_proxy(refusing.address)
        stub = echo_stub(proxy.channel())
        for _ in range(3):
            start = time.monotonic()
            with pytest.raises(grpc.RpcError) as info:
                stub.UnaryEcho(EchoRequest(), timeout=10)
            assert time.monotonic() - start < FAST_S
            assert info.value.code() == grpc.StatusCode.UNAVAILABLE, info.value.details()
            details = info.value.details() or ""
            assert "no backend reachable" in details
            assert refusing.address in details
        assert refusing.connections > 0


# ---------------------------------------------------------------------- resets after headers


@pytest.fixture(scope="module")
def resetting_backend() -> Iterator[str]:
    with running_scripted_backend(Behaviour.HEADERS_THEN_RESET) as backend:
        yield backend.address


RESET_CASES = [
    (0x8, "CANCEL", grpc.StatusCode.CANCELLED),
    (0xB, "ENHANCE_YOUR_CALM", grpc.StatusCode.RESOURCE_EXHAUSTED),
    (0x2, "INTERNAL_ERROR", grpc.StatusCode.INTERNAL),
    # After response headers the backend has seen the call: no retry, just UNAVAILABLE.
    (0x7, "REFUSED_STREAM", grpc.StatusCode.UNAVAILABLE),
]


@pytest.mark.parametrize(("code", "name", "status"), RESET_CASES, ids=[c[1] for c in RESET_CASES])
def test_backend_reset_after_headers_maps_to_grpc_status(
    resetting_backend: str,
    run_proxy: ProxyFactory,
    code: int,
    name: str,
    status: grpc.StatusCode,
) -> None:
    proxy = run_proxy(resetting_backend)
    stub = echo_stub(proxy.channel())
    metadata = [(RESET_CODE_HEADER.decode(), str(code))]

    start = time.monotonic()
    with pytest.raises(grpc.RpcError) as info:
        stub.UnaryEcho(EchoRequest(message="x"), metadata=metadata, timeout=10)
    assert time.monotonic() - start < FAST_S
    err = info.value
    assert err.code() == status, err.details()
    assert name in (err.details() or "")
    # The backend's response headers were relayed before the reset.
    assert ("x-scripted", "headers-then-reset") in [tuple(m) for m in err.initial_metadata()]

    # A streaming call the same way (reset while the client may still be sending).
    stream = stub.BidirectionalStreamingEcho(
        iter([EchoRequest(message="y")] * 3), metadata=metadata, timeout=10
    )
    with pytest.raises(grpc.RpcError):
        list(stream)
    assert stream.code() == status, stream.details()


def test_resetting_backend_does_not_disturb_calls_to_others(
    resetting_backend: str, echo_backends: EchoBackendsFactory, run_proxy: ProxyFactory
) -> None:
    """Resets on one backend's streams leave calls to the other backend alone."""
    [echo] = echo_backends(1)
    # Outlier detection off: it would (rightly) eject the resetting backend mid-test, and
    # this test is about the relay keeping the two apart, with round robin's exact split.
    proxy = run_proxy(
        resetting_backend, echo.address, extra_args=("--outlier-consecutive-failures", "0")
    )
    stub = echo_stub(proxy.channel())
    metadata = [(RESET_CODE_HEADER.decode(), "2")]
    calls = [
        stub.UnaryEcho.future(EchoRequest(message=str(i)), metadata=metadata, timeout=10)
        for i in range(20)
    ]
    outcomes: Counter[str] = Counter()
    for call in calls:
        try:
            outcomes[call.result().backend] += 1
        except grpc.RpcError as err:
            assert err.code() == grpc.StatusCode.INTERNAL, err.details()
            outcomes["reset"] += 1
    assert outcomes == {echo.name: 10, "reset": 10}

"""Retries through a real proxy process: how many, and under the retry budget."""

from __future__ import annotations

from collections import Counter

import grpc
from backends import EchoBackendsFactory, echo_stub, open_channel
from outcomes_support import ClosingListener, proxy_args
from proxy_process import ClosedPort, start_proxy

from proxy_examples.echo.echo_pb2 import EchoRequest

# Outlier detection off: these tests look at retries alone.
NO_OUTLIERS = ("--outlier-consecutive-failures", "0")


def concurrent_calls(
    port: int, count: int, metadata: tuple[tuple[str, str], ...] = ()
) -> list[tuple[grpc.StatusCode, str]]:
    with open_channel(f"127.0.0.1:{port}") as channel:
        stub = echo_stub(channel)
        calls = [
            stub.UnaryEcho.future(EchoRequest(message="x"), metadata=metadata, timeout=20)
            for _ in range(count)
        ]
        outcomes = []
        for future in calls:
            try:
                outcomes.append((grpc.StatusCode.OK, future.result().backend))
            except grpc.RpcError as exc:
                outcomes.append((exc.code(), exc.details() or ""))
        return outcomes


def test_retry_budget_refuses_retries_in_a_failing_pool(
    echo_backends: EchoBackendsFactory, closing_listener: ClosingListener
) -> None:
    # Half the pool drops every connection before HTTP/2, so every call sent there needs a
    # retry; the other half holds each call 2 s, so retries granted stay in flight.
    [echo] = echo_backends(1)
    slow = (("x-echo-delay-ms", "2000"),)
    budget = ("--retry-budget-percent", "10", "--retry-budget-min", "1")
    args = proxy_args(closing_listener.address, echo.address, options=(*NO_OUTLIERS, *budget))
    with start_proxy(args) as (_, port):
        outcomes = concurrent_calls(port, 20, slow)
    refused = [details for code, details in outcomes if code != grpc.StatusCode.OK]
    # At most max(1, 10 % of 20 calls) = 2 retries in flight: most of the ~10 calls that
    # met the dropping backend first are refused, with UNAVAILABLE saying why.
    assert len(refused) >= 5, outcomes
    for code, details in outcomes:
        if code != grpc.StatusCode.OK:
            assert code == grpc.StatusCode.UNAVAILABLE
            assert details.startswith("retry budget exhausted"), details
            assert closing_listener.address in details
        else:
            assert details == echo.name
    assert len(outcomes) - len(refused) >= 10  # the calls sent to the echo backend first


def test_with_budget_to_spare_every_call_is_retried(
    echo_backends: EchoBackendsFactory, closing_listener: ClosingListener
) -> None:
    # The control for the test above: the same load, a budget of every call in flight.
    [echo] = echo_backends(1)
    slow = (("x-echo-delay-ms", "2000"),)
    budget = ("--retry-budget-percent", "100", "--retry-budget-min", "1")
    args = proxy_args(closing_listener.address, echo.address, options=(*NO_OUTLIERS, *budget))
    with start_proxy(args) as (_, port):
        outcomes = concurrent_calls(port, 20, slow)
    assert Counter(outcomes) == {(grpc.StatusCode.OK, echo.name): 20}
    assert closing_listener.accepted > 0  # the dropping backend was really tried


def test_max_retries_zero_does_not_retry(
    echo_backends: EchoBackendsFactory, closed_port: ClosedPort
) -> None:
    [echo] = echo_backends(1)
    args = proxy_args(closed_port.address, echo.address, options=("--max-retries", "0"))
    with start_proxy(args) as (_, port), open_channel(f"127.0.0.1:{port}") as channel:
        stub = echo_stub(channel)
        failures = []
        for _ in range(10):
            try:
                assert stub.UnaryEcho(EchoRequest(), timeout=10).backend == echo.name
            except grpc.RpcError as exc:
                failures.append((exc.code(), exc.details() or ""))
    assert failures  # the dead backend is picked before its first failure at least
    for code, details in failures:
        assert code == grpc.StatusCode.UNAVAILABLE
        assert details.startswith("no backend reachable")
        assert closed_port.address in details
        assert echo.address not in details  # one attempt: the live backend never tried


def test_max_retries_counts_other_backends_tried(
    echo_backends: EchoBackendsFactory,
) -> None:
    dead = [ClosedPort() for _ in range(3)]
    try:
        args = proxy_args(*(d.address for d in dead), options=("--max-retries", "1"))
        with start_proxy(args) as (_, port), open_channel(f"127.0.0.1:{port}") as channel:
            stub = echo_stub(channel)
            for _ in range(3):
                try:
                    stub.UnaryEcho(EchoRequest(), timeout=10)
                except grpc.RpcError as exc:
                    details = exc.details() or ""
                    assert exc.code() == grpc.StatusCode.UNAVAILABLE
                else:
                    raise AssertionError("a pool of dead backends answered")
                # Two attempts (the first and one retry), each naming its backend.
                assert sum(d.address in details for d in dead) == 2, details
    finally:
        for port in dead:
            port.close()

"""The access log of a real proxy process: one JSON line per call, sampled or off."""

from __future__ import annotations

import time

import grpc
import pytest
from backends import EchoBackendsFactory, echo_stub, open_channel
from proxy_process import log_events, start_proxy

from proxy_examples.echo.echo_pb2 import EchoRequest


def serve_args(address: str, *options: str) -> list[str]:
    return ["serve", "--admin", "off", "--log-format", "json", "--backend", address, *options]


def test_one_line_per_call_by_default(echo_backends: EchoBackendsFactory) -> None:
    [echo] = echo_backends(1)
    with start_proxy(serve_args(echo.address)) as (proc, port):
        with open_channel(f"127.0.0.1:{port}") as channel:
            stub = echo_stub(channel)
            stub.UnaryEcho(EchoRequest(message="hello"), timeout=10)
            with pytest.raises(grpc.RpcError):
                stub.UnaryEcho(EchoRequest(), metadata=(("x-echo-status", "7"),), timeout=10)
        deadline = time.monotonic() + 5
        while len(log_events(proc, "call")) < 2 and time.monotonic() < deadline:
            time.sleep(0.05)
        ok, denied = log_events(proc, "call")
    assert ok["logger"] == "proxy.access"
    assert ok["service"] == "echo.Echo" and ok["method"] == "UnaryEcho"
    assert ok["target"] == "static" and ok["backend"] == echo.address
    assert ok["grpc_status"] == 0 and denied["grpc_status"] == 7
    assert ok["request_bytes"] == len(EchoRequest(message="hello").SerializeToString()) + 5
    assert ok["response_bytes"] > ok["request_bytes"]
    assert ok["duration_ms"] > 0
    assert ok["peer"].startswith("127.0.0.1:")


@pytest.mark.parametrize(("sample", "logged"), [("0", 0), ("0.5", None)])
def test_sampled_or_off(
    echo_backends: EchoBackendsFactory, sample: str, logged: int | None
) -> None:
    [echo] = echo_backends(1)
    calls = 200
    with start_proxy(serve_args(echo.address, "--access-log-sample", sample)) as (proc, port):
        with open_channel(f"127.0.0.1:{port}") as channel:
            stub = echo_stub(channel)
            for _ in range(calls):
                stub.UnaryEcho(EchoRequest(), timeout=10)
        time.sleep(0.3)
        lines = len(log_events(proc, "call"))
    if logged is not None:
        assert lines == logged
    else:  # binomial(200, 0.5): outside 50..150 once in ~10^12 runs
        assert 50 <= lines <= 150


def test_durations_are_finer_than_a_millisecond(echo_backends: EchoBackendsFactory) -> None:
    """The served proxy runs on uvloop, whose loop.time() is a cached millisecond clock:
    timing calls with it would make every fast call 0 or 1 ms (and the histogram's
    sub-millisecond buckets useless). Durations come from a fine clock."""
    [echo] = echo_backends(1)
    with start_proxy(serve_args(echo.address)) as (proc, port):
        with open_channel(f"127.0.0.1:{port}") as channel:
            stub = echo_stub(channel)
            for _ in range(20):
                stub.UnaryEcho(EchoRequest(message="x"), timeout=10)
        deadline = time.monotonic() + 5
        while len(log_events(proc, "call")) < 20 and time.monotonic() < deadline:
            time.sleep(0.05)
        durations = [event["duration_ms"] for event in log_events(proc, "call")]
    assert len(durations) == 20
    assert any(d != round(d) for d in durations), durations

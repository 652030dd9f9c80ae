"""Passive outlier detection through a real proxy process, with real grpcio backends."""

from __future__ import annotations

import json
import subprocess
import time
import urllib.request
from collections import Counter
from collections.abc import Callable

import grpc
from backends import echo_stub, open_channel
from outcomes_support import FlakyBackend, proxy_args
from proxy_process import free_port, log_events, start_proxy, wait_for

from proxy_examples.echo.echo_pb2 import EchoRequest

Flaky = Callable[[int], list[FlakyBackend]]


def call(stub: object) -> tuple[str, grpc.StatusCode, str]:
    """(backend name or "", status, details) of one UnaryEcho."""
    try:
        reply = stub.UnaryEcho(EchoRequest(message="x"), timeout=10)  # type: ignore[attr-defined]
    except grpc.RpcError as exc:
        return "", exc.code(), exc.details() or ""
    return reply.backend, grpc.StatusCode.OK, ""


def connections_to(admin: int, address: str) -> int:
    """The proxy's open connections to `address`, from its admin /pool."""
    with urllib.request.urlopen(f"http://127.0.0.1:{admin}/pool", timeout=10) as response:
        pool = json.loads(response.read())
    return sum(
        endpoint["connections"]
        for worker in pool["workers"]
        for target in worker["targets"]
        for endpoint in target["endpoints"]
        if endpoint["address"] == address
    )


def test_failing_backend_is_ejected_then_comes_back(flaky_backends: Flaky) -> None:
    backends = flaky_backends(3)
    bad = backends[1]
    options = (
        "--outlier-consecutive-failures", "3",
        "--outlier-base-ejection", "2",
        "--outlier-max-ejection-percent", "50",
    )  # fmt: skip
    args = proxy_args(*(b.address for b in backends), options=options)
    with start_proxy(args) as (proc, port), open_channel(f"127.0.0.1:{port}") as channel:
        stub = echo_stub(channel)
        assert {call(stub)[0] for _ in range(6)} == {b.name for b in backends}

        bad.fail()
        failures = []
        for _ in range(30):
            sent_at = time.monotonic()
            name, code, details = call(stub)
            if code != grpc.StatusCode.OK:
                # The backend's own answer, relayed as is, not retried.
                assert code == grpc.StatusCode.UNAVAILABLE
                assert details == f"{bad.name} is failing"
                failures.append(details)
                if len(failures) == 3:
                    break
        assert len(failures) == 3
        # The proxy ejected it while relaying the third failure: after that call was sent,
        # and maybe well before its answer reached us (a slow client reads it late).
        ejected_at = sent_at
        # Healthy again at once: only the ejection keeps calls away from it now.
        bad.fail(False)

        # Ejected: for a while, no call reaches it.
        reached = bad.received
        served: Counter[str] = Counter()
        while time.monotonic() < ejected_at + 1.0 or sum(served.values()) < 10:
            name, code, details = call(stub)
            assert code == grpc.StatusCode.OK, details
            served[name] += 1
        if time.monotonic() < ejected_at + 1.9:  # still within the 2 s ejection
            assert bad.received == reached
            assert set(served) == {backends[0].name, backends[2].name}
        [ejected] = log_events(proc, "backend_ejected")
        assert ejected["backend"] == bad.address
        assert ejected["times"] == 1
        assert ejected["for_s"] == 2.0

        # Once its time is up it takes calls again, on its own.
        deadline = time.monotonic() + 15
        while bad.name not in served and time.monotonic() < deadline:
            name, code, details = call(stub)
            assert code == grpc.StatusCode.OK, details
            served[name] += 1
            time.sleep(0.02)
        assert bad.name in served
        assert time.monotonic() - ejected_at >= 1.9
        [returned] = log_events(proc, "backend_returned")
        assert returned["backend"] == bad.address
        assert len(log_events(proc, "backend_ejected")) == 1


def test_no_more_than_the_max_share_is_ejected(flaky_backends: Flaky) -> None:
    backends = flaky_backends(4)
    for bad in backends[:2]:
        bad.fail()
    options = (
        "--outlier-consecutive-failures", "3",
        "--outlier-base-ejection", "60",
        "--outlier-max-ejection-percent", "25",  # one of four
    )  # fmt: skip
    args = proxy_args(*(b.address for b in backends), options=options)
    with start_proxy(args) as (proc, port), open_channel(f"127.0.0.1:{port}") as channel:
        stub = echo_stub(channel)
        for _ in range(40):
            call(stub)
        [ejected] = log_events(proc, "backend_ejected")
        [held] = log_events(proc, "backend_ejection_held_back")
        out = next(b for b in backends if b.address == ejected["backend"])
        kept = next(b for b in backends if b.address == held["backend"])
        assert {out, kept} == set(backends[:2])

        # The ejected one gets nothing; the other failing one still takes its share.
        before = out.received, kept.received
        failed = sum(call(stub)[1] != grpc.StatusCode.OK for _ in range(30))
        assert out.received == before[0]
        assert kept.received - before[1] == failed > 0
        assert len(log_events(proc, "backend_ejected")) == 1


def test_a_killed_backend_is_ejected_and_calls_go_on(
    flaky_backends: Flaky,
    echo_subprocess: Callable[..., tuple[subprocess.Popen[str], int]],
) -> None:
    live = flaky_backends(2)
    doomed, doomed_port = echo_subprocess(name="doomed")
    doomed_address = f"127.0.0.1:{doomed_port}"
    admin = free_port()
    options = (
        "--outlier-consecutive-failures", "3",
        "--outlier-base-ejection", "60",
        "--admin", f"127.0.0.1:{admin}",  # after proxy_args' "--admin off": the last one wins
    )  # fmt: skip
    addresses = [doomed_address, *(b.address for b in live)]
    with (
        start_proxy(proxy_args(*addresses, options=options)) as (proc, port),
        open_channel(f"127.0.0.1:{port}") as channel,
    ):
        stub = echo_stub(channel)
        assert "doomed" in {call(stub)[0] for _ in range(6)}
        doomed.kill()
        doomed.wait()
        # A call sent on its connection before the proxy reads the close would fail (it may
        # have reached the backend, so it is not retried): let the proxy see it first (its
        # connection to the backend leaves /pool), however long that takes.
        wait_for(
            lambda: connections_to(admin, doomed_address) == 0,
            "the proxy to see the killed backend's connection close",
        )
        # Its connect errors count; every call still succeeds, retried on the others.
        deadline = time.monotonic() + 15
        while not log_events(proc, "backend_ejected") and time.monotonic() < deadline:
            name, code, details = call(stub)
            assert code == grpc.StatusCode.OK, details
            assert name != "doomed"
            time.sleep(0.01)
        [ejected] = log_events(proc, "backend_ejected")
        assert ejected["backend"] == doomed_address

"""ActiveHealth against real grpcio echo backends, in the test's event loop (and one on uvloop).

Intervals are short (0.1 s) so the verdicts come quickly; every wait polls against a generous
deadline, so a slow machine makes a test slower, not red.
"""

from __future__ import annotations

import asyncio
import socket
import threading
import time
from collections.abc import AsyncIterator, Callable, Iterator
from concurrent import futures
from typing import Any

import grpc
import pytest
import structlog
from backends import EchoBackendsFactory
from structlog.testing import capture_logs

import proxy.runtime.health_checks as active
from proxy.core.endpoints import Endpoint, TargetPool, static_pool
from proxy.core.options import HealthCheckOptions
from proxy.core.routing import Router
from proxy.runtime.health_checks import ActiveHealth
from proxy_examples.echo.server import SERVICE_NAME, serve

INTERVAL = 0.1
WAIT = 15.0


async def wait_until(predicate: Callable[[], bool], what: str, timeout: float = WAIT) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout} s waiting for {what}")
        await asyncio.sleep(0.02)


@pytest.fixture
async def health_of() -> AsyncIterator[Callable[..., ActiveHealth]]:
    """Factory: ``health_of(pools, **kwargs)`` -> a started ActiveHealth, closed at teardown."""
    started: list[ActiveHealth] = []

    def make(pools: Any, **kwargs: Any) -> ActiveHealth:
        kwargs.setdefault("interval", INTERVAL)
        kwargs.setdefault("timeout", 1.0)
        health = ActiveHealth(pools, HealthCheckOptions(**kwargs))
        health.start()
        started.append(health)
        return health

    yield make
    for health in started:
        await health.close()


@pytest.fixture
def silent_listener() -> Iterator[str]:
    """An address that accepts TCP connections (the kernel's backlog) but never answers."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        sock.listen(16)
        yield f"127.0.0.1:{sock.getsockname()[1]}"


@pytest.fixture
def hung_backend() -> Iterator[str]:
    """A grpc server whose Health/Check never answers (until the server stops)."""
    stop = threading.Event()

    def check(request: bytes, context: grpc.ServicerContext) -> bytes:
        stop.wait(30)
        return b""

    handler = grpc.method_handlers_generic_handler(
        "grpc.health.v1.Health", {"Check": grpc.unary_unary_rpc_method_handler(check)}
    )
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=4))
    server.add_generic_rpc_handlers((handler,))
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    yield f"127.0.0.1:{port}"
    stop.set()
    server.stop(None).wait()


def check_tasks(address: str) -> list[asyncio.Task[Any]]:
    return [t for t in asyncio.all_tasks() if t.get_name() == f"health-check {address}"]


def all_serving(health: ActiveHealth, addresses: list[str]) -> Callable[[], bool]:
    return lambda: all(health.status(a) == "serving" for a in addresses)


async def test_not_serving_takes_a_backend_out_and_serving_brings_it_back(
    echo_backends: EchoBackendsFactory, health_of: Callable[..., ActiveHealth]
) -> None:
    b0, b1 = echo_backends(2)
    health = health_of(lambda: [static_pool("echo", [b0.address, b1.address])])
    await wait_until(all_serving(health, [b0.address, b1.address]), "both serving")
    assert health.usable(b0.address) and health.usable(b1.address)

    b0.set_health(False)
    await wait_until(lambda: not health.usable(b0.address), "b0 out")
    assert health.status(b0.address) == "not_serving"
    assert health.reason(b0.address) == "NOT_SERVING"
    assert health.checks_total[(b0.address, "not_serving")] >= 1
    assert health.status(b1.address) == "serving" and health.usable(b1.address)

    b0.set_health(True)
    await wait_until(lambda: health.usable(b0.address), "b0 back")
    assert health.status(b0.address) == "serving"
    assert health.checks_total[(b1.address, "not_serving")] == 0


async def test_a_change_is_logged_once_not_per_check(
    echo_backends: EchoBackendsFactory,
    health_of: Callable[..., ActiveHealth],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    (b0,) = echo_backends(1)
    with capture_logs() as logs:
        # A fresh logger: one cached by an earlier structlog.configure would bypass the capture.
        monkeypatch.setattr(active, "log", structlog.get_logger("proxy.health"))
        health = health_of(lambda: [static_pool("echo", [b0.address])])
        await wait_until(all_serving(health, [b0.address]), "serving")
        b0.set_health(False)
        await wait_until(
            lambda: health.checks_total[(b0.address, "not_serving")] >= 4, "four failed checks"
        )
        b0.set_health(True)
        await wait_until(lambda: health.checks_total[(b0.address, "serving")] >= 4 + 3, "more")
    changes = [e for e in logs if e["event"] == "backend_health_changed"]
    assert [(e["backend"], e["status"], e["log_level"]) for e in changes] == [
        (b0.address, "serving", "debug"),  # the first answer
        (b0.address, "not_serving", "info"),
        (b0.address, "serving", "info"),
    ]
    assert changes[1]["reason"] == "NOT_SERVING" and changes[1]["previous"] == "serving"


async def test_a_stopped_backend_is_out_and_back_when_it_restarts(
    echo_backends: EchoBackendsFactory, health_of: Callable[..., ActiveHealth]
) -> None:
    b0, b1 = echo_backends(2)
    health = health_of(lambda: [static_pool("echo", [b0.address, b1.address])])
    await wait_until(all_serving(health, [b0.address, b1.address]), "both serving")

    b0.stop(None).wait()
    await wait_until(lambda: not health.usable(b0.address), "stopped b0 out")
    assert health.checks_total[(b0.address, "error")] >= 1
    assert health.reason(b0.address).startswith("UNAVAILABLE")
    assert health.usable(b1.address)

    # Same port again: seen again once the channel reconnects (its backoff is capped at the
    # interval, where grpc's default grows to two minutes).
    restarted, _ = serve(b0.port, name="b0-again")
    try:
        await wait_until(lambda: health.usable(b0.address), "restarted b0 back")
    finally:
        restarted.stop(None).wait()


async def test_no_answer_in_time_is_out_and_unknown_before_the_first_answer(
    hung_backend: str, health_of: Callable[..., ActiveHealth]
) -> None:
    health = health_of(lambda: [static_pool("echo", [hung_backend])], timeout=1.0)
    await wait_until(lambda: hung_backend in health.addresses(), "checking it")
    # Its first check is under way and cannot answer before its 1 s timeout.
    assert health.status(hung_backend) == "unknown"
    assert health.usable(hung_backend)
    await wait_until(lambda: not health.usable(hung_backend), "hung backend out")
    assert health.checks_total[(hung_backend, "timeout")] >= 1
    assert health.status(hung_backend) == "not_serving"
    assert health.reason(hung_backend) == "no answer within 1 s"


async def test_a_backend_that_never_completes_the_connection_is_out(
    silent_listener: str, health_of: Callable[..., ActiveHealth]
) -> None:
    # grpc's connect timeout is the check timeout: whichever fires first, the verdict is out.
    health = health_of(lambda: [static_pool("echo", [silent_listener])], timeout=0.5)
    await wait_until(lambda: not health.usable(silent_listener), "silent backend out")
    results = {r for (a, r) in health.checks_total if a == silent_listener}
    assert results and results <= {"timeout", "error"}, results


async def test_the_service_name_is_the_one_checked(
    echo_backends: EchoBackendsFactory, health_of: Callable[..., ActiveHealth]
) -> None:
    (b0,) = echo_backends(1)
    pools = lambda: [static_pool("echo", [b0.address])]  # noqa: E731
    per_service = health_of(pools, service=SERVICE_NAME)
    overall = health_of(pools)
    unknown = health_of(pools, service="no.such.Service")
    await wait_until(all_serving(per_service, [b0.address]), "echo.Echo serving")
    await wait_until(all_serving(overall, [b0.address]), "overall serving")

    b0.set_health(False, SERVICE_NAME)
    await wait_until(lambda: not per_service.usable(b0.address), "echo.Echo out")
    # The server's overall health is unchanged, and that is all `overall` asks about.
    count = overall.checks_total[(b0.address, "serving")]
    await wait_until(lambda: overall.checks_total[(b0.address, "serving")] >= count + 3, "checks")
    assert overall.usable(b0.address)

    # A service the backend does not know (NOT_FOUND) is not served.
    await wait_until(lambda: unknown.status(b0.address) == "not_serving", "unknown service out")
    assert unknown.checks_total[(b0.address, "not_serving")] >= 1
    assert "unknown" in unknown.reason(b0.address)


async def test_addresses_follow_the_pools(
    echo_backends: EchoBackendsFactory, health_of: Callable[..., ActiveHealth]
) -> None:
    b0, b1, b2 = echo_backends(3)
    echo = static_pool("echo", [b0.address, b1.address])
    other = TargetPool("other")
    health = health_of(Router(default=echo, routes={"x.Y": other}))
    await wait_until(all_serving(health, [b0.address, b1.address]), "both serving")
    assert health.addresses() == {b0.address, b1.address}

    b1.set_health(False)
    await wait_until(lambda: not health.usable(b1.address), "b1 out")
    echo.update([Endpoint(b0.address)])
    other.update([Endpoint(b2.address)])
    await wait_until(lambda: health.addresses() == {b0.address, b2.address}, "rescan")
    # A departed address is forgotten: no verdict, no counts, and usable if it ever returns.
    assert health.status(b1.address) == "unknown" and health.usable(b1.address)
    assert not any(address == b1.address for address, _ in health.checks_total)
    await wait_until(all_serving(health, [b2.address]), "b2 serving")

    # Its checks stopped (task and channel gone): its counts stay at zero.
    await wait_until(lambda: not check_tasks(b1.address), "b1's check task ended")
    b2_checks = sum(n for (a, _), n in health.checks_total.items() if a == b2.address)
    await wait_until(
        lambda: (
            sum(n for (a, _), n in health.checks_total.items() if a == b2.address) >= b2_checks + 5
        ),
        "more checks of b2",
    )
    assert not any(address == b1.address for address, _ in health.checks_total)

    # It comes back fresh: unknown until its first answer, which is now NOT_SERVING.
    echo.update([Endpoint(b0.address), Endpoint(b1.address)])
    await wait_until(lambda: health.status(b1.address) == "not_serving", "b1 checked again")


async def test_close_stops_every_check(
    echo_backends: EchoBackendsFactory, health_of: Callable[..., ActiveHealth]
) -> None:
    (b0,) = echo_backends(1)
    health = health_of(lambda: [static_pool("echo", [b0.address])])
    await wait_until(all_serving(health, [b0.address]), "serving")
    await health.close()
    assert health.addresses() == set()
    assert not check_tasks(b0.address)


def test_runs_on_uvloop(echo_backends: EchoBackendsFactory) -> None:
    """The proxy runs on uvloop; grpc.aio must work on it (no thread, no other loop)."""
    uvloop = pytest.importorskip("uvloop")
    (b0,) = echo_backends(1)

    async def flip() -> str:
        assert type(asyncio.get_running_loop()).__module__.startswith("uvloop")
        health = ActiveHealth(
            lambda: [static_pool("echo", [b0.address])], HealthCheckOptions(INTERVAL, 1.0)
        )
        health.start()
        try:
            await wait_until(all_serving(health, [b0.address]), "serving")
            b0.set_health(False)
            await wait_until(lambda: not health.usable(b0.address), "out")
            return health.status(b0.address)
        finally:
            await health.close()

    assert uvloop.run(flip()) == "not_serving"


async def test_a_check_task_that_dies_is_started_again(
    echo_backends: EchoBackendsFactory,
    health_of: Callable[..., ActiveHealth],
) -> None:
    """A bug that ends a backend's check task must not freeze its last verdict."""
    (b0,) = echo_backends(1)
    health = health_of(lambda: [static_pool("echo", [b0.address])])
    await wait_until(all_serving(health, [b0.address]), "serving")
    record = health._record
    broken = True

    def record_once_broken(*args: Any) -> None:
        nonlocal broken
        if broken:
            broken = False
            raise RuntimeError("injected")
        record(*args)

    with capture_logs() as logs:
        health._record = record_once_broken  # type: ignore[method-assign]
        b0.set_health(False)
        # A check in flight when _record was swapped already holds the original (the call's
        # target is looked up before its await): its verdict may take b0 out before any task
        # dies. Out *after* the died line means the restarted task judged it.
        await wait_until(
            lambda: (
                any(e["event"] == "health_check_task_died" for e in logs)
                and not health.usable(b0.address)
            ),
            "b0 out after the restart",
        )
    died = [e for e in logs if e["event"] == "health_check_task_died"]
    assert [(e["backend"], e["error"]) for e in died] == [(b0.address, "RuntimeError('injected')")]
    assert len(check_tasks(b0.address)) == 1

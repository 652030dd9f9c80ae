"""What health checks cost the proxy's process: grpc.aio on uvloop vs sync grpc in threads.

Run from the repository root::

    python -m loadtest.health_checks_bench [--backends 20] [--interval 0.2] [--seconds 10]

Backends are ``python -m proxy_examples.echo.server`` subprocesses (they answer grpc.health.v1), so
their work does not count here. On uvloop, each mode
runs for ``--seconds`` while a ticker task sleeps 10 ms at a time and records how late the loop
wakes it (what a call being relayed would wait):

* ``active``: :class:`ActiveHealth` itself (grpc.aio on the loop, checks spread out);
* ``thread``: the same schedule with sync stubs in a 4-thread pool, each result handed to the
  loop with ``call_soon_threadsafe`` (the design if grpc.aio did not work on uvloop);
* ``burst``: grpc.aio again, but every backend checked at the same moment each interval.

CPU per check is the process's CPU (and the loop thread's) over the run, less what the ticker
alone costs (the ``idle`` run), divided by the checks made. Every thread of the process takes
the GIL the loop needs, so the process figure is what the proxy pays.

This is a benchmark, not a test: it never judges the figures. Exit status: 0 once every mode
ran, 2 when a backend would not start, 130 on Ctrl-C.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import random
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import grpc
import grpc.aio
import structlog
import uvloop
from grpc_health.v1 import health_pb2, health_pb2_grpc

from loadtest import procs, tools
from loadtest.procs import SetupError
from proxy.core.endpoints import static_pool
from proxy.core.options import HealthCheckOptions
from proxy.runtime.health_checks import JITTER, ActiveHealth

REQUEST = health_pb2.HealthCheckRequest(service="")
TICK = 0.01
STARTUP_TIMEOUT_S = 15.0


async def ticker(stop: asyncio.Event, lags: list[float]) -> None:
    while not stop.is_set():
        start = time.perf_counter()
        await asyncio.sleep(TICK)
        lags.append(time.perf_counter() - start - TICK)


class Bench:
    def __init__(self, addresses: list[str], interval: float, seconds: float) -> None:
        self.addresses = addresses
        self.interval = interval
        self.seconds = seconds
        self.idle = (0.0, 0.0)  # (loop thread, process) CPU per second with only the ticker

    async def measure(self, name: str, checks: Callable[[], Awaitable[int]]) -> None:
        """Run ``checks`` (which returns how many checks it made in ``self.seconds``)."""
        stop, lags = asyncio.Event(), list[float]()
        tick = asyncio.create_task(ticker(stop, lags))
        thread0, process0 = time.thread_time(), time.process_time()
        count = await checks()
        thread_cpu = time.thread_time() - thread0 - self.idle[0] * self.seconds
        process_cpu = time.process_time() - process0 - self.idle[1] * self.seconds
        stop.set()
        await tick
        lags.sort()
        lag = (
            f"loop wake-up lag p50 {lags[len(lags) // 2] * 1e3:.2f} ms, "
            f"p99 {lags[int(len(lags) * 0.99)] * 1e3:.2f} ms, max {lags[-1] * 1e3:.2f} ms"
        )
        if not count:
            self.idle = (thread_cpu / self.seconds, process_cpu / self.seconds)
            print(f"{name:7} {lag}")
            return
        print(
            f"{name:7} {count:5} checks, CPU per check {process_cpu / count * 1e6:4.0f} us "
            f"(loop thread {thread_cpu / count * 1e6:4.0f} us); {lag}"
        )

    async def idle_run(self) -> int:
        await asyncio.sleep(self.seconds)
        return 0

    async def active(self) -> int:
        pool = static_pool("bench", self.addresses)
        health = ActiveHealth(lambda: [pool], HealthCheckOptions(self.interval, 1.0))
        health.start()
        await asyncio.sleep(self.seconds)
        checks = sum(health.checks_total.values())
        await health.close()
        return checks

    async def thread(self) -> int:
        loop = asyncio.get_running_loop()
        checks = 0

        def settle(future: asyncio.Future[Any], result: Any, error: Exception | None) -> None:
            if not future.done():  # its task may have been cancelled at the end of the run
                if error is None:
                    future.set_result(result)
                else:
                    future.set_exception(error)

        def check(stub: Any, future: asyncio.Future[Any]) -> None:
            try:
                loop.call_soon_threadsafe(settle, future, stub.Check(REQUEST, timeout=1.0), None)
            except Exception as exc:
                loop.call_soon_threadsafe(settle, future, None, exc)

        async def run(stub: Any) -> None:
            nonlocal checks
            await asyncio.sleep(random.uniform(0, self.interval))
            while True:
                future = loop.create_future()
                pool.submit(check, stub, future)
                await future
                checks += 1
                await asyncio.sleep(self.interval * random.uniform(1 - JITTER, 1 + JITTER))

        channels = [grpc.insecure_channel(a) for a in self.addresses]
        with ThreadPoolExecutor(max_workers=4) as pool:
            tasks = [asyncio.create_task(run(health_pb2_grpc.HealthStub(c))) for c in channels]
            await asyncio.sleep(self.seconds)
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
        for channel in channels:
            channel.close()
        return checks

    async def burst(self) -> int:
        channels = [grpc.aio.insecure_channel(a) for a in self.addresses]
        stubs = [health_pb2_grpc.HealthStub(c) for c in channels]
        checks = 0
        deadline = time.monotonic() + self.seconds
        while time.monotonic() < deadline:
            await asyncio.gather(*(s.Check(REQUEST, timeout=1.0) for s in stubs))
            checks += len(stubs)
            await asyncio.sleep(self.interval)
        for channel in channels:
            await channel.close()
        return checks


async def measure_all(args: argparse.Namespace, addresses: list[str]) -> None:
    bench = Bench(addresses, args.interval, args.seconds)
    print(f"{args.backends} backends, every {args.interval:g} s, {args.seconds:g} s a mode")
    await bench.measure("idle", bench.idle_run)
    await bench.measure("active", bench.active)
    await bench.measure("thread", bench.thread)
    await bench.measure("burst", bench.burst)


def start_backends(sup: procs.Supervisor, count: int) -> list[str]:
    """``count`` echo server processes named b0, b1, ...; their addresses once all listen."""
    started = []
    for index in range(count):
        port = procs.free_port()
        argv = [sys.executable, "-m", "proxy_examples.echo.server", "--port", str(port)]
        started.append((sup.start(f"b{index}", [*argv, "--name", f"b{index}"]), port))
    for service, port in started:
        failure = procs.wait_for_port(service, port, STARTUP_TIMEOUT_S)
        if failure is not None:
            raise SetupError(f"{failure}\n{service.log_tail()}")
    return [f"127.0.0.1:{port}" for _, port in started]


def run(args: argparse.Namespace) -> int:
    with (
        tempfile.TemporaryDirectory(prefix="health-checks-bench-") as tmp,
        procs.Supervisor(Path(tmp), tools.REPO) as sup,
    ):
        uvloop.run(measure_all(args, start_backends(sup, args.backends)))
    return 0


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m loadtest.health_checks_bench",
        description=(__doc__ or "").splitlines()[0],
    )
    parser.add_argument("--backends", type=int, default=20)
    parser.add_argument("--interval", type=float, default=0.2, help="seconds between checks")
    parser.add_argument("--seconds", type=float, default=10.0, help="how long each mode runs")
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    structlog.configure(wrapper_class=structlog.make_filtering_bound_logger(logging.WARNING))
    return procs.run_main(lambda: run(args))


if __name__ == "__main__":
    sys.exit(main())

"""What a /metrics scrape costs the event loop, with every path slot of CallStats taken.

Run from the repository root::

    python -m loadtest.admin_scrape_bench                 # 1000 paths, 4 backends
    python -m loadtest.admin_scrape_bench --paths 50 --backends 3 --repeat 9

The server's counters are filled by hand (each path on each backend, finished OK and
UNAVAILABLE), then the admin endpoint's metrics are rendered `--repeat` times two ways: all in
the loop (prometheus_client's `generate_latest` over the server's registry), and as /metrics
does it (a snapshot in the loop, families and text in a thread). A task sleeping 1 ms at a
time measures the longest the loop went without running meanwhile: the delay a call in
flight would have seen. Figures are medians, in milliseconds.

This is a benchmark, not a test: it never judges speed.
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import time

from prometheus_client import generate_latest

from proxy.core.endpoints import static_pool
from proxy.core.routing import Router
from proxy.ops.admin.app import ServerAdmin
from proxy.runtime.server import ProxyServer


async def _probe(stop: asyncio.Event) -> float:
    worst = 0.0
    while not stop.is_set():
        start = time.perf_counter()
        await asyncio.sleep(0.001)
        worst = max(worst, time.perf_counter() - start - 0.001)
    return worst


async def run(paths: int, backends: int, repeat: int) -> None:
    addresses = [f"10.0.0.{i}:50051" for i in range(backends)]
    server = ProxyServer(Router(default=static_pool("static", addresses)))
    stats = server.dispatcher.stats
    stats.max_paths = max(stats.max_paths, paths)
    for p in range(paths):
        path = f"/pkg.Service{p % 50}/Method{p}".encode()
        for address in addresses:
            stats.call_started(path, address)
            for status in (0, 14):
                stats.call_finished(path, address, status, 0.003, 100, 200)
    admin = ServerAdmin(server)
    body = await admin.metrics()
    series = sum(1 for line in body.splitlines() if not line.startswith(b"#"))
    print(f"{paths} paths x {backends} backends: {series} series, {len(body) / 1e6:.1f} MB")
    print("| rendering | scrape (ms) | longest loop stall (ms) |")
    print("|---|---:|---:|")
    for name in ("in the loop", "snapshot in the loop, text in a thread"):
        took, stalls = [], []
        for _ in range(repeat):
            stop = asyncio.Event()
            probe = asyncio.create_task(_probe(stop))
            await asyncio.sleep(0.02)
            start = time.perf_counter()
            if name == "in the loop":
                generate_latest(admin.exporter.registry)
            else:
                await admin.metrics()
            took.append(time.perf_counter() - start)
            stop.set()
            stalls.append(await probe)
        print(
            f"| {name} | {statistics.median(took) * 1000:.0f} "
            f"| {statistics.median(stalls) * 1000:.1f} |"
        )
    await server.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--paths", type=int, default=1000)
    parser.add_argument("--backends", type=int, default=4)
    parser.add_argument("--repeat", type=int, default=5)
    args = parser.parse_args()
    asyncio.run(run(args.paths, args.backends, args.repeat))


if __name__ == "__main__":
    main()

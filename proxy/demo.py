"""`grpc-etcd-proxy demo`: three echo backends, the proxy and a client, in one process.

Theory of operation
-------------------
The proxy runs in this asyncio loop exactly as `serve` runs it, over a static pool of three
in-process echo backends (grpcio servers, each with its own thread pool). The built-in client
is a blocking grpcio stub; every call runs in a worker thread (`asyncio.to_thread`) so that
the loop, which is the proxy, never waits on it. Once every backend has answered, one of
them is stopped: the proxy's connect to it fails, the call is retried on another backend
(it reached no application code), and the client keeps getting answers from the other two.

Until etcd discovery exists the pool is static; the next step swaps it for an embedded etcd.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import signal
import sys
from collections import Counter
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import grpc

from proxy.echo import echo_pb2, echo_pb2_grpc
from proxy.echo.server import EchoServer, serve
from proxy.pool.endpoints import static_pool
from proxy.relay.server import ProxyServer
from proxy.routing import Router
from proxy.units import SECONDS

BACKEND_NAMES = ("backend-1", "backend-2", "backend-3")
CALL_INTERVAL_S = 0.5 * SECONDS
CALL_TIMEOUT_S = 2 * SECONDS
# A backend is stopped once every backend has answered and at least the first number of calls
# were made, or after the second number in any case: other clients sharing the proxy (ghz, a
# test) take turns in the rotation, so the demo's own calls may skip a backend for a while.
STOP_AFTER_CALLS = (3, 6)
STOPPED = 1  # index into BACKEND_NAMES: backend-2
CHANNEL_OPTIONS = [("grpc.enable_http_proxy", 0)]  # never route 127.0.0.1 via $http_proxy


def say(line: str) -> None:
    print(line, flush=True)


def dial_address(host: str, port: int) -> str:
    """Where a client on this machine reaches a listener bound to `host:port`."""
    if host in ("", "0.0.0.0"):
        host = "127.0.0.1"
    elif host == "::":
        host = "::1"
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def echo_proto() -> str:
    """The path to type for this checkout's protos/echo.proto (as in the repository otherwise).

    ghz needs it: it resolves the method by server reflection, and grpcio's reflection does not
    find method symbols (grpc/grpc#34743), so `ghz` without `--proto` says "Symbol not found".
    """
    path = Path(__file__).resolve().parent.parent / "protos" / "echo.proto"
    if not path.is_file():
        return "protos/echo.proto"  # an installed wheel: the file is in the repository
    with contextlib.suppress(ValueError):
        return str(path.relative_to(Path.cwd()))
    return str(path)


def hints(address: str, proto: str) -> list[str]:
    request = """'{"message":"hi"}'"""
    return [
        f"try: ghz --insecure --proto {proto} --call echo.Echo/UnaryEcho -d {request} {address}",
        f"     grpcurl -plaintext {address} list",
    ]


class DemoClient:
    """Calls echo.Echo/UnaryEcho through the proxy every CALL_INTERVAL_S and says who answered."""

    def __init__(self, target: str, backends: Sequence[EchoServer]) -> None:
        self.channel = grpc.insecure_channel(target, options=CHANNEL_OPTIONS)
        self.stub: Any = echo_pb2_grpc.EchoStub(self.channel)
        self.backends = backends
        self.calls = 0
        self.answers: Counter[str] = Counter()
        self.stopped: EchoServer | None = None

    async def run(self) -> None:
        loop = asyncio.get_running_loop()
        seen: set[str] = set()
        while True:
            started = loop.time()
            self.calls += 1
            backend = await self._call(self.calls)
            if backend:
                seen.add(backend)
            low, high = STOP_AFTER_CALLS
            all_seen = len(seen) == len(self.backends)
            if self.stopped is None and self.calls >= low and (all_seen or self.calls >= high):
                await self._stop_one()
                started = loop.time()  # a whole interval for the proxy to see the backend go
            await asyncio.sleep(max(0.0, CALL_INTERVAL_S - (loop.time() - started)))

    async def _call(self, n: int) -> str:
        request = echo_pb2.EchoRequest(message=f"hello {n}")
        try:
            response = await asyncio.to_thread(self.stub.UnaryEcho, request, timeout=CALL_TIMEOUT_S)
        except grpc.RpcError as exc:
            say(f"call {n}: failed: {exc.code().name}: {exc.details()}")
            return ""
        backend = str(response.backend)
        self.answers[backend] += 1
        say(f"call {n}: answered by {backend}")
        return backend

    async def _stop_one(self) -> None:
        victim = self.backends[STOPPED]
        say(f"stopping {victim.name} ({victim.address}): the next calls go to the other two")
        # grpcio's stop() returns at once; waiting for it to finish blocks, hence the thread.
        await asyncio.to_thread(lambda: victim.stop(None).wait())
        self.stopped = victim

    def close(self) -> None:
        # Also cancels a call still running in its worker thread.
        self.channel.close()


def start_backends() -> list[EchoServer]:
    backends: list[EchoServer] = []
    try:
        for name in BACKEND_NAMES:
            backends.append(serve(0, "127.0.0.1", name)[0])
    except BaseException:
        stop_backends(backends)
        raise
    return backends


def stop_backends(backends: Sequence[EchoServer]) -> None:
    for backend in backends:
        backend.stop(None).wait()


async def demo(args: argparse.Namespace) -> int:
    """Run the demo until SIGINT/SIGTERM, or for `args.duration` seconds; 0 on a clean exit.

    `args.listen` is the proxy's (host, port); port 0 picks a free one.
    """
    host, port = args.listen
    duration_s: float | None = args.duration
    loop = asyncio.get_running_loop()
    backends = start_backends()
    server: ProxyServer | None = None
    client: DemoClient | None = None
    try:
        say("echo backends: " + ", ".join(f"{b.name} at {b.address}" for b in backends))
        router = Router(default=static_pool("demo", [b.address for b in backends]))
        server = ProxyServer(router)
        try:
            bound = await server.listen(host, port)
        except OSError as exc:
            print(f"demo: cannot listen on {host}:{port}: {exc}", file=sys.stderr, flush=True)
            return 1
        address = dial_address(host, bound[0][1])
        say(f"proxy listening on {address}, balancing each call round robin over the three")
        for line in hints(address, echo_proto()):
            say(line)
        until = f"for {duration_s:g} s" if duration_s is not None else "until Ctrl-C"
        say(f"a client calls echo.Echo/UnaryEcho through the proxy every 0.5 s, {until}")

        stop = asyncio.Event()
        for sig in (signal.SIGINT, signal.SIGTERM):
            with contextlib.suppress(NotImplementedError):
                loop.add_signal_handler(sig, stop.set)
        timer = loop.call_later(duration_s, stop.set) if duration_s is not None else None
        client = DemoClient(address, backends)
        try:
            async with asyncio.TaskGroup() as tasks:
                calls = tasks.create_task(client.run(), name="demo client")
                await stop.wait()
                calls.cancel()
        finally:
            if timer is not None:
                timer.cancel()
        tally = ", ".join(f"{name} {count}" for name, count in sorted(client.answers.items()))
        say(f"done: answers by backend: {tally or 'none'}")
        return 0
    finally:
        if client is not None:
            client.close()
        if server is not None:
            await server.close()
        # The proxy is closed: nothing left in the loop for a blocking wait to hold up.
        stop_backends(backends)

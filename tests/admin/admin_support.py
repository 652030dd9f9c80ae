"""Helpers for the admin tests: an in-process proxy with its admin endpoint, a raw HTTP client
on asyncio streams (the admin server runs in the test's own loop, so a blocking client would
starve it), and polling.

Import as ``from admin_support import ...`` (``tests/admin`` is on ``sys.path`` under pytest).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import AsyncIterator, Awaitable, Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, TypeVar

import grpc
from grpc_health.v1 import health, health_pb2_grpc

from proxy.core.options import ServerOptions
from proxy.core.routing import Router
from proxy.discovery.watcher import EtcdDiscovery
from proxy.ops.admin.app import ServerAdmin
from proxy.ops.admin.http import start_admin
from proxy.runtime.server import ProxyServer

T = TypeVar("T")


@dataclass
class Reply:
    status: int
    headers: dict[str, str]
    body: bytes

    def json(self) -> Any:
        return json.loads(self.body)


@dataclass
class AdminProxy:
    """A ProxyServer listening on ``port`` with its admin endpoint on ``admin_port``."""

    server: ProxyServer
    admin: ServerAdmin
    port: int
    admin_port: int
    channels: list[grpc.aio.Channel] = field(default_factory=list)

    def channel(self) -> grpc.aio.Channel:
        channel = grpc.aio.insecure_channel(f"127.0.0.1:{self.port}")
        self.channels.append(channel)
        return channel

    async def get(self, path: str) -> Reply:
        return await http_request(self.admin_port, f"GET {path} HTTP/1.1\r\nHost: x\r\n\r\n")


@contextlib.asynccontextmanager
async def admin_proxy(
    router: Router, discovery: EtcdDiscovery | None = None, options: ServerOptions | None = None
) -> AsyncIterator[AdminProxy]:
    server = ProxyServer(router, options=options)
    server.discovery = discovery
    [(_host, port)] = await server.listen("127.0.0.1", 0)
    server.serving = True  # what run_until_stopped sets once its signal handlers are in
    admin = ServerAdmin(server)
    http = await start_admin(admin, "127.0.0.1", 0)
    proxy = AdminProxy(server, admin, port, http.sockets[0].getsockname()[1])
    try:
        yield proxy
    finally:
        for channel in proxy.channels:
            await channel.close()
        http.close()
        await server.close()


async def http_request(
    port: int | None, raw: str | bytes, unix_path: str | None = None, timeout: float = 10.0
) -> Reply:
    """Send ``raw`` as is, read the response until the server closes, parse it."""
    async with asyncio.timeout(timeout):
        if unix_path is not None:
            reader, writer = await asyncio.open_unix_connection(unix_path)
        else:
            reader, writer = await asyncio.open_connection("127.0.0.1", port)
        try:
            writer.write(raw.encode() if isinstance(raw, str) else raw)
            data = await reader.read()
        finally:
            writer.close()
    return parse_response(data)


def parse_response(data: bytes) -> Reply:
    head, sep, body = data.partition(b"\r\n\r\n")
    assert sep, f"no complete response head in {data[:200]!r}"
    status_line, *lines = head.decode("latin-1").split("\r\n")
    version, status, _reason = status_line.split(" ", 2)
    assert version == "HTTP/1.1", status_line
    headers = {}
    for line in lines:
        name, _, value = line.partition(":")
        headers[name.strip().lower()] = value.strip()
    assert int(headers["content-length"]) == len(body) or not body
    return Reply(int(status), headers, body)


async def eventually(check: Callable[[], Awaitable[T | None]], timeout: float = 15.0) -> T:
    """Poll ``check`` until it returns something other than None (or time runs out)."""
    async with asyncio.timeout(timeout):
        while True:
            result = await check()
            if result is not None:
                return result
            await asyncio.sleep(0.05)


def start_sick_backend() -> tuple[grpc.Server, str]:
    """A grpcio backend that passes its health checks but answers every echo.Echo/UnaryEcho
    with UNAVAILABLE: what the outlier detector is for. Returns (server, address)."""

    def unavailable(_request: bytes, context: grpc.ServicerContext) -> bytes:
        context.abort(grpc.StatusCode.UNAVAILABLE, "sick backend")
        raise AssertionError("abort returns no more")

    server = grpc.server(ThreadPoolExecutor(max_workers=4))
    server.add_generic_rpc_handlers(
        (
            grpc.method_handlers_generic_handler(
                "echo.Echo", {"UnaryEcho": grpc.unary_unary_rpc_method_handler(unavailable)}
            ),
        )
    )
    health_pb2_grpc.add_HealthServicer_to_server(health.HealthServicer(), server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    return server, f"127.0.0.1:{port}"

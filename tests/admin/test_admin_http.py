"""The admin HTTP server: routing, methods, bounds, and that a bad client holds nobody up.

Most tests run a real ProxyServer behind it; the framing tests that need an app to misbehave
use a small stand-in app (the AdminApp protocol is all the server knows)."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import pytest
from admin_support import admin_proxy, http_request
from backends import EchoBackendsFactory
from etcd_support import FAST
from proxy_process import free_port

from proxy.core.endpoints import TargetPool, static_pool
from proxy.core.routing import Router
from proxy.discovery.watcher import EtcdDiscovery
from proxy.ops.admin import http
from proxy.ops.admin.http import start_admin


class StandInApp:
    """Answers fixed documents; ``fail`` makes /pool raise."""

    def __init__(self, fail: bool = False) -> None:
        self.fail = fail

    async def metrics(self) -> bytes:
        return b"# nothing\n"

    async def pool(self) -> dict[str, Any]:
        if self.fail:
            raise RuntimeError("boom")
        return {"workers": []}

    async def ready(self) -> tuple[bool, str]:
        return True, "ready"

    async def healthy(self) -> tuple[bool, str]:
        return True, "ok"


async def _stand_in(app: StandInApp | None = None) -> tuple[asyncio.Server, int]:
    server = await start_admin(app or StandInApp(), "127.0.0.1", 0)
    return server, server.sockets[0].getsockname()[1]


async def test_routes_and_content_types(echo_backends: EchoBackendsFactory) -> None:
    (backend,) = echo_backends(1)
    async with admin_proxy(Router(default=static_pool("static", [backend.address]))) as proxy:
        metrics = await proxy.get("/metrics")
        assert metrics.status == 200
        assert metrics.headers["content-type"].startswith("text/plain; version=0.0.4")
        assert b"grpc_proxy_client_connections " in metrics.body
        assert metrics.headers["connection"] == "close"

        pool = await proxy.get("/pool?pretty=1")  # a query string is ignored
        assert pool.status == 200
        assert pool.headers["content-type"] == "application/json"
        assert pool.json()["workers"][0]["targets"][0]["endpoints"][0]["address"] == (
            backend.address
        )

        page = await proxy.get("/")
        assert page.status == 200
        assert page.headers["content-type"].startswith("text/html")
        assert b"<script>" in page.body

        healthz = await proxy.get("/healthz")
        readyz = await proxy.get("/readyz")
        assert (healthz.status, readyz.status) == (200, 200)

        missing = await proxy.get("/nope")
        assert missing.status == 404


async def test_readyz_and_healthz_say_why(echo_backends: EchoBackendsFactory) -> None:
    (backend,) = echo_backends(1)
    # A target whose etcd cannot be reached is never listed: not ready, and /readyz says why.
    # (An empty pool that etcd did list is ready: see test_pool_etcd.py.)
    dead = f"127.0.0.1:{free_port()}"
    async with EtcdDiscovery(dead, ["empty"], backoff=FAST) as discovery:
        await discovery.wait_ready(10)
        router = Router(
            default=static_pool("static", [backend.address]),
            routes={"pkg.Empty": discovery.pool("empty")},
        )
        async with admin_proxy(router, discovery) as proxy:
            readyz = await proxy.get("/readyz")
            assert readyz.status == 503
            assert b"target 'empty'" in readyz.body
            assert b"etcd unreachable" in readyz.body
            assert (await proxy.get("/healthz")).status == 200

            proxy.server.listeners.draining = True
            healthz = await proxy.get("/healthz")
            assert (healthz.status, healthz.body) == (503, b"draining\n")
            assert (await proxy.get("/readyz")).body == b"draining\n"


async def test_not_ready_until_the_process_serves(echo_backends: EchoBackendsFactory) -> None:
    """The admin endpoint starts before the listener (and the signal handlers): until both
    are in, /readyz must not send traffic (or a SIGHUP) this way."""
    (backend,) = echo_backends(1)
    async with admin_proxy(Router(default=static_pool("static", [backend.address]))) as proxy:
        proxy.server.serving = False
        readyz = await proxy.get("/readyz")
        assert (readyz.status, readyz.body) == (503, b"starting: not listening yet\n")
        assert (await proxy.get("/healthz")).status == 200
        proxy.server.serving = True
        assert (await proxy.get("/readyz")).status == 200


async def test_an_empty_static_target_is_ready(echo_backends: EchoBackendsFactory) -> None:
    (backend,) = echo_backends(1)
    empty = TargetPool("empty", "no endpoints registered under 'empty/' in etcd")
    router = Router(default=static_pool("static", [backend.address]), routes={"pkg.Empty": empty})
    async with admin_proxy(router) as proxy:
        readyz = await proxy.get("/readyz")
        assert (readyz.status, readyz.body) == (200, b"ready\n")


async def test_methods_other_than_get_and_head_are_refused() -> None:
    server, port = await _stand_in()
    try:
        post = await http_request(port, "POST /pool HTTP/1.1\r\nContent-Length: 0\r\n\r\n")
        assert post.status == 405
        assert post.headers["allow"] == "GET, HEAD"

        head = await http_request(port, "HEAD /pool HTTP/1.1\r\n\r\n")
        assert head.status == 200
        assert head.body == b""
        assert int(head.headers["content-length"]) == len(b'{"workers":[]}')
    finally:
        server.close()


@pytest.mark.parametrize(
    "raw",
    [
        "GET\r\n\r\n",
        "GET /pool\r\n\r\n",
        "GET pool HTTP/1.1\r\n\r\n",
        "GET /pool SPDY/3\r\n\r\n",
        b"GET /\xff HTTP/1.1\r\n\r\n",
    ],
)
async def test_malformed_request_line(raw: str | bytes) -> None:
    server, port = await _stand_in()
    try:
        assert (await http_request(port, raw)).status == 400
    finally:
        server.close()


async def test_oversized_request_head_is_refused() -> None:
    server, port = await _stand_in()
    try:
        raw = "GET /pool HTTP/1.1\r\nX-Big: " + "a" * (http.MAX_HEAD_BYTES + 10) + "\r\n\r\n"
        reply = await http_request(port, raw)
        assert reply.status == 431
        # Just under the bound is fine.
        raw = "GET /pool HTTP/1.1\r\nX-Big: " + "a" * (http.MAX_HEAD_BYTES - 100) + "\r\n\r\n"
        assert (await http_request(port, raw)).status == 200
    finally:
        server.close()


async def test_a_failing_handler_answers_500() -> None:
    server, port = await _stand_in(StandInApp(fail=True))
    try:
        assert (await http_request(port, "GET /pool HTTP/1.1\r\n\r\n")).status == 500
        # The server goes on serving.
        assert (await http_request(port, "GET /healthz HTTP/1.1\r\n\r\n")).status == 200
    finally:
        server.close()


async def test_a_stalled_client_does_not_block_others(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(http, "READ_TIMEOUT_S", 3.0)  # the other client is served well within it
    server, port = await _stand_in()
    try:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(b"GET /pool HTTP/1.1\r\nHost: x\r\n")  # and never the blank line
        await writer.drain()
        # Another client is served while the first one stalls.
        assert (await http_request(port, "GET /healthz HTTP/1.1\r\n\r\n")).status == 200
        assert not reader.at_eof()
        # The stalled one is answered 408 and closed once its read deadline passes.
        async with asyncio.timeout(10):
            data = await reader.read()
        assert data.startswith(b"HTTP/1.1 408 ")
        writer.close()
    finally:
        server.close()


async def test_too_many_clients_at_once(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(http, "MAX_CLIENTS", 2)
    server, port = await _stand_in()
    idle = []
    try:
        for _ in range(2):
            idle.append(await asyncio.open_connection("127.0.0.1", port))

        # Both are now held by a handler (accepted in order); a third is dropped unanswered.
        async def dropped() -> bytes:
            reader, writer = await asyncio.open_connection("127.0.0.1", port)
            writer.write(b"GET /healthz HTTP/1.1\r\n\r\n")
            try:
                return await reader.read()
            except ConnectionResetError:
                return b""
            finally:
                writer.close()

        assert await dropped() == b""
        for _reader, writer in idle:
            writer.close()
        # Once they are gone, clients are served again.
        for _ in range(100):
            reply = await dropped()
            if reply:
                break
            await asyncio.sleep(0.05)
        assert reply.startswith(b"HTTP/1.1 200 ")
    finally:
        server.close()


async def test_unix_socket(tmp_path: Path) -> None:
    path = str(tmp_path / "admin.sock")
    server = await start_admin(StandInApp(), "", None, path=path)
    try:
        reply = await http_request(None, "GET /readyz HTTP/1.1\r\n\r\n", unix_path=path)
        assert (reply.status, reply.body) == (200, b"ready\n")
    finally:
        server.close()

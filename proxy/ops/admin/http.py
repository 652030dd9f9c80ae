"""A tiny HTTP/1.1 server for the admin endpoint, on asyncio streams in the proxy's own loop.

It shares the loop with the data plane, so it must never hold it: every read and write has a
deadline, a request head is bounded, the number of admin clients at once is capped, and each
answer is one response followed by ``Connection: close`` (no keep-alive, no bodies to read).
Only GET and HEAD are served.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import sys
from collections.abc import Awaitable, Callable
from typing import Any, Final, Protocol

import structlog

from proxy.ops.admin.page import PAGE
from proxy.ops.metrics import CONTENT_TYPE as METRICS_CONTENT_TYPE

log = structlog.get_logger("proxy.admin")

MAX_HEAD_BYTES: Final = 8 * 1024  # request line and headers; a browser's fit easily
READ_TIMEOUT_S: Final = 5.0
WRITE_TIMEOUT_S: Final = 10.0
MAX_CLIENTS: Final = 64

_REASONS: Final = {
    200: "OK",
    400: "Bad Request",
    404: "Not Found",
    405: "Method Not Allowed",
    408: "Request Timeout",
    431: "Request Header Fields Too Large",
    500: "Internal Server Error",
    503: "Service Unavailable",
}
_TEXT: Final = "text/plain; charset=utf-8"


class AdminApp(Protocol):
    """What the admin endpoint serves: one process (ServerAdmin) or a supervisor's workers."""

    async def metrics(self) -> bytes:
        """The Prometheus text exposition."""
        ...

    async def pool(self) -> dict[str, Any]:
        """``{"workers": [...]}``, the /pool document."""
        ...

    async def ready(self) -> tuple[bool, str]: ...

    async def healthy(self) -> tuple[bool, str]: ...


Response = tuple[int, str, bytes]  # status, content type, body


async def start_admin(
    app: AdminApp, host: str, port: int | None, path: str | None = None
) -> asyncio.Server:
    """Serve ``app`` on ``host:port`` (TCP), or on the unix socket ``path`` when given."""
    handler = AdminHandler(app)
    if path is not None:
        return await asyncio.start_unix_server(handler, path, limit=MAX_HEAD_BYTES)
    if port is None:
        raise ValueError("start_admin needs a port or a path")
    server = await asyncio.start_server(
        handler, host, port, limit=MAX_HEAD_BYTES, reuse_address=True
    )
    bound = [sock.getsockname()[:2] for sock in server.sockets]
    shown = [f"[{h}]:{p}" if ":" in h else f"{h}:{p}" for h, p in bound]
    log.info("admin_listening", addresses=shown)
    return server


async def admin_on(
    stack: contextlib.AsyncExitStack,
    app: AdminApp,
    host: str,
    port: int | None,
    path: str | None = None,
    hint: str = "",
) -> bool:
    """Start the admin server and close it with ``stack``; False (after saying why on
    stderr) when the address cannot be bound, which the caller turns into exit status 1."""
    try:
        server = await start_admin(app, host, port, path)
    except OSError as exc:
        where = path if path is not None else f"{host}:{port}"
        print(
            f"grpc-etcd-proxy: --admin {where}: cannot listen: {exc.strerror or exc}{hint}",
            file=sys.stderr,
        )
        return False

    async def close() -> None:
        server.close()
        with contextlib.suppress(Exception):
            await server.wait_closed()

    stack.push_async_callback(close)
    return True


class AdminHandler:
    def __init__(self, app: AdminApp) -> None:
        self.app = app
        self.clients = 0
        self.routes: dict[str, Callable[[], Awaitable[Response]]] = {
            "/metrics": self._metrics,
            "/healthz": self._healthz,
            "/readyz": self._readyz,
            "/pool": self._pool,
            "/": self._page,
        }

    async def __call__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        if self.clients >= MAX_CLIENTS:
            writer.transport.abort()
            return
        self.clients += 1
        try:
            await self._serve(reader, writer)
        except Exception:  # one admin client's trouble must not surface as a loop error
            log.exception("admin_request_failed")
            writer.transport.abort()
        finally:
            self.clients -= 1
            writer.close()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            async with asyncio.timeout(READ_TIMEOUT_S):
                head = await reader.readuntil(b"\r\n\r\n")
        except asyncio.LimitOverrunError:
            await _send(writer, (431, _TEXT, b"request head too large\n"), head_only=False)
            return
        except TimeoutError:
            await _send(writer, (408, _TEXT, b"request timed out\n"), head_only=False)
            return
        except (asyncio.IncompleteReadError, ConnectionError):
            return
        method, target = _request_line(head)
        if method is None:
            response: Response = (400, _TEXT, b"bad request\n")
        elif method not in ("GET", "HEAD"):
            response = (405, _TEXT, b"only GET and HEAD\n")
        else:
            route = self.routes.get(target.partition("?")[0])
            response = (404, _TEXT, b"not found\n") if route is None else await self._run(route)
        await _send(writer, response, head_only=method == "HEAD")

    @staticmethod
    async def _run(route: Callable[[], Awaitable[Response]]) -> Response:
        try:
            return await route()
        except Exception:
            log.exception("admin_handler_failed")
            return 500, _TEXT, b"internal error\n"

    async def _metrics(self) -> Response:
        return 200, METRICS_CONTENT_TYPE, await self.app.metrics()

    async def _healthz(self) -> Response:
        return _check(*await self.app.healthy())

    async def _readyz(self) -> Response:
        return _check(*await self.app.ready())

    async def _pool(self) -> Response:
        body = json.dumps(await self.app.pool(), default=str, separators=(",", ":"))
        return 200, "application/json", body.encode()

    async def _page(self) -> Response:
        return 200, "text/html; charset=utf-8", PAGE


def _check(ok: bool, reason: str) -> Response:
    return (200 if ok else 503), _TEXT, reason.encode() + b"\n"


def _request_line(head: bytes) -> tuple[str | None, str]:
    """(method, target) of ``METHOD TARGET HTTP/1.x``; method None when malformed."""
    parts = head.split(b"\r\n", 1)[0].split(b" ")
    if len(parts) != 3 or not parts[2].startswith(b"HTTP/1.") or not parts[1].startswith(b"/"):
        return None, ""
    try:
        return parts[0].decode("ascii"), parts[1].decode("ascii")
    except UnicodeDecodeError:
        return None, ""


async def _send(writer: asyncio.StreamWriter, response: Response, head_only: bool) -> None:
    status, content_type, body = response
    extra = "Allow: GET, HEAD\r\n" if status == 405 else ""
    head = (
        f"HTTP/1.1 {status} {_REASONS[status]}\r\n"
        f"Content-Type: {content_type}\r\n"
        f"Content-Length: {len(body)}\r\n"
        "Cache-Control: no-store\r\n"
        f"{extra}Connection: close\r\n\r\n"
    ).encode("ascii")
    writer.write(head if head_only else head + body)
    try:
        async with asyncio.timeout(WRITE_TIMEOUT_S):
            await writer.drain()
    except (TimeoutError, ConnectionError):
        writer.transport.abort()

"""The proxy: its listeners and its call dispatcher, put together.

`ProxyServer` is the composition and the lifecycle (listen, drain, close); what routes calls
is `server.dispatcher` (proxy.runtime.dispatcher), what accepts them `server.listeners`
(proxy.runtime.listener).
"""

from __future__ import annotations

import asyncio
import ssl
import time
from typing import TYPE_CHECKING

from proxy.core.balancing import Balancer
from proxy.core.buffers import BufferMeter
from proxy.core.h2.limits import Limits
from proxy.core.options import ServerOptions
from proxy.core.routing import Router
from proxy.runtime.dispatcher import Dispatcher
from proxy.runtime.flusher import Flusher
from proxy.runtime.listener import Listeners

if TYPE_CHECKING:
    from proxy.discovery.watcher import EtcdDiscovery

__all__ = ["ProxyServer", "ServerOptions"]


class ProxyServer:
    def __init__(
        self,
        router: Router,
        limits: Limits | None = None,
        options: ServerOptions | None = None,
        balancer: Balancer | None = None,
        discovery: EtcdDiscovery | None = None,
    ) -> None:
        self.loop = asyncio.get_running_loop()
        self.limits = limits or Limits()
        self.options = options or ServerOptions()
        self.flusher = Flusher(self.loop)
        # What is held for clients, both ways, against the buffer budget (proxy.core.buffers).
        meter = BufferMeter(self.options.buffer_budget)
        self.dispatcher = Dispatcher(
            router, self.limits, self.options, balancer, self.flusher, self.loop, meter
        )
        self.listeners = Listeners(
            self.dispatcher, self.flusher, self.limits, self.options, self.loop, meter
        )
        # The etcd discovery that feeds the router's pools, if any: the admin endpoint reports
        # its watches.
        self.discovery = discovery
        # Set once the listener is bound and the signal handlers are in (run_until_stopped):
        # before that /readyz says "starting", so that a readiness probe, or a supervisor
        # about to pass on a SIGHUP, does not take an admin answer for a process that serves.
        self.serving = False
        self.started_at = time.time()

    @property
    def draining(self) -> bool:
        return self.listeners.draining

    async def listen(
        self,
        host: str,
        port: int,
        reuse_port: bool = False,
        *,
        tls: ssl.SSLContext | None = None,
    ) -> list[tuple[str, int]]:
        return await self.listeners.listen(host, port, reuse_port, tls=tls)

    async def listen_unix(self, path: str) -> str:
        return await self.listeners.listen_unix(path)

    async def drain(self, timeout_s: float) -> None:
        await self.listeners.drain(timeout_s)

    async def close(self) -> None:
        await self.listeners.close()
        await self.dispatcher.close()

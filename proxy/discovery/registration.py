"""Registering a backend in etcd the way Go's endpoints.Manager does, under a kept-alive lease.

Theory of operation: grant a lease, put ``target/addr`` -> ``{"Op":0,"Addr":...,
"Metadata":...}`` attached to it, then keep the lease alive on one stream, reading every
response (an unread response queue is what makes Go's client log "lease keepalive response
queue is full"). If etcd says the lease is gone (revoked, or expired while we could not
reach etcd), the key went with it: grant a new lease and put the key again. On exit, delete
the key and revoke the lease, so the proxies drop this backend at once instead of after the
TTL.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import Sequence
from types import TracebackType
from typing import Any

import structlog

from proxy.core.backoff import Backoff
from proxy.discovery.etcd import EtcdClient
from proxy.discovery.etcd_model import EtcdConfig, EtcdError, Lease, LeaseLost, etcd_config
from proxy.discovery.values import address_problem
from proxy.discovery.watcher import prefix_of

log = structlog.get_logger("proxy.discovery")


def endpoint_value(addr: str, metadata: Any = None) -> str:
    """The value Go's ``endpoints.Manager`` stores: ``{"Op":0,"Addr":addr,"Metadata":...}``."""
    return json.dumps({"Op": 0, "Addr": addr, "Metadata": metadata}, separators=(",", ":"))


class Registration:
    """Registers ``addr`` under ``target`` in etcd for as long as the context is entered.

    ``async with Registration("http://127.0.0.1:2379", "svc", "10.0.0.7:50051"):`` grants a
    lease of ``ttl`` seconds, puts the key ``svc/10.0.0.7:50051`` (or ``key``) with the
    endpoints.Manager value, keeps the lease alive in a background task (named
    ``etcd-registration:KEY``) and registers again with a new lease if the lease is lost.
    On exit it deletes the key and revokes the lease.

    ``etcd`` is an :class:`EtcdConfig` (for TLS or auth), a comma-separated endpoint list or
    a list of endpoints; pass ``client`` to share an open :class:`EtcdClient` instead.
    Entering raises :class:`EtcdError` if the first registration fails. ``lease`` is the
    current lease and ``registrations`` counts how many times the key was put.
    """

    def __init__(
        self,
        etcd: EtcdConfig | str | Sequence[str],
        target: str,
        addr: str,
        ttl: int = 10,
        metadata: Any = None,
        *,
        key: str | None = None,
        client: EtcdClient | None = None,
        backoff: Backoff | None = None,
    ) -> None:
        problem = address_problem(addr)
        if problem is not None:
            raise ValueError(problem)
        if ttl < 1:
            raise ValueError(f"ttl must be at least 1 second, got {ttl}")
        self.config = etcd_config(etcd)
        self.key = key if key is not None else prefix_of(target) + addr
        self.value = endpoint_value(addr, metadata)
        self.ttl = ttl
        self.lease: Lease | None = None
        self.registrations = 0
        self._client = client or EtcdClient(self.config)
        self._owns_client = client is None
        self._backoff = backoff or Backoff()
        self._task: asyncio.Task[None] | None = None

    async def __aenter__(self) -> Registration:
        try:
            await self._register()
        except BaseException:
            await self._close_client()
            raise
        self._task = asyncio.create_task(self._keep_alive(), name=f"etcd-registration:{self.key}")
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None
        try:
            await self._deregister()
        finally:
            await self._close_client()

    async def _register(self) -> None:
        lease = await self._client.grant_lease(self.ttl)
        await self._client.put(self.key, self.value, lease=lease.id)
        self.lease = lease
        self.registrations += 1
        log.info("registration.registered", key=self.key, lease=f"{lease.id:x}", ttl=lease.ttl_s)

    async def _keep_alive(self) -> None:
        delays = self._backoff.delays()
        while True:
            try:
                if self.lease is None:
                    await self._register()
                    continue
                async for _ttl in self._client.keep_alive(self.lease.id):
                    delays = self._backoff.delays()
            except LeaseLost as exc:
                # The key went with the lease; a new lease and put bring it back.
                log.warning("registration.lease_lost", key=self.key, error=str(exc))
                self.lease = None
            except EtcdError as exc:
                # Keep the lease: if etcd comes back before the TTL ends, nothing was lost.
                log.warning("registration.etcd_unavailable", key=self.key, error=str(exc))
                await asyncio.sleep(next(delays))

    async def _deregister(self) -> None:
        lease, self.lease = self.lease, None
        try:
            # Bounded: at exit etcd may be gone, and the lease expires by itself anyway.
            async with asyncio.timeout(2 * self.config.request_timeout_s):
                await self._client.delete(self.key)
                if lease is not None:
                    await self._client.revoke_lease(lease.id)
        except (EtcdError, TimeoutError) as exc:
            log.warning("registration.deregister_failed", key=self.key, error=str(exc))
        else:
            log.info("registration.deregistered", key=self.key)

    async def _close_client(self) -> None:
        if self._owns_client:
            await self._client.close()

"""The only module that talks to etcd: a thin async wrapper over etcd3aio.

Why etcd3aio: it is a maintained asyncio client built on ``grpc.aio`` with typed service
facades and the generated etcd v3 stubs. python-etcd3 is unmaintained and fails to import
with protobuf >= 4 (which grpcio needs); aetcd talks to a single endpoint and has no TLS.

What we take from etcd3aio and what we do ourselves:

* Unary calls (range, put, delete, compact, lease grant/revoke, authenticate) go through its
  ``KVService`` / ``LeaseService`` / ``AuthService``, built on *our* channel with one attempt
  each: failover between endpoints is done here, so every caller sees the same rule.
* Channels are built here, not by its ``ConnectionManager``: that one joins all endpoints
  into one ``ipv4:`` target (no host names, no IPv6) and pings without active calls, which
  etcd's keep-alive enforcement punishes with GOAWAY.
* Watch and lease keep-alive use the raw ``etcdserverpb`` stubs it ships. Its own watch
  reconnects silently (we must know, to resume or re-list), hides compaction (it skips
  ahead, losing deletes) and cannot ask for a leader. Its keep-alive opens one stream per
  ping and only flips a flag when the lease is gone.

Failover: one channel at a time, to the current endpoint. A call that fails for a
connection reason (UNAVAILABLE, a deadline) drops the channel and moves on to the next
endpoint; a unary call tries every endpoint once before raising :class:`EtcdUnavailable`.
Streams (watch, keep-alive) raise on the first failure and leave retrying to their owner,
who knows whether to resume or start again.
"""

from __future__ import annotations

import asyncio
import contextlib
import re
from collections.abc import AsyncGenerator, AsyncIterator, Awaitable, Callable
from pathlib import Path
from types import TracebackType
from typing import Any, TypeVar

import grpc
import grpc.aio
from etcd3aio import (
    EtcdConnectionError,
    EtcdPermissionDeniedError,
    EtcdTransientError,
    EtcdUnauthenticatedError,
)

# The raw stubs live in a private module of etcd3aio (it fixes sys.path so the generated code
# imports); the version is pinned in pyproject.toml for that reason.
from etcd3aio._protobuf import (
    LeaseKeepAliveRequest,
    LeaseStub,
    WatchCreateRequest,
    WatchRequest,
    WatchStub,
)
from etcd3aio.auth import AuthService
from etcd3aio.kv import KVService, prefix_range_end
from etcd3aio.lease import LeaseService

from proxy.core.units import SECONDS, MiB
from proxy.discovery.etcd_model import (
    EtcdAuthError,
    EtcdConfig,
    EtcdError,
    EtcdUnavailable,
    KeyValue,
    Lease,
    LeaseLost,
    WatchBatch,
    WatchCanceled,
    WatchCompacted,
    WatchDisconnected,
    decode_key,
)
from proxy.discovery.values import Delete, Event, Put

T = TypeVar("T")
Metadata = tuple[tuple[str, str], ...]

# etcd's Go client sends this with WithRequireLeader: a member cut off from its leader then
# ends the watch ("no leader") instead of serving a stale, silent stream.
REQUIRE_LEADER: Metadata = (("hasleader", "true"),)
# gRPC wraps a refused connection in a line that repeats the address we already name.
_GRPC_CONNECT_NOISE = re.compile(
    r"^failed to connect to all addresses; last error: (?:[A-Z_]+: )?(?:(?:ipv4|ipv6|dns):\S+?: )?"
)
_DROP_CODES = frozenset(
    {
        grpc.StatusCode.UNAVAILABLE,
        grpc.StatusCode.DEADLINE_EXCEEDED,
        grpc.StatusCode.UNAUTHENTICATED,  # an expired token: a new channel authenticates again
        grpc.StatusCode.CANCELLED,  # our channel was closed under the call
    }
)
# etcd enforces a keep-alive minimum of 5 s and forbids pings without active calls.
_CHANNEL_OPTIONS: list[tuple[str, int]] = [
    ("grpc.keepalive_time_ms", 10_000),
    ("grpc.keepalive_timeout_ms", 5_000),
    ("grpc.keepalive_permit_without_calls", 0),
    ("grpc.max_receive_message_length", 64 * MiB),
]


def describe(exc: BaseException) -> str:
    """A one-line reason for a failed etcd call, from the gRPC status when there is one."""
    cause: BaseException | None = exc
    while cause is not None:
        if isinstance(cause, grpc.aio.AioRpcError):
            details = _GRPC_CONNECT_NOISE.sub("", cause.details() or "no details")
            return f"{cause.code().name}: {details}"
        cause = cause.__cause__
    if isinstance(exc, TimeoutError):
        return "no answer in time"
    return str(exc) or type(exc).__name__


class _Connection:
    """One channel to one endpoint, with the services and stubs bound to it."""

    def __init__(self, endpoint: str, channel: grpc.aio.Channel) -> None:
        self.endpoint = endpoint
        self.channel = channel
        self.kv = KVService(channel, max_attempts=1)
        self.lease = LeaseService(channel, max_attempts=1)
        self.auth = AuthService(channel, max_attempts=1)
        self.watch_stub = WatchStub(channel)
        self.lease_stub = LeaseStub(channel)
        self.metadata: Metadata = ()

    def set_token(self, token: str) -> None:
        self.metadata = (("token", token),)
        self.kv.set_token(token)
        self.lease.set_token(token)


class EtcdClient:
    """An etcd v3 client over several endpoints, with failover, TLS and password auth.

    Use as ``async with EtcdClient(config) as client:``, or call :meth:`close` yourself.
    Connecting is lazy: the first call opens the channel.
    """

    def __init__(self, config: EtcdConfig) -> None:
        self.config = config
        self._targets = config.addresses
        self._next = 0
        self._conn: _Connection | None = None
        self._lock = asyncio.Lock()
        self._closed = False

    @property
    def current_endpoint(self) -> str | None:
        """The endpoint of the open channel, if one is open."""
        return self._conn.endpoint if self._conn is not None else None

    async def __aenter__(self) -> EtcdClient:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.close()

    async def close(self) -> None:
        """Close the channel; later calls raise :class:`EtcdError`."""
        self._closed = True
        conn, self._conn = self._conn, None
        if conn is not None:
            await conn.channel.close()

    # ------------------------------------------------------------------ KV

    async def get_prefix(self, prefix: str) -> tuple[int, list[KeyValue]]:
        """All keys under ``prefix`` and the revision they were read at (linearizable)."""

        async def call(conn: _Connection) -> tuple[int, list[KeyValue]]:
            resp = await conn.kv.get(prefix, prefix_range_end(prefix), timeout=self._timeout)
            kvs = [
                KeyValue(decode_key(kv.key), bytes(kv.value), int(kv.mod_revision), int(kv.lease))
                for kv in resp.kvs
            ]
            return int(resp.header.revision), kvs

        return await self._unary(call)

    async def put(self, key: str, value: str | bytes, lease: int = 0) -> int:
        """Store ``key`` (attached to ``lease`` when not 0); returns the new revision."""

        async def call(conn: _Connection) -> int:
            resp = await conn.kv.put(key, value, lease, timeout=self._timeout)
            return int(resp.header.revision)

        return await self._unary(call)

    async def delete(self, key: str) -> int:
        """Delete ``key``; returns how many keys were deleted (0 or 1)."""

        async def call(conn: _Connection) -> int:
            resp = await conn.kv.delete(key, timeout=self._timeout)
            return int(resp.deleted)

        return await self._unary(call)

    async def compact(self, revision: int) -> None:
        """Drop history before ``revision`` (physically, so watches see it at once)."""

        async def call(conn: _Connection) -> None:
            await conn.kv.compact(revision, physical=True, timeout=self._timeout)

        await self._unary(call)

    # ------------------------------------------------------------------ leases

    async def grant_lease(self, ttl_s: int) -> Lease:
        """A new lease of ``ttl_s`` seconds."""

        async def call(conn: _Connection) -> Lease:
            resp = await conn.lease.grant(ttl_s, timeout=self._timeout)
            if resp.error:
                raise EtcdError(f"lease grant refused: {resp.error}")
            return Lease(int(resp.ID), int(resp.TTL))

        return await self._unary(call)

    async def revoke_lease(self, lease_id: int) -> bool:
        """Revoke a lease (deleting its keys); False if it was already gone."""

        async def call(conn: _Connection) -> bool:
            try:
                await conn.lease.revoke(lease_id, timeout=self._timeout)
            except grpc.aio.AioRpcError as exc:
                if exc.code() == grpc.StatusCode.NOT_FOUND:
                    return False
                raise
            return True

        return await self._unary(call)

    async def keep_alive(self, lease_id: int) -> AsyncGenerator[int, None]:
        """Keep ``lease_id`` alive on one stream; yields the TTL etcd reports each time.

        Sends one request, reads its response, then waits a third of the TTL (as etcd's Go
        client does): every response is consumed, so nothing queues up. Raises
        :class:`LeaseLost` when etcd says the lease is gone, :class:`EtcdUnavailable` when
        the stream fails or a response does not come in time.
        """
        conn = await self._connection_or_unavailable()
        requests: asyncio.Queue[Any] = asyncio.Queue()

        async def request_stream() -> AsyncIterator[Any]:
            while True:
                yield await requests.get()

        call = conn.lease_stub.LeaseKeepAlive(request_stream(), metadata=conn.metadata or None)
        try:
            while True:
                requests.put_nowait(LeaseKeepAliveRequest(ID=lease_id))
                async with asyncio.timeout(self._timeout):
                    resp = await call.read()
                if resp is grpc.aio.EOF:
                    raise EtcdUnavailable(f"{conn.endpoint}: keep-alive stream closed by etcd")
                ttl = int(resp.TTL)
                if ttl <= 0:
                    raise LeaseLost(lease_id)
                yield ttl
                await asyncio.sleep(max(ttl / 3, 0.2) * SECONDS)
        except grpc.aio.AioRpcError as exc:
            await self._drop_if(conn, exc)
            raise EtcdUnavailable(f"{conn.endpoint}: keep-alive failed: {describe(exc)}") from exc
        except TimeoutError as exc:
            await self._drop(conn)
            raise EtcdUnavailable(f"{conn.endpoint}: keep-alive got no answer in time") from exc
        finally:
            call.cancel()

    # ------------------------------------------------------------------ watch

    async def watch_prefix(
        self, prefix: str, start_revision: int
    ) -> AsyncGenerator[WatchBatch, None]:
        """Events under ``prefix`` from ``start_revision`` on, batch by batch, forever.

        The stream requires a leader. The first batch is the creation (no events). Raises
        :class:`WatchCompacted` when ``start_revision`` is compacted away,
        :class:`WatchDisconnected` when the stream is lost (resume from the last batch's
        revision + 1), :class:`WatchCanceled` when etcd ends the watch for another reason.
        """
        conn = await self._connection_or_unavailable(WatchDisconnected)
        create = WatchCreateRequest(
            key=prefix.encode(), range_end=prefix_range_end(prefix), start_revision=start_revision
        )
        done = asyncio.Event()

        async def request_stream() -> AsyncIterator[Any]:
            yield WatchRequest(create_request=create)
            # Ending the request stream would half-close the watch; hold it open until we stop.
            await done.wait()

        metadata = conn.metadata + REQUIRE_LEADER
        call = conn.watch_stub.Watch(request_stream(), metadata=metadata)
        try:
            # The creation must come back promptly; later events may take forever, and a dead
            # connection is then found by gRPC keep-alive pings.
            async with asyncio.timeout(self._timeout):
                resp = await call.read()
            created = True
            while resp is not grpc.aio.EOF:
                if resp.canceled:
                    if resp.compact_revision > 0:
                        raise WatchCompacted(int(resp.compact_revision))
                    raise WatchCanceled(resp.cancel_reason or "watch canceled by etcd")
                if created:
                    yield WatchBatch((), start_revision - 1, created=True)
                    created = False
                if resp.events:
                    events = tuple(_event(e) for e in resp.events)
                    yield WatchBatch(events, int(resp.events[-1].kv.mod_revision))
                resp = await call.read()
            raise WatchDisconnected(f"{conn.endpoint}: watch stream closed by etcd")
        except grpc.aio.AioRpcError as exc:
            await self._drop_if(conn, exc)
            raise WatchDisconnected(f"{conn.endpoint}: {describe(exc)}") from exc
        except TimeoutError as exc:
            await self._drop(conn)
            raise WatchDisconnected(f"{conn.endpoint}: watch not created in time") from exc
        finally:
            done.set()
            call.cancel()

    # ------------------------------------------------------------------ connections

    @property
    def _timeout(self) -> float:
        return self.config.request_timeout_s

    async def _unary(self, call: Callable[[_Connection], Awaitable[T]]) -> T:
        """Run ``call`` on the current endpoint, failing over to each other one once."""
        errors: list[str] = []
        attempts = len(self._targets)
        reauthenticated = False
        while attempts > 0:
            attempts -= 1
            try:
                conn = await self._connection()
            except EtcdUnavailable as exc:
                errors.append(str(exc))
                continue
            try:
                return await call(conn)
            except (EtcdConnectionError, EtcdTransientError, TimeoutError) as exc:
                errors.append(f"{conn.endpoint}: {describe(exc)}")
                await self._drop(conn)
            except grpc.aio.AioRpcError as exc:
                if exc.code() not in _DROP_CODES:
                    raise EtcdError(f"{conn.endpoint}: {describe(exc)}") from exc
                errors.append(f"{conn.endpoint}: {describe(exc)}")
                await self._drop(conn)
            except (EtcdUnauthenticatedError, EtcdPermissionDeniedError) as exc:
                await self._drop(conn)
                can_retry = isinstance(exc, EtcdUnauthenticatedError) and not reauthenticated
                if not can_retry or self.config.username is None:
                    raise EtcdAuthError(f"{conn.endpoint}: {describe(exc)}") from exc
                # Most likely an expired token: a new channel authenticates again, once.
                reauthenticated = True
                attempts += 1
        raise EtcdUnavailable("; ".join(errors))

    async def _connection_or_unavailable(
        self, error: type[EtcdUnavailable] = EtcdUnavailable
    ) -> _Connection:
        try:
            return await self._connection()
        except EtcdUnavailable as exc:
            raise error(str(exc)) from exc

    async def _connection(self) -> _Connection:
        if self._closed:
            raise EtcdError("etcd client is closed")
        async with self._lock:
            if self._conn is None:
                self._conn = await self._open(self._targets[self._next])
            return self._conn

    async def _open(self, target: str) -> _Connection:
        channel = self._channel(target)
        conn = _Connection(target, channel)
        if self.config.username is not None and self.config.password is not None:
            try:
                resp = await conn.auth.authenticate(
                    self.config.username, self.config.password, timeout=self._timeout
                )
            except (EtcdConnectionError, EtcdTransientError, TimeoutError) as exc:
                await channel.close()
                self._next = (self._next + 1) % len(self._targets)
                raise EtcdUnavailable(f"{target}: {describe(exc)}") from exc
            except (grpc.aio.AioRpcError, EtcdUnauthenticatedError) as exc:
                await channel.close()
                raise EtcdAuthError(f"{target}: authentication failed: {describe(exc)}") from exc
            conn.set_token(str(resp.token))
        return conn

    def _channel(self, target: str) -> grpc.aio.Channel:
        if not self.config.uses_tls:
            return grpc.aio.insecure_channel(target, options=_CHANNEL_OPTIONS)
        credentials = grpc.ssl_channel_credentials(
            root_certificates=_read(self.config.ca_file),
            private_key=_read(self.config.key_file),
            certificate_chain=_read(self.config.cert_file),
        )
        options: list[tuple[str, int | str]] = [*_CHANNEL_OPTIONS]
        if self.config.server_name is not None:
            options.append(("grpc.ssl_target_name_override", self.config.server_name))
        return grpc.aio.secure_channel(target, credentials, options=options)

    async def _drop_if(self, conn: _Connection, exc: grpc.aio.AioRpcError) -> None:
        if exc.code() in _DROP_CODES:
            await self._drop(conn)

    async def _drop(self, conn: _Connection) -> None:
        """Forget a failed channel and move to the next endpoint (once per failure)."""
        async with self._lock:
            if self._conn is not conn:
                return  # another caller already moved on
            self._conn = None
            self._next = (self._targets.index(conn.endpoint) + 1) % len(self._targets)
        with contextlib.suppress(Exception):
            await conn.channel.close()


def _read(path: str | None) -> bytes | None:
    return Path(path).expanduser().read_bytes() if path is not None else None


def _event(event: Any) -> Event:
    key = decode_key(bytes(event.kv.key))
    # mvccpb.Event.EventType: PUT = 0, DELETE = 1.
    if event.type == 1:
        return Delete(key)
    return Put(key, bytes(event.kv.value))

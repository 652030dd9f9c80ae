"""Active health checks: ``grpc.health.v1.Health/Check`` against every backend of the pools.

Wiring (``serve`` with ``--health-check``)::

    from proxy.runtime.health_checks import ActiveHealth

    health = ActiveHealth(
        # Re-read, so that a SIGHUP that swaps the router is followed.
        lambda: server.dispatcher.router.pools(),
        config.health_check_options(),  # interval, timeout, service
    )
    server.dispatcher.health = health
    health.start()  # inside the running loop
    stack.push_async_callback(health.close)

``pools`` is a callable returning the target pools, or anything with a ``pools()`` method (a
:class:`~proxy.core.routing.Router`). Every address in any pool is checked on its own schedule, over
its own ``grpc.aio`` channel. The set of addresses is re-read every ``min(interval, 1 s)``: a
backend that leaves stops being checked and its channel is closed; one that joins has its first
check within two such periods, then the second at a random point of the following interval
(which spreads a big pool evenly over the interval instead of checking it in bursts), then one
every interval +-10 %.

Verdicts, one check each (no thresholds): ``SERVING`` makes a backend ``serving``; an answer of
``NOT_SERVING`` / ``SERVICE_UNKNOWN``, ``NOT_FOUND`` (the server does not know ``service``), any
other error, or no answer within ``timeout_s`` make it ``not_serving``, which :meth:`usable`
refuses. Before its first answer a backend is ``unknown`` and usable: a new backend is not held
back while its first check runs (passive outlier detection covers it meanwhile).

Why ``grpc.aio`` on the proxy's loop rather than the sync API in threads handing results over
with ``call_soon_threadsafe``: it works on uvloop (as the etcd watch, through etcd3aio, already
does), costs about the same CPU per check (every thread takes the GIL the loop needs, so the
process total is what counts; see loadtest/health_checks_bench.py), and needs no
thread pool: deadlines, cancellation and closing a channel are the loop's own.

Each worker process (``--workers``) checks every backend on its own.

Backends reached with TLS (``backend_tls``, per target) are checked over TLS with the same CA,
client certificate and server name (``tls_of`` maps a target to its settings); grpcio has no
way to skip verification, so ``backend_tls_skip_verify`` and health checks do not go together
(the CLI refuses the pair).
"""

from __future__ import annotations

import asyncio
import contextlib
import random
from collections import Counter
from collections.abc import Callable, Iterable
from typing import Any, Literal, Protocol, runtime_checkable

import grpc
import grpc.aio
import structlog
from grpc_health.v1 import health_pb2, health_pb2_grpc

from proxy.core.endpoints import TargetPool
from proxy.core.options import HealthCheckOptions
from proxy.runtime.tls import UpstreamTLSFiles

log = structlog.get_logger("proxy.health")

Status = Literal["serving", "not_serving", "unknown"]
Result = Literal["serving", "not_serving", "error", "timeout"]

JITTER = 0.1
_SERVING = health_pb2.HealthCheckResponse.SERVING


@runtime_checkable
class PoolSource(Protocol):
    def pools(self) -> Iterable[TargetPool]: ...


class _Backend:
    __slots__ = ("address", "reason", "status", "task", "tls")

    def __init__(self, address: str, tls: UpstreamTLSFiles | None = None) -> None:
        self.address = address
        self.tls = tls
        self.status: Status = "unknown"
        self.reason = ""
        self.task: asyncio.Task[None] | None = None


class ActiveHealth:
    """Checks every backend address of the pools; answers ``usable``/``status`` per address."""

    def __init__(
        self,
        pools: Callable[[], Iterable[TargetPool]] | PoolSource,
        options: HealthCheckOptions | None = None,
        tls_of: Callable[[str], UpstreamTLSFiles | None] | None = None,
    ) -> None:
        options = options or HealthCheckOptions()
        interval_s, timeout_s, service = options.interval, options.timeout, options.service
        if interval_s <= 0 or timeout_s <= 0:
            raise ValueError("health check interval and timeout must be > 0")
        self._pools = pools.pools if isinstance(pools, PoolSource) else pools
        self.interval_s = interval_s
        self.timeout_s = timeout_s
        self.service = service
        # Target name -> its backends' TLS settings (None: cleartext); re-read every rescan.
        self._tls_of = tls_of
        self.rescan_s = min(interval_s, 1.0)
        # Checks by (address, result); an address's counts go when it leaves the pools, so
        # churn does not grow this (or the metric series read from it) without bound.
        self.checks_total: Counter[tuple[str, str]] = Counter()
        self._request = health_pb2.HealthCheckRequest(service=service)
        self._backends: dict[str, _Backend] = {}
        # What usable() reads on every pick: one set lookup.
        self._down: set[str] = set()
        self._tasks: set[asyncio.Task[None]] = set()
        self._scanner: asyncio.Task[None] | None = None
        interval_ms, timeout_ms = int(interval_s * 1000), int(timeout_s * 1000)
        self._channel_options = [
            # grpc's reconnect backoff grows to 120 s: a backend that restarts would then
            # fail its checks fast for minutes. Cap it at the interval.
            ("grpc.initial_reconnect_backoff_ms", min(interval_ms, 1000)),
            ("grpc.max_reconnect_backoff_ms", interval_ms),
            # Also grpc's connect timeout (default 20 s): a connect that hangs is then judged
            # like any check without an answer in time.
            ("grpc.min_reconnect_backoff_ms", timeout_ms),
            # Own connections: closing the channel of a departed backend really closes them.
            ("grpc.use_local_subchannel_pool", 1),
            ("grpc.enable_retries", 0),
        ]

    # ------------------------------------------------------------------ queries

    def usable(self, address: str) -> bool:
        return address not in self._down

    def status(self, address: str) -> Status:
        backend = self._backends.get(address)
        return "unknown" if backend is None else backend.status

    def reason(self, address: str) -> str:
        """Why the last verdict was what it was (``NOT_SERVING``, ``UNAVAILABLE: ...``)."""
        backend = self._backends.get(address)
        return "" if backend is None else backend.reason

    def addresses(self) -> set[str]:
        """The addresses being checked."""
        return set(self._backends)

    # ------------------------------------------------------------------ lifecycle

    def start(self) -> None:
        if self._scanner is None:
            self._scanner = asyncio.get_running_loop().create_task(self._scan())

    async def close(self) -> None:
        if self._scanner is not None:
            self._scanner.cancel()
        for address in list(self._backends):
            self._remove(address)
        tasks = [t for t in (self._scanner, *self._tasks) if t is not None]
        await asyncio.gather(*tasks, return_exceptions=True)
        self._scanner = None

    def rescan(self) -> None:
        """Start checking addresses that joined a pool, stop checking those that left."""
        live: dict[str, UpstreamTLSFiles | None] = {}
        tls_of = self._tls_of
        for pool in self._pools():
            tls = tls_of(pool.target) if tls_of is not None else None
            for address in pool.snapshot.addresses:
                live.setdefault(address, tls)
        for address in live.keys() - self._backends.keys():
            self._add(address, live[address])
        for address in self._backends.keys() - live.keys():
            self._remove(address)
        for address, tls in live.items():
            if self._backends[address].tls != tls:  # a reload changed its TLS settings
                self._remove(address)
                self._add(address, tls)
        for backend in list(self._backends.values()):
            task = backend.task
            if task is not None and task.done():
                # _run only ends by cancellation (on removal); anything else is a bug, and
                # must not leave a backend stuck in its last verdict: check it afresh.
                error = None if task.cancelled() else task.exception()
                log.error("health_check_task_died", backend=backend.address, error=repr(error))
                self._remove(backend.address)
                self._add(backend.address, backend.tls)

    async def _scan(self) -> None:
        while True:
            try:
                self.rescan()
            except Exception:  # a broken pool source must not end the health checks
                log.exception("health_rescan_failed")
            await asyncio.sleep(self.rescan_s)

    def _add(self, address: str, tls: UpstreamTLSFiles | None = None) -> None:
        backend = _Backend(address, tls)
        self._backends[address] = backend
        task = asyncio.get_running_loop().create_task(
            self._run(backend), name=f"health-check {address}"
        )
        backend.task = task
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    def _remove(self, address: str) -> None:
        backend = self._backends.pop(address)
        self._down.discard(address)
        for result in ("serving", "not_serving", "error", "timeout"):
            self.checks_total.pop((address, result), None)
        if backend.task is not None:
            backend.task.cancel()

    # ------------------------------------------------------------------ checking

    def _channel(self, backend: _Backend) -> grpc.aio.Channel:
        tls = backend.tls
        if tls is None:
            return grpc.aio.insecure_channel(backend.address, options=self._channel_options)

        def read(path: str | None) -> bytes | None:
            if path is None:
                return None
            with open(path, "rb") as file:
                return file.read()

        credentials = grpc.ssl_channel_credentials(read(tls.ca), read(tls.key), read(tls.cert))
        options: list[tuple[str, int | str]] = list(self._channel_options)
        if tls.server_name:
            options.append(("grpc.ssl_target_name_override", tls.server_name))
        return grpc.aio.secure_channel(backend.address, credentials, options=options)

    async def _run(self, backend: _Backend) -> None:
        while True:
            try:
                channel = self._channel(backend)
                break
            except OSError as exc:  # a TLS file gone since start: say so, try again later
                self._record(backend, "error", f"cannot read a TLS file: {exc}")
                await asyncio.sleep(self.interval_s)
        try:
            stub = health_pb2_grpc.HealthStub(channel)
            await asyncio.sleep(random.uniform(0, self.rescan_s))
            self._record(backend, *await self._check(stub))
            await asyncio.sleep(random.uniform(0, self.interval_s))
            while True:
                self._record(backend, *await self._check(stub))
                await asyncio.sleep(self.interval_s * random.uniform(1 - JITTER, 1 + JITTER))
        finally:
            with contextlib.suppress(Exception):
                await channel.close()

    async def _check(self, stub: Any) -> tuple[Result, str]:
        try:
            response = await stub.Check(self._request, timeout=self.timeout_s)
        except grpc.aio.AioRpcError as exc:
            code = exc.code()
            if code == grpc.StatusCode.DEADLINE_EXCEEDED:
                return "timeout", f"no answer within {self.timeout_s:g} s"
            if code == grpc.StatusCode.NOT_FOUND:
                return "not_serving", f"service {self.service!r} unknown to the backend"
            return "error", f"{code.name}: {exc.details()}"
        except Exception as exc:  # whatever grpc raises, the verdict is "not answering"
            return "error", repr(exc)
        if response.status == _SERVING:
            return "serving", "SERVING"
        return "not_serving", health_pb2.HealthCheckResponse.ServingStatus.Name(response.status)

    def _record(self, backend: _Backend, result: Result, reason: str) -> None:
        address = backend.address
        if self._backends.get(address) is not backend:
            return  # left the pools while the check ran
        self.checks_total[(address, result)] += 1
        status: Status = "serving" if result == "serving" else "not_serving"
        backend.reason = reason
        if status == backend.status:
            return
        previous, backend.status = backend.status, status
        if status == "serving":
            self._down.discard(address)
        else:
            self._down.add(address)
        # A backend's first answer being SERVING is the expected case: keep a big pool's start
        # from writing a line per backend at info.
        emit = log.debug if previous == "unknown" and status == "serving" else log.info
        emit(
            "backend_health_changed",
            backend=address,
            status=status,
            previous=previous,
            reason=reason,
            result=result,
        )

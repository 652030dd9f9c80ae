"""The call dispatcher: what every Call asks "where next?" (`pick`) and "get me there"
(`attach`), and tells how it ended (`call_ended`: stats, outlier detection, the access log).

It owns what routing and balancing weigh: the router and balancer, the backend pool, outlier
detection, the retry budget, calls in flight per backend, and the call stats. It is the
`CallRouter` port of the core (proxy.core.ports); the listeners hand it to each Call.
"""

from __future__ import annotations

import asyncio
import dataclasses
from bisect import bisect_left
from collections.abc import Callable
from random import random
from time import perf_counter
from typing import TYPE_CHECKING

import structlog

from proxy.core.balancing import Balancer, NoPick, NoPickKind
from proxy.core.buffers import BufferMeter
from proxy.core.call import Call
from proxy.core.endpoints import Endpoint, PoolSnapshot, TargetPool
from proxy.core.grpc_status import UNAVAILABLE, Status
from proxy.core.h2.limits import Limits
from proxy.core.options import ServerOptions
from proxy.core.outlier import OutlierDetector
from proxy.core.ports import Refusal
from proxy.core.retry_budget import RetryBudget
from proxy.core.routing import Router, service_of
from proxy.core.stats import (
    BUCKET0,
    DURATION_BUCKETS,
    DURATION_SUM,
    MAX_STATUS,
    NO_BACKEND,
    STATUS0,
    CallStats,
    split_path,
)
from proxy.runtime.flusher import Flusher
from proxy.runtime.pool import BackendPool
from proxy.runtime.tls import UpstreamTLS

if TYPE_CHECKING:
    from proxy.core.ports import HealthSource

log = structlog.get_logger("proxy.server")
access_log = structlog.get_logger("proxy.access")


class Dispatcher:
    def __init__(
        self,
        router: Router,
        limits: Limits,
        options: ServerOptions,
        balancer: Balancer | None,
        flusher: Flusher,
        loop: asyncio.AbstractEventLoop,
        meter: BufferMeter | None = None,
    ) -> None:
        self.loop = loop
        self.router = router
        self.options = options
        self.pool = BackendPool(
            flusher,
            # Backend streams start with the base window; a call grows its stream's window
            # to the full one while the buffer budget allows (proxy/core/buffers.py).
            dataclasses.replace(limits, stream_window=options.base_stream_window),
            connect_timeout_s=options.connect_timeout,
            max_connections_per_backend=options.max_connections_per_backend,
            on_failure=self.backend_failed,
            meter=meter,
        )
        self.outliers = OutlierDetector(
            options.outlier_consecutive_failures,
            options.outlier_base_ejection,
            options.outlier_max_ejection,
            options.outlier_max_ejection_percent,
            clock=loop.time,
        )
        self.budget = RetryBudget(options.retry_budget_percent, options.retry_budget_min)
        # Active health checks, when on (set by whoever runs them).
        self.health: HealthSource | None = None
        self.access_log_sample = options.access_log_sample
        # The balancer's filter, made once: a bound method reading the time of the pick in
        # progress, rather than a closure built per call.
        self._pick_time = 0.0
        self._usable_fn = self._usable
        self.balancer = balancer or Balancer()
        # Calls in flight per backend address: what least-request and bounded load weigh.
        self.inflight: dict[str, int] = {}
        # TLS towards backends: per target name, else the default (None: cleartext).
        self.upstream_tls: UpstreamTLS | None = None
        self.target_tls: dict[str, UpstreamTLS | None] = {}
        # Services that only some client identities may call (empty: no such rule).
        self.allowed: dict[str, frozenset[str]] = {}
        self.stats = CallStats()
        # Calls ended this loop turn, accounted after its writes (see call_ended).
        self._flusher = flusher
        self._ended: list[tuple[Call, int, bool]] = []
        self._account_cb = self._account_ended
        # Every pool listened to: those of the first router, then those reloads brought. A
        # listener is never removed; one left on a pool no longer routed to is harmless.
        self._subscribed_pools: set[TargetPool] = set()
        self._pool_addresses: dict[str, frozenset[str]] = {
            pool.target: pool.snapshot.addresses for pool in router.pools()
        }
        self._subscribe(router)

    # ------------------------------------------------------------------ CallRouter

    @property
    def max_attempts(self) -> int:
        return 1 + self.options.max_retries

    @property
    def replay_limit(self) -> int:
        return self.options.replay_limit

    def pick(self, call: Call) -> Endpoint | Refusal:
        if not call.attempts:  # its first pick: the call starts now
            # Not loop.time(): uvloop's is libuv's cached millisecond clock, too coarse for
            # the sub-millisecond buckets of the duration histogram.
            call.started_at = perf_counter()
        path = call.path
        target = self.router.route(path)
        call.target = target
        if self.allowed:
            denied = self._denied(call, path)
            if denied is not None:
                return denied
        if target is None:
            service = service_of(path) or path.decode("latin-1")
            return Refusal(Status.UNIMPLEMENTED, f"no route for service {service!r}")
        snap = target.snapshot
        if not snap.endpoints:
            return Refusal(
                Status.UNAVAILABLE, f"no backend for target {target.target!r}: {snap.reason}"
            )
        # Only when some backend may be unusable is the filter passed: most picks skip it.
        if self.pool.backing_off or self.outliers.ejected or self.health is not None:
            self._pick_time = self.loop.time()  # read only when the filter runs
            usable: Callable[[str], bool] | None = self._usable_fn
        else:
            usable = None
        picked = self.balancer.pick(snap, call.headers, call.tried, usable, self.inflight)
        if isinstance(picked, NoPick):
            # A pinned session must learn that its instance is gone: that message is final.
            if picked.kind in (NoPickKind.NO_INSTANCE, NoPickKind.INSTANCE_TRIED):
                return Refusal(Status.UNAVAILABLE, picked.message, final=True)
            return Refusal(Status.UNAVAILABLE, call.no_backend_message())
        return picked

    def _denied(self, call: Call, path: bytes) -> Refusal | None:
        """PERMISSION_DENIED when the call's service allows only some identities and the
        client's certificate names none of them (or the client has no certificate)."""
        service = service_of(path)
        allowed = self.allowed.get(service)
        if allowed is None:
            return None
        identity = call.client.identity
        if identity is not None and not allowed.isdisjoint(identity.names()):
            return None
        who = (
            f"client {identity.primary!r}"
            if identity is not None
            else "a client without a verified certificate"
        )
        return Refusal(Status.PERMISSION_DENIED, f"{who} may not call {service}", final=True)

    def _usable(self, address: str) -> bool:
        """Not in connect backoff, not ejected, not failing its health checks. When no
        backend of a pool passes, the balancer still picks one of them as a probe, so a
        pool of sick backends gets tried rather than failing every call."""
        now = self._pick_time
        if now < self.pool.retry_at.get(address, 0.0):
            return False
        outliers = self.outliers
        if outliers.ejected and not outliers.usable(address, now):
            return False
        health = self.health
        return health is None or health.usable(address)

    def retry(self, call: Call, kind: str) -> Refusal | None:
        if not call.retry_slot:
            budget = self.budget
            # Calls in flight: those at a backend now. Summed here, on a retry, so that the
            # path of every call pays nothing for the budget.
            calls = sum(self.inflight.values())
            if not budget.acquire(calls):
                self.stats.budget_refused()
                return Refusal(
                    Status.UNAVAILABLE,
                    f"retry budget exhausted ({budget.retries} retries in flight, at most "
                    f"{budget.limit(calls):g}): not retrying {call.path.decode('latin-1')} after "
                    + "; ".join(call.errors),
                )
            call.retry_slot = True
        self.stats.retried(kind)
        return None

    def backend_failed(self, address: str) -> None:
        if not self.outliers.consecutive_failures:
            return
        pools = [
            snap.addresses
            for snap in (target_pool.snapshot for target_pool in self.router.pools())
            if address in snap.addresses
        ]
        if pools:  # in no pool any more: nothing to eject it from
            self.outliers.failed(address, pools)

    def call_ended(self, call: Call, status: int, answered: bool) -> None:
        """What the next pick weighs is released now: the call's place in flight and in the
        retry budget. The rest (stats, outlier detection, the access log) waits for the end of
        the loop turn, after the writes: the client's last bytes are not held back by it (a
        serial call's latency), and the call's duration then includes writing them."""
        self.release(call)
        if call.retry_slot:
            self.budget.release()
        if not self._ended:
            self._flusher.after_writes(self._account_cb)
        self._ended.append((call, status, answered))

    def _account_ended(self) -> None:
        ended, self._ended = self._ended, []
        now = perf_counter()
        for call, status, answered in ended:
            self._account(call, status, answered, now)

    def _account(self, call: Call, status: int, answered: bool, now: float) -> None:
        duration = now - call.started_at
        endpoint = call.endpoint
        row = call.stats_row
        if endpoint is None:
            backend = NO_BACKEND
            row = self.stats.call_started(call.path, backend)  # refused before any backend
        else:
            backend = endpoint.address
            if answered:
                if status == UNAVAILABLE:
                    self.backend_failed(backend)
                elif self.outliers.failures:
                    self.outliers.succeeded(backend)
        if call.attempts > 1:  # retried: the row is that of the backend it ended on
            row = None
        if row is not None and 0 <= status <= MAX_STATUS:
            # The usual case, inline: a few increments on the row the call took at its start.
            i = STATUS0 + 3 * status
            row[i] += 1
            row[i + 1] += call.request_bytes
            row[i + 2] += call.response_bytes
            row[BUCKET0 + bisect_left(DURATION_BUCKETS, duration)] += 1
            row[DURATION_SUM] += duration
        else:
            self.stats.call_finished(
                call.path, backend, status, duration, call.request_bytes, call.response_bytes, row
            )
        sample = self.access_log_sample
        if sample and (sample >= 1.0 or random() < sample):
            self._log_access(call, backend, status, duration)

    def set_access_log_sample(self, sample: float) -> None:
        """The share of calls logged from now on (a reload may change it)."""
        self.access_log_sample = sample

    def _log_access(self, call: Call, backend: str, status: int, duration: float) -> None:
        service, method = split_path(call.path)
        target = call.target
        access_log.info(
            "call",
            service=service,
            method=method,
            target=target.target if target is not None else "",
            backend=backend,
            grpc_status=status,
            duration_ms=round(duration * 1000, 3),
            request_bytes=call.request_bytes,
            response_bytes=call.response_bytes,
            peer=call.client.peer,
            **({} if call.client.identity is None else {"client": call.client.identity.primary}),
        )

    def attach(self, endpoint: Endpoint, call: Call) -> None:
        address = endpoint.address
        inflight = self.inflight
        inflight[address] = inflight.get(address, 0) + 1
        call.holding = True
        if call.attempts == 1:  # counted once, on the backend first picked
            call.stats_row = self.stats.call_started(call.path, address)
        tls = self.upstream_tls
        if self.target_tls:
            target = call.target
            if target is not None:
                tls = self.target_tls.get(target.target, tls)
        self.pool.get(address, tls).attach(call)

    def release(self, call: Call) -> None:
        if call.holding and call.endpoint is not None:
            call.holding = False
            address = call.endpoint.address
            left = self.inflight[address] - 1
            if left:
                self.inflight[address] = left
            else:
                del self.inflight[address]

    # ------------------------------------------------------------------ configuration

    def reconfigure(self, router: Router, balancer: Balancer) -> None:
        """Route and balance the next picks with these (SIGHUP). Calls in flight keep their
        backend; connections to backends left in no pool are retired once their calls end."""
        self._subscribe(router)
        self.router = router
        self.balancer = balancer
        self._pools_changed()

    def _subscribe(self, router: Router) -> None:
        for target_pool in router.pools():
            if target_pool not in self._subscribed_pools:
                self._subscribed_pools.add(target_pool)
                target_pool.subscribe(self._pool_changed)

    def _pool_changed(self, snap: PoolSnapshot) -> None:
        """One line per change of a pool (not per call): what joined, what left."""
        before = self._pool_addresses.get(snap.target, frozenset())
        self._pool_addresses[snap.target] = snap.addresses
        added, removed = snap.addresses - before, before - snap.addresses
        if added or removed:
            log.info(
                "pool_changed",
                target=snap.target,
                added=sorted(added),
                removed=sorted(removed),
                size=len(snap.addresses),
            )
        self._pools_changed()

    def _pools_changed(self) -> None:
        live: set[str] = set()
        for target_pool in self.router.pools():
            live |= target_pool.snapshot.addresses
        self.pool.retain(frozenset(live))
        self.outliers.retain(live)

    def set_upstream_tls(
        self, default: UpstreamTLS | None, per_target: dict[str, UpstreamTLS | None]
    ) -> None:
        """New backend connections use these (SIGHUP); open ones keep theirs."""
        self.upstream_tls = default
        self.target_tls = per_target

    async def close(self) -> None:
        # Calls ended in this loop turn are accounted (and logged) even if the loop stops
        # before the flusher runs again.
        self._account_ended()
        await self.pool.close()
        self._account_ended()

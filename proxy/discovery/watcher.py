"""Keeping each target's pool in sync with etcd: list, watch, resume, re-list.

Theory of operation, per target (one owned task each):

1. List the prefix ``NAME/`` at revision R (the slash matters: ``svc`` must not pick up
   ``svc-v2/...``, a mistake of Go's resolver) and replace the pool with what it found.
2. Watch the prefix from R + 1 and apply every batch of events as it arrives; a change
   reaches the pool within one etcd round trip.
3. The stream is lost (etcd restarted, network cut, no leader): keep the pool as it is,
   back off, and watch again from the last revision seen + 1, so nothing is missed.
4. That revision was compacted meanwhile: list again, which diffs against the current pool
   (keys deleted during the gap leave it), then watch from the new revision + 1.

Go's resolver stops for good at the first watch error (compaction included); never giving
up is the point of this module. While etcd cannot be reached, the pool keeps its last
endpoints: backends usually outlive an etcd outage, and a proxy that empties its pools
because etcd blinked turns an etcd incident into an outage of every service. A pool that
has never been listed is empty, with the reason ("etcd unreachable (...)") said to callers.
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
from collections.abc import Callable, Iterable, Sequence
from types import TracebackType
from typing import Any

import structlog

from proxy.core.backoff import Backoff
from proxy.core.endpoints import TargetPool
from proxy.discovery.etcd import EtcdClient
from proxy.discovery.etcd_model import (
    EtcdAuthError,
    EtcdConfig,
    EtcdError,
    WatchCanceled,
    WatchCompacted,
    etcd_config,
)
from proxy.discovery.values import (
    Applied,
    Invalid,
    PoolState,
    Put,
    apply_events,
    apply_listing,
    record_invalid,
)

log = structlog.get_logger("proxy.discovery")


class WatchState(enum.Enum):
    """Where a target's sync loop is; exported as a metric later."""

    STARTING = "starting"  # nothing asked of etcd yet
    LISTING = "listing"  # reading the prefix
    WATCHING = "watching"  # a watch stream is open and applied as it comes
    RETRYING = "retrying"  # etcd unreachable or the stream lost: waiting to try again
    CLOSED = "closed"


def prefix_of(target: str) -> str:
    """The etcd prefix of a target: ``NAME/``, never ``NAME`` alone."""
    name = target.rstrip("/")
    if not name:
        raise ValueError(f"invalid target name {target!r}")
    return name + "/"


class TargetWatch:
    """The sync loop of one target; its attributes are the state to report and export.

    ``state``, ``last_revision`` (the etcd revision the pool reflects), ``last_error`` (why
    the last attempt failed, "" once it works again), ``has_listed``, ``relists`` (after
    compaction or cancellation) and ``retries`` are read by the admin layer; ``invalid``
    holds the keys whose current value is skipped, with the reason.
    """

    def __init__(self, client: EtcdClient, target: str, backoff: Backoff) -> None:
        self.target = target.rstrip("/")
        self.prefix = prefix_of(target)
        self.pool = TargetPool(
            self.target, f"waiting for the first etcd listing of {self.prefix!r}"
        )
        self.state = WatchState.STARTING
        self.last_revision = 0
        self.last_error = ""
        self.has_listed = False
        self.relists = 0
        self.retries = 0
        self.pool_state = PoolState()
        # Set once the first listing succeeded or failed: enough to start serving.
        self.settled = asyncio.Event()
        self._client = client
        self._backoff = backoff
        self._listeners: list[Callable[[TargetWatch], None]] = []

    @property
    def invalid(self) -> dict[str, Invalid]:
        """Keys whose current value is not an endpoint, with why."""
        return dict(self.pool_state.invalid)

    def subscribe(self, listener: Callable[[TargetWatch], None]) -> None:
        """Call ``listener(self)`` after every change of the pool, invalid keys or state."""
        self._listeners.append(listener)

    async def run(self) -> None:
        """Sync forever (until cancelled)."""
        delays = self._backoff.delays()
        must_list = True
        while True:
            try:
                if must_list:
                    await self._list()
                    must_list = False
                watch = self._client.watch_prefix(self.prefix, self.last_revision + 1)
                async with contextlib.aclosing(watch) as batches:
                    async for batch in batches:
                        if batch.created:
                            self._recovered()
                            delays = self._backoff.delays()
                            continue
                        self.last_revision = max(self.last_revision, batch.revision)
                        self._commit(apply_events(self.pool_state, batch.events))
            except WatchCompacted as exc:
                # No wait: listing again is the remedy, and it cannot hit the same compaction.
                log.info("discovery.compacted", target=self.target, detail=str(exc))
                self.relists += 1
                must_list = True
            except WatchCanceled as exc:
                self.relists += 1
                must_list = True
                await self._retry_later(str(exc), next(delays))
            except EtcdAuthError as exc:
                await self._retry_later(str(exc), next(delays), "etcd refused access")
            except EtcdError as exc:
                await self._retry_later(str(exc), next(delays))
            except Exception as exc:  # a bug must not end discovery for good: log, retry
                log.exception("discovery.unexpected_error", target=self.target)
                await self._retry_later(f"internal error: {exc!r}", next(delays))

    async def _list(self) -> None:
        self._set_state(WatchState.LISTING)
        revision, kvs = await self._client.get_prefix(self.prefix)
        applied = apply_listing(self.pool_state, [Put(kv.key, kv.value) for kv in kvs])
        self.last_revision = revision
        first = not self.has_listed
        self.has_listed = True
        self._commit(applied, force=first)
        self.settled.set()

    def _commit(self, applied: Applied, force: bool = False) -> None:
        record_invalid(self.target, applied.newly_invalid)
        self.pool_state = applied.state
        endpoints = applied.state.endpoints.values()
        reason = "" if applied.state.endpoints else self._empty_reason()
        snapshot = self.pool.snapshot
        if (
            force
            or applied.endpoints_changed
            or (not snapshot.endpoints and reason != snapshot.reason)
        ):
            self.pool.update(endpoints, reason=reason)
        self._notify()

    def _empty_reason(self) -> str:
        invalid = self.pool_state.invalid
        if not invalid:
            return f"no endpoints registered under {self.prefix!r} in etcd"
        key, bad = next(iter(sorted(invalid.items())))
        return (
            f"no valid endpoint under {self.prefix!r} in etcd: {len(invalid)} invalid "
            f"value(s), e.g. {key}: {bad.reason}"
        )

    def _recovered(self) -> None:
        if self.last_error:
            log.info("discovery.resumed", target=self.target, revision=self.last_revision)
        self.last_error = ""
        snapshot = self.pool.snapshot
        if not snapshot.endpoints and snapshot.reason != self._empty_reason():
            # The pool said "etcd unreachable"; now it is reachable and simply empty.
            self.pool.update((), reason=self._empty_reason())
        self._set_state(WatchState.WATCHING)

    async def _retry_later(
        self, error: str, delay_s: float, what: str = "etcd unreachable"
    ) -> None:
        if not self.last_error:
            log.warning("discovery.etcd_unavailable", target=self.target, error=error)
        else:
            log.debug("discovery.retry", target=self.target, error=error, delay_s=delay_s)
        self.last_error = error
        self.retries += 1
        self._set_state(WatchState.RETRYING)
        if not self.pool.snapshot.endpoints:
            # Nothing to keep: say why calls fail. A pool with endpoints is left alone.
            reason = f"{what} ({error})"
            if self.has_listed:
                reason += f"; no endpoints under {self.prefix!r} when last listed"
            if reason != self.pool.snapshot.reason:
                self.pool.update((), reason=reason)
        self.settled.set()
        await asyncio.sleep(delay_s)

    def _set_state(self, state: WatchState) -> None:
        if state is not self.state:
            self.state = state
            self._notify()

    def _notify(self) -> None:
        for listener in self._listeners:
            listener(self)


class EtcdDiscovery:
    """Keeps one :class:`TargetPool` per target in sync with the etcd naming prefix ``NAME/``.

    ``etcd`` is an :class:`EtcdConfig`, a comma-separated endpoint list or a list of
    endpoints. Targets can be given up front or added with :meth:`pool` at any time. Use as
    ``async with EtcdDiscovery(...) as discovery:`` (or :meth:`start` / :meth:`close`); the
    sync tasks are named ``etcd-discovery:NAME`` and cancelled on close. ``watches`` maps each
    target to its :class:`TargetWatch` (state, last revision, invalid keys).
    """

    def __init__(
        self,
        etcd: EtcdConfig | str | Sequence[str],
        targets: Iterable[str] = (),
        *,
        backoff: Backoff | None = None,
        client: EtcdClient | None = None,
    ) -> None:
        self.config = etcd_config(etcd)
        self.backoff = backoff or Backoff()
        self.client = client or EtcdClient(self.config)
        self._owns_client = client is None
        self.watches: dict[str, TargetWatch] = {}
        self._tasks: dict[str, asyncio.Task[None]] = {}
        self._started = False
        for target in targets:
            self.pool(target)

    def pool(self, target: str) -> TargetPool:
        """The pool of ``target``, synced from etcd from now on (or from :meth:`start`)."""
        name = target.rstrip("/")
        watch = self.watches.get(name)
        if watch is None:
            watch = self.watches[name] = TargetWatch(self.client, name, self.backoff)
            if self._started:
                self._spawn(watch)
        return watch.pool

    async def retain(self, targets: Iterable[str]) -> list[str]:
        """Stop watching every target not in ``targets`` (a reload that dropped a route);
        returns the targets dropped. Their pools keep their last endpoints for calls already
        routed to them, but no longer follow etcd, and leave ``watches`` (so /pool and the
        metrics stop showing them)."""
        keep = {target.rstrip("/") for target in targets}
        dropped = [name for name in self.watches if name not in keep]
        await self._stop(dropped)
        for name in dropped:
            del self.watches[name]
        return dropped

    async def start(self) -> None:
        """Start syncing every target (returns at once; see :meth:`wait_ready`)."""
        self._started = True
        for watch in self.watches.values():
            if watch.target not in self._tasks:
                self._spawn(watch)

    async def wait_ready(self, timeout_s: float | None = None) -> bool:
        """Wait until every target was listed or failed to be; False on timeout."""
        waits = [watch.settled.wait() for watch in self.watches.values()]
        try:
            async with asyncio.timeout(timeout_s):
                await asyncio.gather(*waits)
        except TimeoutError:
            return False
        return True

    async def close(self) -> None:
        """Stop every sync task and close the etcd client (if this object made it)."""
        await self._stop(list(self.watches))
        self._started = False
        if self._owns_client:
            await self.client.close()

    async def __aenter__(self) -> EtcdDiscovery:
        await self.start()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.close()

    async def _stop(self, names: list[str]) -> None:
        """Cancel the sync tasks of these targets, wait for them to end, mark them closed."""
        tasks = [task for name in names if (task := self._tasks.pop(name, None)) is not None]
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        for name in names:
            self.watches[name].state = WatchState.CLOSED

    def _spawn(self, watch: TargetWatch) -> None:
        task = asyncio.create_task(watch.run(), name=f"etcd-discovery:{watch.target}")
        self._tasks[watch.target] = task
        task.add_done_callback(self._task_done)

    @staticmethod
    def _task_done(task: asyncio.Task[Any]) -> None:
        # run() only ends by cancellation; anything else is a bug worth a loud line.
        if not task.cancelled() and task.exception() is not None:
            log.error("discovery.task_died", task=task.get_name(), error=repr(task.exception()))

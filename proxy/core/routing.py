"""Which target pool serves a call, from the gRPC service in its :path."""

from __future__ import annotations

from dataclasses import dataclass, field

from proxy.core.endpoints import PoolSnapshot, TargetPool


def service_of(path: bytes) -> str:
    """`/pkg.Service/Method` -> `pkg.Service` ('' when the path is not a gRPC path)."""
    if path[:1] != b"/":
        return ""
    service, sep, _ = path[1:].partition(b"/")
    return service.decode("latin-1") if sep else ""


@dataclass(slots=True)
class Router:
    default: TargetPool | None = None
    routes: dict[str, TargetPool] = field(default_factory=dict)

    def route(self, path: bytes) -> TargetPool | None:
        if self.routes:
            pool = self.routes.get(service_of(path))
            if pool is not None:
                return pool
        return self.default

    def pools(self) -> list[TargetPool]:
        seen: dict[str, TargetPool] = {}
        for pool in [self.default, *self.routes.values()]:
            if pool is not None:
                seen.setdefault(pool.target, pool)
        return list(seen.values())


def with_fallback(primary: TargetPool, fallback: TargetPool) -> TargetPool:
    """A pool that mirrors `primary`, or serves `fallback`'s endpoints while primary is empty
    (e.g. etcd unreachable at start, or nothing registered yet)."""
    pool = TargetPool(primary.target)

    def refresh(_: PoolSnapshot) -> None:
        snap = primary.snapshot
        if snap.endpoints:
            pool.update(snap.endpoints)
        else:
            pool.update(fallback.snapshot.endpoints, reason=snap.reason)

    primary.subscribe(refresh)
    refresh(primary.snapshot)
    return pool

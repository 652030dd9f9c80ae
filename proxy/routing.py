"""Which target pool serves a call, from the gRPC service in its :path."""

from __future__ import annotations

from dataclasses import dataclass, field

from proxy.pool.endpoints import TargetPool


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

"""Per-call figures, kept as plain ints in dicts so the hot path pays a lookup and a few adds.

The Prometheus layer (`proxy.metrics`) reads these at scrape time and turns them into
families: nothing here imports prometheus_client, takes a lock, or formats a label. Paths are
kept as the raw `:path` bytes and split into service and method only when scraped.

Label cardinality is bounded: a client can send any `:path`, so after `max_paths` distinct
paths every new one is counted under `OTHER_PATH`.
"""

from __future__ import annotations

from bisect import bisect_left
from collections import Counter
from typing import Final

# Call duration buckets in seconds (upper bounds; +Inf is implied): 0.5 ms to 60 s, roughly
# x2.5 apart, the range of unary calls through long streams.
DURATION_BUCKETS: Final = (
    0.0005,
    0.001,
    0.0025,
    0.005,
    0.01,
    0.025,
    0.05,
    0.1,
    0.25,
    0.5,
    1.0,
    2.5,
    5.0,
    10.0,
    30.0,
    60.0,
)
OTHER_PATH: Final = b"/other/other"
NO_BACKEND: Final = ""  # the backend label of calls that never reached one
MAX_PATHS: Final = 1000


class CallStats:
    """Counters per (path, backend[, status]); a duration histogram per path.

    - ``started[(path, backend)]``: calls that started on that backend (counted once per
      call, at its first pick; a call refused before any pick counts with ``NO_BACKEND``).
    - ``finished[(path, backend, status)] = [calls, request_bytes, response_bytes]``: calls
      that ended, with the backend that last served them and their grpc-status.
    - ``durations[path] = [count per bucket..., count over the last bucket, sum_seconds]``:
      non-cumulative bucket counts (the exporter accumulates them).
    - ``retries[reason]``, ``budget_refusals``: retries made, and retries the budget refused.
    """

    __slots__ = ("budget_refusals", "durations", "finished", "max_paths", "paths", "retries",
                 "started")  # fmt: skip

    def __init__(self, max_paths: int = MAX_PATHS) -> None:
        self.max_paths = max_paths
        self.paths: set[bytes] = set()
        self.started: dict[tuple[bytes, str], int] = {}
        self.finished: dict[tuple[bytes, str, int], list[int]] = {}
        self.durations: dict[bytes, list[float]] = {}
        self.retries: Counter[str] = Counter()
        self.budget_refusals = 0

    def _path(self, path: bytes) -> bytes:
        if path in self.paths:
            return path
        if len(self.paths) >= self.max_paths:
            return OTHER_PATH
        self.paths.add(path)
        return path

    def call_started(self, path: bytes, backend: str) -> None:
        key = (path, backend)
        started = self.started
        n = started.get(key)
        if n is not None:
            started[key] = n + 1
            return
        started[(self._path(path), backend)] = started.get((self._path(path), backend), 0) + 1

    def call_finished(
        self,
        path: bytes,
        backend: str,
        status: int,
        duration_s: float,
        request_bytes: int,
        response_bytes: int,
    ) -> None:
        row = self.finished.get((path, backend, status))
        if row is None:
            path = self._path(path)
            row = self.finished.setdefault((path, backend, status), [0, 0, 0])
        row[0] += 1
        row[1] += request_bytes
        row[2] += response_bytes
        hist = self.durations.get(path)
        if hist is None:
            path = self._path(path)
            hist = self.durations.setdefault(path, [0.0] * (len(DURATION_BUCKETS) + 2))
        hist[bisect_left(DURATION_BUCKETS, duration_s)] += 1
        hist[-1] += duration_s

    def retried(self, reason: str) -> None:
        self.retries[reason] += 1

    def budget_refused(self) -> None:
        self.budget_refusals += 1


def split_path(path: bytes) -> tuple[str, str]:
    """`/pkg.Service/Method` -> ("pkg.Service", "Method"); anything else -> ("", path)."""
    if path[:1] == b"/":
        service, sep, method = path[1:].partition(b"/")
        if sep and service and method and b"/" not in method:
            return service.decode("latin-1"), method.decode("latin-1")
    return "", path.decode("latin-1")

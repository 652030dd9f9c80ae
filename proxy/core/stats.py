"""Per-call figures, kept as plain ints in dicts so the hot path pays a lookup and a few adds.

The Prometheus layer (`proxy.ops.metrics`) reads these at scrape time and turns them into
families: nothing here imports prometheus_client, takes a lock, or formats a label. Paths are
kept as the raw `:path` bytes and split into service and method only when scraped.

Label cardinality is bounded: a client can send any `:path`, so after `max_paths` distinct
paths every new one is counted under `OTHER_PATH`.
"""

from __future__ import annotations

from bisect import bisect_left
from collections import Counter
from collections.abc import Hashable, Sequence
from typing import Final, TypeVar

K = TypeVar("K", bound=Hashable)

# Call duration buckets in seconds (upper bounds; +Inf is implied): 0.5 ms to 60 s, roughly
# x2.5 apart, the range of unary calls through long streams. Typed as a tuple of any length:
# mypyc keeps a fixed-length Final tuple as an unboxed C constant, which another module-level
# Final (DURATION_SUM below) read before it was set.
DURATION_BUCKETS: Final[tuple[float, ...]] = (
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


# One row per (path, backend), a flat list so that the hot path indexes it without calls:
STARTED: Final = 0  # calls started on this backend (first pick)
STATUS0: Final = 1  # then per grpc-status 0..16: [calls, request bytes, response bytes]
MAX_STATUS: Final = 16
BUCKET0: Final = STATUS0 + 3 * (MAX_STATUS + 1)  # then a count per duration bucket (+ over)
DURATION_SUM: Final = BUCKET0 + len(DURATION_BUCKETS) + 1
ROW_SIZE: Final = DURATION_SUM + 1


class CallStats:
    """Counters per (path, backend): calls started, calls finished per grpc-status with their
    bytes, and a duration histogram, in one flat row each (see the layout constants above).

    The server keeps a call's row from its first pick, so ending the call is a few list
    increments (`ProxyServer.call_ended`); `call_started`/`call_finished` do the same by key,
    for the rarer cases (retried elsewhere, refused before any pick) and for tests. Readers use
    the views, built at scrape time:

    - ``started[(path, backend)]``: calls started there (a call refused before any pick counts
      with ``NO_BACKEND``).
    - ``finished[(path, backend, status)] = [calls, request_bytes, response_bytes]``: calls
      that ended, with the backend that last served them and their grpc-status.
    - ``durations[path] = [count per bucket..., count over the last bucket, sum_seconds]``:
      non-cumulative bucket counts (the exporter accumulates them), over all backends.
    - ``retries[reason]``, ``budget_refusals``: retries made, and retries the budget refused.
    """

    __slots__ = ("budget_refusals", "max_paths", "odd", "paths", "retries", "rows")

    def __init__(self, max_paths: int = MAX_PATHS) -> None:
        self.max_paths = max_paths
        self.paths: set[bytes] = set()
        self.rows: dict[tuple[bytes, str], list[float]] = {}
        # Statuses outside 0..16 (a backend may send any number): rare, kept by key.
        self.odd: dict[tuple[bytes, str, int], list[int]] = {}
        self.retries: Counter[str] = Counter()
        self.budget_refusals = 0

    def row(self, path: bytes, backend: str) -> list[float]:
        row = self.rows.get((path, backend))
        if row is None:
            if path not in self.paths:
                if len(self.paths) >= self.max_paths:
                    path = OTHER_PATH
                self.paths.add(path)
            row = self.rows.setdefault((path, backend), [0] * ROW_SIZE)
        return row

    def call_started(self, path: bytes, backend: str) -> list[float]:
        row = self.row(path, backend)
        row[STARTED] += 1
        return row

    def call_finished(
        self,
        path: bytes,
        backend: str,
        status: int,
        duration_s: float,
        request_bytes: int,
        response_bytes: int,
        row: list[float] | None = None,
    ) -> None:
        if row is None:
            row = self.row(path, backend)
        if 0 <= status <= MAX_STATUS:
            i = STATUS0 + 3 * status
            row[i] += 1
            row[i + 1] += request_bytes
            row[i + 2] += response_bytes
        else:
            odd = self.odd.setdefault((path, backend, status), [0, 0, 0])
            odd[0] += 1
            odd[1] += request_bytes
            odd[2] += response_bytes
        row[BUCKET0 + bisect_left(DURATION_BUCKETS, duration_s)] += 1
        row[DURATION_SUM] += duration_s

    def retried(self, reason: str) -> None:
        self.retries[reason] += 1

    def budget_refused(self) -> None:
        self.budget_refusals += 1

    # ------------------------------------------------------------------ views

    @property
    def started(self) -> dict[tuple[bytes, str], int]:
        return {key: int(row[STARTED]) for key, row in self.rows.items() if row[STARTED]}

    @property
    def finished(self) -> dict[tuple[bytes, str, int], list[int]]:
        out: dict[tuple[bytes, str, int], list[int]] = {}
        for (path, backend), row in self.rows.items():
            for status in range(MAX_STATUS + 1):
                i = STATUS0 + 3 * status
                if row[i]:
                    out[(path, backend, status)] = [int(v) for v in row[i : i + 3]]
        for key, counts in self.odd.items():
            out[key] = list(counts)
        return out

    @property
    def durations(self) -> dict[bytes, list[float]]:
        out: dict[bytes, list[float]] = {}
        for (path, _backend), row in self.rows.items():
            hist = row[BUCKET0:]
            if not any(hist[:-1]):
                continue
            add_counts(out, path, hist)
        return out


def add_counts(sums: dict[K, list[float]], key: K, counts: Sequence[float]) -> None:
    """Add ``counts`` (a histogram row) into ``sums[key]``, element by element."""
    into = sums.get(key)
    if into is None:
        sums[key] = list(counts)
    else:
        for i, v in enumerate(counts):
            into[i] += v


def split_path(path: bytes) -> tuple[str, str]:
    """`/pkg.Service/Method` -> ("pkg.Service", "Method"); anything else -> ("", path)."""
    if path[:1] == b"/":
        service, sep, method = path[1:].partition(b"/")
        if sep and service and method and b"/" not in method:
            return service.decode("latin-1"), method.decode("latin-1")
    return "", path.decode("latin-1")

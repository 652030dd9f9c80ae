"""The supervisor's admin endpoint: its workers' answers, gathered from their unix sockets.

- /metrics: every worker's families, each sample with a `worker="I"` label added (HELP and
  TYPE once per family), plus the supervisor's own: grpc_proxy_workers,
  grpc_proxy_worker_up{worker} and grpc_proxy_worker_restarts_total{worker}.
- /pool: the workers' `workers` arrays, concatenated; a worker that does not answer shows as
  an entry with `ready: false` and an `error`.
- /readyz, /healthz: 200 when every worker says so (a worker being restarted is neither);
  /healthz is 503 once the supervisor is draining, as a single process's is.

Workers are asked in parallel, each with a deadline, so one stuck worker costs a scrape at
most `FETCH_TIMEOUT_S` and never blocks the others' figures.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Iterable, Sequence
from typing import Any, Final, Protocol

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.parser import text_string_to_metric_families

FETCH_TIMEOUT_S: Final = 3.0
MAX_ANSWER_BYTES: Final = 64 * 1024 * 1024


class WorkerView(Protocol):
    @property
    def index(self) -> int: ...
    @property
    def admin_socket(self) -> str: ...
    @property
    def pid(self) -> int | None: ...
    @property
    def restarts(self) -> int: ...


class WorkerSet(Protocol):
    @property
    def workers(self) -> Sequence[WorkerView]: ...
    @property
    def draining(self) -> bool: ...


class FetchError(Exception):
    pass


async def admin_get(
    socket_path: str, path: str, timeout_s: float = FETCH_TIMEOUT_S
) -> tuple[int, bytes]:
    """GET `path` from a worker's admin endpoint: (status, body). Raises FetchError."""
    try:
        async with asyncio.timeout(timeout_s):
            reader, writer = await asyncio.open_unix_connection(socket_path)
            try:
                writer.write(
                    f"GET {path} HTTP/1.1\r\nHost: worker\r\nConnection: close\r\n\r\n".encode()
                )
                # The admin server answers once and closes: everything up to EOF is the answer.
                answer = await reader.read(MAX_ANSWER_BYTES)
                while chunk := await reader.read(MAX_ANSWER_BYTES):
                    answer += chunk
            finally:
                writer.close()
    except TimeoutError:
        raise FetchError(f"no answer within {timeout_s:g} s") from None
    except OSError as exc:
        raise FetchError(exc.strerror or str(exc)) from None
    head, sep, body = answer.partition(b"\r\n\r\n")
    parts = head.split(b" ", 2)
    if not sep or len(parts) < 2 or not parts[1].isdigit():
        raise FetchError("malformed answer")
    return int(parts[1]), body


class WorkersAdmin:
    """An AdminApp (proxy.ops.admin.http) over the supervisor's workers."""

    def __init__(self, supervisor: WorkerSet) -> None:
        self.supervisor = supervisor

    async def _ask(self, path: str) -> list[tuple[WorkerView, tuple[int, bytes] | str]]:
        """Every worker's answer to `path`, or why there is none."""
        workers = list(self.supervisor.workers)

        async def one(worker: WorkerView) -> tuple[int, bytes] | str:
            if worker.pid is None:
                return "not running (restarting)"
            try:
                return await admin_get(worker.admin_socket, path)
            except FetchError as exc:
                return str(exc)

        answers = await asyncio.gather(*(one(w) for w in workers))
        return list(zip(workers, answers, strict=True))

    async def metrics(self) -> bytes:
        answers = await self._ask("/metrics")
        texts = [
            (worker.index, answer[1].decode("utf-8", "replace"))
            for worker, answer in answers
            if not isinstance(answer, str) and answer[0] == 200
        ]
        up = {index for index, _ in texts}
        families = merge_families(texts)
        families += self._own_families([w for w, _ in answers], up)
        return render_families(families)

    def _own_families(self, workers: Sequence[WorkerView], up: set[int]) -> list[Metric]:
        count = GaugeMetricFamily("grpc_proxy_workers", "Worker processes configured.")
        count.add_metric([], len(workers))
        alive = GaugeMetricFamily(
            "grpc_proxy_worker_up",
            "1 when the worker is running and answered this scrape.",
            labels=["worker"],
        )
        restarts = CounterMetricFamily(
            "grpc_proxy_worker_restarts",
            "Times the supervisor started a worker again after it died.",
            labels=["worker"],
        )
        for worker in workers:
            alive.add_metric([str(worker.index)], 1 if worker.index in up else 0)
            restarts.add_metric([str(worker.index)], worker.restarts)
        return [count, alive, restarts]

    async def pool(self) -> dict[str, Any]:
        entries: list[Any] = []
        for worker, answer in await self._ask("/pool"):
            error = answer if isinstance(answer, str) else None
            if error is None:
                assert not isinstance(answer, str)
                try:
                    entries += json.loads(answer[1])["workers"]
                    continue
                except (ValueError, KeyError, TypeError):
                    error = f"unreadable /pool answer (HTTP {answer[0]})"
            entries.append(
                {
                    "worker": worker.index,
                    "pid": worker.pid,
                    "draining": self.supervisor.draining,
                    "ready": False,
                    "targets": [],
                    "error": error,
                }
            )
        return {"workers": entries}

    async def ready(self) -> tuple[bool, str]:
        return await self._all_ok("/readyz", "ready")

    async def healthy(self) -> tuple[bool, str]:
        if self.supervisor.draining:
            return False, "draining"
        return await self._all_ok("/healthz", "ok")

    async def _all_ok(self, path: str, word: str) -> tuple[bool, str]:
        problems = []
        answers = await self._ask(path)
        for worker, answer in answers:
            if isinstance(answer, str):
                problems.append(f"worker {worker.index}: {answer}")
            elif answer[0] != 200:
                reason = answer[1].decode("utf-8", "replace").strip()
                problems.append(f"worker {worker.index}: {reason}")
        if problems:
            return False, "; ".join(problems)
        return True, f"{word} ({len(answers)} workers)"


def merge_families(texts: Iterable[tuple[int, str]]) -> list[Metric]:
    """The families of several workers' expositions, one per name, each sample labelled with
    its worker."""
    merged: dict[tuple[str, str], Metric] = {}
    for index, text in texts:
        worker = str(index)
        for family in text_string_to_metric_families(text):
            key = (family.name, family.type)
            target = merged.get(key)
            if target is None:
                target = merged[key] = Metric(
                    family.name, family.documentation, family.type, family.unit
                )
            for sample in family.samples:
                target.add_sample(
                    sample.name,
                    {**sample.labels, "worker": worker},
                    sample.value,
                    sample.timestamp,
                    sample.exemplar,
                )
    return list(merged.values())


class _Families:
    def __init__(self, families: list[Metric]) -> None:
        self.families = families

    def collect(self) -> list[Metric]:
        return self.families


def render_families(families: list[Metric]) -> bytes:
    registry = CollectorRegistry(auto_describe=False)
    registry.register(_Families(families))
    return generate_latest(registry)

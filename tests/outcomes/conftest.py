"""Fixtures for the outcome tests: backends that fail on demand, listeners that drop."""

from __future__ import annotations

from collections.abc import Callable, Iterator

import pytest
from outcomes_support import ClosingListener, FlakyBackend
from proxy_process import ClosedPort


@pytest.fixture
def flaky_backends() -> Iterator[Callable[[int], list[FlakyBackend]]]:
    """Factory: ``flaky_backends(n)`` starts n echo backends named f0.. that can be told to
    answer UnaryEcho with UNAVAILABLE (``backend.fail()``). Stopped at teardown."""
    started: list[FlakyBackend] = []

    def start(count: int) -> list[FlakyBackend]:
        new = [FlakyBackend(f"f{len(started) + i}") for i in range(count)]
        started.extend(new)
        return new

    yield start
    for backend in started:
        backend.stop()


@pytest.fixture
def closing_listener() -> Iterator[ClosingListener]:
    listener = ClosingListener()
    yield listener
    listener.close()


@pytest.fixture
def closed_port() -> Iterator[ClosedPort]:
    port = ClosedPort()
    yield port
    port.close()

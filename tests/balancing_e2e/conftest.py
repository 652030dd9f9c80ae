"""Fixtures for the balancing end-to-end tests: a real etcd (as in tests/discovery) and a
backend that is always slow. Helpers and types live in ``balancing_e2e_support.py`` (import
nothing from here: several folders have a module named ``conftest``).

The etcd fixture comes from ``tests/etcd_fixture.py``, so that this folder also runs on its
own (``pytest tests/balancing_e2e``).
"""

from __future__ import annotations

from collections.abc import Iterator

import grpc
import pytest
from balancing_e2e_support import SlowBackendFactory, start_slow_backend
from etcd_fixture import etcd

__all__ = ["etcd", "slow_backend"]


@pytest.fixture
def slow_backend() -> Iterator[SlowBackendFactory]:
    """Factory: ``slow_backend(name)`` starts a backend whose every UnaryEcho takes
    SLOW_DELAY_S and answers ``backend=name`` (see ``start_slow_backend``); returns its
    address. All are stopped at teardown."""
    servers: list[grpc.Server] = []

    def start(name: str) -> str:
        server, address = start_slow_backend(name)
        servers.append(server)
        return address

    yield start
    for server in servers:
        server.stop(None).wait()

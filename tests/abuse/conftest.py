"""Fixtures for the abuse tests: a real proxy in front of a real echo backend, and a
well-behaved grpcio client that must not notice a neighbour being thrown out."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import pytest
from abuse_support import Bystander, BystanderFactory, ProxyFactory, RunningProxy
from backends import EchoBackendsFactory
from proxy_process import start_proxy


@pytest.fixture
def abuse_proxy(echo_backends: EchoBackendsFactory) -> Iterator[ProxyFactory]:
    """Factory: ``abuse_proxy(*extra_args, backend=None)`` starts the proxy in front of one echo
    backend (a new in-process one unless ``backend`` gives an address)."""
    with contextlib.ExitStack() as stack:

        def start(*extra_args: str, backend: str | None = None) -> RunningProxy:
            """`backend`: an address to relay to instead of a new in-process echo backend."""
            if backend is None:
                backend = echo_backends(1)[0].address
            args = ["serve", "--backend", backend, *extra_args]
            proc, port = stack.enter_context(start_proxy(args))
            return RunningProxy(proc, port)

        yield start


@pytest.fixture
def bystander() -> Iterator[BystanderFactory]:
    """Factory: ``bystander(proxy)`` starts a well-behaved client (tests call ``finish()``
    to check it); it is stopped at teardown in any case."""
    started: list[Bystander] = []

    def start(proxy: RunningProxy) -> Bystander:
        b = Bystander(proxy.target)
        started.append(b)
        return b.start()

    yield start
    for b in started:
        b.stop()

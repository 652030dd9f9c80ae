"""Fixtures for the end-to-end relay tests: a real proxy process in front of real backends."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import pytest
from proxy_process import ClosedPort, start_proxy
from relay_support import ClosedPortFactory, ProxyFactory, RunningProxy


@pytest.fixture
def run_proxy() -> Iterator[ProxyFactory]:
    """Factory: ``run_proxy(*backend_addresses, extra_args=())`` starts
    ``python -m proxy serve --backend A --backend B ...`` and returns a :class:`RunningProxy`.

    Channels opened with ``RunningProxy.channel()`` are closed, then the proxy is stopped,
    at teardown.
    """
    with contextlib.ExitStack() as stack:

        def start(*backends: str, extra_args: tuple[str, ...] = ()) -> RunningProxy:
            args = ["serve"]
            for address in backends:
                args += ["--backend", address]
            proc, port = stack.enter_context(start_proxy([*args, *extra_args]))
            running = RunningProxy(proc, port, [])
            stack.callback(lambda: [channel.close() for channel in running.channels])
            return running

        yield start


@pytest.fixture
def closed_port() -> Iterator[ClosedPortFactory]:
    """Factory: ``closed_port()`` reserves a port where nothing listens (connect -> refused)."""
    ports: list[ClosedPort] = []

    def make() -> ClosedPort:
        port = ClosedPort()
        ports.append(port)
        return port

    yield make
    for port in ports:
        port.close()

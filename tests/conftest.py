"""Shared fixtures: echo backends. Helpers live in ``tests/backends.py``."""

from __future__ import annotations

import subprocess
from collections.abc import Iterator

import pytest
from backends import (
    EchoBackendsFactory,
    EchoSubprocessFactory,
    start_echo_backends,
    start_echo_subprocess,
    stop_subprocess,
)

from proxy.echo.server import EchoServer


@pytest.fixture
def echo_backends() -> Iterator[EchoBackendsFactory]:
    """Factory: ``echo_backends(n)`` starts n in-process echo backends named b0..b(n-1).

    Further calls in the same test continue the numbering (b<n>, ...), so names stay
    unique. Each returned ``EchoServer`` has ``.port``, ``.address``, ``.name`` and
    ``.cancelled_calls`` / ``.wait_for_cancelled()``. All are stopped at teardown.
    """
    started: list[EchoServer] = []

    def start(count: int) -> list[EchoServer]:
        servers = start_echo_backends(count, first=len(started))
        started.extend(servers)
        return servers

    yield start
    for server in started:
        server.stop(None).wait()


@pytest.fixture
def echo_subprocess() -> Iterator[EchoSubprocessFactory]:
    """Factory: ``echo_subprocess(name=None, host=..., port=0)`` -> (Popen, port).

    See ``backends.start_echo_subprocess``; use it when a test must kill -9 the backend.

    Processes still running at teardown are terminated.
    """
    procs: list[subprocess.Popen[str]] = []

    def start(
        name: str | None = None, host: str = "127.0.0.1", port: int = 0
    ) -> tuple[subprocess.Popen[str], int]:
        proc, port = start_echo_subprocess(name, host, port)
        procs.append(proc)
        return proc, port

    yield start
    for proc in procs:
        stop_subprocess(proc)

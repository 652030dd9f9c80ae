"""Shared fixtures: echo backends and test CAs. Helpers live in ``tests/backends.py`` and
``tests/tls_support.py``."""

from __future__ import annotations

import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest
from backends import (
    EchoBackendsFactory,
    EchoSubprocessFactory,
    TLSEchoBackendsFactory,
    start_echo_backends,
    start_echo_subprocess,
    start_tls_echo_backends,
    stop_subprocess,
)
from tls_support import CertFiles, TestCA

from proxy_examples.echo.server import EchoServer


@pytest.fixture
def tls_ca(tmp_path: Path) -> TestCA:
    """A fresh root CA in ``tmp_path/tls-ca``; issue with ``tls_ca.issue_server(name)`` and
    ``tls_ca.issue_client(name, uris=...)``. Per test, so tests may overwrite its files."""
    return TestCA.create(tmp_path / "tls-ca", "test-ca")


@pytest.fixture
def other_ca(tmp_path: Path) -> TestCA:
    """A second root CA that nothing trusts: its certificates must be refused."""
    return TestCA.create(tmp_path / "other-ca", "other-ca")


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
def tls_echo_backends() -> Iterator[TLSEchoBackendsFactory]:
    """Factory: ``tls_echo_backends(n, certs, client_ca=None)`` starts n in-process TLS echo
    backends named tls0..tls(n-1) (numbering continues across calls), stopped at teardown.

    See ``backends.start_tls_echo_backends``; ``client_ca`` makes them require client
    certificates and report the caller in ``x-peer-*`` metadata.
    """
    started: list[EchoServer] = []

    def start(count: int, certs: CertFiles, client_ca: Path | None = None) -> list[EchoServer]:
        servers = start_tls_echo_backends(count, certs, client_ca, first=len(started))
        started.extend(servers)
        return servers

    yield start
    for server in started:
        server.stop(None).wait()


@pytest.fixture
def echo_subprocess() -> Iterator[EchoSubprocessFactory]:
    """Factory: ``echo_subprocess(name=None, host=..., port=0, *, certs=None, client_ca=None)``
    -> (Popen, port).

    See ``backends.start_echo_subprocess``; use it when a test must kill -9 the backend, or
    needs a TLS backend in its own process (``certs``: a ``CertFiles`` to serve).

    Processes still running at teardown are terminated.
    """
    procs: list[subprocess.Popen[str]] = []

    def start(
        name: str | None = None,
        host: str = "127.0.0.1",
        port: int = 0,
        *,
        certs: CertFiles | None = None,
        client_ca: Path | None = None,
    ) -> tuple[subprocess.Popen[str], int]:
        proc, port = start_echo_subprocess(name, host, port, certs=certs, client_ca=client_ca)
        procs.append(proc)
        return proc, port

    yield start
    for proc in procs:
        stop_subprocess(proc)

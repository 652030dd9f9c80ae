"""Fixtures for the gRPC-Web tests: a proxy process with gRPC-Web on, in front of two
in-process echo backends, shared by the tests of a module (starting one takes a second).
Helpers and types live in ``grpcweb_support.py`` (import nothing from here: several folders
have a module named ``conftest``); the etcd fixture comes from ``tests/etcd_fixture.py``.
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from backends import start_echo_backends
from etcd_fixture import etcd
from grpcweb_support import ALLOWED_ORIGIN, WebProxy
from proxy_process import start_proxy

__all__ = ["etcd", "web_proxy"]


@pytest.fixture(scope="module")
def web_proxy() -> Iterator[WebProxy]:
    """gRPC-Web on (the default), one allowed origin, a custom request and response header
    allowed through CORS, round robin over backends b0 and b1."""
    backends = start_echo_backends(2)
    args = ["serve", "--cors-allowed-origins", ALLOWED_ORIGIN]
    args += ["--cors-allow-headers", "x-pin", "--cors-expose-headers", "x-backend"]
    for backend in backends:
        args += ["--backend", backend.address]
    try:
        with start_proxy(args) as (_proc, port):
            yield WebProxy(port, backends)
    finally:
        for backend in backends:
            backend.stop(None).wait()

